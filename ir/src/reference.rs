//! Reference semantics of every op, in plain f32 loops (f64 accumulation where a
//! reduction is long). This is the definition compiled kernels are checked against.

use crate::op::{GeluApprox, Op};
use crate::pattern::{KvCompression, NativeSparse, NsaScore, Pattern, SvdRank, Window};
use faer::linalg::matmul::matmul;
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Accum, Mat, Par};
use ndarray::{ArrayD, IxDyn};

/// GELU, tanh form.
pub fn gelu_tanh(x: f32) -> f32 {
    let c = (2.0f32 / std::f32::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

/// GELU, erf form.
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x / std::f32::consts::SQRT_2))
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn contiguous(a: &ArrayD<f32>) -> std::borrow::Cow<'_, [f32]> {
    match a.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(a.iter().copied().collect()),
    }
}

/// Evaluates a compute op on concrete operands. `patterns` are the op's patterns;
/// weight patterns (sparsity, low rank) have already been applied to the weight
/// data by the weight-transform passes, so here they change nothing.
pub fn eval_op(op: &Op, patterns: &[Pattern], operands: &[&ArrayD<f32>]) -> Result<ArrayD<f32>, String> {
    crate::pattern::refuse_unimplemented(patterns)?;
    match op {
        Op::Input | Op::Weight { .. } | Op::Constant { .. } => Err("leaf ops have no reference kernel".into()),
        Op::MatMul { transpose_b } => {
            let (a, b) = (operands[0], operands[1]);
            let k = *a.shape().last().ok_or("matmul of a scalar")?;
            let (bk, n) = if *transpose_b { (b.shape()[1], b.shape()[0]) } else { (b.shape()[0], b.shape()[1]) };
            if bk != k {
                return Err(format!("inner dimensions differ: {k} vs {bk}"));
            }
            let rows = a.len() / k.max(1);
            let (av, bv) = (contiguous(a), contiguous(b));
            let a2 = ndarray::ArrayView2::from_shape((rows, k), &av).map_err(|e| e.to_string())?;
            let b2 = if *transpose_b {
                ndarray::ArrayView2::from_shape((n, k), &bv).map_err(|e| e.to_string())?.reversed_axes()
            } else {
                ndarray::ArrayView2::from_shape((k, n), &bv).map_err(|e| e.to_string())?
            };
            // f32 GEMM (matrixmultiply): the same precision class as the kernels.
            let out = a2.dot(&b2).into_raw_vec_and_offset().0;
            let mut shape = a.shape().to_vec();
            *shape.last_mut().unwrap_or(&mut 0) = n;
            ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| e.to_string())
        }
        Op::Add | Op::Mul => {
            let (a, b) = (operands[0], operands[1]);
            let (long, short) = if a.ndim() >= b.ndim() { (a, b) } else { (b, a) };
            let (lv, sv) = (contiguous(long), contiguous(short));
            let m = sv.len().max(1);
            let out: Vec<f32> =
                lv.iter().enumerate().map(|(i, x)| if matches!(op, Op::Add) { x + sv[i % m] } else { x * sv[i % m] }).collect();
            ArrayD::from_shape_vec(long.raw_dim(), out).map_err(|e| e.to_string())
        }
        Op::Gelu { approx } => Ok(operands[0].mapv(match approx {
            GeluApprox::Tanh => gelu_tanh,
            GeluApprox::Erf => gelu_erf,
        })),
        Op::Silu => Ok(operands[0].mapv(silu)),
        Op::LayerNorm { eps } | Op::RmsNorm { eps } => {
            let x = operands[0];
            let d = *x.shape().last().ok_or("norm of a scalar")?;
            let xv = contiguous(x);
            let gamma = contiguous(operands[1]);
            let beta = operands.get(2).map(|b| contiguous(b));
            let mut out = vec![0f32; xv.len()];
            for (row, orow) in xv.chunks(d).zip(out.chunks_mut(d)) {
                let is_layer = matches!(op, Op::LayerNorm { .. });
                let mean = if is_layer { row.iter().map(|v| *v as f64).sum::<f64>() / d as f64 } else { 0.0 };
                let var = row.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                let inv = 1.0 / (var + *eps as f64).sqrt();
                for j in 0..d {
                    let y = ((row[j] as f64 - mean) * inv) as f32 * gamma[j];
                    orow[j] = y + beta.as_ref().map_or(0.0, |b| b[j]);
                }
            }
            ArrayD::from_shape_vec(x.raw_dim(), out).map_err(|e| e.to_string())
        }
        Op::Softmax => {
            let x = operands[0];
            let d = *x.shape().last().ok_or("softmax of a scalar")?;
            let mut out = contiguous(x).into_owned();
            for row in out.chunks_mut(d) {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut s = 0f64;
                for v in row.iter_mut() {
                    *v = (*v - m).exp();
                    s += *v as f64;
                }
                for v in row.iter_mut() {
                    *v = (*v as f64 / s) as f32;
                }
            }
            ArrayD::from_shape_vec(x.raw_dim(), out).map_err(|e| e.to_string())
        }
        Op::Attention { heads, kv_heads } => {
            attention(*heads as usize, *kv_heads as usize, patterns, operands[0], operands[1], operands[2], &operands[3..], 0)
        }
        Op::Embedding => {
            let (table, ids) = (operands[0], operands[1]);
            let (rows, width) = (table.shape()[0], table.shape()[1]);
            let tv = contiguous(table);
            let mut out = Vec::with_capacity(ids.len() * width);
            for &id in ids.iter() {
                // Ids travel as f32 holding integers (exact below 2^24).
                if id < 0.0 || id.fract() != 0.0 || id as usize >= rows {
                    return Err(format!("id {id} is outside the table's {rows} rows"));
                }
                let r = id as usize;
                out.extend_from_slice(&tv[r * width..(r + 1) * width]);
            }
            ArrayD::from_shape_vec(IxDyn(&[ids.len(), width]), out).map_err(|e| e.to_string())
        }
        Op::Positions => Err("positions needs the sequence length; the interpreter evaluates it".into()),
        Op::Rope { heads, theta, adjacent } => rope(operands[0], *heads as usize, *theta, *adjacent, 0),
    }
}

/// Rotary embedding of `x[seq, heads·d]` at positions `offset..offset+seq`.
pub fn rope(x: &ArrayD<f32>, heads: usize, theta: f32, adjacent: bool, offset: usize) -> Result<ArrayD<f32>, String> {
    let &[s, w] = x.shape() else { return Err(format!("rope of a {}-d value", x.ndim())) };
    if heads == 0 || w % heads != 0 || !(w / heads).is_multiple_of(2) {
        return Err(format!("rope of width {w} over {heads} heads needs heads of an even width"));
    }
    let d = w / heads;
    let mut out = contiguous(x).into_owned();
    for t in 0..s {
        let pos = (t + offset) as f64;
        for h in 0..heads {
            let base = t * w + h * d;
            for i in 0..d / 2 {
                let freq = (theta as f64).powf(-2.0 * i as f64 / d as f64);
                let (sin, cos) = (pos * freq).sin_cos();
                let (a, b) = if adjacent { (base + 2 * i, base + 2 * i + 1) } else { (base + i, base + i + d / 2) };
                let (xa, xb) = (out[a] as f64, out[b] as f64);
                out[a] = (xa * cos - xb * sin) as f32;
                out[b] = (xa * sin + xb * cos) as f32;
            }
        }
    }
    ArrayD::from_shape_vec(x.raw_dim(), out).map_err(|e| e.to_string())
}

/// The keys of `#kv(pre_rope)`: each KV head's coefficients `c[t, kh·r..]`
/// expanded by its basis (`basis[kh·r + i, ..]`, `d` wide), then rotated by
/// RoPE at positions `0..rows` (the caches hold every key from position 0).
pub fn pre_rope_keys(
    coef: &ArrayD<f32>,
    basis: &ArrayD<f32>,
    kv_heads: usize,
    r: usize,
    theta: f32,
    adjacent: bool,
) -> Result<ArrayD<f32>, String> {
    let (&[rows, w], &[br, d]) = (coef.shape(), basis.shape()) else { return Err("pre-RoPE keys need 2-d coefficients and basis".into()) };
    if w != kv_heads * r || br != w {
        return Err(format!("pre-RoPE coefficients of width {w} and a basis of {br} rows for {kv_heads} heads of rank {r}"));
    }
    let (c, b) = (contiguous(coef), contiguous(basis));
    let mut k = vec![0f32; rows * kv_heads * d];
    for t in 0..rows {
        for kh in 0..kv_heads {
            for j in 0..d {
                let dot: f64 = (0..r).map(|i| c[t * w + kh * r + i] as f64 * b[(kh * r + i) * d + j] as f64).sum();
                k[(t * kv_heads + kh) * d + j] = dot as f32;
            }
        }
    }
    let k = ArrayD::from_shape_vec(IxDyn(&[rows, kv_heads * d]), k).map_err(|e| e.to_string())?;
    rope(&k, kv_heads, theta, adjacent, 0)
}

/// Causal attention with an optional sliding window (plus sink tokens). The
/// queries sit at positions `q_offset..q_offset + q.rows`; keys and values cover
/// positions `0..k.rows` (a KV cache followed by the new rows). `extra` are
/// the operands after q, k and v (a gated `#nsa`'s gate and compression).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    heads: usize,
    kv_heads: usize,
    patterns: &[Pattern],
    q: &ArrayD<f32>,
    k: &ArrayD<f32>,
    v: &ArrayD<f32>,
    extra: &[&ArrayD<f32>],
    q_offset: usize,
) -> Result<ArrayD<f32>, String> {
    let mut window: Option<(usize, usize)> = None;
    let mut nsa: Option<NativeSparse> = None;
    let mut expanded = None;
    let mut factored = None;
    let mut low_pass = None;
    for p in patterns {
        match p {
            Pattern::Window(Window::Full) => {}
            Pattern::Window(Window::Sliding { size, sinks }) => window = Some((*size as usize, *sinks as usize)),
            Pattern::Nsa(n) => nsa = Some(*n),
            Pattern::Kv(KvCompression::PreRope { rank, theta, adjacent }) => {
                let basis = extra.first().ok_or("#kv(pre_rope) attention lacks its basis")?;
                expanded = Some(pre_rope_keys(k, basis, kv_heads, *rank as usize, *theta, *adjacent)?);
            }
            Pattern::Kv(KvCompression::ChunkedSvd { chunk, rank }) => factored = Some((*chunk, *rank)),
            Pattern::Kv(kv) => match crate::kv_sequence::SeqParams::of(kv) {
                Some(seq) => low_pass = Some(seq),
                None => crate::pattern::refuse_unimplemented(std::slice::from_ref(p))?,
            },
            Pattern::Sparsity(_) | Pattern::Specialize(_) | Pattern::Values(_) | Pattern::LowRank(_) => {
                return Err(format!("#{} does not apply to attention", p.keyword()))
            }
        }
    }
    let (k, extra) = match &expanded {
        Some(k) => (k, &extra[1..]),
        None => (k, extra),
    };
    if let Some((chunk, rank)) = factored {
        return chunked_svd_attention((heads, kv_heads), chunk, rank, q, k, v, q_offset);
    }
    if let Some(seq) = low_pass {
        return sequence_attention((heads, kv_heads), seq, q, k, v, q_offset);
    }
    let s = q.shape()[0];
    let qw = q.shape()[1];
    let total = k.shape()[0];
    if total != q_offset + s || v.shape()[0] != total {
        return Err(format!("{} keys and {} values for queries at {q_offset}..{}", total, v.shape()[0], q_offset + s));
    }
    let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
    let d = qw / heads;
    let kvw = d * kv_heads;
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    if let Some(nsa) = nsa {
        let extra: Vec<Vec<f32>> = extra.iter().map(|a| contiguous(a).into_owned()).collect();
        let out = nsa_attention(&nsa, (heads, kv_heads, d), (&q[..], &k[..], &v[..]), &extra, q_offset)?;
        return ArrayD::from_shape_vec(IxDyn(&[s, qw]), out).map_err(|e| e.to_string());
    }
    let mut out = vec![0f32; s * qw];
    // Per head, in f64 throughout: scores S = Q·Kᵀ·scale for a chunk of
    // queries, softmax over the visible keys (the rest weigh exactly 0), then
    // P·V divided by the row sums.
    const CHUNK: usize = 128;
    let mut scores = Mat::<f64>::zeros(CHUNK.min(s.max(1)), total);
    let mut pv = Mat::<f64>::zeros(CHUNK.min(s.max(1)), d);
    for kh in 0..kv_heads {
        let kt = Mat::<f64>::from_fn(d, total, |c, j| k[j * kvw + kh * d + c] as f64);
        let vm = Mat::<f64>::from_fn(total, d, |j, c| v[j * kvw + kh * d + c] as f64);
        for h in kh * group..(kh + 1) * group {
            for q0 in (0..s).step_by(CHUNK) {
                let rows = CHUNK.min(s - q0);
                let qm = Mat::<f64>::from_fn(rows, d, |r, c| q[(q0 + r) * qw + h * d + c] as f64);
                let mut sc = scores.as_mut().submatrix_mut(0, 0, rows, total);
                crate::simd_state::faer(|| matmul(sc.rb_mut(), Accum::Replace, qm.as_ref(), kt.as_ref(), scale, Par::Seq));
                let mut sums = vec![0f64; rows];
                for (r, sum) in sums.iter_mut().enumerate() {
                    let i = q0 + r + q_offset; // absolute position of this query
                    let visible = |j: usize| match window {
                        None => j <= i,
                        Some((size, sinks)) => j <= i && (j + size > i || j < sinks),
                    };
                    let m = (0..total).filter(|&j| visible(j)).map(|j| sc[(r, j)]).fold(f64::NEG_INFINITY, f64::max);
                    for j in 0..total {
                        let p = if visible(j) { (sc[(r, j)] - m).exp() } else { 0.0 };
                        sc[(r, j)] = p;
                        *sum += p;
                    }
                }
                let mut o = pv.as_mut().submatrix_mut(0, 0, rows, d);
                crate::simd_state::faer(|| matmul(o.rb_mut(), Accum::Replace, sc.rb(), vm.as_ref(), 1.0, Par::Seq));
                for (r, sum) in sums.iter().enumerate() {
                    for c in 0..d {
                        out[(q0 + r) * qw + h * d + c] = (o[(r, c)] / sum) as f32;
                    }
                }
            }
        }
    }
    ArrayD::from_shape_vec(IxDyn(&[s, qw]), out).map_err(|e| e.to_string())
}

/// Rows of queries, their width, and the keys present, checked: keys and
/// values cover positions `0..q_offset + rows`.
fn query_rows(q: &ArrayD<f32>, k: &ArrayD<f32>, v: &ArrayD<f32>, q_offset: usize) -> Result<(usize, usize, usize), String> {
    let (s, qw, total) = (q.shape()[0], q.shape()[1], k.shape()[0]);
    if total != q_offset + s || v.shape()[0] != total {
        return Err(format!("{} keys and {} values for queries at {q_offset}..{}", total, v.shape()[0], q_offset + s));
    }
    Ok((s, qw, total))
}

/// `a·b` in f64.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Softmax over the keys' scores, then the weighted sum of their value rows (f64).
fn attend(keys: &[(f64, &[f32])]) -> Vec<f64> {
    let m = keys.iter().map(|x| x.0).fold(f64::NEG_INFINITY, f64::max);
    let d = keys.first().map_or(0, |x| x.1.len());
    let (mut sum, mut acc) = (0.0, vec![0f64; d]);
    for (sc, row) in keys {
        let w = (sc - m).exp();
        sum += w;
        for (a, x) in acc.iter_mut().zip(row.iter()) {
            *a += w * *x as f64;
        }
    }
    acc.iter().map(|a| a / sum).collect()
}

/// Causal attention over chunked-SVD caches (`#kv(chunked_svd)`, the rule of
/// `kv_chunked`): the query at position p reads the chunks before its own
/// through their factors (expanded here, in f64), and its own chunk exactly.
/// Simple loops in f64, one query and head at a time.
#[allow(clippy::too_many_arguments)]
fn chunked_svd_attention(
    (heads, kv_heads): (usize, usize),
    chunk: u32,
    rank: SvdRank,
    q: &ArrayD<f32>,
    k: &ArrayD<f32>,
    v: &ArrayD<f32>,
    q_offset: usize,
) -> Result<ArrayD<f32>, String> {
    let (s, qw, _) = query_rows(q, k, v, q_offset)?;
    let d = qw / heads.max(1);
    let kvw = kv_heads * d;
    let layout = crate::kv_chunked::ChunkLayout::new(chunk, rank, kv_heads, d, 1).ok_or("#kv(chunked_svd) does not fit the heads")?;
    let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
    let kf = layout.factored(&k).ok_or("#kv(chunked_svd): a chunk of K does not factor")?;
    let vf = layout.factored(&v).ok_or("#kv(chunked_svd): a chunk of V does not factor")?;
    let group = heads / kv_heads.max(1);
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; s * qw];
    for r in 0..s {
        let p = q_offset + r;
        let own = p / layout.chunk * layout.chunk;
        for h in 0..heads {
            let kh = h / group.max(1);
            // Key j as the query at p reads it: factored before its own chunk.
            let keys: Vec<(f64, &[f32])> = (0..=p)
                .map(|j| {
                    let (ks, vs): (&[f32], &[f32]) = if j < own { (&kf, &vf) } else { (&k, &v) };
                    let (kr, vr) = (&ks[j * kvw + kh * d..j * kvw + (kh + 1) * d], &vs[j * kvw + kh * d..j * kvw + (kh + 1) * d]);
                    (dot(&q[r * qw + h * d..r * qw + (h + 1) * d], kr) * scale, vr)
                })
                .collect();
            for (c, y) in attend(&keys).into_iter().enumerate() {
                out[r * qw + h * d + c] = y as f32;
            }
        }
    }
    ArrayD::from_shape_vec(IxDyn(&[s, qw]), out).map_err(|e| e.to_string())
}

/// Causal attention over sequence-axis caches (`#kv(dct | pswf, axis =
/// sequence)`, the rule of `kv_sequence`): the query at p reads the sinks,
/// the low-pass positions of the blocks older than its last `recent`
/// positions (each score + ln(block/m)), and the rest exactly. Simple loops
/// in f64, one query and head at a time.
fn sequence_attention(
    (heads, kv_heads): (usize, usize),
    seq: crate::kv_sequence::SeqParams,
    q: &ArrayD<f32>,
    k: &ArrayD<f32>,
    v: &ArrayD<f32>,
    q_offset: usize,
) -> Result<ArrayD<f32>, String> {
    let (s, qw, total) = query_rows(q, k, v, q_offset)?;
    let d = qw / heads.max(1);
    let kvw = kv_heads * d;
    let l = seq.layout(kvw, 1).ok_or("#kv(axis = sequence) keeps nothing")?;
    let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
    // Every complete block's low-pass rows.
    let low = |x: &[f32]| -> Result<Vec<Vec<f32>>, String> {
        (0..l.blocks(total))
            .map(|b| {
                let at = (l.sinks + b * l.block) * kvw;
                l.compress(&x[at..at + l.block * kvw]).ok_or_else(|| "a block does not compress".to_string())
            })
            .collect()
    };
    let (kl, vl) = (low(&k)?, low(&v)?);
    let group = heads / kv_heads.max(1);
    let scale = 1.0 / (d as f64).sqrt();
    let bonus = l.bonus() as f64;
    let mut out = vec![0f32; s * qw];
    for r in 0..s {
        let p = q_offset + r;
        let nb = l.read_blocks(p);
        let from = l.sinks + nb * l.block;
        for h in 0..heads {
            let kh = h / group.max(1);
            // (score, value row) of every key the query reads.
            let qh = &q[r * qw + h * d..r * qw + (h + 1) * d];
            let mut keys: Vec<(f64, &[f32])> = Vec::new();
            for t in (0..l.sinks.min(p + 1)).chain(from.max(l.sinks)..p + 1) {
                let at = t * kvw + kh * d;
                keys.push((dot(qh, &k[at..at + d]) * scale, &v[at..at + d]));
            }
            for b in 0..nb {
                for j in 0..l.m {
                    let at = j * kvw + kh * d;
                    keys.push((dot(qh, &kl[b][at..at + d]) * scale + bonus, &vl[b][at..at + d]));
                }
            }
            for (c, y) in attend(&keys).into_iter().enumerate() {
                out[r * qw + h * d + c] = y as f32;
            }
        }
    }
    ArrayD::from_shape_vec(IxDyn(&[s, qw]), out).map_err(|e| e.to_string())
}

/// Per KV head and whole block (`nb` of them), what native sparse attention
/// keeps of the block, in f64: the keys' per-channel mean, minimum and
/// maximum (for scoring), and, when gated, the block's compressed key and
/// value (`NsaCompress`).
struct NsaBlocks {
    nb: usize,
    /// `[kv_heads][nb][d]` each.
    mean: Vec<f64>,
    min: Vec<f64>,
    max: Vec<f64>,
    ck: Vec<f64>,
    cv: Vec<f64>,
}

impl NsaBlocks {
    fn new(nsa: &NativeSparse, (kv_heads, d): (usize, usize), k: &[f32], v: &[f32], compress: Option<&[f32]>) -> Self {
        let kvw = kv_heads * d;
        let block = nsa.block as usize;
        let nb = k.len() / kvw.max(1) / block.max(1);
        let n = kv_heads * nb * d;
        let (mut mean, mut min, mut max) = (vec![0f64; n], vec![f64::INFINITY; n], vec![f64::NEG_INFINITY; n]);
        let (mut ck, mut cv) = (vec![0f64; if nsa.gated() { n } else { 0 }], vec![0f64; if nsa.gated() { n } else { 0 }]);
        let words = crate::pattern::NsaCompress::linear_words(block as u64, d as u64) as usize;
        for kh in 0..kv_heads {
            for b in 0..nb {
                let at = (kh * nb + b) * d;
                for c in 0..d {
                    for j in b * block..(b + 1) * block {
                        let x = k[j * kvw + kh * d + c] as f64;
                        mean[at + c] += x / block as f64;
                        min[at + c] = min[at + c].min(x);
                        max[at + c] = max[at + c].max(x);
                    }
                    // As a `bound` summary stores them: f16, rounded outward.
                    min[at + c] = crate::pattern::f16_down(min[at + c] as f32) as f64;
                    max[at + c] = crate::pattern::f16_up(max[at + c] as f32) as f64;
                }
                if !nsa.gated() {
                    continue;
                }
                for (src, dst, row) in [(k, &mut ck, kh), (v, &mut cv, kv_heads + kh)] {
                    match compress {
                        // Mean pooling.
                        None => {
                            for c in 0..d {
                                dst[at + c] =
                                    (b * block..(b + 1) * block).map(|j| src[j * kvw + kh * d + c] as f64).sum::<f64>() / block as f64;
                            }
                        }
                        // W·(Σ_j p_j·x_j) + c.
                        Some(w) => {
                            let w = &w[row * words..(row + 1) * words];
                            let pooled: Vec<f64> = (0..d)
                                .map(|c| (0..block).map(|jj| w[jj] as f64 * src[(b * block + jj) * kvw + kh * d + c] as f64).sum())
                                .collect();
                            for o in 0..d {
                                let m = &w[block + d + o * d..block + d + (o + 1) * d];
                                dst[at + o] = w[block + o] as f64 + m.iter().zip(&pooled).map(|(&a, p)| a as f64 * p).sum::<f64>();
                            }
                        }
                    }
                }
            }
        }
        NsaBlocks { nb, mean, min, max, ck, cv }
    }
}

/// What a query at position `i` of KV head `kh` sees under native sparse
/// attention (`NativeSparse`), ranking blocks from `blocks`: its sinks and the
/// selected blocks (in that order), then its window.
fn nsa_visible(
    nsa: &NativeSparse,
    (group, d): (usize, usize),
    qrow: &[f32],
    blocks: &NsaBlocks,
    kh: usize,
    i: usize,
) -> (Vec<usize>, Vec<usize>) {
    let (block, window) = (nsa.block as usize, nsa.window as usize);
    let from = (i + 1).saturating_sub(window);
    let sinks = (nsa.sinks as usize).min(from);
    let mut seen: Vec<usize> = (0..sinks).collect();
    let first = (nsa.sinks as usize).div_ceil(block);
    let last = from / block; // candidate blocks first..last end at or before the window
    if last > first {
        let scale = 1.0 / (d as f64).sqrt();
        // Per head of the group: a softmax over the candidates' scores; the
        // probabilities summed over the group rank the blocks.
        let mut importance = vec![0f64; last - first];
        for g in 0..group {
            let qh = &qrow[(kh * group + g) * d..(kh * group + g + 1) * d];
            let scores: Vec<f64> = (first..last)
                .map(|b| {
                    let at = (kh * blocks.nb + b) * d;
                    let s: f64 = (0..d)
                        .map(|c| {
                            let qc = qh[c] as f64;
                            match nsa.score {
                                NsaScore::Mean => qc * blocks.mean[at + c],
                                NsaScore::Bound => (qc * blocks.min[at + c]).max(qc * blocks.max[at + c]),
                            }
                        })
                        .sum();
                    s * scale
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            for (imp, s) in importance.iter_mut().zip(&scores) {
                *imp += (s - m).exp() / z;
            }
        }
        // The top_n, earlier blocks first among equals.
        let mut order: Vec<usize> = (0..importance.len()).collect();
        order.sort_by(|&a, &b| importance[b].total_cmp(&importance[a]).then(a.cmp(&b)));
        for &c in order.iter().take(nsa.top_n as usize) {
            let b = first + c;
            seen.extend(b * block..(b + 1) * block);
        }
    }
    (seen, (from..=i).collect())
}

/// Softmax(q·kᵀ/√d)·v of one head over the keys `keys` yields (key row,
/// value row) pairs, in f64; all zeros when there are none.
fn softmax_rows<'a>(q: &[f32], keys: impl Iterator<Item = (&'a [f64], &'a [f64])> + Clone, d: usize) -> Vec<f64> {
    let scale = 1.0 / (d as f64).sqrt();
    let sc: Vec<f64> = keys.clone().map(|(k, _)| q.iter().zip(k).map(|(&a, b)| a as f64 * b).sum::<f64>() * scale).collect();
    let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = p.iter().sum();
    let mut y = vec![0f64; d];
    for ((_, v), w) in keys.zip(&p) {
        for (yc, vc) in y.iter_mut().zip(v) {
            *yc += w * vc / z;
        }
    }
    y
}

/// The three branch outputs of gated native sparse attention for query rows
/// `rows` (of `q`, at positions `q_offset + r`): per row and head the
/// compressed, selected and window branches' outputs, `d` each, in f64
/// (`NativeSparse`). `compress` is the linear compression's data
/// (`NsaCompress::Linear`), `None` for mean pooling. Used by the interpreter
/// and by gate fitting.
#[allow(clippy::too_many_arguments)]
pub fn nsa_branches(
    nsa: &NativeSparse,
    (heads, kv_heads, d): (usize, usize, usize),
    q: &[f32],
    k: &[f32],
    v: &[f32],
    compress: Option<&[f32]>,
    q_offset: usize,
    rows: &[usize],
) -> Vec<f64> {
    let gated = NativeSparse { gate: crate::pattern::NsaGate::Fixed, ..*nsa };
    let blocks = NsaBlocks::new(&gated, (kv_heads, d), k, v, compress);
    let (qw, kvw, group, block) = (heads * d, kv_heads * d, heads / kv_heads, nsa.block as usize);
    let k64: Vec<f64> = k.iter().map(|&x| x as f64).collect();
    let v64: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    let mut out = Vec::with_capacity(rows.len() * heads * 3 * d);
    for &r in rows {
        let i = r + q_offset;
        let qrow = &q[r * qw..(r + 1) * qw];
        for kh in 0..kv_heads {
            let (sel, win) = nsa_visible(nsa, (group, d), qrow, &blocks, kh, i);
            let kv_of = |j: usize| (&k64[j * kvw + kh * d..j * kvw + (kh + 1) * d], &v64[j * kvw + kh * d..j * kvw + (kh + 1) * d]);
            let visible_blocks = (i + 1) / block;
            let cmp = (0..visible_blocks.min(blocks.nb)).map(|b| {
                let at = (kh * blocks.nb + b) * d;
                (&blocks.ck[at..at + d], &blocks.cv[at..at + d])
            });
            for h in kh * group..(kh + 1) * group {
                let qh = &qrow[h * d..(h + 1) * d];
                out.extend(softmax_rows(qh, cmp.clone(), d));
                out.extend(softmax_rows(qh, sel.iter().map(|&j| kv_of(j)), d));
                out.extend(softmax_rows(qh, win.iter().map(|&j| kv_of(j)), d));
            }
        }
    }
    out
}

/// `attention` under `#nsa` for queries `q` at positions `q_offset..` over
/// keys and values `k`, `v` (rows of `kv_heads·d`), in f64. Joint: per query
/// and KV group, the visible positions (`nsa_visible`), then one softmax
/// over them per head. Gated: the three branches (`nsa_branches`) mixed by
/// the gate `extra[0]` (weights, or logits through a sigmoid), with the linear
/// compression `extra[1]` when given. Returns the rows of `heads·d` outputs.
fn nsa_attention(
    nsa: &NativeSparse,
    (heads, kv_heads, d): (usize, usize, usize),
    (q, k, v): (&[f32], &[f32], &[f32]),
    extra: &[Vec<f32>],
    q_offset: usize,
) -> Result<Vec<f32>, String> {
    use crate::pattern::{NsaCompress, NsaGate};
    let qw = heads * d;
    let kvw = d * kv_heads;
    let group = heads / kv_heads;
    let s = q.len() / qw.max(1);
    let mut out = vec![0f32; s * qw];
    if nsa.extra_operands() != extra.len() {
        return Err(format!(
            "#nsa with gate = {} takes {} operands after q, k, v, got {}",
            nsa.gate.name(),
            nsa.extra_operands(),
            extra.len()
        ));
    }
    if nsa.gated() {
        let gate = &extra[0];
        let compress = (nsa.compress == NsaCompress::Linear).then(|| extra[1].as_slice());
        let rows: Vec<usize> = (0..s).collect();
        let ys = nsa_branches(nsa, (heads, kv_heads, d), q, k, v, compress, q_offset, &rows);
        for r in 0..s {
            for h in 0..heads {
                for (br, y) in ys[(r * heads + h) * 3 * d..(r * heads + h + 1) * 3 * d].chunks(d).enumerate() {
                    let g = match nsa.gate {
                        NsaGate::Sigmoid => 1.0 / (1.0 + (-(gate[r * 3 * heads + h * 3 + br] as f64)).exp()),
                        _ => gate[h * 3 + br] as f64,
                    };
                    for (c, yc) in y.iter().enumerate() {
                        out[r * qw + h * d + c] += (g * yc) as f32;
                    }
                }
            }
        }
        return Ok(out);
    }
    let blocks = NsaBlocks::new(nsa, (kv_heads, d), k, v, None);
    let k64: Vec<f64> = k.iter().map(|&x| x as f64).collect();
    let v64: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    for r in 0..s {
        let i = r + q_offset;
        let qrow = &q[r * qw..(r + 1) * qw];
        for kh in 0..kv_heads {
            let (mut seen, win) = nsa_visible(nsa, (group, d), qrow, &blocks, kh, i);
            seen.extend(win);
            let kv_of = |j: usize| (&k64[j * kvw + kh * d..j * kvw + (kh + 1) * d], &v64[j * kvw + kh * d..j * kvw + (kh + 1) * d]);
            for h in kh * group..(kh + 1) * group {
                let y = softmax_rows(&qrow[h * d..(h + 1) * d], seen.iter().map(|&j| kv_of(j)), d);
                for (c, yc) in y.iter().enumerate() {
                    out[r * qw + h * d + c] = *yc as f32;
                }
            }
        }
    }
    Ok(out)
}
