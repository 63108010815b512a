//! Tensor types: element types, dimensions with a symbolic sequence length, shapes.

use std::fmt;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    /// Block-quantized (ggml's Q8_0): blocks of 32 along the last axis, an f16
    /// scale `d` and 32 i8 `q`; x = d·q. Packed layout: `crate::quant`.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// ggml's Q4_0: an f16 scale and 32 4-bit `q`; x = d·(q − 8).
    #[serde(rename = "q4_0")]
    Q4_0,
    /// ggml's Q4_1: f16 scale `d` and minimum `m`, 32 4-bit `q`; x = d·q + m.
    #[serde(rename = "q4_1")]
    Q4_1,
}

impl DType {
    pub const ALL: [DType; 7] = [DType::F32, DType::F16, DType::BF16, DType::I32, DType::Q8_0, DType::Q4_0, DType::Q4_1];

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
        }
    }

    /// Block-quantized: the data is packed blocks, not one value per element.
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8_0 | DType::Q4_0 | DType::Q4_1)
    }

    /// A 16-bit float (f16, bf16): weights stored so are widened to f32 as
    /// they are read (matmul weights and embedding tables).
    pub fn is_half(self) -> bool {
        matches!(self, DType::F16 | DType::BF16)
    }

    /// Stored in a type that kernels widen as they read it (block-quantized or
    /// 16-bit float): allowed only as matmul weights and embedding tables.
    pub fn is_packed_weight(self) -> bool {
        self.is_quantized() || self.is_half()
    }

    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }

    /// Bytes of `numel` elements as stored (quantized types: whole blocks of
    /// `crate::quant::QK`; `None` when `numel` is not a whole number of blocks).
    pub fn storage_bytes(self, numel: usize) -> Option<usize> {
        match self {
            DType::F32 | DType::I32 => numel.checked_mul(4),
            DType::F16 | DType::BF16 => numel.checked_mul(2),
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
                numel.is_multiple_of(crate::quant::QK).then(|| numel / crate::quant::QK * crate::quant::block_bytes(self))
            }
        }
    }
}

/// One dimension: a fixed extent or the symbolic sequence length `seq`,
/// bound when the graph runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Dim {
    Fixed(u64),
    Seq,
}

impl Dim {
    pub fn resolve(self, seq: u64) -> u64 {
        match self {
            Dim::Fixed(n) => n,
            Dim::Seq => seq,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Seq => f.write_str("seq"),
        }
    }
}

/// A number of elements as a monomial in `seq`: `coef * seq^seq_pow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SymSize {
    pub coef: u64,
    pub seq_pow: u32,
}

impl SymSize {
    pub fn resolve(self, seq: u64) -> u64 {
        self.coef * seq.pow(self.seq_pow)
    }

    /// `resolve`, or `None` where it overflows.
    pub fn checked_resolve(self, seq: u64) -> Option<u64> {
        seq.checked_pow(self.seq_pow).and_then(|p| p.checked_mul(self.coef))
    }

    pub fn of_dims(dims: &[Dim]) -> SymSize {
        dims.iter().fold(SymSize { coef: 1, seq_pow: 0 }, |acc, d| match d {
            Dim::Fixed(n) => SymSize { coef: acc.coef * n, ..acc },
            Dim::Seq => SymSize { seq_pow: acc.seq_pow + 1, ..acc },
        })
    }
}

impl fmt::Display for SymSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seq_pow {
            0 => write!(f, "{}", self.coef),
            1 => write!(f, "{}*seq", self.coef),
            p => write!(f, "{}*seq^{p}", self.coef),
        }
    }
}

/// The type of a value: element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TensorType {
    pub dtype: DType,
    pub dims: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, dims: Vec<Dim>) -> Self {
        TensorType { dtype, dims }
    }

    pub fn f32(dims: &[Dim]) -> Self {
        TensorType { dtype: DType::F32, dims: dims.to_vec() }
    }

    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    pub fn numel(&self) -> SymSize {
        SymSize::of_dims(&self.dims)
    }

    pub fn has_seq(&self) -> bool {
        self.dims.contains(&Dim::Seq)
    }

    /// Extents with `seq` bound.
    pub fn resolve(&self, seq: u64) -> Vec<usize> {
        self.dims.iter().map(|d| d.resolve(seq) as usize).collect()
    }

    pub fn last_dim(&self) -> Option<Dim> {
        self.dims.last().copied()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype.name())?;
        for (i, d) in self.dims.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}
