//! qwick's quantizers land at least as close to the original values as ggml's own (what
//! llama-quantize writes without an importance matrix): per type and test matrix, the rms error
//! of quantizing then dequantizing stays within 1% of ggml's, and so does every row of the
//! matrix of special cases (zeros, constants, outliers, tiny and huge values). The references
//! are `tests/quantize/errors.json` (written by `python/make_quantize_refs.py`).

use qwick_backend::Format;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/quantize")
}

fn rms(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    (s / a.len() as f64).sqrt()
}

/// Within 1% of the reference, or below a floor of float noise relative to the values.
fn close_enough(got: f64, want: f64, scale: f64) -> bool {
    got.is_finite() && got <= want * 1.01 + 1e-7 * scale
}

#[test]
fn rms_error_is_within_ggml_s_for_every_type_and_matrix() {
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("errors.json")).unwrap()).unwrap();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for (ty, per) in refs["errors"].as_object().unwrap() {
        let f = Format::from_name(ty).unwrap();
        for (m, want) in per.as_object().unwrap() {
            let (shape, x) = qwick_model::npy::read_f32(&dir().join(format!("{m}.npy"))).unwrap();
            let (rows, cols) = (shape[0], shape[1]);
            let mut q = vec![0u8; f.bytes_for(x.len()).unwrap()];
            qwick_backend::quant::quantize::quantize_rows(f, &x, rows, &mut q, 2);
            if let Some(b) = want["bytes"].as_u64() {
                assert_eq!(q.len() as u64, b, "{ty} {m}: size");
            }
            let y = f.to_f32_vec(&q);
            let scale = (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
            let (got, ref_rms) = (rms(&x, &y), want["rms"].as_f64().unwrap());
            report.push(format!("{ty:7} {m:6} qwick/ggml {:.4}", got / ref_rms.max(1e-30)));
            if !close_enough(got, ref_rms, scale) {
                failures.push(format!("{ty} {m}: rms {got:.4e}, ggml {ref_rms:.4e}"));
            }
            if let Some(rr) = want["row_rms"].as_array() {
                for (r, w) in rr.iter().enumerate() {
                    let (xs, ys) = (&x[r * cols..(r + 1) * cols], &y[r * cols..(r + 1) * cols]);
                    let g = rms(xs, ys);
                    let rs = (xs.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / cols as f64).sqrt();
                    if !close_enough(g, w.as_f64().unwrap(), rs) {
                        failures.push(format!("{ty} {m} row {r}: rms {g:.4e}, ggml {:.4e}", w.as_f64().unwrap()));
                    }
                }
            }
            checked += 1;
        }
    }
    println!("{}", report.join("\n"));
    assert!(checked >= 12 * 3, "only {checked} cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
