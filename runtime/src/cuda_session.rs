//! A KV-cached decoding session on the GPU: the CUDA twin of `CpuSession`.
//! Every buffer the plan needs (inputs, temp slots, KV caches for a fixed
//! capacity of positions) lives in one device arena allocated when the session
//! is created; a call (prefill of `seq` rows, or one decode step) uploads its
//! inputs and its position (`pos` lives in the arena: kernels read it there),
//! launches the plan's kernels, appends the new keys and values to the caches
//! (`cuda_append`: f32 copies, or rounded to f16), and downloads the outputs.
//! Nothing is allocated on the device per call. A decode step (one row) is
//! captured once as a CUDA graph and replayed at every later position (off
//! with `set_graphs(false)`, and while profiling). Consecutive kernels that
//! touch disjoint memory launch side by side on forked streams in calls of
//! several rows (`cuda_side`). `greedy_steps` decodes
//! greedily without copying logits to the host: the step and the runtime's
//! argmax (`cuda_greedy`), captured as one graph, replay back to back and the
//! ids come back at the end. Caches are whole (row j holds position j): a
//! windowed layer's ring (`BufferSpec::ring`) and an `#nsa` layer's
//! blocks per KV head (`BufferSpec::head_blocks`) are the CPU's. Sequence-axis
//! caches are appended and compressed on the device (`cuda_seq_append`);
//! chunked-SVD caches on the host (their SVD is the CPU runtime's), which
//! keeps such sessions from capturing graphs.

use crate::artifact::Artifact;
use crate::cuda::cu;
use crate::cuda::CudaExecutor;
use crate::error::{RuntimeError, RuntimeResult};
use crate::manifest::{BufferKind, BufferSpec, ExecutionPlan, Step};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig};
use ndarray::{ArrayD, Axis, IxDyn, Slice};
use sparsec_ir::DType;

/// Arena offsets are multiples of this (the 128-bit loads of vector kernels
/// and the driver's own allocation granularity both divide it).
const ALIGN: usize = 256;

/// How many rows a session holds: `positions` in its KV caches (the most the
/// sequence may reach), `seq` rows per call (a longer call runs in chunks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionCapacity {
    pub positions: usize,
    pub seq: usize,
}

/// One step of the plan, resolved against the arena.
enum GpuStep {
    /// The loaded kernel and its step (arguments, thread counts);
    /// `dependent`: launched with programmatic stream serialization
    /// (`CudaExecutor::launches_dependent`).
    Kernel { f: CudaFunction, step: crate::manifest::KernelStep, dependent: bool },
    /// Store `seq` rows into a cache at row `pos`, in its type.
    Append(crate::cuda_append::KvAppend),
    /// Store `seq` rows into a sequence-axis cache's exact rows and compress
    /// the blocks they complete, on the device.
    SeqAppend(crate::cuda_seq_append::SeqAppend),
    /// A chunked-SVD cache: the rows are downloaded,
    /// appended to the host copy `mirror` by the CPU runtime's code (which
    /// factors or compresses what they complete), and the bytes it wrote
    /// uploaded to the device cache.
    HostAppend { src: u64, cache: usize, device: u64, mirror: usize },
}

impl GpuStep {
    /// An append launch's second (source, cache) pair, which a value
    /// cache's append joining the key cache's fills (`joined_appends`).
    fn second_pair(&mut self) -> Option<&mut Option<(u64, u64)>> {
        match self {
            GpuStep::Append(a) => Some(&mut a.second),
            GpuStep::SeqAppend(a) => Some(&mut a.second),
            GpuStep::Kernel { .. } | GpuStep::HostAppend { .. } => None,
        }
    }
}

pub struct CudaSession<'a> {
    exec: &'a CudaExecutor,
    art: &'a Artifact,
    cap: SessionCapacity,
    pos: usize,
    /// The arena: every non-weight buffer of the plan.
    _arena: CudaSlice<u8>,
    /// Per buffer: its device address (a weight's upload, or a place in the arena).
    ptrs: Vec<u64>,
    steps: Vec<GpuStep>,
    /// The plan's row-local tail as an index into `steps` (appends joined
    /// into one launch make the two lists differ).
    tail_step: Option<usize>,
    /// The arena's bytes (reported by `arena_bytes`).
    arena_bytes: usize,
    /// The device address of `pos` (one i64 in the arena).
    pos_ptr: u64,
    /// Whether decode steps replay a captured graph.
    graphs: bool,
    /// The captured decode step (one row), once captured.
    decode_graph: Option<cudarc::driver::CudaGraph>,
    /// The captured decode step followed by the greedy step, once captured.
    greedy_graph: Option<cudarc::driver::CudaGraph>,
    /// The device address of the id log (`cap.positions` u32 values).
    ids_ptr: u64,
    /// Host copies of the chunked-SVD caches (`GpuStep::HostAppend`).
    mirrors: Vec<Vec<f32>>,
    /// The sequence-axis caches' resampling matrices on the device, one per layout.
    _matrices: Vec<CudaSlice<f64>>,
    /// Runs of consecutive kernel steps (indices into `steps`) launched side
    /// by side (`cuda_side`), and the side streams they take; empty when
    /// the executor's `side_by_side` is off.
    runs: Vec<std::ops::Range<usize>>,
    side: Option<crate::cuda_side::SideStreams>,
    /// Per kernel: milliseconds and launches, when `profile_kernels` asked
    /// (each launch is then synchronized and timed on the host clock, which
    /// slows the run: for finding where the time goes, not for throughput).
    profile: Option<std::collections::HashMap<String, (f64, u64)>>,
}

impl CudaExecutor {
    /// A decoding session over `art` (the artifact this executor was loaded
    /// from) holding `cap` rows; `cap.positions` is clamped to what the model
    /// addresses.
    pub fn session<'a>(&'a self, art: &'a Artifact, cap: SessionCapacity) -> RuntimeResult<CudaSession<'a>> {
        if art.manifest.integrity != self.artifact {
            return Err(RuntimeError::Artifact {
                path: art.dir.clone(),
                message: "this CUDA executor was loaded from another artifact; load one for this artifact".into(),
            });
        }
        let max = usize::try_from(art.limits.max_positions).unwrap_or(usize::MAX);
        let positions = cap.positions.min(max).max(1);
        let plan = &art.manifest.execution;
        // A compressed cache's ring of exact rows takes at most `max_call`
        // rows a call (as on the CPU): longer calls run in chunks.
        let most = plan.buffers.iter().filter_map(|b| b.compressed().map(|l| l.max_call())).min().unwrap_or(usize::MAX);
        let cap = SessionCapacity { positions, seq: cap.seq.clamp(1, positions).min(most.max(1)) };
        // Lay out the arena: inputs and unslotted temps at `cap.seq` rows, one
        // region per temp slot (its largest buffer), caches at `positions` rows.
        let seq = cap.seq as u64;
        let slot_bytes = plan.slot_bytes(seq);
        let mut end = 0usize;
        let mut place = |bytes: usize| -> RuntimeResult<usize> {
            let at = end;
            end = at
                .checked_add(bytes.max(1).div_ceil(ALIGN) * ALIGN)
                .ok_or_else(|| RuntimeError::Cuda("the session's buffers overflow the address space".into()))?;
            Ok(at)
        };
        let slot_at: Vec<usize> = slot_bytes.iter().map(|b| place(*b)).collect::<RuntimeResult<_>>()?;
        let pos_at = place(8)?;
        let ids_at = place(positions.checked_mul(4).ok_or_else(|| RuntimeError::Cuda("the id log overflows".into()))?)?;
        // Per buffer: where it lies in the arena and its bytes (weights: `None`).
        let mut offsets: Vec<Option<(usize, usize)>> = Vec::with_capacity(plan.buffers.len());
        for b in &plan.buffers {
            let off = match b.kind {
                BufferKind::Weight => None,
                BufferKind::Input => Some((place(b.bytes(seq))?, b.bytes(seq))),
                // Scratch: one step's working memory of a fixed size (in a slot).
                BufferKind::Temp | BufferKind::Scratch => match b.slot {
                    Some(s) => Some((slot_at[s], slot_bytes[s])),
                    None => Some((place(b.bytes(seq))?, b.bytes(seq))),
                },
                BufferKind::BlockCache { .. } => {
                    let rows = b.block_rows(positions).unwrap_or(1);
                    let bytes = b
                        .bytes(1)
                        .checked_mul(rows)
                        .ok_or_else(|| RuntimeError::Cuda(format!("block cache `{}` overflows at {positions} positions", b.name)))?;
                    Some((place(bytes)?, bytes))
                }
                BufferKind::KvCache if b.compressed_cache() => {
                    // Exact rows, then a record per chunk or block the positions complete.
                    let bytes = b
                        .try_bytes(positions as u64)
                        .ok_or_else(|| RuntimeError::Cuda(format!("KV cache `{}` overflows at {positions} positions", b.name)))?;
                    Some((place(bytes)?, bytes))
                }
                BufferKind::KvCache => {
                    if !matches!(b.dtype, DType::F32 | DType::F16) {
                        return Err(RuntimeError::Cuda(format!("KV cache `{}` is {} (f32 or f16 only)", b.name, b.dtype.name())));
                    }
                    let bytes = b
                        .bytes(1)
                        .checked_mul(positions)
                        .ok_or_else(|| RuntimeError::Cuda(format!("KV cache `{}` overflows at {positions} positions", b.name)))?;
                    Some((place(bytes)?, bytes))
                }
            };
            offsets.push(off);
        }
        let arena_bytes = end.max(ALIGN);
        // Zeroed once, so that no kernel ever reads memory nothing wrote.
        let arena = self.stream.alloc_zeros::<u8>(arena_bytes).map_err(cu("allocate the session's arena"))?;
        let base = {
            let (p, _sync) = arena.device_ptr(&self.stream);
            p
        };
        let mut ptrs = Vec::with_capacity(plan.buffers.len());
        for (i, (b, off)) in plan.buffers.iter().zip(&offsets).enumerate() {
            let p = match off {
                Some((o, _)) => base + *o as u64,
                None => {
                    let w = self.weights.get(&i).ok_or_else(|| RuntimeError::Cuda(format!("weight `{}` not uploaded", b.name)))?;
                    let (p, _sync) = w.device_ptr(&self.stream);
                    p
                }
            };
            ptrs.push(p);
        }
        let mut steps = Vec::with_capacity(plan.steps.len());
        let mut mirrors = Vec::new();
        let mut matrices: Vec<(sparsec_ir::kv_sequence::SeqLayout, CudaSlice<f64>)> = Vec::new();
        let joins = joined_appends(plan);
        for (step, &joins_prev) in plan.steps.iter().zip(&joins) {
            let next = match step {
                Step::KvAppend { hadamard: Some(_), .. } => {
                    return Err(RuntimeError::Cuda("rotated (Hadamard) KV caches are kept on the CPU only".into()))
                }
                Step::KvAppend { src, cache, hadamard: None } if plan.buffers[*cache].chunked.is_some() => {
                    let c = &plan.buffers[*cache];
                    let bytes = c.try_bytes(positions as u64).unwrap_or(0);
                    mirrors.push(vec![0f32; bytes.div_ceil(4)]);
                    GpuStep::HostAppend { src: ptrs[*src], cache: *cache, device: ptrs[*cache], mirror: mirrors.len() - 1 }
                }
                // Plain and sequence-axis caches append on the device.
                Step::KvAppend { src, cache, hadamard: None } => {
                    let (s, c) = (&plan.buffers[*src], &plan.buffers[*cache]);
                    let row_elems = s.numel().resolve(1);
                    if row_elems != c.numel().resolve(1) || !s.by_rows() || s.dtype != DType::F32 {
                        return Err(RuntimeError::Cuda(format!("KV append of `{}` into `{}`: rows differ", s.name, c.name)));
                    }
                    let layout = match c.sequence {
                        None => None,
                        Some(_) => Some(c.sequence_layout().ok_or_else(|| {
                            RuntimeError::Cuda(format!("KV cache `{}`: a sequence-axis layout that does not fit", c.name))
                        })?),
                    };
                    let (src, cache) = (ptrs[*src], ptrs[*cache]);
                    if joins_prev {
                        if let Some(second) = steps.last_mut().and_then(GpuStep::second_pair) {
                            *second = Some((src, cache));
                            continue;
                        }
                    }
                    if let Some(layout) = layout {
                        let matrix = match matrices.iter().find(|(l, _)| *l == layout) {
                            Some((_, m)) => m.device_ptr(&self.stream).0,
                            None => {
                                let host = crate::cuda_seq_append::SeqAppender::matrix(&layout)
                                    .ok_or_else(|| RuntimeError::Cuda(format!("KV cache `{}`: no resampling matrix", c.name)))?;
                                let m = self.stream.clone_htod(&host).map_err(cu("upload a resampling matrix"))?;
                                let p = m.device_ptr(&self.stream).0;
                                matrices.push((layout, m));
                                p
                            }
                        };
                        GpuStep::SeqAppend(crate::cuda_seq_append::SeqAppend { layout, src, cache, matrix, second: None })
                    } else {
                        GpuStep::Append(crate::cuda_append::KvAppend { dtype: c.dtype, src, cache, row_elems, second: None })
                    }
                }
                Step::Kernel(k) => {
                    let f = self.kernels.get(&k.kernel).ok_or_else(|| RuntimeError::Cuda(format!("kernel {} not loaded", k.kernel)))?;
                    let out = *k.args.last().ok_or_else(|| RuntimeError::Cuda(format!("kernel {} has no output", k.kernel)))?;
                    if k.args[..k.args.len() - 1].iter().any(|&a| ptrs[a] == ptrs[out]) {
                        return Err(RuntimeError::Cuda(format!("kernel {} reads its own output", k.kernel)));
                    }
                    if plan.buffers[out].kind == BufferKind::Weight {
                        return Err(RuntimeError::Cuda(format!("kernel {} writes a weight", k.kernel)));
                    }
                    GpuStep::Kernel { f: f.clone(), step: k.clone(), dependent: self.launches_dependent(&k.kernel) }
                }
            };
            steps.push(next);
        }
        for &o in &plan.outputs {
            let b = &plan.buffers[o];
            if b.dtype.is_quantized() || b.as_bytes() {
                return Err(RuntimeError::Cuda(format!("output `{}` is not an f32 buffer", b.name)));
            }
        }
        let pos_ptr = base + pos_at as u64;
        let ids_ptr = base + ids_at as u64;
        // Runs of kernels that touch disjoint memory: what each reads and
        // writes (its output and its scratch), weights left out.
        let (runs, side) = if self.side_by_side() {
            let extent = |a: usize| offsets[a].map(|(o, n)| base + o as u64..base + (o + n) as u64);
            let access: Vec<Option<crate::cuda_side::Access>> = steps
                .iter()
                .map(|s| match s {
                    GpuStep::Kernel { step, .. } => {
                        let (last, inputs) = step.args.split_last()?;
                        let mut a = crate::cuda_side::Access { reads: Vec::new(), writes: vec![extent(*last)?] };
                        for &i in inputs {
                            let Some(r) = extent(i) else { continue };
                            if plan.buffers[i].kind == BufferKind::Scratch {
                                a.writes.push(r);
                            } else {
                                a.reads.push(r);
                            }
                        }
                        Some(a)
                    }
                    GpuStep::Append(_) | GpuStep::SeqAppend(_) | GpuStep::HostAppend { .. } => None,
                })
                .collect();
            let runs = crate::cuda_side::runs(&access);
            let widest = runs.iter().map(|r| r.len()).max().unwrap_or(0);
            let side = if widest > 1 {
                Some(crate::cuda_side::SideStreams::new(&self.stream, widest - 1).map_err(cu("create side streams"))?)
            } else {
                None
            };
            (runs, side)
        } else {
            (Vec::new(), None)
        };
        let tail_step = plan.row_local_tail.map(|t| launch_index(&joins, t));
        Ok(CudaSession {
            tail_step,
            exec: self,
            art,
            cap,
            pos: 0,
            _arena: arena,
            ptrs,
            steps,
            arena_bytes,
            pos_ptr,
            // Host appends cannot be captured: such sessions launch every step.
            graphs: mirrors.is_empty(),
            mirrors,
            _matrices: matrices.into_iter().map(|(_, m)| m).collect(),
            decode_graph: None,
            greedy_graph: None,
            ids_ptr,
            runs,
            side,
            profile: None,
        })
    }
}

impl CudaSession<'_> {
    /// Positions already consumed.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// The rows this session holds.
    pub fn capacity(&self) -> SessionCapacity {
        self.cap
    }

    /// Device bytes of the session's arena (inputs, temps, KV caches).
    pub fn arena_bytes(&self) -> usize {
        self.arena_bytes
    }

    /// How many runs of consecutive kernels launch side by side (`cuda_side`).
    pub fn side_by_side_runs(&self) -> usize {
        self.runs.len()
    }

    /// Times every kernel from now on (earlier times are forgotten); each
    /// launch is synchronized, so the run itself is slower while profiling.
    pub fn profile_kernels(&mut self) {
        self.profile = Some(std::collections::HashMap::new());
    }

    /// Per kernel: milliseconds and launches since `profile_kernels`, slowest first.
    pub fn kernel_times(&self) -> Vec<(String, f64, u64)> {
        let mut v: Vec<(String, f64, u64)> = self.profile.iter().flatten().map(|(k, (t, n))| (k.clone(), *t, *n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// Whether decode steps (one row) replay a CUDA graph captured at the
    /// first one (the default), or launch every kernel. Sessions with
    /// chunked-SVD caches always launch (their appends run on the host).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on && self.mirrors.is_empty();
    }

    /// Forgets every position.
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Forgets the positions from `pos` on; the next `run` continues there.
    /// Compressed caches keep exact rows of their last positions only
    /// (`cpu::compressed_cannot_go_back`).
    pub fn truncate(&mut self, pos: usize) -> RuntimeResult<()> {
        if let Some(why) = crate::cpu::compressed_cannot_go_back(&self.art.manifest.execution, self.pos, pos) {
            return Err(RuntimeError::Cuda(why));
        }
        self.pos = self.pos.min(pos);
        Ok(())
    }

    /// Runs the next `seq` positions (bound by the inputs) and returns the
    /// outputs; more rows than the session's `seq` capacity run in chunks.
    pub fn run(&mut self, inputs: &[ArrayD<f32>]) -> RuntimeResult<Vec<ArrayD<f32>>> {
        self.run_rows(inputs, false)
    }

    /// `run`, or with `last_only` the outputs' last rows (shape `[1, ...]`):
    /// then the plan's row-local tail (final norm, LM head) runs on the last
    /// row of each call only.
    fn run_rows(&mut self, inputs: &[ArrayD<f32>], last_only: bool) -> RuntimeResult<Vec<ArrayD<f32>>> {
        let art = self.art;
        let seq = art.bind_seq(inputs)? as usize;
        self.check_room(seq)?;
        if seq <= self.cap.seq {
            return self.run_chunk(inputs, seq, last_only);
        }
        // Chunks of the session's capacity; outputs concatenated by rows.
        let plan = &art.manifest.execution;
        let rows = |i: usize| plan.buffers[i].by_rows();
        if !plan.inputs.iter().all(|&i| rows(i)) || !plan.outputs.iter().all(|&o| rows(o)) {
            return Err(RuntimeError::Cuda(format!(
                "{seq} rows exceed the {} this session holds per call, and the plan's inputs or outputs are not by rows",
                self.cap.seq
            )));
        }
        let mut parts: Vec<Vec<ArrayD<f32>>> = vec![Vec::new(); plan.outputs.len()];
        let mut lo = 0;
        while lo < seq {
            let hi = (lo + self.cap.seq).min(seq);
            let chunk: Vec<ArrayD<f32>> = inputs.iter().map(|a| a.slice_axis(Axis(0), Slice::from(lo..hi)).to_owned()).collect();
            let out = self.run_chunk(&chunk, hi - lo, last_only)?;
            lo = hi;
            if last_only {
                if lo == seq {
                    return Ok(out);
                }
                continue;
            }
            for (p, o) in parts.iter_mut().zip(out) {
                p.push(o);
            }
        }
        parts
            .iter()
            .map(|p| {
                let views: Vec<_> = p.iter().map(|a| a.view()).collect();
                ndarray::concatenate(Axis(0), &views).map_err(|e| RuntimeError::Cuda(e.to_string()))
            })
            .collect()
    }

    /// Greedy decoding on the device: `first` is the input id at the current
    /// position; `n` decode steps follow, each feeding its argmax to the next.
    /// Returns the `n` ids the steps chose. No logits leave the GPU: the steps
    /// (with `set_graphs`, one captured graph of the decode step and the greedy
    /// kernel, replayed `n` times) run back to back and the ids are copied
    /// once at the end. The plan must be a language model's: one id input,
    /// logits `[seq, vocab]` first among the outputs.
    pub fn greedy_steps(&mut self, first: u32, n: usize) -> RuntimeResult<Vec<u32>> {
        let plan = &self.art.manifest.execution;
        let not_lm = || RuntimeError::Model("greedy decoding takes a language model (one id input, logits [seq, vocab] first)".into());
        let (&input, &out) = match (plan.inputs.as_slice(), plan.outputs.first()) {
            ([i], Some(o)) => (i, o),
            _ => return Err(not_lm()),
        };
        let (ib, ob) = (&plan.buffers[input], &plan.buffers[out]);
        if !ib.by_rows() || ib.numel().resolve(1) != 1 || !ob.by_rows() || ob.dtype != DType::F32 {
            return Err(not_lm());
        }
        let vocab = ob.numel().resolve(1);
        if vocab == 0 || vocab >= 1 << 24 {
            return Err(RuntimeError::Model(format!("a vocabulary of {vocab} ids (greedy steps carry ids as exact f32: below 2^24)")));
        }
        self.check_room(n)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let exec = self.exec;
        let stream = &exec.stream;
        let raw = stream.cu_stream();
        exec.ctx.bind_to_thread().map_err(cu("bind the context"))?;
        let step = crate::cuda_greedy::GreedyStep {
            logits: self.ptrs[out],
            vocab,
            input: self.ptrs[input],
            ids: self.ids_ptr,
            positions: self.cap.positions as u64,
            pos_ptr: self.pos_ptr,
        };
        let (id_host, pos_host) = ([first as f32], [self.pos as i64]);
        // SAFETY: the input's region holds at least one f32 and `pos_ptr` one
        // i64; both host arrays outlive the synchronize below.
        unsafe { cudarc::driver::result::memcpy_htod_async(self.ptrs[input], &id_host, raw) }.map_err(cu("upload the first id"))?;
        unsafe { cudarc::driver::result::memcpy_htod_async(self.pos_ptr, &pos_host, raw) }.map_err(cu("upload pos"))?;
        let graphs = self.graphs && self.profile.is_none();
        for _ in 0..n {
            if graphs {
                if self.greedy_graph.is_none() {
                    self.greedy_graph = Some(self.capture(|s| {
                        s.launch_steps(1, None)?;
                        // SAFETY: `step` names the session's logits row
                        // (`vocab` f32, checked above), id input, id log
                        // (`cap.positions` u32) and `pos`.
                        unsafe { exec.greedy.launch(&exec.stream, &step) }
                    })?);
                }
                if let Some(g) = &self.greedy_graph {
                    g.launch().map_err(cu("launch the greedy graph"))?;
                }
            } else {
                self.launch_steps(1, None)?;
                // SAFETY: as for the captured launch above.
                unsafe { exec.greedy.launch(stream, &step) }?;
            }
        }
        let mut ids = vec![0u32; n];
        // SAFETY: the id log holds `cap.positions >= pos + n` u32 values (checked
        // above); `ids` is not touched until the synchronize below.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut ids, self.ids_ptr + 4 * self.pos as u64, raw) }
            .map_err(cu("download the ids"))?;
        stream.synchronize().map_err(cu("synchronize"))?;
        self.pos += n;
        Ok(ids)
    }

    /// Like `run`, but returns only the last position's row of each output
    /// (shape `[1, ...]`). The plan's row-local tail (`ExecutionPlan::
    /// row_local_tail`: a final norm and the LM head) runs on each call's last
    /// row only; without one, every row is computed and the last comes back.
    pub fn run_last(&mut self, inputs: &[ArrayD<f32>]) -> RuntimeResult<Vec<ArrayD<f32>>> {
        let out = self.run_rows(inputs, true)?;
        out.into_iter()
            .map(|a| match a.shape().first() {
                Some(&n) if n > 0 => {
                    let mut shape = a.shape().to_vec();
                    shape[0] = 1;
                    let row = a.index_axis(Axis(0), n - 1).to_owned();
                    row.into_shape_with_order(IxDyn(&shape)).map_err(|e| RuntimeError::Cuda(e.to_string()))
                }
                _ => Ok(a),
            })
            .collect()
    }

    /// Launches the plan's steps for `seq` rows on the executor's stream
    /// (with `profile_kernels`, each one synchronized and timed). From step
    /// `tail` on (a row-local tail), kernels run for one row, the last: their
    /// inputs and temporaries are addressed at their last row.
    fn launch_steps(&mut self, seq: usize, tail: Option<usize>) -> RuntimeResult<()> {
        let main = &self.exec.stream;
        let plan = &self.art.manifest.execution;
        // Side by side in calls of several rows, unless each launch is timed
        // on the session's stream. A decode step keeps every kernel on the
        // session's stream, where each launches as a programmatic dependent
        // of the one before: side by side, SmolLM2-shaped Llama bf16 decoded
        // 0.96x (1237 against 1287 tok/s on an H200; GPT-2 1.02x), and
        // prefill of 512 rows ran 1.19x faster (GPT-2 1.03-1.14x).
        let side = self.side.as_ref().filter(|_| self.profile.is_none() && seq > 1);
        let mut runs = self.runs.iter().filter(|_| side.is_some()).peekable();
        let mut after_join = false;
        for (i, step) in self.steps.iter().enumerate() {
            // This step's lane in a run (0: the session's stream), forking
            // the run's side streams at its first step.
            let mut lane = 0;
            let mut joins = 0;
            if let (Some(side), Some(run)) = (side, runs.peek()) {
                if run.contains(&i) {
                    if i == run.start {
                        side.fork(main, run.len() - 1).map_err(cu("fork side streams"))?;
                    }
                    lane = i - run.start;
                    if i + 1 == run.end {
                        joins = run.len() - 1;
                        runs.next();
                    }
                }
            }
            let stream = match side.and_then(|s| s.stream(lane)) {
                Some(s) => s,
                None => main,
            };
            let in_tail = tail.is_some_and(|t| i >= t);
            let rows = if in_tail { 1 } else { seq };
            let seq_arg = rows as i64;
            // A by-rows buffer's last row in the tail (partition checks that
            // the tail's buffers are by rows); weights and caches as they are.
            let at = |a: usize| -> u64 {
                let b = &plan.buffers[a];
                match b.kind {
                    BufferKind::Temp | BufferKind::Input if in_tail => self.ptrs[a] + ((seq - 1) * b.bytes(1)) as u64,
                    _ => self.ptrs[a],
                }
            };
            let t = self.profile.is_some().then(std::time::Instant::now);
            match step {
                GpuStep::Append(a) => {
                    // SAFETY: `src` holds `cap.seq >= seq` rows of `row_elems`
                    // f32 values; the cache holds `cap.positions >= pos + seq`
                    // rows (checked in `run`) of its type; `pos_ptr` is the
                    // arena's `pos`.
                    unsafe { self.exec.appender.launch(stream, a, seq as u64, self.pos_ptr) }?;
                }
                GpuStep::SeqAppend(a) => {
                    // SAFETY: `src` (and the second source) holds `cap.seq >= seq`
                    // rows of the layout's width in f32; the cache was sized for
                    // `cap.positions >= pos + seq` positions of its layout
                    // (`try_bytes`); `seq` is at most the layout's `max_call`
                    // (`cap.seq`, checked again in `launch`); the matrix is
                    // the layout's, uploaded when the session was made.
                    unsafe { self.exec.seq_appender.launch(stream, a, seq as u64, self.pos_ptr) }?;
                }
                GpuStep::HostAppend { src, cache, device, mirror } => {
                    let cb = &plan.buffers[*cache];
                    let width = cb.numel().resolve(1) as usize;
                    let mut rows = vec![0f32; seq * width];
                    // The kernels before wrote the rows; earlier uploads from the mirror are done.
                    stream.synchronize().map_err(cu("synchronize"))?;
                    // SAFETY: `src` holds `cap.seq >= seq` rows of `width` f32 values.
                    unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut rows, *src) }.map_err(cu("download KV rows"))?;
                    let m = &mut self.mirrors[*mirror];
                    let mut wrote = Vec::new();
                    for (i, row) in rows.chunks(width.max(1)).enumerate() {
                        let w = crate::cpu::append_compressed(m.as_mut_ptr() as *mut u8, cb, self.pos + i, row)
                            .map_err(|e| RuntimeError::Cuda(e.to_string()))?
                            .ok_or_else(|| RuntimeError::Cuda(format!("KV cache `{}` is not compressed", cb.name)))?;
                        wrote.extend(w);
                    }
                    // SAFETY: the mirror is 4-byte aligned memory of the cache's
                    // `try_bytes(cap.positions)` bytes, as is the device cache;
                    // each range lies within them (`append_compressed`).
                    let bytes = unsafe { std::slice::from_raw_parts(m.as_ptr() as *const u8, m.len() * 4) };
                    for r in wrote {
                        let part = bytes
                            .get(r.clone())
                            .ok_or_else(|| RuntimeError::Cuda(format!("KV cache `{}`: a write past its end", cb.name)))?;
                        // SAFETY: `device + r.start` lies in the cache's arena region (as above).
                        unsafe { cudarc::driver::result::memcpy_htod_sync(device + r.start as u64, part) }
                            .map_err(cu("upload KV cache bytes"))?;
                    }
                }
                GpuStep::Kernel { f, step, dependent } => {
                    let (name, args) = (&step.kernel, &step.args);
                    let (grid, block) =
                        step.gpu_launch_at(rows as u64).ok_or_else(|| RuntimeError::Cuda(format!("kernel {name}: too many threads")))?;
                    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
                    let mut ptrs: Vec<u64> = args.iter().map(|&a| at(a)).collect();
                    ptrs.push(seq_arg as u64);
                    ptrs.push(self.pos_ptr);
                    let mut params: Vec<*mut std::ffi::c_void> = ptrs.iter_mut().map(|p| p as *mut u64 as *mut std::ffi::c_void).collect();
                    // SAFETY: the kernel takes the step's buffers as device
                    // pointers, then `seq` as i64 and the address of `pos` (the
                    // entry's parameter count was checked at load), each a
                    // 64-bit value `params` points at; every buffer is sized
                    // for `cap.seq >= seq` rows, the caches for `pos + seq`
                    // positions; the output is no input (checked when the
                    // session was made). A dependent launch is only made for a
                    // kernel that waits for its prior grids before any read.
                    // A dependent launch follows the kernel before it on the
                    // session's stream: never on a side stream, nor right
                    // after a join (the side streams' kernels are no prior grid).
                    let dependent = *dependent && lane == 0 && !after_join;
                    unsafe { crate::cuda::launch_kernel(stream, f, cfg, &mut params, dependent) }.map_err(cu(&format!("launch {name}")))?;
                }
            }
            after_join = joins > 0;
            if let (Some(side), true) = (side, joins > 0) {
                side.join(main, joins).map_err(cu("join side streams"))?;
            }
            if let (Some(t), Some(p)) = (t, self.profile.as_mut()) {
                stream.synchronize().map_err(cu("synchronize"))?;
                let name = match step {
                    GpuStep::Append(_) => "kv_append".to_string(),
                    GpuStep::SeqAppend(_) => "kv_append_sequence".to_string(),
                    GpuStep::HostAppend { .. } => "kv_append_host".to_string(),
                    GpuStep::Kernel { step, .. } => step.kernel.clone(),
                };
                let e = p.entry(name).or_default();
                e.0 += t.elapsed().as_secs_f64() * 1e3;
                e.1 += 1;
            }
        }
        Ok(())
    }

    /// Whether `n` more positions fit the model and this session.
    fn check_room(&self, n: usize) -> RuntimeResult<()> {
        self.art.check_positions(self.pos, n as u64)?;
        if self.pos + n > self.cap.positions {
            return Err(RuntimeError::Positions(format!(
                "positions {}..{} exceed the {} this CUDA session holds",
                self.pos,
                self.pos + n,
                self.cap.positions
            )));
        }
        Ok(())
    }

    /// What `launch` puts on the session's stream, captured as a CUDA graph.
    fn capture(&mut self, launch: impl FnOnce(&mut Self) -> RuntimeResult<()>) -> RuntimeResult<cudarc::driver::CudaGraph> {
        let stream = &self.exec.stream;
        stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(cu("begin capture"))?;
        let launched = launch(self);
        let graph = self.exec.stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).map_err(cu("end capture"));
        launched?;
        graph?.ok_or_else(|| RuntimeError::Cuda("the captured step is empty".into()))
    }

    /// One call of `seq <= cap.seq` rows; with `last_only`, the row-local
    /// tail runs on the last row and the outputs are that row (`[1, ...]`).
    fn run_chunk(&mut self, inputs: &[ArrayD<f32>], seq: usize, last_only: bool) -> RuntimeResult<Vec<ArrayD<f32>>> {
        let exec = self.exec;
        let plan = &self.art.manifest.execution;
        let stream = &exec.stream;
        let raw = stream.cu_stream();
        exec.ctx.bind_to_thread().map_err(cu("bind the context"))?;
        // Host copies stay alive until the stream is synchronized below.
        let host: Vec<Vec<f32>> = inputs.iter().map(|a| a.iter().copied().collect()).collect();
        for (h, &b) in host.iter().zip(&plan.inputs) {
            if h.len() * 4 != plan.buffers[b].bytes(seq as u64) {
                return Err(RuntimeError::Cuda(format!("input `{}` holds a wrong number of elements", plan.buffers[b].name)));
            }
            // SAFETY: the input's arena region holds `cap.seq >= seq` rows, so
            // `h.len() * 4` bytes fit; `h` outlives the synchronize below.
            unsafe { cudarc::driver::result::memcpy_htod_async(self.ptrs[b], h, raw) }.map_err(cu("upload input"))?;
        }
        // The position, where the kernels and the appends read it.
        let pos_host = [self.pos as i64];
        // SAFETY: `pos_ptr` is the arena's 8-byte `pos` place; `pos_host`
        // outlives the synchronize below.
        unsafe { cudarc::driver::result::memcpy_htod_async(self.pos_ptr, &pos_host, raw) }.map_err(cu("upload pos"))?;
        let profiling = self.profile.is_some();
        if profiling {
            stream.synchronize().map_err(cu("synchronize"))?;
        }
        let tail = self.tail_step.filter(|_| last_only && seq > 1);
        if seq == 1 && self.graphs && !profiling {
            if self.decode_graph.is_none() {
                // Capture the step once; every launch reads `seq` = 1 and
                // `pos` from the arena, so the graph serves every position.
                self.decode_graph = Some(self.capture(|s| s.launch_steps(1, None))?);
            }
            if let Some(g) = &self.decode_graph {
                g.launch().map_err(cu("launch the decode graph"))?;
            }
        } else {
            self.launch_steps(seq, tail)?;
        }
        let mut outs = Vec::with_capacity(plan.outputs.len());
        let mut hosts = Vec::with_capacity(plan.outputs.len());
        for &o in &plan.outputs {
            let b: &BufferSpec = &plan.buffers[o];
            // After a tail, an output holds its last row only (written there).
            let (rows, from) = match tail {
                Some(_) => (1, self.ptrs[o] + ((seq - 1) * b.bytes(1)) as u64),
                None => (seq, self.ptrs[o]),
            };
            let shape: Vec<usize> = b.dims.iter().map(|d| d.resolve(rows as u64) as usize).collect();
            let mut v = vec![0f32; shape.iter().product()];
            // SAFETY: the output region holds `bytes(seq)` bytes, `seq` rows of
            // `bytes(1)`; `from` reads `4 · v.len()` of them (all, or the last
            // row); `v` is not touched until the synchronize below.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut v, from, raw) }.map_err(cu("download output"))?;
            hosts.push(v);
            outs.push(shape);
        }
        stream.synchronize().map_err(cu("synchronize"))?;
        drop(host);
        self.pos += seq;
        outs.into_iter()
            .zip(hosts)
            .map(|(shape, v)| ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| RuntimeError::Cuda(e.to_string())))
            .collect()
    }
}

/// Per plan step: whether it joins the launch before it. A value cache's
/// append right after the key cache's (same row width and cache type, and
/// either both plain or both sequence-axis caches of one layout; no chunked-SVD
/// cache) is launched with it, as one append of two caches.
pub fn joined_appends(plan: &ExecutionPlan) -> Vec<bool> {
    let plain = |s: &Step| match s {
        Step::KvAppend { src, cache, hadamard: None } => {
            let c = &plan.buffers[*cache];
            (c.chunked.is_none()).then(|| (c.dtype, plan.buffers[*src].numel().resolve(1), c.sequence_layout()))
        }
        _ => None,
    };
    let mut joins = vec![false; plan.steps.len()];
    for i in 1..plan.steps.len() {
        let (prev, this) = (plain(&plan.steps[i - 1]), plain(&plan.steps[i]));
        joins[i] = this.is_some() && prev == this && !joins[i - 1];
    }
    joins
}

/// The index among a session's launches of plan step `step` (or of the end,
/// for `step` = the plan's length), given `joined_appends`.
pub fn launch_index(joins: &[bool], step: usize) -> usize {
    step - joins.iter().take(step).filter(|&&j| j).count()
}
