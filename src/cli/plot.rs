//! SVG plots for the eval commands (`--plot FILE.svg`): labelled points, one series per method.

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use std::path::Path;

/// One series: a name and its (x, y, point label) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64, String)>,
    /// Join the points with a line in x order (a method swept over a parameter).
    pub joined: bool,
}

/// A scatter-with-lines plot of `series` written to `path` as SVG.
pub fn write_svg(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| (p.0, p.1)))
        .collect();
    if all.is_empty() {
        bail!("nothing to plot");
    }
    let span = |v: &mut dyn Iterator<Item = f64>| {
        let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
        let pad = ((hi - lo) * 0.08).max(1e-9 + hi.abs() * 0.02);
        (lo - pad)..(hi + pad)
    };
    let xr = span(&mut all.iter().map(|p| p.0));
    let yr = span(&mut all.iter().map(|p| p.1));
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (820, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(xr.clone(), yr.clone())?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mut pts = s.points.clone();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let line = if s.joined { pts.clone() } else { Vec::new() };
            chart
                .draw_series(LineSeries::new(
                    line.iter().map(|p| (p.0, p.1)),
                    color.stroke_width(2),
                ))?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|p| {
                EmptyElement::at((p.0, p.1))
                    + Circle::new((0, 0), 4, color.filled())
                    + Text::new(p.2.clone(), (6, -14), ("sans-serif", 12))
            }))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("writing {}", path.display()))
}
