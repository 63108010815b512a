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
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::I32];

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
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
