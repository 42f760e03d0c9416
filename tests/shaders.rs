//! Every WGSL kernel, in every specialization the engine uses, goes through naga: parsed,
//! validated, overrides applied, and translated to SPIR-V, MSL, HLSL and GLSL.

use kvpack::gpu::{shader_names, shader_source, SHADER_FILES};
use naga::back::{glsl, hlsl, msl, spv, PipelineConstants};
use naga::valid::{Capabilities, ValidationFlags, Validator};

/// (kind, bits_a, bits_b) for every vector format: f32, f16, q8_0, q4_0, turbo1..4,
/// prod 1..4 (MSE bits b−1), split 2.5 and 3.5.
const FORMATS: &[(u32, u32, u32)] = &[
    (0, 0, 0),
    (1, 0, 0),
    (2, 0, 0),
    (3, 0, 0),
    (4, 1, 0),
    (4, 2, 0),
    (4, 3, 0),
    (4, 4, 0),
    (5, 0, 0),
    (5, 1, 0),
    (5, 2, 0),
    (5, 3, 0),
    (6, 3, 2),
    (6, 4, 3),
];

/// GGML weight types the model kernels read: F32, F16, Q4_0, Q4_1, Q8_0.
const WEIGHT_TYPES: &[f64] = &[0.0, 1.0, 2.0, 3.0, 8.0];

/// Specializations of the model kernels (`shaders/model/`), or `None` for other kernels.
fn model_variants(name: &str) -> Option<Vec<Vec<(&'static str, f64)>>> {
    let mut out = Vec::new();
    match name {
        "model/matmul" => {
            for &t in WEIGHT_TYPES {
                for (lanes, toks, acc) in [(8.0, 1.0, 0.0), (32.0, 8.0, 1.0), (4.0, 4.0, 0.0)] {
                    out.push(vec![
                        ("WTYPE", t),
                        ("WG", 64.0),
                        ("LANES", lanes),
                        ("TOKS", toks),
                        ("ACCUMULATE", acc),
                    ]);
                }
            }
        }
        "model/matmul_cpu" => {
            for &t in WEIGHT_TYPES {
                for (rows, toks, acc) in [(2.0, 1.0, 0.0), (4.0, 10.0, 1.0), (1.0, 16.0, 0.0)] {
                    out.push(vec![
                        ("WTYPE", t),
                        ("WG", 64.0 / rows),
                        ("ROWS", rows),
                        ("TOKS", toks),
                        ("ACCUMULATE", acc),
                    ]);
                }
            }
        }
        "model/embed" => {
            for &t in WEIGHT_TYPES {
                out.push(vec![("WTYPE", t), ("WG", 64.0)]);
            }
        }
        n if n.starts_with("model/") => out.push(vec![("WG", 256.0)]),
        "kv/center" => {
            for mean in [0.0, 1.0] {
                out.push(vec![("MEAN", mean), ("WG", 64.0)]);
            }
        }
        "attention/prompt_tiles" => out.push(vec![]),
        "attention/prompt_rows" => {
            // f32 and f16 keys and values, bias on and off.
            for d in [64.0, 128.0] {
                for (kf16, vf16, bias) in [
                    (0.0, 0.0, 0.0),
                    (1.0, 1.0, 1.0),
                    (0.0, 1.0, 1.0),
                    (1.0, 0.0, 0.0),
                ] {
                    out.push(vec![
                        ("D", d),
                        ("K_F16", kf16),
                        ("V_F16", vf16),
                        ("HAS_BIAS", bias),
                        ("WG", 64.0),
                    ]);
                }
            }
        }
        "compact/scores" | "compact/scores_rows" => {
            for d in [32.0, 64.0, 128.0, 256.0] {
                out.push(vec![("D", d), ("WG", 64.0)]);
            }
        }
        _ => return None,
    }
    Some(out)
}

fn variants(name: &str) -> Vec<Vec<(&'static str, f64)>> {
    if let Some(v) = model_variants(name) {
        return v;
    }
    let mut out = Vec::new();
    for &d in &[64.0, 128.0] {
        for &(kind, a, b) in FORMATS {
            let mut c = vec![
                ("D", d),
                ("FMT_KIND", kind as f64),
                ("FMT_BITS_A", a as f64),
                ("FMT_BITS_B", b as f64),
            ];
            match name {
                "attention/decode" => {
                    // K format varies with V fixed and V with K fixed, bias on and off.
                    let mut k = c.clone();
                    k[1] = ("FMT_KIND", 4.0);
                    k[2] = ("FMT_BITS_A", 2.0);
                    k.extend([
                        ("K_KIND", kind as f64),
                        ("K_BITS_A", a as f64),
                        ("K_BITS_B", b as f64),
                        ("HAS_BIAS", 1.0),
                        ("WG", 128.0),
                    ]);
                    // Codebook lookups by indexed loads and by selects (CPU adapters); one
                    // query head per workgroup, and the default model's 3 sharing a KV head.
                    for sel in [0.0, 1.0] {
                        for gq in [1.0, 3.0] {
                            let mut k = k.clone();
                            k.extend([("CB_SELECT", sel), ("GQ", gq)]);
                            out.push(k);
                        }
                    }
                    c.extend([
                        ("K_KIND", 1.0),
                        ("HAS_BIAS", 0.0),
                        ("WG", d.max(128.0)),
                        ("CB_SELECT", 1.0),
                    ]);
                }
                "gpu/copy" => c.clear(),
                "codec/encode" => {
                    // Input as f32, as f16, and as f16 in the codec's rotated domain.
                    c.push(("WG", d));
                    for src in [1.0, 2.0] {
                        out.push([c.clone(), vec![("SRC", src)]].concat());
                    }
                }
                _ => c.push(("WG", d)),
            }
            out.push(c);
        }
    }
    // The full-precision copies: values in a TurboQuant codec's rotated domain as f32 (kind 7) or
    // f16 (kind 8), written by the encoder and read by attention beside f16 keys, and attention
    // over centered keys.
    for &d in &[64.0, 128.0] {
        for kind in [7.0, 8.0] {
            for (a, b) in [(3.0, 0.0), (3.0, 2.0)] {
                let c = vec![
                    ("D", d),
                    ("FMT_KIND", kind),
                    ("FMT_BITS_A", a),
                    ("FMT_BITS_B", b),
                ];
                match name {
                    "codec/encode" => out.push([c, vec![("WG", d)]].concat()),
                    "attention/decode" => out.push(
                        [
                            c,
                            vec![("K_KIND", 1.0), ("HAS_BIAS", 0.0), ("WG", d.max(128.0))],
                        ]
                        .concat(),
                    ),
                    _ => {}
                }
            }
        }
        if name == "attention/decode" {
            out.push(vec![
                ("D", d),
                ("FMT_KIND", 4.0),
                ("FMT_BITS_A", 2.0),
                ("K_KIND", 4.0),
                ("K_BITS_A", 3.0),
                ("HAS_CENTER", 1.0),
                ("WG", d.max(128.0)),
            ]);
        }
    }
    out.dedup();
    out
}

#[test]
fn every_shader_file_is_registered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut on_disk = Vec::new();
    for sub in std::fs::read_dir(&dir).unwrap() {
        let sub = sub.unwrap().path();
        for f in std::fs::read_dir(&sub).unwrap() {
            let f = f.unwrap().path();
            let rel = f
                .strip_prefix(&dir)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            on_disk.push(rel);
        }
    }
    on_disk.sort();
    let mut registered: Vec<String> = SHADER_FILES.iter().map(|(p, _)| p.to_string()).collect();
    registered.sort();
    assert_eq!(on_disk, registered, "shaders/ and SHADER_FILES differ");
}

#[test]
fn every_kernel_translates_to_all_backends() {
    let names = shader_names();
    assert!(names.len() >= 5, "too few kernels: {names:?}");
    for name in names {
        let src = shader_source(name).unwrap();
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
        let info = Validator::new(
            ValidationFlags::all(),
            Capabilities::SHADER_FLOAT16_IN_FLOAT32,
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
        let ep = module.entry_points[0].name.clone();
        for consts in variants(name) {
            let mut pc = PipelineConstants::default();
            for (k, v) in &consts {
                pc.insert(k.to_string(), *v);
            }
            let (m, i) = naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some((naga::ShaderStage::Compute, &ep)),
                &pc,
            )
            .unwrap_or_else(|e| panic!("{name} {consts:?}: overrides: {e:?}"));
            let ctx = format!("{name} {consts:?}");
            spv::write_vec(&m, &i, &spv::Options::default(), None)
                .unwrap_or_else(|e| panic!("{ctx}: SPIR-V: {e:?}"));
            let msl_opts = msl::Options {
                lang_version: (2, 4),
                ..Default::default()
            };
            msl::write_string(&m, &i, &msl_opts, &msl::PipelineOptions::default())
                .unwrap_or_else(|e| panic!("{ctx}: MSL: {e:?}"));
            let mut hlsl_out = String::new();
            let hlsl_opts = hlsl::Options::default();
            let hlsl_pipe = hlsl::PipelineOptions::default();
            hlsl::Writer::new(&mut hlsl_out, &hlsl_opts, &hlsl_pipe)
                .write(&m, &i, None)
                .unwrap_or_else(|e| panic!("{ctx}: HLSL: {e:?}"));
            let mut glsl_out = String::new();
            let glsl_opts = glsl::Options {
                version: glsl::Version::Embedded {
                    version: 310,
                    is_webgl: false,
                },
                ..Default::default()
            };
            let glsl_pipe = glsl::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: ep.clone(),
                multiview: None,
            };
            glsl::Writer::new(
                &mut glsl_out,
                &m,
                &i,
                &glsl_opts,
                &glsl_pipe,
                naga::proc::BoundsCheckPolicies::default(),
            )
            .and_then(|mut w| w.write())
            .unwrap_or_else(|e| panic!("{ctx}: GLSL: {e:?}"));
        }
    }
}
