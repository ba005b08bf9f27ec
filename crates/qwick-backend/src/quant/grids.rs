//! IQ lookup tables. The grids are GGML's, written to `grids/*.hex` (one row a hex
//! number, element j in byte j) by `python3 python/make_quant_tables.py` from the `gguf`
//! Python package 0.19.0, and parsed here at compile time.

/// IQ1_S / IQ1_M: the offset added to every grid value, negated where the block says so.
pub const IQ1S_DELTA: f32 = 0.125;

/// The `N` whitespace-separated hex numbers of `text`; a compile error if it holds another
/// count or a character that is neither a hex digit nor white space.
const fn hex_rows<const N: usize>(text: &str) -> [u64; N] {
    let bytes = text.as_bytes();
    let mut rows = [0u64; N];
    let (mut i, mut n, mut open) = (0, 0, false);
    while i < bytes.len() {
        let c = bytes[i];
        let digit = match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b' ' | b'\n' => None,
            _ => panic!("grid tables hold hex digits and white space only"),
        };
        match digit {
            Some(d) => {
                assert!(n < N, "grid table longer than its type");
                rows[n] = rows[n] << 4 | d as u64;
                open = true;
            }
            None if open => {
                n += 1;
                open = false;
            }
            None => {}
        }
        i += 1;
    }
    assert!(n == N, "grid table shorter than its type");
    rows
}

/// `hex_rows` for tables of 4-byte rows.
const fn hex_rows_u32<const N: usize>(text: &str) -> [u32; N] {
    let wide = hex_rows::<N>(text);
    let mut rows = [0u32; N];
    let mut i = 0;
    while i < N {
        assert!(wide[i] <= u32::MAX as u64, "grid row wider than 4 bytes");
        rows[i] = wide[i] as u32;
        i += 1;
    }
    rows
}

/// IQ2_XXS grid: 256 rows of 8 magnitudes (bytes 0x08, 0x19, 0x2b), element j in byte j.
pub static IQ2XXS_GRID: [u64; 256] = hex_rows(include_str!("grids/iq2xxs.hex"));

/// IQ2_XS grid: 512 rows of 8 magnitudes (bytes 0x08, 0x19, 0x2b), element j in byte j.
pub static IQ2XS_GRID: [u64; 512] = hex_rows(include_str!("grids/iq2xs.hex"));

/// IQ2_S grid: 1024 rows of 8 magnitudes (bytes 0x08, 0x19, 0x2b), element j in byte j.
pub static IQ2S_GRID: [u64; 1024] = hex_rows(include_str!("grids/iq2s.hex"));

/// IQ3_XXS grid: 256 rows of 4 magnitudes (bytes 0x04 … 0x3e), element j in byte j.
pub static IQ3XXS_GRID: [u32; 256] = hex_rows_u32(include_str!("grids/iq3xxs.hex"));

/// IQ3_S grid: 512 rows of 4 magnitudes (odd bytes 0x01 … 0x0f), element j in byte j.
pub static IQ3S_GRID: [u32; 512] = hex_rows_u32(include_str!("grids/iq3s.hex"));

/// IQ1_S / IQ1_M grid: 2048 rows of 8 values -1, 0, 1 stored as `i8` bytes, element j in byte j.
pub static IQ1S_GRID: [u64; 2048] = hex_rows(include_str!("grids/iq1s.hex"));

/// Sign patterns of the IQ2/IQ3 types: a 7-bit index gives 8 sign bits (bit j set: element j
/// negative); bit 7 is the parity of the other seven, so the count of negatives is even.
pub static KSIGNS_IQ2XS: [u8; 128] = {
    let mut signs = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        signs[i] = i as u8 | ((i.count_ones() as u8 & 1) << 7);
        i += 1;
    }
    signs
};

/// The 16 non-linear levels of IQ4_NL and IQ4_XS, indexed by a 4-bit quant.
#[rustfmt::skip]
pub static KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];
