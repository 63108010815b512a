//! Weight sparsity as data: magnitude pruning for every `Sparsity` kind, and the
//! packed formats sparse kernels read (CSR, N:M, BSR).
//!
//! Every format views the weight as `[n, k]`: one row per output, the reduction
//! axis contiguous (a `transpose_b` weight as stored; a `[k, n]` weight transposed).
//! Sizes depend only on the pattern and the shape, never on the data: pruning
//! keeps exactly `kept(total, ratio)` entries (or blocks), ties broken by position,
//! so partitioning knows every buffer's bytes before the weights are read.
//!
//! Packed layouts (little-endian, every section 4-byte aligned):
//! - CSR: `row_ptr` (`n+1` u32), `values` (`nnz` f32), `cols` (`nnz` u16 when
//!   `k ≤ 65536`, else u32).
//! - N:M: `values` (`n · k/m · N` f32, row-major by output, in `k` order), then
//!   `bitmap` (per output row `ceil(k/8)` bytes, bit `k % 8` of byte `k / 8` set
//!   where `k` is kept): a kernel expands the values into the set lanes.
//! - BSR with `r×c` blocks: `block_ptr` (`n/r + 1` u32), `values` (`nb · r · c`
//!   f32, each block row-major), `block_cols` (`nb` u32, in units of `c`).
//!
//! With `#values(q8)` or `#values(q4)` the same patterns pack as `NmQ`, `CsrQ`
//! and `BsrQ`: the same index sections (unstructured: row pointers and a
//! per-row bitmap or u16 columns, whichever is smaller), the values in 8- or
//! 4-bit blocks; `sparse_quant.rs` has their layout and bytes per weight.

use crate::pattern::{Sparsity, ValueCoding};
use crate::sparse_quant::{self, CsrIndex, QBits};

/// The stored form of a sparse weight, with every size the kernels need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(tag = "format", rename_all = "lowercase")]
pub enum SparseFormat {
    Csr {
        n: u64,
        k: u64,
        nnz: u64,
    },
    Nm {
        n: u64,
        k: u64,
        keep: u32,
        group: u32,
    },
    Bsr {
        n: u64,
        k: u64,
        rows: u32,
        cols: u32,
        blocks: u64,
    },
    /// Unstructured, values quantized (`sparse_quant.rs`).
    CsrQ {
        n: u64,
        k: u64,
        nnz: u64,
        bits: QBits,
    },
    /// N:M, values quantized.
    NmQ {
        n: u64,
        k: u64,
        keep: u32,
        group: u32,
        bits: QBits,
    },
    /// Blocks, values quantized.
    BsrQ {
        n: u64,
        k: u64,
        rows: u32,
        cols: u32,
        blocks: u64,
        bits: QBits,
    },
}

/// How a pruned weight is stored: its format and whether the graph's weight is
/// `[n, k]` as packed (`transpose_b`) or `[k, n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SparseStorage {
    #[serde(flatten)]
    pub format: SparseFormat,
    pub transposed: bool,
}

/// Entries (or blocks) that pruning `ratio` of `total` keeps.
pub fn kept(total: u64, ratio: f32) -> u64 {
    let pruned = ((ratio as f64) * (total as f64)).floor() as u64;
    total - pruned.min(total)
}

impl SparseFormat {
    /// The format a `Sparsity` packs into, for an `[n, k]` weight view, with f32 values.
    pub fn for_pattern(s: &Sparsity, n: u64, k: u64) -> SparseFormat {
        Self::for_pattern_coded(s, ValueCoding::F32, n, k)
    }

    /// The format a `Sparsity` with kept values stored as `values` packs into.
    pub fn for_pattern_coded(s: &Sparsity, values: ValueCoding, n: u64, k: u64) -> SparseFormat {
        let bits = QBits::of(values);
        match (s.clone(), bits) {
            (Sparsity::Unstructured { ratio }, None) => SparseFormat::Csr { n, k, nnz: kept(n * k, ratio) },
            (Sparsity::Unstructured { ratio }, Some(bits)) => SparseFormat::CsrQ { n, k, nnz: kept(n * k, ratio), bits },
            (Sparsity::NM { n: keep, m }, None) => SparseFormat::Nm { n, k, keep, group: m },
            (Sparsity::NM { n: keep, m }, Some(bits)) => SparseFormat::NmQ { n, k, keep, group: m, bits },
            (Sparsity::Block { ratio, rows, cols }, bits) => {
                let total = (n / rows.max(1) as u64) * (k / cols.max(1) as u64);
                let blocks = kept(total, ratio);
                match bits {
                    None => SparseFormat::Bsr { n, k, rows, cols, blocks },
                    Some(bits) => SparseFormat::BsrQ { n, k, rows, cols, blocks, bits },
                }
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            SparseFormat::Csr { .. } => "csr",
            SparseFormat::Nm { .. } => "nm",
            SparseFormat::Bsr { .. } => "bsr",
            SparseFormat::CsrQ { bits: QBits::Q8, .. } => "csr_q8",
            SparseFormat::CsrQ { bits: QBits::Q4, .. } => "csr_q4",
            SparseFormat::NmQ { bits: QBits::Q8, .. } => "nm_q8",
            SparseFormat::NmQ { bits: QBits::Q4, .. } => "nm_q4",
            SparseFormat::BsrQ { bits: QBits::Q8, .. } => "bsr_q8",
            SparseFormat::BsrQ { bits: QBits::Q4, .. } => "bsr_q4",
        }
    }

    /// The `[n, k]` view: outputs, reduction.
    pub fn nk(&self) -> (u64, u64) {
        match *self {
            SparseFormat::Csr { n, k, .. }
            | SparseFormat::Nm { n, k, .. }
            | SparseFormat::Bsr { n, k, .. }
            | SparseFormat::CsrQ { n, k, .. }
            | SparseFormat::NmQ { n, k, .. }
            | SparseFormat::BsrQ { n, k, .. } => (n, k),
        }
    }

    /// The bits of quantized values, `None` for f32 values.
    pub fn bits(&self) -> Option<QBits> {
        match *self {
            SparseFormat::Csr { .. } | SparseFormat::Nm { .. } | SparseFormat::Bsr { .. } => None,
            SparseFormat::CsrQ { bits, .. } | SparseFormat::NmQ { bits, .. } | SparseFormat::BsrQ { bits, .. } => Some(bits),
        }
    }

    /// How an unstructured format indexes its entries (`Cols` for f32 CSR).
    pub fn csr_index(&self) -> CsrIndex {
        match *self {
            SparseFormat::CsrQ { n, k, nnz, .. } => sparse_quant::csr_index(n, k, nnz),
            _ => CsrIndex::Cols(Self::csr_index_bytes(self.nk().1)),
        }
    }

    /// The planes of quantized values (`None` for f32 values).
    pub fn value_planes(&self) -> Option<sparse_quant::ValuePlanes> {
        Some(sparse_quant::value_planes(self.bits()?, self.layout().values, self.stored_values()))
    }

    /// The f32 form of the format (same indices, f32 values): what its values
    /// dequantize to, index for index.
    pub fn unquantized(&self) -> SparseFormat {
        match *self {
            SparseFormat::CsrQ { n, k, nnz, .. } => SparseFormat::Csr { n, k, nnz },
            SparseFormat::NmQ { n, k, keep, group, .. } => SparseFormat::Nm { n, k, keep, group },
            SparseFormat::BsrQ { n, k, rows, cols, blocks, .. } => SparseFormat::Bsr { n, k, rows, cols, blocks },
            f => f,
        }
    }

    /// Bytes of one column index in CSR (2 when `k` fits 16 bits).
    pub fn csr_index_bytes(k: u64) -> u64 {
        if k <= 1 << 16 {
            2
        } else {
            4
        }
    }

    /// Bytes of one output row's bitmap in the N:M format.
    pub fn bitmap_row_bytes(k: u64) -> u64 {
        k.div_ceil(8)
    }

    /// Stored values (f32), nonzero or not.
    pub fn stored_values(&self) -> u64 {
        match *self {
            SparseFormat::Csr { nnz, .. } | SparseFormat::CsrQ { nnz, .. } => nnz,
            SparseFormat::Nm { n, k, keep, group } | SparseFormat::NmQ { n, k, keep, group, .. } => n * (k / group as u64) * keep as u64,
            SparseFormat::Bsr { rows, cols, blocks, .. } | SparseFormat::BsrQ { rows, cols, blocks, .. } => {
                blocks * rows as u64 * cols as u64
            }
        }
    }

    /// Byte offsets of the sections: (index pointers or 0, values, indices, total).
    pub fn layout(&self) -> SparseLayout {
        let al = |x: u64| x.next_multiple_of(4);
        match *self {
            SparseFormat::Csr { n, k, nnz } => {
                let values = (n + 1) * 4;
                let cols = values + nnz * 4;
                SparseLayout { ptr: 0, values, indices: cols, total: al(cols + nnz * Self::csr_index_bytes(k)) }
            }
            SparseFormat::Nm { n, k, .. } => {
                let v = self.stored_values();
                SparseLayout { ptr: 0, values: 0, indices: v * 4, total: al(v * 4 + n * Self::bitmap_row_bytes(k)) }
            }
            SparseFormat::Bsr { n, rows, blocks, .. } => {
                let values = (n / rows as u64 + 1) * 4;
                let cols = values + self.stored_values() * 4;
                SparseLayout { ptr: 0, values, indices: cols, total: cols + blocks * 4 }
            }
            SparseFormat::CsrQ { n, k, nnz, bits } => {
                let values = (n + 1) * 4;
                let idx = al(sparse_quant::value_planes(bits, values, nnz).end);
                let ib = match sparse_quant::csr_index(n, k, nnz) {
                    CsrIndex::Bitmap => n * Self::bitmap_row_bytes(k),
                    CsrIndex::Cols(b) => nnz * b,
                };
                SparseLayout { ptr: 0, values, indices: idx, total: al(idx + ib) }
            }
            SparseFormat::NmQ { n, k, bits, .. } => {
                let idx = al(sparse_quant::value_planes(bits, 0, self.stored_values()).end);
                SparseLayout { ptr: 0, values: 0, indices: idx, total: al(idx + n * Self::bitmap_row_bytes(k)) }
            }
            SparseFormat::BsrQ { n, rows, blocks, bits, .. } => {
                let values = (n / rows as u64 + 1) * 4;
                let cols = al(sparse_quant::value_planes(bits, values, self.stored_values()).end);
                SparseLayout { ptr: 0, values, indices: cols, total: cols + blocks * 4 }
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.layout().total as usize
    }
}

/// Where a packed sparse weight's sections start, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseLayout {
    pub ptr: u64,
    pub values: u64,
    pub indices: u64,
    pub total: u64,
}

/// Reads `[n, k]` element `(j, kk)` of a weight stored `[n, k]` (`transposed`,
/// i.e. `transpose_b`) or `[k, n]`.
fn at(n: usize, k: usize, transposed: bool, j: usize, kk: usize) -> usize {
    if transposed {
        j * k + kk
    } else {
        kk * n + j
    }
}

/// Prunes `w` (a matmul weight, `[n, k]` if `transposed` else `[k, n]`) in place
/// by magnitude as `s` says, and returns the keep mask over the `[n, k]` view.
/// Deterministic: among equal magnitudes the later position is pruned first.
pub fn prune(s: &Sparsity, w: &mut [f32], n: usize, k: usize, transposed: bool) -> Vec<bool> {
    let mut keep = vec![true; n * k];
    match *s {
        Sparsity::Unstructured { ratio } => {
            let drop = n * k - kept((n * k) as u64, ratio) as usize;
            let mut order: Vec<usize> = (0..n * k).collect();
            // Smallest magnitude first; the position breaks ties (later pruned first).
            let key = |i: usize| (w[at(n, k, transposed, i / k.max(1), i % k.max(1))].abs(), std::cmp::Reverse(i));
            if drop > 0 && drop < order.len() {
                order.select_nth_unstable_by(drop - 1, |&a, &b| key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal));
            }
            for &i in order.iter().take(drop) {
                keep[i] = false;
            }
        }
        Sparsity::NM { n: nz, m } => {
            let (nz, m) = (nz as usize, m.max(1) as usize);
            for j in 0..n {
                for g in 0..k / m {
                    let mut idx: Vec<usize> = (0..m).collect();
                    let mag = |t: usize| w[at(n, k, transposed, j, g * m + t)].abs();
                    // Largest first, earlier position first among equals.
                    idx.sort_by(|&a, &b| mag(b).partial_cmp(&mag(a)).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
                    for &t in &idx[nz.min(m)..] {
                        keep[j * k + g * m + t] = false;
                    }
                }
            }
        }
        Sparsity::Block { ratio, rows, cols } => {
            let (r, c) = (rows.max(1) as usize, cols.max(1) as usize);
            let (br, bc) = (n / r, k / c);
            let score = |b: usize| -> f64 {
                let (bi, bj) = (b / bc.max(1), b % bc.max(1));
                let mut s = 0.0f64;
                for j in bi * r..(bi + 1) * r {
                    for kk in bj * c..(bj + 1) * c {
                        let x = w[at(n, k, transposed, j, kk)] as f64;
                        s += x * x;
                    }
                }
                s
            };
            let scores: Vec<f64> = (0..br * bc).map(score).collect();
            let drop = br * bc - kept((br * bc) as u64, ratio) as usize;
            let mut order: Vec<usize> = (0..br * bc).collect();
            order.sort_by(|&a, &b| scores[a].partial_cmp(&scores[b]).unwrap_or(std::cmp::Ordering::Equal).then(b.cmp(&a)));
            for &b in order.iter().take(drop) {
                let (bi, bj) = (b / bc, b % bc);
                for j in bi * r..(bi + 1) * r {
                    for kk in bj * c..(bj + 1) * c {
                        keep[j * k + kk] = false;
                    }
                }
            }
        }
    }
    for j in 0..n {
        for kk in 0..k {
            if !keep[j * k + kk] {
                w[at(n, k, transposed, j, kk)] = 0.0;
            }
        }
    }
    keep
}

fn put_u32(out: &mut [u8], at: u64, v: u32) {
    out[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_f32(out: &mut [u8], at: u64, v: f32) {
    out[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], at: u64) -> u32 {
    u32::from_le_bytes([b[at as usize], b[at as usize + 1], b[at as usize + 2], b[at as usize + 3]])
}
fn get_f32(b: &[u8], at: u64) -> f32 {
    f32::from_bits(get_u32(b, at))
}

/// Packs a pruned weight (`w` as stored, `keep` over the `[n, k]` view, both from
/// `prune`) into `fmt`. `None` when the mask does not have the format's shape
/// (a mask that is not the one `prune` made for this pattern). Quantized
/// values are encoded from `w` as it is: pass it through `materialize` first
/// for the bytes to decode to `w` exactly.
pub fn pack(fmt: &SparseFormat, w: &[f32], keep: &[bool], transposed: bool) -> Option<Vec<u8>> {
    let lay = fmt.layout();
    let mut out = vec![0u8; lay.total as usize];
    let (n, k) = fmt.nk();
    let (n, k) = (n as usize, k as usize);
    // The stored values in storage order, written after the indices.
    let mut vals: Vec<f32> = Vec::with_capacity(fmt.stored_values() as usize);
    match *fmt {
        SparseFormat::Csr { nnz, .. } | SparseFormat::CsrQ { nnz, .. } => {
            let index = fmt.csr_index();
            let rb = SparseFormat::bitmap_row_bytes(k as u64) as usize;
            for j in 0..n {
                put_u32(&mut out, 4 * j as u64, vals.len() as u32);
                for kk in 0..k {
                    if keep[j * k + kk] {
                        let p = vals.len() as u64;
                        if p >= nnz {
                            return None;
                        }
                        vals.push(w[at(n, k, transposed, j, kk)]);
                        match index {
                            CsrIndex::Bitmap => out[lay.indices as usize + j * rb + kk / 8] |= 1 << (kk % 8),
                            CsrIndex::Cols(2) => {
                                let ia = (lay.indices + 2 * p) as usize;
                                out[ia..ia + 2].copy_from_slice(&(kk as u16).to_le_bytes());
                            }
                            CsrIndex::Cols(_) => put_u32(&mut out, lay.indices + 4 * p, kk as u32),
                        }
                    }
                }
            }
            put_u32(&mut out, 4 * n as u64, vals.len() as u32);
            if vals.len() as u64 != nnz {
                return None;
            }
        }
        SparseFormat::Nm { keep: nz, group, .. } | SparseFormat::NmQ { keep: nz, group, .. } => {
            let (nz, m) = (nz as usize, group as usize);
            let rb = SparseFormat::bitmap_row_bytes(k as u64) as usize;
            for j in 0..n {
                for g in 0..k / m {
                    if (0..m).filter(|t| keep[j * k + g * m + t]).count() != nz {
                        return None;
                    }
                }
                for kk in 0..k {
                    if keep[j * k + kk] {
                        vals.push(w[at(n, k, transposed, j, kk)]);
                        out[lay.indices as usize + j * rb + kk / 8] |= 1 << (kk % 8);
                    }
                }
            }
        }
        SparseFormat::Bsr { rows, cols, blocks, .. } | SparseFormat::BsrQ { rows, cols, blocks, .. } => {
            let (r, c) = (rows as usize, cols as usize);
            let mut p = 0u64;
            for bi in 0..n / r {
                put_u32(&mut out, 4 * bi as u64, p as u32);
                for bj in 0..k / c {
                    let kept_block = keep[bi * r * k + bj * c];
                    if !kept_block {
                        continue;
                    }
                    if p >= blocks {
                        return None;
                    }
                    for i in 0..r {
                        for t in 0..c {
                            vals.push(w[at(n, k, transposed, bi * r + i, bj * c + t)]);
                        }
                    }
                    put_u32(&mut out, lay.indices + 4 * p, bj as u32);
                    p += 1;
                }
            }
            put_u32(&mut out, 4 * (n / r) as u64, p as u32);
            if p != blocks {
                return None;
            }
        }
    }
    match (fmt.bits(), fmt.value_planes()) {
        (Some(bits), Some(vp)) => sparse_quant::encode_values(bits, &vals, &vp, &mut out),
        _ => {
            for (p, v) in vals.iter().enumerate() {
                put_f32(&mut out, lay.values + 4 * p as u64, *v);
            }
        }
    }
    Some(out)
}

/// Unpacks `bytes` of format `fmt` into a dense weight as stored (`[n, k]` if
/// `transposed`, else `[k, n]`); `None` where `entries` finds the bytes invalid.
pub fn unpack(fmt: &SparseFormat, bytes: &[u8], transposed: bool) -> Option<Vec<f32>> {
    let (n, k) = fmt.nk();
    let (n, k) = (n as usize, k as usize);
    let mut w = vec![0f32; n * k];
    for (j, row) in entries(fmt, bytes)?.iter().enumerate() {
        for &(kk, p) in row {
            w[at(n, k, transposed, j, kk as usize)] = value_at(fmt, bytes, p);
        }
    }
    Some(w)
}

/// Checks that a format's own fields are coherent and its sizes fit in
/// memory: `n·k` entries at most 2^40, N:M groups that divide `k` with at most
/// `group` kept, BSR blocks that tile the matrix, counts within the matrix.
/// Every other function here assumes a format that passed.
pub fn check_format(fmt: &SparseFormat) -> Result<(), String> {
    const MAX_ENTRIES: u64 = 1 << 40;
    let (n, k) = fmt.nk();
    let entries = n.checked_mul(k).filter(|e| *e <= MAX_ENTRIES && n > 0 && k > 0);
    let Some(total) = entries else {
        return Err(format!("{} of {n}x{k}: the shape is empty or too large", fmt.name()));
    };
    match *fmt {
        SparseFormat::Csr { nnz, .. } | SparseFormat::CsrQ { nnz, .. } if nnz > total => Err(format!("csr keeps {nnz} of {total} entries")),
        SparseFormat::Nm { keep, group, .. } | SparseFormat::NmQ { keep, group, .. }
            if group == 0 || keep > group || k % group as u64 != 0 =>
        {
            Err(format!("{keep}:{group} does not fit rows of {k}"))
        }
        SparseFormat::Bsr { rows, cols, blocks, .. } | SparseFormat::BsrQ { rows, cols, blocks, .. }
            if rows == 0 || cols == 0 || n % rows as u64 != 0 || k % cols as u64 != 0 || blocks > total / (rows as u64 * cols as u64) =>
        {
            Err(format!("{blocks} blocks of {rows}x{cols} do not tile {n}x{k}"))
        }
        _ => Ok(()),
    }
}

/// Checks packed `bytes` against `fmt` without building anything: the length,
/// CSR row pointers monotone and within `nnz` with every column below `k`, N:M
/// bitmaps with exactly `keep` bits in every group (none past `k`), BSR block
/// pointers monotone within `blocks` with every block column inside the row.
/// What kernels index with is then in range. The error says what is wrong.
pub fn validate(fmt: &SparseFormat, bytes: &[u8]) -> Result<(), String> {
    check_format(fmt)?;
    let lay = fmt.layout();
    if bytes.len() as u64 != lay.total {
        return Err(format!("{} bytes where {} {} needs {}", bytes.len(), fmt.name(), fmt_shape(fmt), lay.total));
    }
    // Row (or block row) pointers: `count + 1` u32s from 0, monotone, within `limit`.
    let pointers = |count: u64, limit: u64, what: &str| -> Result<(), String> {
        let mut prev = 0u64;
        for j in 0..=count {
            let p = get_u32(bytes, 4 * j) as u64;
            if p < prev || p > limit {
                return Err(format!("{what} pointer {j} is {p} (after {prev}, at most {limit})"));
            }
            prev = p;
        }
        Ok(())
    };
    match *fmt {
        SparseFormat::Csr { n, k, nnz } | SparseFormat::CsrQ { n, k, nnz, .. } => {
            pointers(n, nnz, "row")?;
            match fmt.csr_index() {
                CsrIndex::Cols(ib) => {
                    for p in 0..nnz {
                        let ia = (lay.indices + ib * p) as usize;
                        let kk =
                            if ib == 2 { u16::from_le_bytes([bytes[ia], bytes[ia + 1]]) as u64 } else { get_u32(bytes, ia as u64) as u64 };
                        if kk >= k {
                            return Err(format!("column index {p} is {kk}, not below {k}"));
                        }
                    }
                }
                CsrIndex::Bitmap => {
                    // Every row's bits count its entries (the row pointers' difference), none past `k`.
                    let rb = SparseFormat::bitmap_row_bytes(k);
                    for j in 0..n {
                        let row = &bytes[(lay.indices + j * rb) as usize..(lay.indices + (j + 1) * rb) as usize];
                        let set: u64 = row.iter().map(|b| b.count_ones() as u64).sum();
                        let want = (get_u32(bytes, 4 * (j + 1)) - get_u32(bytes, 4 * j)) as u64;
                        if set != want {
                            return Err(format!("row {j} sets {set} bitmap bits, its row pointers give {want} entries"));
                        }
                        if (k..rb * 8).any(|kk| row[(kk / 8) as usize] & (1 << (kk % 8)) != 0) {
                            return Err(format!("row {j} sets bitmap bits past {k}"));
                        }
                    }
                }
            }
        }
        SparseFormat::Nm { n, k, keep, group } | SparseFormat::NmQ { n, k, keep, group, .. } => {
            let rb = SparseFormat::bitmap_row_bytes(k);
            let bit = |j: u64, kk: u64| bytes[(lay.indices + j * rb + kk / 8) as usize] & (1 << (kk % 8)) != 0;
            for j in 0..n {
                for g in 0..k / group as u64 {
                    let set = (0..group as u64).filter(|t| bit(j, g * group as u64 + t)).count();
                    if set != keep as usize {
                        return Err(format!("row {j} group {g} keeps {set}, not {keep} of {group}"));
                    }
                }
                if (k..rb * 8).any(|kk| bit(j, kk)) {
                    return Err(format!("row {j} sets bitmap bits past {k}"));
                }
            }
        }
        SparseFormat::Bsr { n, k, rows, cols, blocks } | SparseFormat::BsrQ { n, k, rows, cols, blocks, .. } => {
            pointers(n / rows as u64, blocks, "block row")?;
            for p in 0..blocks {
                let bc = get_u32(bytes, lay.indices + 4 * p) as u64;
                if (bc + 1) * cols as u64 > k {
                    return Err(format!("block {p} is at block column {bc}, past {k} columns"));
                }
            }
        }
    }
    Ok(())
}

fn fmt_shape(fmt: &SparseFormat) -> String {
    let (n, k) = fmt.nk();
    format!("{n}x{k}")
}

/// Every output's stored entries as `(k, value index)` pairs, in `k` order
/// within a CSR or N:M row, block by block for BSR: what a kernel that bakes
/// the indices unrolls. `None` if the bytes do not hold the format (`validate`).
pub fn entries(fmt: &SparseFormat, bytes: &[u8]) -> Option<Vec<Vec<(u32, u32)>>> {
    validate(fmt, bytes).ok()?;
    let lay = fmt.layout();
    let mut out = Vec::new();
    match *fmt {
        SparseFormat::Csr { n, k, .. } | SparseFormat::CsrQ { n, k, .. } if fmt.csr_index() != CsrIndex::Bitmap => {
            let ib = SparseFormat::csr_index_bytes(k);
            for j in 0..n {
                let (lo, hi) = (get_u32(bytes, 4 * j) as u64, get_u32(bytes, 4 * (j + 1)) as u64);
                let row = (lo..hi)
                    .map(|p| {
                        let ia = (lay.indices + ib * p) as usize;
                        let kk = if ib == 2 { u16::from_le_bytes([bytes[ia], bytes[ia + 1]]) as u32 } else { get_u32(bytes, ia as u64) };
                        (kk, p as u32)
                    })
                    .collect();
                out.push(row);
            }
        }
        SparseFormat::Csr { n, k, .. }
        | SparseFormat::CsrQ { n, k, .. }
        | SparseFormat::Nm { n, k, .. }
        | SparseFormat::NmQ { n, k, .. } => {
            // A bitmap per row; entries numbered in order (for CSR the row
            // pointers agree: `validate` checked every row's count).
            let rb = SparseFormat::bitmap_row_bytes(k);
            let mut p = 0u32;
            for j in 0..n {
                let mut row = Vec::new();
                for kk in 0..k {
                    if bytes[(lay.indices + j * rb + kk / 8) as usize] & (1 << (kk % 8)) != 0 {
                        row.push((kk as u32, p));
                        p += 1;
                    }
                }
                out.push(row);
            }
        }
        SparseFormat::Bsr { n, rows, cols, .. } | SparseFormat::BsrQ { n, rows, cols, .. } => {
            let (r, c) = (rows as u64, cols as u64);
            for j in 0..n {
                let (bi, i) = (j / r, j % r);
                let (lo, hi) = (get_u32(bytes, 4 * bi) as u64, get_u32(bytes, 4 * (bi + 1)) as u64);
                let mut row = Vec::new();
                for p in lo..hi {
                    let bc = get_u32(bytes, lay.indices + 4 * p) as u64;
                    for t in 0..c {
                        row.push(((bc * c + t) as u32, (p * r * c + i * c + t) as u32));
                    }
                }
                out.push(row);
            }
        }
    }
    Some(out)
}

/// The value at value index `p` of a packed weight (quantized values dequantized).
pub fn value_at(fmt: &SparseFormat, bytes: &[u8], p: u32) -> f32 {
    match (fmt.bits(), fmt.value_planes()) {
        (Some(bits), Some(vp)) => sparse_quant::decode_value(bits, &vp, bytes, p as u64),
        _ => get_f32(bytes, fmt.layout().values + 4 * p as u64),
    }
}

/// The weights a graph prunes: weight node index → (its `#sparsity`, whether
/// the matmul reads it transposed, its `[n, k]` view). The verifier guarantees
/// every use of such a weight prunes it alike.
pub fn pruned_weights(g: &crate::Graph) -> std::collections::HashMap<usize, PrunedWeight> {
    let mut out = std::collections::HashMap::new();
    for node in &g.nodes {
        let crate::Op::MatMul { transpose_b } = node.op else { continue };
        let Some(s) = node.patterns.iter().find_map(|p| match p {
            crate::Pattern::Sparsity(s) => Some(s.clone()),
            _ => None,
        }) else {
            continue;
        };
        let w = node.operands[1].0;
        let Some(dims) = g.nodes[w].ty.as_ref().map(|t| t.dims.clone()) else { continue };
        let (crate::Dim::Fixed(a), crate::Dim::Fixed(b)) = (dims[0], dims[1]) else { continue };
        let (n, k) = if transpose_b { (a, b) } else { (b, a) };
        let values = node
            .patterns
            .iter()
            .find_map(|p| match p {
                crate::Pattern::Values(v) => Some(*v),
                _ => None,
            })
            .unwrap_or(ValueCoding::F32);
        out.insert(w, PrunedWeight { sparsity: s, values, transposed: transpose_b, n, k });
    }
    out
}

/// How one weight is pruned.
#[derive(Clone, Debug, PartialEq)]
pub struct PrunedWeight {
    pub sparsity: Sparsity,
    /// How the kept values are stored (`#values`, f32 when absent).
    pub values: ValueCoding,
    pub transposed: bool,
    pub n: u64,
    pub k: u64,
}

impl PrunedWeight {
    /// Prunes `w` (as stored) in place; returns the keep mask over `[n, k]`.
    pub fn prune(&self, w: &mut [f32]) -> Vec<bool> {
        prune(&self.sparsity, w, self.n as usize, self.k as usize, self.transposed)
    }

    /// The weight's reference value, as the interpreter and the compiler both
    /// use it: pruned (`prune`), then each block of kept values replaced by its
    /// dequantized form when `#values` stores them quantized. Idempotent (a
    /// materialized weight materializes to itself; tested). Returns the mask.
    pub fn materialize(&self, w: &mut [f32]) -> Vec<bool> {
        let keep = self.prune(w);
        let fmt = self.format();
        if let Some(bits) = fmt.bits() {
            let (n, k) = (self.n as usize, self.k as usize);
            let order = storage_order(&fmt, &keep);
            let mut vals: Vec<f32> = order.iter().map(|&(j, kk)| w[at(n, k, self.transposed, j, kk)]).collect();
            for b in vals.chunks_mut(sparse_quant::QB) {
                sparse_quant::qdq_block(bits, b);
            }
            for (&(j, kk), v) in order.iter().zip(&vals) {
                w[at(n, k, self.transposed, j, kk)] = *v;
            }
        }
        keep
    }

    pub fn format(&self) -> SparseFormat {
        SparseFormat::for_pattern_coded(&self.sparsity, self.values, self.n, self.k)
    }
}

/// The kept `(output, k)` entries of a mask in the order `fmt` stores their
/// values: row by row in `k` order, or BSR block by block (each row-major).
fn storage_order(fmt: &SparseFormat, keep: &[bool]) -> Vec<(usize, usize)> {
    let (n, k) = fmt.nk();
    let (n, k) = (n as usize, k as usize);
    match *fmt {
        SparseFormat::Bsr { rows, cols, .. } | SparseFormat::BsrQ { rows, cols, .. } => {
            let (r, c) = (rows as usize, cols as usize);
            let mut out = Vec::new();
            for bi in 0..n / r {
                for bj in (0..k / c).filter(|bj| keep[bi * r * k + bj * c]) {
                    out.extend((0..r * c).map(|e| (bi * r + e / c, bj * c + e % c)));
                }
            }
            out
        }
        _ => (0..n * k).filter(|&i| keep[i]).map(|i| (i / k, i % k)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        crate::Init::Normal { seed, std: 1.0 }.generate(len)
    }

    #[test]
    fn prune_counts_and_pack_round_trips() {
        let (n, k) = (12, 16);
        for s in [
            Sparsity::Unstructured { ratio: 0.9 },
            Sparsity::Unstructured { ratio: 0.0 },
            Sparsity::NM { n: 2, m: 4 },
            Sparsity::NM { n: 1, m: 8 },
            Sparsity::Block { ratio: 0.5, rows: 4, cols: 4 },
        ] {
            for transposed in [true, false] {
                let mut w = data(n * k, 7);
                let keep = prune(&s, &mut w, n, k, transposed);
                let fmt = SparseFormat::for_pattern(&s, n as u64, k as u64);
                assert_eq!(keep.iter().filter(|x| **x).count() as u64, fmt.stored_values(), "{s:?}");
                let packed = pack(&fmt, &w, &keep, transposed).expect("mask fits the format");
                assert_eq!(packed.len(), fmt.bytes());
                let dense = unpack(&fmt, &packed, transposed).expect("unpacks");
                assert_eq!(dense, w, "{s:?} transposed={transposed}");
                // The entries list says the same.
                let mut from_entries = vec![0f32; n * k];
                for (j, row) in entries(&fmt, &packed).expect("entries").iter().enumerate() {
                    for &(kk, p) in row {
                        from_entries[at(n, k, transposed, j, kk as usize)] = value_at(&fmt, &packed, p);
                    }
                }
                assert_eq!(from_entries, w, "entries of {s:?}");
                // Pruning is idempotent: the pruned weight prunes to itself.
                let mut again = w.clone();
                prune(&s, &mut again, n, k, transposed);
                assert_eq!(again, w);
            }
        }
    }

    #[test]
    fn quantized_formats_materialize_idempotently_and_pack_exactly() {
        // 12 x 80: N:M rows of 40 values (blocks straddle rows), a CSR bitmap at
        // 50% and u16 columns at 97%, BSR blocks of 4x8 and 2x4.
        let (n, k) = (12, 80);
        for values in [ValueCoding::Q8, ValueCoding::Q4] {
            for s in [
                Sparsity::NM { n: 2, m: 4 },
                Sparsity::NM { n: 3, m: 8 },
                Sparsity::Unstructured { ratio: 0.5 },
                Sparsity::Unstructured { ratio: 0.97 },
                Sparsity::Block { ratio: 0.5, rows: 4, cols: 8 },
                Sparsity::Block { ratio: 0.25, rows: 2, cols: 4 },
            ] {
                for transposed in [true, false] {
                    let pw = PrunedWeight { sparsity: s.clone(), values, transposed, n: n as u64, k: k as u64 };
                    let orig = data(n * k, 11);
                    let mut w = orig.clone();
                    let keep = pw.materialize(&mut w);
                    let fmt = pw.format();
                    assert_eq!(fmt.bits(), QBits::of(values));
                    assert_eq!(keep.iter().filter(|x| **x).count() as u64, fmt.stored_values(), "{s:?}");
                    // Close to the pruned weight, but not equal (it was quantized).
                    let mut pruned = orig.clone();
                    pw.prune(&mut pruned);
                    let err = pruned.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(err > 0.0 && err < if values == ValueCoding::Q8 { 0.03 } else { 0.5 }, "{s:?} {values:?}: {err}");
                    // Idempotent, and the packed bytes decode to it exactly.
                    let mut again = w.clone();
                    assert_eq!(pw.materialize(&mut again), keep);
                    assert_eq!(again, w, "{s:?} {values:?} transposed={transposed}");
                    let packed = pack(&fmt, &w, &keep, transposed).expect("mask fits the format");
                    assert_eq!(packed.len(), fmt.bytes());
                    assert_eq!(unpack(&fmt, &packed, transposed).expect("unpacks"), w, "{s:?} {values:?}");
                }
            }
        }
        // The index choice for unstructured sparsity.
        assert_eq!(sparse_quant::csr_index(12, 80, 480), CsrIndex::Bitmap);
        assert_eq!(sparse_quant::csr_index(12, 80, 28), CsrIndex::Cols(2));
        // Bytes per weight of 2:4 q4 on a 4096x4096 matrix: 0.4375 (Q4_1: 0.625).
        let f = SparseFormat::for_pattern_coded(&Sparsity::NM { n: 2, m: 4 }, ValueCoding::Q4, 4096, 4096);
        assert_eq!(f.bytes() as f64 / (4096.0 * 4096.0), 0.4375);
    }

    #[test]
    fn corrupt_quantized_indices_are_rejected() {
        let pw = PrunedWeight { sparsity: Sparsity::Unstructured { ratio: 0.5 }, values: ValueCoding::Q4, transposed: true, n: 4, k: 64 };
        let mut w = data(4 * 64, 5);
        let keep = pw.materialize(&mut w);
        let fmt = pw.format();
        let good = pack(&fmt, &w, &keep, true).unwrap();
        assert!(validate(&fmt, &good).is_ok());
        let lay = fmt.layout();
        let mut b = good.clone();
        b[lay.indices as usize] ^= 0x01; // a row's bitmap no longer matches its pointers
        assert!(validate(&fmt, &b).unwrap_err().contains("bitmap bits"), "{:?}", validate(&fmt, &b));
        let mut b = good.clone();
        b[4..8].copy_from_slice(&999u32.to_le_bytes()); // a row pointer past nnz
        assert!(validate(&fmt, &b).unwrap_err().contains("row pointer 1"));
        let nm = SparseFormat::for_pattern_coded(&Sparsity::NM { n: 2, m: 4 }, ValueCoding::Q8, 4, 64);
        let mut b = vec![0u8; nm.bytes()];
        assert!(validate(&nm, &b).unwrap_err().contains("keeps 0, not 2"));
        b.pop();
        assert!(validate(&nm, &b).is_err());
    }

    #[test]
    fn magnitude_pruning_keeps_the_largest() {
        let mut w = vec![0.1, -5.0, 0.2, 3.0, -0.05, 0.3, 4.0, -0.4];
        let keep = prune(&Sparsity::NM { n: 2, m: 4 }, &mut w, 1, 8, true);
        assert_eq!(w, vec![0.0, -5.0, 0.0, 3.0, 0.0, 0.0, 4.0, -0.4]);
        assert_eq!(keep, vec![false, true, false, true, false, false, true, true]);
        let mut w = vec![1.0, -2.0, 3.0, -4.0];
        prune(&Sparsity::Unstructured { ratio: 0.5 }, &mut w, 2, 2, true);
        assert_eq!(w, vec![0.0, 0.0, 3.0, -4.0]);
    }

    #[test]
    fn corrupt_bytes_are_rejected() {
        let fmt = SparseFormat::Csr { n: 2, k: 4, nnz: 2 };
        let mut w = vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0];
        let keep = prune(&Sparsity::Unstructured { ratio: 0.75 }, &mut w, 2, 4, true);
        let mut b = pack(&fmt, &w, &keep, true).unwrap();
        assert!(unpack(&fmt, &b[..b.len() - 4], true).is_none());
        let last = b.len() - 2;
        b[last] = 9; // a column index past k
        assert!(unpack(&fmt, &b, true).is_none());
    }
}
