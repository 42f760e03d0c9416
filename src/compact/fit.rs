//! The small solves of Attention Matching on the CPU (nalgebra, f64): non-negative least squares
//! for the mass weights w = exp(β) and ridge least squares for the fitted values.

use nalgebra::{DMatrix, DVector};

/// Non-negative least squares min ‖A w − b‖², w ≥ 0, by projected coordinate descent on the
/// normal equations (t is small: the Gram matrix is t × t). `w` holds the starting point and
/// receives the solution. `ridge` (relative to the mean diagonal) keeps flat directions tame.
pub fn nnls(a: &DMatrix<f64>, b: &DVector<f64>, w: &mut DVector<f64>, sweeps: usize, ridge: f64) {
    if a.ncols() == 0 {
        return;
    }
    nnls_gram(a.tr_mul(a), &a.tr_mul(b), w, sweeps, ridge);
}

/// [`nnls`] given the normal equations: the Gram matrix `g` = AᵀA (t × t, consumed) and
/// `c` = Aᵀb. Greedy selections that grow A one column at a time keep `g` up to date instead
/// of recomputing it.
pub fn nnls_gram(
    mut g: DMatrix<f64>,
    c: &DVector<f64>,
    w: &mut DVector<f64>,
    sweeps: usize,
    ridge: f64,
) {
    let t = g.ncols();
    if t == 0 {
        return;
    }
    let mean_diag = g.diagonal().sum() / t as f64;
    for j in 0..t {
        g[(j, j)] += ridge * mean_diag + f64::MIN_POSITIVE;
    }
    // grad = G w − c
    let mut grad = &g * &*w - c;
    for _ in 0..sweeps {
        let mut moved = 0.0f64;
        let mut scale = 0.0f64;
        for j in 0..t {
            let old = w[j];
            let new = (old - grad[j] / g[(j, j)]).max(0.0);
            let delta = new - old;
            if delta != 0.0 {
                w[j] = new;
                grad.axpy(delta, &g.column(j), 1.0);
                moved = moved.max(delta.abs());
            }
            scale = scale.max(new.abs());
        }
        if moved <= 1e-9 * scale.max(1e-300) {
            break;
        }
    }
}

/// Ridge least squares toward a prior: argmin_X ‖A X − Y‖² + λ‖X − X₀‖², λ = `ridge` × the mean
/// diagonal of AᵀA. Returns `prior` unchanged when the system cannot be factored.
pub fn ridge_toward(
    a: &DMatrix<f64>,
    y: &DMatrix<f64>,
    prior: &DMatrix<f64>,
    ridge: f64,
) -> DMatrix<f64> {
    let t = a.ncols();
    if t == 0 {
        return prior.clone();
    }
    let mut g = a.tr_mul(a);
    let lambda = (ridge * g.diagonal().sum() / t as f64).max(1e-12);
    for j in 0..t {
        g[(j, j)] += lambda;
    }
    let rhs = a.tr_mul(y) + prior * lambda;
    match g.cholesky() {
        Some(ch) => ch.solve(&rhs),
        None => prior.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nnls_recovers_a_nonnegative_solution_and_clips_negative_ones() {
        // Columns independent; the truth has a zero and positive entries.
        let a = DMatrix::from_row_slice(
            5,
            3,
            &[
                1.0, 0.2, 0.0, 0.3, 1.0, 0.1, 0.0, 0.4, 1.0, 0.5, 0.5, 0.5, 0.2, 0.1, 0.9,
            ],
        );
        let truth = DVector::from_vec(vec![2.0, 0.0, 3.0]);
        let b = &a * &truth;
        let mut w = DVector::from_element(3, 1.0);
        nnls(&a, &b, &mut w, 2000, 0.0);
        for j in 0..3 {
            assert!((w[j] - truth[j]).abs() < 1e-6, "{w}");
        }
        // The unconstrained solution would be negative: NNLS stops at zero.
        let b = &a * DVector::from_vec(vec![1.0, -1.0, 1.0]);
        let mut w = DVector::from_element(3, 1.0);
        nnls(&a, &b, &mut w, 2000, 0.0);
        assert!(w.iter().all(|&x| x >= 0.0));
        assert_eq!(w[1], 0.0);
    }

    #[test]
    fn ridge_solves_a_well_posed_system() {
        let a = DMatrix::from_row_slice(3, 2, &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let x = DMatrix::from_row_slice(2, 2, &[1.0, 2.0, -1.0, 0.5]);
        let y = &a * &x;
        let got = ridge_toward(&a, &y, &DMatrix::zeros(2, 2), 1e-10);
        assert!((got - x).abs().max() < 1e-6);
    }
}
