//! The scalar dequantization of every quantized format against the `gguf` Python package's
//! (`tests/quant_refs`, written by `python3 python/make_quant_refs.py`), bit for bit.

use std::path::PathBuf;

use qwick_backend::quant::dequant::{dequantize, random_blocks};
use qwick_backend::Format;

/// The quantized formats (every format that is not a plain float).
fn quantized() -> impl Iterator<Item = Format> {
    Format::ALL.iter().copied().filter(|f| !f.is_float())
}

/// A format's fixture: the raw blocks and gguf's dequantization of them.
fn fixture(format: Format) -> (Vec<u8>, Vec<f32>) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/quant_refs").join(format!("{format}.bin"));
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let per_block = format.block_bytes() + 4 * format.block();
    assert!(
        !data.is_empty() && data.len().is_multiple_of(per_block),
        "{}: {} bytes is not a whole number of {per_block}-byte {format} records",
        path.display(),
        data.len()
    );
    let blocks = data.len() / per_block;
    let (raw, values) = data.split_at(blocks * format.block_bytes());
    let want = values.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    (raw.to_vec(), want)
}

/// Panics at the first value whose bits differ, naming type, block and index.
fn assert_bits_eq(format: Format, what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{format} {what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        let block = format.block();
        panic!(
            "{format} {what}: block {} index {}: got {:e} ({:#010x}), want {:e} ({:#010x})",
            i / block,
            i % block,
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

#[test]
fn every_quantized_format_matches_gguf_bit_for_bit() {
    for format in quantized() {
        let (raw, want) = fixture(format);
        let mut got = vec![f32::NAN; want.len()];
        dequantize(format, &raw, &mut got);
        assert_bits_eq(format, "dequantize", &got, &want);
        // The method on Format is the same function.
        let mut again = vec![f32::NAN; want.len()];
        format.dequantize(&raw, &mut again);
        assert_bits_eq(format, "Format::dequantize", &again, &want);
    }
}

#[test]
fn fixtures_cover_zero_and_ff_quant_bytes() {
    // The last four blocks of every fixture have all quant bytes 0x00 (two) and 0xFF (two).
    for format in quantized() {
        let (raw, _) = fixture(format);
        let bytes = format.block_bytes();
        let blocks: Vec<&[u8]> = raw.chunks_exact(bytes).collect();
        assert!(blocks.len() >= 8, "{format}: {} blocks", blocks.len());
        let tail = &blocks[blocks.len() - 4..];
        // Scale fields take at most 4 of a block's bytes (IQ1_M's 4 nibbles take 2 bytes' worth).
        let zeros = |b: &[u8]| b.iter().filter(|&&x| x == 0).count();
        let ffs = |b: &[u8]| b.iter().filter(|&&x| x == 0xFF).count();
        assert!(tail[..2].iter().all(|b| zeros(b) + 8 >= bytes), "{format}: no all-0x00 blocks");
        assert!(tail[2..].iter().all(|b| ffs(b) + 8 >= bytes), "{format}: no all-0xFF blocks");
    }
}

#[test]
fn to_f32_vec_and_get_agree_with_dequantize() {
    for format in Format::ALL.iter().copied() {
        let raw = if format.is_float() { random_blocks(format, 64, 7) } else { fixture(format).0 };
        let mut want = vec![0f32; raw.len() / format.block_bytes() * format.block()];
        dequantize(format, &raw, &mut want);
        assert_bits_eq(format, "to_f32_vec", &format.to_f32_vec(&raw), &want);
        // A trailing partial block is ignored by to_f32_vec.
        let mut ragged = raw.clone();
        ragged.push(0xAB);
        assert_bits_eq(format, "to_f32_vec (ragged)", &format.to_f32_vec(&ragged), &want);
        let got: Vec<f32> = (0..want.len()).map(|i| format.get(&raw, i)).collect();
        assert_bits_eq(format, "get", &got, &want);
    }
}

#[test]
fn random_blocks_dequantize_to_small_finite_values() {
    for format in Format::ALL.iter().copied() {
        let blocks = 16;
        let raw = random_blocks(format, blocks, 42);
        assert_eq!(raw.len(), blocks * format.block_bytes(), "{format}");
        assert_eq!(raw, random_blocks(format, blocks, 42), "{format}: not deterministic");
        assert_ne!(raw, random_blocks(format, blocks, 43), "{format}: seed ignored");
        let y = format.to_f32_vec(&raw);
        assert_eq!(y.len(), blocks * format.block());
        if let Some((i, v)) = y.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            panic!("{format}: value {i} is {v}");
        }
        let max = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mean = y.iter().map(|v| v.abs() as f64).sum::<f64>() / y.len() as f64;
        assert!(max <= 0.2, "{format}: max |w| {max}");
        assert!((0.002..=0.1).contains(&mean), "{format}: mean |w| {mean}");
    }
}

#[test]
fn any_bytes_dequantize_without_panicking() {
    // Every byte value in every position (a ramp shifted per block), scales included.
    for format in Format::ALL.iter().copied() {
        let bytes = format.block_bytes();
        let raw: Vec<u8> = (0..256 * bytes).map(|i| (i + i / bytes) as u8).collect();
        let mut y = vec![0f32; 256 * format.block()];
        dequantize(format, &raw, &mut y);
    }
}
