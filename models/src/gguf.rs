//! GGUF v2/v3 files: header, metadata, tensor infos, alignment; tensor data
//! stays memory-mapped and is dequantized on request (`quant.rs`).

use crate::quant::{dequantize, GgmlType};
use crate::ModelError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v as u64),
            GgufValue::U16(v) => Some(v as u64),
            GgufValue::U32(v) => Some(v as u64),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) if v >= 0 => Some(v as u64),
            GgufValue::I16(v) if v >= 0 => Some(v as u64),
            GgufValue::I32(v) if v >= 0 => Some(v as u64),
            GgufValue::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where a tensor is and what it holds. `dims` are in ggml order (`dims[0]`
/// is the contiguous one); `shape()` gives the row-major shape.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Elements; saturates instead of overflowing (a file whose tensors do not
    /// fit in it does not open, so every tensor of an opened file is exact).
    pub fn numel(&self) -> usize {
        self.dims.iter().try_fold(1usize, |a, d| usize::try_from(*d).ok().and_then(|d| a.checked_mul(d))).unwrap_or(usize::MAX)
    }

    /// Row-major shape: ggml's dims reversed (each saturating like `numel`).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|d| usize::try_from(*d).unwrap_or(usize::MAX)).collect()
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    data_start: usize,
    map: memmap2::Mmap,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn bad(&self, message: String) -> ModelError {
        ModelError::Format { path: self.path.into(), message }
    }

    /// Bytes not read yet.
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    /// Checks a count read from the file before anything is allocated or looped
    /// for it: `n` items of at least `min_bytes` each must fit in what is left.
    fn check_count(&self, n: u64, min_bytes: u64, what: &str) -> Result<usize, ModelError> {
        let need = n.checked_mul(min_bytes);
        match (need, usize::try_from(n)) {
            (Some(need), Ok(n)) if need <= self.remaining() as u64 => Ok(n),
            _ => Err(self.bad(format!(
                "truncated or corrupt: {what}: a count of {n} (each at least {min_bytes} bytes) exceeds the file ({} bytes left at offset {})",
                self.remaining(),
                self.pos
            ))),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ModelError> {
        if self.remaining() < n {
            return Err(self.bad(format!("truncated: {what} needs {n} bytes at offset {}, the file has {}", self.pos, self.bytes.len())));
        }
        let s = &self.bytes[self.pos..][..n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, ModelError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn string(&mut self, what: &str) -> Result<String, ModelError> {
        let n = self.u64(what)?;
        let n = usize::try_from(n).map_err(|_| self.bad(format!("{what}: length {n} is too large")))?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue, ModelError> {
        let what = format!("metadata `{key}`");
        Ok(match ty {
            0 => GgufValue::U8(self.take(1, &what)?[0]),
            1 => GgufValue::I8(self.take(1, &what)?[0] as i8),
            2 => {
                let b = self.take(2, &what)?;
                GgufValue::U16(u16::from_le_bytes([b[0], b[1]]))
            }
            3 => {
                let b = self.take(2, &what)?;
                GgufValue::I16(i16::from_le_bytes([b[0], b[1]]))
            }
            4 => GgufValue::U32(self.u32(&what)?),
            5 => GgufValue::I32(self.u32(&what)? as i32),
            6 => GgufValue::F32(f32::from_bits(self.u32(&what)?)),
            7 => GgufValue::Bool(self.take(1, &what)?[0] != 0),
            8 => GgufValue::Str(self.string(&what)?),
            9 => {
                if depth > 4 {
                    return Err(self.bad(format!("{what}: arrays nested too deeply")));
                }
                let ety = self.u32(&what)?;
                let n = self.u64(&what)?;
                // Every element takes at least its type's smallest encoding: a
                // count beyond the file is corrupt, and is refused before allocating.
                let min = min_value_bytes(ety).ok_or_else(|| self.bad(format!("{what}: unknown array element type {ety}")))?;
                let n = self.check_count(n, min, &format!("{what}: the array length"))?;
                // Reserve no more than a bounded start: a value is larger in memory than on disk.
                let mut v = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    v.push(self.value(ety, key, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(&what)?),
            11 => GgufValue::I64(self.u64(&what)? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64(&what)?)),
            t => return Err(self.bad(format!("{what}: unknown value type {t}"))),
        })
    }
}

/// The fewest bytes a value of GGUF type `ty` takes in the file (`None`: unknown type).
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,     // the length of an empty string
        9 => 4 + 8, // element type and count of an empty array
        10..=12 => 8,
        _ => return None,
    })
}

/// The fewest bytes of one metadata entry: key length, type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// The fewest bytes of one tensor info: name length, dim count, one dim, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

impl GgufFile {
    /// Opens and indexes a GGUF file; tensor data is not read.
    pub fn open(path: &Path) -> Result<GgufFile, ModelError> {
        let f = std::fs::File::open(path).map_err(|error| ModelError::Io { path: path.into(), error })?;
        // SAFETY: mapped read-only; the checkpoint is not modified while we hold it.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|error| ModelError::Io { path: path.into(), error })?;
        let mut r = Reader { bytes: &map, pos: 0, path };
        let magic = r.take(4, "the magic")?;
        if magic != GGUF_MAGIC {
            return Err(r.bad(format!("wrong magic {magic:02x?}, expected \"GGUF\"")));
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(r.bad(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;
        let n_kv = r.check_count(n_kv, MIN_KV_BYTES, "the metadata count")?;
        // Both sections follow: the tensor infos' smallest size must fit too.
        r.check_count(n_tensors, MIN_TENSOR_INFO_BYTES, "the tensor count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key {i}"))?;
            let ty = r.u32(&format!("the type of `{key}`"))?;
            let v = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(r.bad(format!("metadata `{key}` appears twice")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => return Err(r.bad(format!("general.alignment = {v:?} is not a power of two"))),
            },
        };
        let n_tensors = r.check_count(n_tensors, MIN_TENSOR_INFO_BYTES, "the tensor count")?;
        let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(n_tensors.min(1 << 16));
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor name {i}"))?;
            let nd = r.u32(&format!("dims of `{name}`"))?;
            if nd == 0 || nd > 4 {
                return Err(r.bad(format!("tensor `{name}` has {nd} dimensions (1 to 4 allowed)")));
            }
            let mut dims = Vec::new();
            for _ in 0..nd {
                dims.push(r.u64(&format!("dims of `{name}`"))?);
            }
            let ty = GgmlType::from_code(r.u32(&format!("type of `{name}`"))?);
            let offset = r.u64(&format!("offset of `{name}`"))?;
            if !names.insert(name.clone()) {
                return Err(r.bad(format!("tensor `{name}` appears twice")));
            }
            tensors.push(GgufTensorInfo { name, dims, ty, offset });
        }
        let data_start = (r.pos as u64)
            .div_ceil(alignment)
            .checked_mul(alignment)
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| r.bad(format!("the data section start, {} aligned to {alignment}, overflows", r.pos)))?;
        let file = GgufFile { path: path.into(), version, metadata, tensors, alignment, data_start, map };
        for t in &file.tensors {
            file.tensor_bytes(t)?;
        }
        Ok(file)
    }

    /// The whole file, as mapped.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor, bounds- and alignment-checked.
    pub fn tensor_bytes(&self, t: &GgufTensorInfo) -> Result<&[u8], ModelError> {
        let bad = |message: String| ModelError::Format { path: self.path.clone(), message };
        let numel =
            t.dims.iter().try_fold(1u64, |a, d| a.checked_mul(*d)).ok_or_else(|| bad(format!("tensor `{}` is too large", t.name)))?;
        if let GgmlType::Unsupported(_) = t.ty {
            return Ok(&[]); // reported when its data is asked for
        }
        let numel = usize::try_from(numel).map_err(|_| bad(format!("tensor `{}` is too large", t.name)))?;
        let len = t.ty.bytes_for(numel).ok_or_else(|| {
            if matches!(t.ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) && numel % crate::quant::QK != 0 {
                bad(format!("tensor `{}` ({}) has {numel} elements, not a whole number of 32-element blocks", t.name, t.ty.name()))
            } else {
                bad(format!("tensor `{}` is too large: {numel} {} elements overflow a byte count", t.name, t.ty.name()))
            }
        })?;
        if !t.offset.is_multiple_of(self.alignment) {
            return Err(bad(format!("tensor `{}` offset {} is not aligned to {}", t.name, t.offset, self.alignment)));
        }
        let file_len = self.map.len();
        let range = usize::try_from(t.offset)
            .ok()
            .and_then(|o| self.data_start.checked_add(o))
            .and_then(|start| Some(start..start.checked_add(len)?));
        match range {
            Some(r) if r.end <= file_len => Ok(&self.map[r]),
            _ => Err(bad(format!(
                "truncated: tensor `{}` needs {len} bytes at data offset {} (file offset {} + {}), the file has {file_len}",
                t.name, t.offset, self.data_start, t.offset
            ))),
        }
    }

    /// The tensor as f32, row-major, dequantized exactly as ggml defines it.
    pub fn dequantize(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let t = self.tensor(name).ok_or_else(|| ModelError::MissingTensor { path: self.path.clone(), name: name.into() })?;
        if let GgmlType::Unsupported(_) = t.ty {
            return Err(ModelError::Format {
                path: self.path.clone(),
                message: format!("tensor `{}` has unsupported type {}", t.name, t.ty.name()),
            });
        }
        let bytes = self.tensor_bytes(t)?;
        let mut out = vec![0f32; t.numel()];
        if !dequantize(t.ty, bytes, &mut out) {
            return Err(ModelError::Format { path: self.path.clone(), message: format!("tensor `{}`: bad data length", t.name) });
        }
        Ok((t.shape(), out))
    }

    pub fn meta(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A required metadata number.
    pub fn meta_u64(&self, key: &str) -> Result<u64, ModelError> {
        self.meta(key).and_then(GgufValue::as_u64).ok_or_else(|| ModelError::Format {
            path: self.path.clone(),
            message: format!("metadata `{key}` is missing or not an integer"),
        })
    }

    pub fn meta_f64(&self, key: &str) -> Result<f64, ModelError> {
        self.meta(key)
            .and_then(GgufValue::as_f64)
            .ok_or_else(|| ModelError::Format { path: self.path.clone(), message: format!("metadata `{key}` is missing or not a number") })
    }

    pub fn meta_str(&self, key: &str) -> Result<&str, ModelError> {
        self.meta(key)
            .and_then(GgufValue::as_str)
            .ok_or_else(|| ModelError::Format { path: self.path.clone(), message: format!("metadata `{key}` is missing or not a string") })
    }
}
