//! Borrowed views of stored weights: their format, shape and how their bytes are laid out.

use crate::format::Format;

/// How a weight's bytes are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row after row, each a run of the format's blocks: the layout of checkpoint files.
    Rows,
    /// Groups of 16 rows interleaved for the integer kernels (see [`crate::quant::tiles`]), or
    /// bf16 in AMX's tiles ([`crate::quant::tiles::bf16`]).
    Tiles,
    /// A float weight stored transposed: `cols` rows of `rows` values (`y = x · stored`). AMX,
    /// the bf16 dot-product GEMM and the AVX-512 f32 GEMM read it as it is (see
    /// [`crate::matmul::reads_transposed`]); other products transpose the weight for the call.
    Transposed,
}

/// A borrowed 2-D weight, `rows` output features by `cols` input features.
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    pub format: Format,
    pub layout: Layout,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> WeightView<'a> {
    /// A weight in the file's layout: `rows` rows, each a run of `format` blocks.
    pub fn new(format: Format, data: &'a [u8], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * format.row_bytes(cols), "weight buffer size does not match its shape");
        WeightView { format, layout: Layout::Rows, data, rows, cols }
    }

    /// A weight converted to tiles by [`crate::quant::repack_into`].
    pub fn tiles(format: Format, data: &'a [u8], rows: usize, cols: usize) -> Self {
        let bytes = match format {
            Format::BF16 => crate::quant::tiles::bf16::bytes(rows, cols),
            _ => crate::quant::tiles::spec(format).expect("tiles of a format without a tile layout").bytes(rows, cols),
        };
        assert_eq!(data.len(), bytes, "tile buffer size does not match its shape");
        WeightView { format, layout: Layout::Tiles, data, rows, cols }
    }

    /// A float weight of `rows` outputs by `cols` inputs given as its transpose (`cols` rows of
    /// `rows` values, e.g. a `Linear` weight read backwards for `dx = dy · W`).
    pub fn transposed(format: Format, data: &'a [u8], rows: usize, cols: usize) -> Self {
        assert!(format.is_float(), "only float weights are read transposed");
        assert_eq!(data.len(), cols * format.row_bytes(rows), "weight buffer size does not match its shape");
        WeightView { format, layout: Layout::Transposed, data, rows, cols }
    }

    pub fn from_f32(data: &'a [f32], rows: usize, cols: usize) -> Self {
        // Any initialised f32 slice is also a valid byte slice of four times the length.
        let bytes = crate::format::f32_bytes(data);
        WeightView::new(Format::F32, bytes, rows, cols)
    }

    /// Bytes of one row in the file's layout.
    pub fn row_bytes(&self) -> usize {
        self.format.row_bytes(self.cols)
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}
