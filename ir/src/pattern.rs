//! The pattern families of DESIGN.md as typed attributes on ops: weight sparsity,
//! the specialization dial, low rank / shared bases, frequency-domain and
//! chunked-SVD K/V, sliding windows, native sparse attention.
//! Their invariants are checked in `verifier.rs`; their spelling is `#name(args)`.

use crate::attr::{AttrArgs, AttrValue};

/// One pattern attached to an op. Closed: adding a family means adding a variant
/// here and following `docs/add-a-pattern.md`.
#[derive(Clone, Debug, PartialEq)]
pub enum Pattern {
    /// Weight sparsity of the right-hand (weight) operand of a matmul.
    Sparsity(Sparsity),
    /// How far the compiler specializes a sparse kernel.
    Specialize(Specialize),
    /// How the kept values of a `#sparsity` weight are stored (f32, 8-bit or 4-bit blocks).
    Values(ValueCoding),
    /// The weight is factored `W ≈ B·C`, `B` possibly shared by a group of layers.
    LowRank(LowRank),
    /// K/V compression of an attention op.
    Kv(KvCompression),
    /// Attention window (full, or sliding with sink tokens).
    Window(Window),
    /// Native sparse attention: compressed, selected and sliding branches.
    Nsa(NativeSparse),
}

/// Which kind of op a pattern may sit on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatternSite {
    MatMul,
    Attention,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Sparsity {
    /// Magnitude pruning to `ratio` zeros, anywhere.
    Unstructured { ratio: f32 },
    /// `n` nonzeros in every group of `m` consecutive elements of a row.
    NM { n: u32, m: u32 },
    /// `ratio` of the `rows`×`cols` blocks are zero.
    Block { ratio: f32, rows: u32, cols: u32 },
}

/// How a pruned weight's kept values are stored: f32, or blocks of 32
/// consecutive stored values quantized as Q8_0 (8-bit, f16 scale) or Q4_1
/// (4-bit, f16 scale and minimum) do for dense weights
/// (`sparse_quant.rs`). The weight's reference value is the dequantized one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueCoding {
    F32,
    Q8,
    Q4,
}

impl ValueCoding {
    pub const ALL: [ValueCoding; 3] = [ValueCoding::F32, ValueCoding::Q8, ValueCoding::Q4];

    pub fn name(self) -> &'static str {
        match self {
            ValueCoding::F32 => "f32",
            ValueCoding::Q8 => "q8",
            ValueCoding::Q4 => "q4",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        ValueCoding::ALL.into_iter().find(|v| v.name() == s)
    }
}

/// The specialization dial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Specialize {
    /// Ignore the zeros: a dense kernel.
    Dense,
    /// One sparse kernel; indices and values read at run time.
    Generic,
    /// Nonzero structure baked into the code; values read at run time.
    Indices,
    /// Indices and values baked as constants.
    Full,
    /// The compiler picks from its cost model.
    Auto,
}

impl Specialize {
    pub const ALL: [Specialize; 5] = [Specialize::Dense, Specialize::Generic, Specialize::Indices, Specialize::Full, Specialize::Auto];

    pub fn name(self) -> &'static str {
        match self {
            Specialize::Dense => "dense",
            Specialize::Generic => "generic",
            Specialize::Indices => "indices",
            Specialize::Full => "full",
            Specialize::Auto => "auto",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Specialize::ALL.into_iter().find(|v| v.name() == s)
    }
}

/// `x·Wᵀ ≈ (x·Bᵀ)·Cᵀ`: the weight replaced by an input-side factor `B`
/// (`[rank, k]`) and an output-side factor `C` (`[n, rank]`). The `low-rank`
/// pass (`passes/src/low_rank.rs`) lowers it into two matmuls over new weights
/// before any backend runs; the factors' data come from the model
/// (`src/factor.rs` fits them) or a weights file.
#[derive(Clone, Debug, PartialEq)]
pub struct LowRank {
    pub rank: u32,
    /// Name of the input-side factor shared by a group of layers (one weight
    /// node, one buffer); `None` for a private factorization.
    pub basis: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvAxis {
    /// Along the head features (a fixed low-pass projection, foldable into weights).
    Feature,
    /// Along the sequence (whole or blockwise).
    Sequence,
}

impl KvAxis {
    pub fn name(self) -> &'static str {
        match self {
            KvAxis::Feature => "feature",
            KvAxis::Sequence => "sequence",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SvdRank {
    Fixed(u32),
    /// Smallest rank keeping `fraction` of the chunk's spectral energy, at
    /// most `max_rank` (the slot the cache reserves per chunk; unset: half
    /// of `min(chunk, head width)`, where the f16 factors take as many bytes
    /// as the f16 rows they stand for).
    Energy {
        fraction: f32,
        max_rank: Option<u32>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum KvCompression {
    /// Along the feature axis: the lowest `keep·d` DCT-II frequencies of a
    /// head (the plan's feature bases are a pass, not this pattern). Along
    /// the sequence axis (`kv_sequence`): positions after the first `sinks`
    /// are taken in blocks of `block`; a block older than the last `recent`
    /// positions is read as `round(keep·block)` low-pass positions.
    Dct {
        keep: f32,
        axis: KvAxis,
        block: Option<u32>,
        /// Sequence axis: positions kept exact at the start (0 on the feature axis).
        sinks: u32,
        /// Sequence axis: the newest positions kept exact (0 on the feature axis).
        recent: u32,
    },
    /// As `Dct`, in discrete prolate spheroidal sequences of half-bandwidth
    /// `bandwidth` (feature axis: the plan's bases are a pass; sequence
    /// axis: `kv_sequence`'s PSWF basis).
    Pswf {
        keep: f32,
        axis: KvAxis,
        block: Option<u32>,
        bandwidth: f32,
        /// Sequence axis: positions kept exact at the start (0 on the feature axis).
        sinks: u32,
        /// Sequence axis: the newest positions kept exact (0 on the feature axis).
        recent: u32,
    },
    ChunkedSvd {
        chunk: u32,
        rank: SvdRank,
    },
    /// K cached before RoPE as `rank` coefficients per KV head in an
    /// orthonormal basis of the head's features (operand 3, `[kv_heads·rank,
    /// d]`, row `kh·rank + c` = basis vector c of KV head kh); attention
    /// expands each cached key and rotates it by its position as it reads it
    /// (base `theta`, pairs as `Op::Rope`'s `adjacent`).
    PreRope {
        rank: u32,
        theta: f32,
        adjacent: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Window {
    Full,
    Sliding { size: u32, sinks: u32 },
}

/// Native sparse attention for inference (NSA's selected and sliding
/// branches, no training): a query at position i sees its first `sinks`
/// positions, the `top_n` most important complete blocks of `block` positions
/// between the sinks and its window, and the `window` positions ending at i.
/// Blocks are ranked per KV group: each head of the group scores every
/// candidate block (`score`), the scores go through a softmax over the
/// candidates per head, and the probabilities are summed over the group's
/// heads (ties go to the earlier block). A candidate block lies whole at or
/// after the sinks (`b·block ≥ sinks`) and before the window.
///
/// `gate` says how the keys are mixed. `Joint`: one softmax over the sinks,
/// the selected blocks and the window. Otherwise NSA's three branches, each
/// its own softmax, mixed per head by gate weights `g` (operand 3 of the
/// attention: `[3·heads]` constants under `Fixed`, `[seq, 3·heads]` logits
/// through a sigmoid under `Sigmoid`; per head in the order compressed,
/// selected, window):
/// - compressed: over one compressed key and value per whole block at or
///   before the query (block `b` when `(b+1)·block ≤ i+1`), `compress` saying
///   how a block's keys and values become one;
/// - selected: over the sinks and the selected blocks;
/// - window: over the window.
///
/// A branch without keys contributes nothing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NativeSparse {
    pub block: u32,
    pub top_n: u32,
    pub window: u32,
    pub sinks: u32,
    pub score: NsaScore,
    pub gate: NsaGate,
    pub compress: NsaCompress,
}

/// How NSA's branches are mixed (`NativeSparse`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NsaGate {
    /// No branches: one softmax over sinks, selected blocks and window.
    Joint,
    /// Three branches, mixed by constant weights per head (operand 3,
    /// `[3·heads]`): fitted on calibration text by least squares.
    Fixed,
    /// Three branches, mixed by `sigmoid(logits)` per row and head (operand 3,
    /// `[seq, 3·heads]`, computed by the graph from trained gate weights).
    Sigmoid,
}

impl NsaGate {
    pub const ALL: [NsaGate; 3] = [NsaGate::Joint, NsaGate::Fixed, NsaGate::Sigmoid];

    pub fn name(self) -> &'static str {
        match self {
            NsaGate::Joint => "joint",
            NsaGate::Fixed => "fixed",
            NsaGate::Sigmoid => "sigmoid",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        NsaGate::ALL.into_iter().find(|v| v.name() == s)
    }
}

/// How a block's keys (and values) become its compressed key (and value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NsaCompress {
    /// Their mean.
    Mean,
    /// A trained linear compression (operand 4 of the attention, `[2·kv_heads,
    /// block + d + d·d]`: row `kh` for K and `kv_heads + kh` for V, each the
    /// per-position weights `p[block]`, the bias `c[d]` and the map `W[d, d]`
    /// row-major): `W·(Σ_j p_j·x_j) + c` over the block's rows `x_j`.
    Linear,
}

impl NsaCompress {
    pub const ALL: [NsaCompress; 2] = [NsaCompress::Mean, NsaCompress::Linear];

    pub fn name(self) -> &'static str {
        match self {
            NsaCompress::Mean => "mean",
            NsaCompress::Linear => "linear",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        NsaCompress::ALL.into_iter().find(|v| v.name() == s)
    }

    /// f32 words of a `Linear` compression row for one of K or V of one KV head.
    pub fn linear_words(block: u64, d: u64) -> u64 {
        block + d + d * d
    }
}

impl NativeSparse {
    /// The `#nsa` pattern among an op's patterns, if it has one.
    pub fn of(patterns: &[Pattern]) -> Option<NativeSparse> {
        patterns.iter().find_map(|p| match p {
            Pattern::Nsa(n) => Some(*n),
            _ => None,
        })
    }

    /// Whether the three branches are mixed by a gate (not `Joint`).
    pub fn gated(&self) -> bool {
        self.gate != NsaGate::Joint
    }

    /// f32 words of one KV head's selection: the count selected, `top_n`
    /// block indices and `top_n` importances.
    pub fn select_words_per_head(&self) -> u64 {
        2 * self.top_n as u64 + 1
    }

    /// f32 words of a selection row (one per query row): every KV head's.
    pub fn select_words(&self, kv_heads: u64) -> u64 {
        kv_heads * self.select_words_per_head()
    }

    /// Head-width slabs of a KV head's part of a block summary row: first
    /// the one slab the selection's score reads, then, when gated, the
    /// compressed key and compressed value (`compressed_slab`).
    ///
    /// The score's slab: `mean`, the keys' mean per channel (f32); `bound`,
    /// f16 pairs: the `d` per-channel minima rounded toward −∞ (`f16_down`),
    /// then the `d` maxima rounded toward +∞ (`f16_up`), two to a word,
    /// channel `2i` in word `i`'s low half. Half the bytes of f32 bounds, and
    /// the bound still holds every key of the block (exact for f16 caches,
    /// whose keys are f16 already).
    pub fn block_slabs(&self) -> u64 {
        self.compressed_slab() + if self.gated() { 2 } else { 0 }
    }

    /// Gated: the slab of the compressed key in a KV head's part of a block
    /// summary row (after the score's, `block_slabs`; the compressed value's
    /// follows it).
    pub fn compressed_slab(&self) -> u64 {
        1
    }

    /// f32 words of a block summary row, for `kv_width` = KV heads × head width.
    pub fn block_words(&self, kv_width: u64) -> u64 {
        self.block_slabs() * kv_width
    }

    /// The attention's operands beyond q, k and v: the gate (when gated), then
    /// the compression weights (under `NsaCompress::Linear`).
    pub fn extra_operands(&self) -> usize {
        self.gated() as usize + (self.compress == NsaCompress::Linear) as usize
    }
}

/// `x` rounded to an f16 value at or below it (toward −∞), as f32: the
/// minimum a `bound` block summary stores (`NativeSparse::block_slabs`).
pub fn f16_down(x: f32) -> f32 {
    let h = half::f16::from_f32(x);
    if h.to_f32() <= x || h.is_nan() {
        return h.to_f32();
    }
    f16_step(h, false).to_f32()
}

/// `x` rounded to an f16 value at or above it (toward +∞), as f32: the
/// maximum a `bound` block summary stores.
pub fn f16_up(x: f32) -> f32 {
    let h = half::f16::from_f32(x);
    if h.to_f32() >= x || h.is_nan() {
        return h.to_f32();
    }
    f16_step(h, true).to_f32()
}

/// The f16 next to `h` upward or downward (from ±0: the smallest subnormal
/// of that sign). The compiled summary kernel steps the same way on the bits.
fn f16_step(h: half::f16, up: bool) -> half::f16 {
    let bits = h.to_bits();
    let negative = bits & 0x8000 != 0;
    let stepped = match (bits & 0x7fff == 0, up, negative) {
        (true, true, _) => 0x0001,
        (true, false, _) => 0x8001,
        // Away from zero: the magnitude grows; toward zero: it shrinks.
        (false, true, false) | (false, false, true) => bits + 1,
        (false, true, true) | (false, false, false) => bits - 1,
    };
    half::f16::from_bits(stepped)
}

/// How a query head scores a block of keys (scaled by 1/√d like a key's score).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NsaScore {
    /// `q · mean(K_block)`: the score against the block's mean-pooled key
    /// (NSA's compressed key without a trained compression).
    Mean,
    /// `Σ_c max(q_c·min_c, q_c·max_c)` over the block's per-channel key
    /// minimum and maximum: an upper bound of every key's score in the block
    /// (as Quest keeps).
    Bound,
}

impl NsaScore {
    pub const ALL: [NsaScore; 2] = [NsaScore::Mean, NsaScore::Bound];

    pub fn name(self) -> &'static str {
        match self {
            NsaScore::Mean => "mean",
            NsaScore::Bound => "bound",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        NsaScore::ALL.into_iter().find(|v| v.name() == s)
    }
}

impl Pattern {
    /// The name after `#` in the text form.
    pub fn keyword(&self) -> &'static str {
        match self {
            Pattern::Sparsity(_) => "sparsity",
            Pattern::Specialize(_) => "specialize",
            Pattern::Values(_) => "values",
            Pattern::LowRank(_) => "low_rank",
            Pattern::Kv(_) => "kv",
            Pattern::Window(_) => "window",
            Pattern::Nsa(_) => "nsa",
        }
    }

    /// Whether a backend and the interpreter execute an op carrying the
    /// pattern. The text form and the verifier know every pattern; one nothing
    /// implements is refused by `refuse_unimplemented`, never silently ignored.
    /// `#low_rank` is false: the `low-rank` pass lowers it into plain matmuls,
    /// so an op that still carries it was not lowered.
    pub fn implemented(&self) -> bool {
        match self {
            Pattern::Sparsity(_)
            | Pattern::Specialize(_)
            | Pattern::Values(_)
            | Pattern::Window(_)
            | Pattern::Nsa(_)
            | Pattern::Kv(KvCompression::PreRope { .. } | KvCompression::ChunkedSvd { .. }) => true,
            Pattern::Kv(KvCompression::Dct { axis, .. } | KvCompression::Pswf { axis, .. }) => *axis == KvAxis::Sequence,
            Pattern::LowRank(_) => false,
        }
    }

    pub fn site(&self) -> PatternSite {
        match self {
            Pattern::Sparsity(_) | Pattern::Specialize(_) | Pattern::Values(_) | Pattern::LowRank(_) => PatternSite::MatMul,
            Pattern::Kv(_) | Pattern::Window(_) | Pattern::Nsa(_) => PatternSite::Attention,
        }
    }

    /// The arguments in canonical order, for the printer.
    pub fn to_args(&self) -> AttrArgs {
        use AttrValue::{Float, Int, Str, Word};
        let a = AttrArgs::new();
        match self {
            Pattern::Sparsity(Sparsity::Unstructured { ratio }) => a.word("unstructured").kv("ratio", Float(*ratio as f64)),
            Pattern::Sparsity(Sparsity::NM { n, m }) => a.word("nm").kv("n", Int(*n as i128)).kv("m", Int(*m as i128)),
            Pattern::Sparsity(Sparsity::Block { ratio, rows, cols }) => {
                a.word("block").kv("ratio", Float(*ratio as f64)).kv("rows", Int(*rows as i128)).kv("cols", Int(*cols as i128))
            }
            Pattern::Specialize(s) => a.word(s.name()),
            Pattern::Values(v) => a.word(v.name()),
            Pattern::LowRank(LowRank { rank, basis }) => {
                let a = a.kv("rank", Int(*rank as i128));
                match basis {
                    Some(b) => a.kv("basis", Str(b.clone())),
                    None => a,
                }
            }
            Pattern::Kv(KvCompression::Dct { keep, axis, block, sinks, recent }) => {
                let a = a.word("dct").kv("keep", Float(*keep as f64)).kv("axis", Word(axis.name().into()));
                let a = match block {
                    Some(b) => a.kv("block", Int(*b as i128)),
                    None => a,
                };
                match axis {
                    KvAxis::Sequence => a.kv("sinks", Int(*sinks as i128)).kv("recent", Int(*recent as i128)),
                    KvAxis::Feature => a,
                }
            }
            Pattern::Kv(KvCompression::Pswf { keep, axis, block, bandwidth, sinks, recent }) => {
                let a = a.word("pswf").kv("keep", Float(*keep as f64)).kv("axis", Word(axis.name().into()));
                let a = match block {
                    Some(b) => a.kv("block", Int(*b as i128)),
                    None => a,
                };
                let a = a.kv("bandwidth", Float(*bandwidth as f64));
                match axis {
                    KvAxis::Sequence => a.kv("sinks", Int(*sinks as i128)).kv("recent", Int(*recent as i128)),
                    KvAxis::Feature => a,
                }
            }
            Pattern::Kv(KvCompression::ChunkedSvd { chunk, rank }) => {
                let a = a.word("chunked_svd").kv("chunk", Int(*chunk as i128));
                match rank {
                    SvdRank::Fixed(r) => a.kv("rank", Int(*r as i128)),
                    SvdRank::Energy { fraction, max_rank } => {
                        let a = a.kv("energy", Float(*fraction as f64));
                        match max_rank {
                            Some(m) => a.kv("max_rank", Int(*m as i128)),
                            None => a,
                        }
                    }
                }
            }
            Pattern::Kv(KvCompression::PreRope { rank, theta, adjacent }) => a
                .word("pre_rope")
                .kv("rank", Int(*rank as i128))
                .kv("theta", Float(*theta as f64))
                .kv("adjacent", AttrValue::Bool(*adjacent)),
            Pattern::Window(Window::Full) => a.word("full"),
            Pattern::Window(Window::Sliding { size, sinks }) => {
                a.word("sliding").kv("size", Int(*size as i128)).kv("sinks", Int(*sinks as i128))
            }
            Pattern::Nsa(NativeSparse { block, top_n, window, sinks, score, gate, compress }) => {
                let a = a
                    .kv("block", Int(*block as i128))
                    .kv("top_n", Int(*top_n as i128))
                    .kv("window", Int(*window as i128))
                    .kv("sinks", Int(*sinks as i128))
                    .kv("score", Word(score.name().into()));
                // The defaults are left out, so joint NSA reads as before.
                let a = if *gate == NsaGate::Joint { a } else { a.kv("gate", Word(gate.name().into())) };
                if *compress == NsaCompress::Mean {
                    a
                } else {
                    a.kv("compress", Word(compress.name().into()))
                }
            }
        }
    }

    /// Builds a pattern from `#keyword(args)`; errors are sentences.
    pub fn from_args(keyword: &str, args: &AttrArgs) -> Result<Pattern, String> {
        let what = format!("#{keyword}");
        let mut r = args.reader(&what);
        let p = match keyword {
            "sparsity" => {
                let kind = r.require_positional("unstructured, nm or block")?;
                match kind {
                    "unstructured" => Pattern::Sparsity(Sparsity::Unstructured { ratio: r.f32("ratio")? }),
                    "nm" => Pattern::Sparsity(Sparsity::NM { n: r.u32("n")?, m: r.u32("m")? }),
                    "block" => Pattern::Sparsity(Sparsity::Block { ratio: r.f32("ratio")?, rows: r.u32("rows")?, cols: r.u32("cols")? }),
                    other => return Err(format!("{what}: unknown kind `{other}` (expected unstructured, nm or block)")),
                }
            }
            "specialize" => {
                let level = r.require_positional("dense, generic, indices, full or auto")?;
                Pattern::Specialize(
                    Specialize::from_name(level)
                        .ok_or_else(|| format!("{what}: unknown level `{level}` (expected dense, generic, indices, full or auto)"))?,
                )
            }
            "values" => {
                let coding = r.require_positional("f32, q8 or q4")?;
                Pattern::Values(
                    ValueCoding::from_name(coding).ok_or_else(|| format!("{what}: unknown coding `{coding}` (expected f32, q8 or q4)"))?,
                )
            }
            "low_rank" => Pattern::LowRank(LowRank { rank: r.u32("rank")?, basis: r.opt_str("basis")?.map(str::to_string) }),
            "kv" => {
                let kind = r.require_positional("dct, pswf, chunked_svd or pre_rope")?;
                let axis = |r: &mut crate::attr::ArgReader<'_>| -> Result<KvAxis, String> {
                    match r.opt_word("axis")? {
                        None | Some("feature") => Ok(KvAxis::Feature),
                        Some("sequence") => Ok(KvAxis::Sequence),
                        Some(o) => Err(format!("{what}: unknown axis `{o}` (expected feature or sequence)")),
                    }
                };
                match kind {
                    "dct" => Pattern::Kv(KvCompression::Dct {
                        keep: r.f32("keep")?,
                        axis: axis(&mut r)?,
                        block: r.opt_u32("block")?,
                        sinks: r.opt_u32("sinks")?.unwrap_or(0),
                        recent: r.opt_u32("recent")?.unwrap_or(0),
                    }),
                    "pswf" => Pattern::Kv(KvCompression::Pswf {
                        keep: r.f32("keep")?,
                        axis: axis(&mut r)?,
                        block: r.opt_u32("block")?,
                        bandwidth: r.f32("bandwidth")?,
                        sinks: r.opt_u32("sinks")?.unwrap_or(0),
                        recent: r.opt_u32("recent")?.unwrap_or(0),
                    }),
                    "chunked_svd" => {
                        let chunk = r.u32("chunk")?;
                        let rank = r.opt_u32("rank")?;
                        let energy = r.opt_f32("energy")?;
                        let max_rank = r.opt_u32("max_rank")?;
                        let rank = match (rank, energy, max_rank) {
                            (Some(k), None, None) => SvdRank::Fixed(k),
                            (None, Some(fraction), max_rank) => SvdRank::Energy { fraction, max_rank },
                            (Some(_), None, Some(_)) => return Err(format!("{what}: chunked_svd's `max_rank` caps an `energy` rank")),
                            _ => return Err(format!("{what}: chunked_svd needs exactly one of `rank` or `energy`")),
                        };
                        Pattern::Kv(KvCompression::ChunkedSvd { chunk, rank })
                    }
                    "pre_rope" => Pattern::Kv(KvCompression::PreRope {
                        rank: r.u32("rank")?,
                        theta: r.f32("theta")?,
                        adjacent: r.opt_bool("adjacent")?.unwrap_or(false),
                    }),
                    other => return Err(format!("{what}: unknown kind `{other}` (expected dct, pswf, chunked_svd or pre_rope)")),
                }
            }
            "window" => match r.require_positional("full or sliding")? {
                "full" => Pattern::Window(Window::Full),
                "sliding" => Pattern::Window(Window::Sliding { size: r.u32("size")?, sinks: r.opt_u32("sinks")?.unwrap_or(0) }),
                other => return Err(format!("{what}: unknown kind `{other}` (expected full or sliding)")),
            },
            "nsa" => {
                let (block, top_n, window, sinks) = (r.u32("block")?, r.u32("top_n")?, r.u32("window")?, r.opt_u32("sinks")?.unwrap_or(0));
                let score = match r.opt_word("score")? {
                    None => NsaScore::Bound,
                    Some(w) => NsaScore::from_name(w).ok_or_else(|| format!("{what}: unknown score `{w}` (expected mean or bound)"))?,
                };
                let gate = match r.opt_word("gate")? {
                    None => NsaGate::Joint,
                    Some(w) => {
                        NsaGate::from_name(w).ok_or_else(|| format!("{what}: unknown gate `{w}` (expected joint, fixed or sigmoid)"))?
                    }
                };
                let compress = match r.opt_word("compress")? {
                    None => NsaCompress::Mean,
                    Some(w) => {
                        NsaCompress::from_name(w).ok_or_else(|| format!("{what}: unknown compress `{w}` (expected mean or linear)"))?
                    }
                };
                Pattern::Nsa(NativeSparse { block, top_n, window, sinks, score, gate, compress })
            }
            other => {
                return Err(format!("unknown pattern `#{other}` (expected sparsity, specialize, values, low_rank, kv, window or nsa)"))
            }
        };
        r.finish()?;
        Ok(p)
    }
}

/// An error for the first of an op's patterns that nothing implements yet, or
/// for `#specialize` without the `#sparsity` it specializes: the interpreter
/// and the compiler both call it, so neither ignores an attribute.
pub fn refuse_unimplemented(patterns: &[Pattern]) -> Result<(), String> {
    if let Some(p) = patterns.iter().find(|p| !p.implemented()) {
        if let Pattern::LowRank(_) = p {
            return Err(
                "#low_rank is lowered by the `low-rank` pass into two matmuls before a backend runs; this op was not lowered".into()
            );
        }
        return Err(format!("#{} is not lowered yet: no backend or interpreter implements it (its pattern issue adds it)", p.keyword()));
    }
    let has = |k: &str| patterns.iter().any(|p| p.keyword() == k);
    if has("specialize") && !has("sparsity") {
        return Err("#specialize chooses how a #sparsity pattern is lowered; this op has no #sparsity".into());
    }
    if has("values") && !has("sparsity") {
        return Err("#values says how a #sparsity pattern's kept values are stored; this op has no #sparsity".into());
    }
    Ok(())
}

#[cfg(test)]
mod f16_outward_tests {
    use super::{f16_down, f16_up};
    use half::f16;

    /// The f16 right above the f16 value `v`.
    fn next_up(v: f32) -> f32 {
        let bits = f16::from_f32(v).to_bits();
        let next = match bits {
            0x0000 | 0x8000 => 0x0001,
            b if b & 0x8000 != 0 => b - 1,
            b => b + 1,
        };
        f16::from_bits(next).to_f32()
    }

    #[test]
    fn outward_rounding_brackets_the_value_with_neighbouring_f16s() {
        let mut xs = vec![0.0f32, -0.0, 1.0, -1.0, 65504.0, -65504.0, 70000.0, -70000.0, 1e-8, -1e-8, 6.0e-5, -6.0e-5];
        let mut s = 0x2545_f491_u32;
        for _ in 0..20000 {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let mag = 10f32.powf((s >> 8) as f32 / (1u32 << 24) as f32 * 12.0 - 8.0);
            xs.push(if s & 1 == 0 { mag } else { -mag });
        }
        for x in xs {
            let (lo, hi) = (f16_down(x), f16_up(x));
            assert!(lo <= x && x <= hi, "{x}: {lo} {hi}");
            for v in [lo, hi] {
                assert_eq!(f16::from_f32(v).to_f32(), v, "{x}: {v} is not an f16");
            }
            if f16::from_f32(x).to_f32() == x {
                assert!(lo == x && hi == x, "{x} is an f16: {lo} {hi}");
            } else {
                // Neighbours: `hi` is the f16 right after `lo`.
                assert_eq!(next_up(lo), hi, "{x}: {lo} {hi}");
            }
        }
    }
}
