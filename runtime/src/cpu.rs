//! The CPU executor: dlopens the artifact's `cpu/kernels.so` and runs the plan,
//! either once over a whole sequence or as a session that keeps KV caches
//! across calls (prefill, then one token at a time).

use crate::artifact::Artifact;
use crate::error::{RuntimeError, RuntimeResult};
use crate::manifest::{
    abi_record, BufferKind, BufferSpec, KernelStep, Step, ABI_MAGIC, ABI_SYMBOL_PREFIX, CPU_LIBRARY, MAX_KERNEL_BUFFERS,
};
use crate::pool::SpinPool;
use crate::resident::ResidentWeights;
use ndarray::{ArrayD, IxDyn};
use sparsec_ir::DType;
use std::collections::HashMap;
use std::ffi::c_void;

/// MLIR's descriptor of a rank-1 memref (`_mlir_ciface_` ABI).
#[repr(C)]
#[derive(Clone, Copy)]
struct MemRef1 {
    allocated: *mut u8,
    aligned: *mut u8,
    offset: i64,
    size: i64,
    stride: i64,
}

/// Scalar operations below which a step runs on the calling thread: handing
/// work to the spinning pool costs well under a microsecond, but splitting tiny
/// ops only adds cache traffic.
const PARALLEL_MIN_OPS: u64 = 8_192;

pub struct CpuExecutor {
    // Kept alive for the function pointers below.
    _lib: libloading::Library,
    /// Per step of the plan, its kernel's address (0 for KV appends).
    step_fns: Vec<usize>,
    threads: usize,
    pool: SpinPool,
    /// The weights in huge-page memory (`WeightPlacement::Resident`); `None`
    /// when sessions read them from the artifact's file mapping.
    resident: Option<ResidentWeights>,
    /// The loaded artifact's manifest hash: sessions serve that artifact only.
    artifact: String,
}

/// Where a CPU executor reads the weights from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightPlacement {
    /// Read once at load into memory on 2 MB pages (`resident`): fewer TLB
    /// misses while decode streams every weight per token (F32 SmolLM2 decode
    /// +10-17% here). The default.
    Resident,
    /// The artifact's file mapping: nothing is copied, pages are shared
    /// between processes and paged in on first use.
    Mapped,
}

impl WeightPlacement {
    /// `resident` or `mapped` (as reports spell it).
    pub fn name(self) -> &'static str {
        match self {
            WeightPlacement::Resident => "resident",
            WeightPlacement::Mapped => "mapped",
        }
    }

    /// `$SPARSEC_WEIGHTS` = `mmap` picks `Mapped`; anything else `Resident`.
    pub fn from_env() -> WeightPlacement {
        match std::env::var("SPARSEC_WEIGHTS") {
            Ok(v) if v == "mmap" => WeightPlacement::Mapped,
            _ => WeightPlacement::Resident,
        }
    }
}

/// Threads for kernels: `$SPARSEC_THREADS`, else every core.
pub fn default_threads() -> usize {
    std::env::var("SPARSEC_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n: &usize| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// Calls a kernel whose C signature takes `args.len()` integer-class arguments
/// (descriptor pointers, then `seq`, `pos`, `lo`, `hi` as i64).
///
/// # Safety
/// `f` must be a `_mlir_ciface_` kernel of this artifact taking exactly
/// `args.len()` arguments, each descriptor pointer valid for the call, and the
/// buffers large enough for the kernel's shapes at the given `seq` and `pos`.
unsafe fn call(f: *const c_void, a: &[usize]) -> Result<(), String> {
    use std::mem::transmute;
    type U = usize;
    // On x86-64 System V, pointers and i64 are both INTEGER-class arguments, so
    // one signature of `usize`s per arity is the kernel's real signature.
    unsafe {
        match a.len() {
            5 => transmute::<*const c_void, extern "C" fn(U, U, U, U, U)>(f)(a[0], a[1], a[2], a[3], a[4]),
            6 => transmute::<*const c_void, extern "C" fn(U, U, U, U, U, U)>(f)(a[0], a[1], a[2], a[3], a[4], a[5]),
            7 => transmute::<*const c_void, extern "C" fn(U, U, U, U, U, U, U)>(f)(a[0], a[1], a[2], a[3], a[4], a[5], a[6]),
            8 => transmute::<*const c_void, extern "C" fn(U, U, U, U, U, U, U, U)>(f)(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]),
            9 => transmute::<*const c_void, extern "C" fn(U, U, U, U, U, U, U, U, U)>(f)(
                a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8],
            ),
            10 => transmute::<*const c_void, extern "C" fn(U, U, U, U, U, U, U, U, U, U)>(f)(
                a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9],
            ),
            11 => transmute::<*const c_void, extern "C" fn(U, U, U, U, U, U, U, U, U, U, U)>(f)(
                a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10],
            ),
            12 => transmute::<*const c_void, extern "C" fn(U, U, U, U, U, U, U, U, U, U, U, U)>(f)(
                a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11],
            ),
            n => return Err(format!("no kernel calling convention for {n} arguments")),
        }
    }
    Ok(())
}

impl CpuExecutor {
    /// Loads `art`'s CPU code, with weights placed as `$SPARSEC_WEIGHTS` says.
    pub fn load(art: &Artifact) -> RuntimeResult<CpuExecutor> {
        Self::load_placed(art, WeightPlacement::from_env())
    }

    pub fn load_placed(art: &Artifact, placement: WeightPlacement) -> RuntimeResult<CpuExecutor> {
        let path = art.dir.join(CPU_LIBRARY);
        if !path.is_file() {
            return Err(RuntimeError::Artifact { path, message: "no CPU code: compile with --target cpu or all".into() });
        }
        // Code for features this host lacks would die of SIGILL: refuse it here.
        let (cpu, features) = crate::isa::recorded_target(&art.manifest.options);
        let missing = crate::isa::missing_on_host(&crate::isa::required(&cpu, &features));
        if !missing.is_empty() {
            return Err(RuntimeError::Artifact {
                path,
                message: format!(
                    "its CPU code was compiled for x86-64 features this host lacks: {} (target `{cpu}`); compile it on this host (`--cpu host`, the default) or for a level it has (`--cpu x86-64-v3`)",
                    missing.join(", ")
                ),
            });
        }
        // SAFETY: the library is our own generated code with no initializers.
        let lib = unsafe { libloading::Library::new(&path) }
            .map_err(|e| RuntimeError::Artifact { path: path.clone(), message: e.to_string() })?;
        let mut step_fns = Vec::new();
        for step in &art.manifest.execution.steps {
            let Step::Kernel(step) = step else {
                step_fns.push(0);
                continue;
            };
            if step.args.len() > MAX_KERNEL_BUFFERS {
                return Err(RuntimeError::Artifact {
                    path: path.clone(),
                    message: format!("kernel {} takes {} buffers (at most {MAX_KERNEL_BUFFERS})", step.kernel, step.args.len()),
                });
            }
            let sym = format!("_mlir_ciface_{}", step.kernel);
            // SAFETY: we only take the symbol's address here; the ABI record
            // below pins the buffers the kernel was generated for.
            let f: libloading::Symbol<'_, *const c_void> = unsafe { lib.get(sym.as_bytes()) }
                .map_err(|e| RuntimeError::Artifact { path: path.clone(), message: format!("{sym}: {e}") })?;
            let bufs: Vec<&crate::manifest::BufferSpec> = step.args.iter().map(|&a| &art.manifest.execution.buffers[a]).collect();
            let want = abi_record(&bufs);
            let got = Self::abi_record_of(&lib, &step.kernel).map_err(|message| RuntimeError::Artifact { path: path.clone(), message })?;
            if got != want {
                let which = (0..bufs.len()).find(|&i| got.get(2 + 2 * i..4 + 2 * i) != want.get(2 + 2 * i..4 + 2 * i));
                let what = match which {
                    Some(i) => format!(
                        "buffer {i} (`{}`) is {:?} bytes at seq 1, 2; the kernel was built for {:?}",
                        bufs[i].name,
                        &want[2 + 2 * i..4 + 2 * i],
                        got.get(2 + 2 * i..4 + 2 * i)
                    ),
                    None => format!("{} buffers; the kernel was built for {}", bufs.len(), got.get(1).copied().unwrap_or(0)),
                };
                return Err(RuntimeError::Artifact { path: path.clone(), message: format!("kernel {}: {what}", step.kernel) });
            }
            step_fns.push(*f as usize);
        }
        let threads = default_threads();
        let resident = match placement {
            WeightPlacement::Resident => Some(ResidentWeights::load(art)?),
            WeightPlacement::Mapped => None,
        };
        let artifact = art.manifest.integrity.clone();
        Ok(CpuExecutor { _lib: lib, step_fns, threads, pool: Self::pool(threads)?, resident, artifact })
    }

    /// The ABI record `lib` holds for `kernel` (`ABI_SYMBOL_PREFIX`).
    fn abi_record_of(lib: &libloading::Library, kernel: &str) -> Result<Vec<u64>, String> {
        let sym = format!("{ABI_SYMBOL_PREFIX}{kernel}");
        // SAFETY: only the symbol's address is taken.
        let p: libloading::Symbol<'_, *const u64> = unsafe { lib.get(sym.as_bytes()) }.map_err(|e| format!("{sym}: {e}"))?;
        let p: *const u64 = *p;
        if p.is_null() || !(p as usize).is_multiple_of(std::mem::align_of::<u64>()) {
            return Err(format!("{sym} is not an aligned record"));
        }
        // SAFETY: the symbol is a constant array the compiler emitted into this
        // library (whose hash the manifest checked): two header words, and the
        // 2·n words after them are read only once the header's magic matches and
        // n is a count a record can have.
        unsafe {
            let head = std::slice::from_raw_parts(p, 2);
            if head[0] != ABI_MAGIC || head[1] as usize > MAX_KERNEL_BUFFERS {
                return Err(format!("{sym} is not an ABI record"));
            }
            Ok(std::slice::from_raw_parts(p, 2 + 2 * head[1] as usize).to_vec())
        }
    }

    /// The calling thread and `threads - 1` spinning workers.
    fn pool(threads: usize) -> RuntimeResult<SpinPool> {
        SpinPool::new(threads).map_err(|e| RuntimeError::Cpu(format!("cannot start worker threads: {e}")))
    }

    /// Splits each kernel's units over `n` threads (1: run on the caller's thread).
    pub fn with_threads(mut self, n: usize) -> RuntimeResult<Self> {
        self.threads = n.max(1);
        self.pool = Self::pool(self.threads)?;
        Ok(self)
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn placement(&self) -> WeightPlacement {
        if self.resident.is_some() {
            WeightPlacement::Resident
        } else {
            WeightPlacement::Mapped
        }
    }

    /// Runs the plan once over a whole sequence (no earlier positions).
    pub fn run(&self, art: &Artifact, inputs: &[ArrayD<f32>]) -> RuntimeResult<Vec<ArrayD<f32>>> {
        self.session(art)?.run(inputs)
    }

    /// A decoding session: every `run` continues where the last one stopped.
    pub fn session<'a>(&'a self, art: &'a Artifact) -> RuntimeResult<CpuSession<'a>> {
        if art.manifest.integrity != self.artifact {
            return Err(RuntimeError::Artifact {
                path: art.dir.clone(),
                message: "this CPU executor was loaded from another artifact; load one for this artifact".into(),
            });
        }
        let n = art.manifest.execution.buffers.len();
        let mut weights: Vec<Option<WeightData>> = (0..n).map(|_| None).collect();
        for (i, b) in art.manifest.execution.buffers.iter().enumerate() {
            if b.kind != BufferKind::Weight {
                continue;
            }
            if let Some((p, n)) = self.resident.as_ref().filter(|r| r.serves(art)).and_then(|r| r.get(i)) {
                weights[i] = Some(WeightData::Mapped(p, n));
                continue;
            }
            let bytes = art.weights.at(art.weight_range(b)?);
            let need = bytes.len();
            // Kernels load f32 and f16 values: data that is not 4-byte aligned is copied.
            let data = if (bytes.as_ptr() as usize).is_multiple_of(4) {
                WeightData::Mapped(bytes.as_ptr(), need)
            } else {
                let mut v = vec![0u32; need.div_ceil(4)];
                // SAFETY: `v` holds at least `need` bytes; u32 has no invalid bit patterns.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, need) };
                WeightData::Owned(v, need)
            };
            weights[i] = Some(data);
        }
        let profile = std::env::var_os("SPARSEC_PROFILE").map(|_| HashMap::new());
        let profile_print = profile.is_some();
        Ok(CpuSession {
            exec: self,
            art,
            pos: 0,
            caches: vec![Vec::new(); n],
            slots: Vec::new(),
            slot_bytes: None,
            weights,
            profile,
            profile_print,
        })
    }
}

enum WeightData {
    /// Borrowed from the artifact's map (alive as long as the artifact) or the
    /// executor's resident weights (alive as long as the executor).
    Mapped(*const u8, usize),
    Owned(Vec<u32>, usize),
}

impl WeightData {
    fn ptr_len(&self) -> (*mut u8, usize) {
        match self {
            WeightData::Mapped(p, n) => (*p as *mut u8, *n),
            WeightData::Owned(v, n) => (v.as_ptr() as *mut u8, *n),
        }
    }
}

/// The most rows one kernel pass takes: longer calls of a plan whose inputs
/// and outputs are laid out by rows run in chunks (as llama.cpp's
/// micro-batches), which bounds the temporaries' memory at long prompts.
pub const MAX_CALL_ROWS: u64 = 512;

/// The state of one sequence: positions consumed, the KV caches, and the
/// memory of the temporaries (reused from call to call).
pub struct CpuSession<'a> {
    exec: &'a CpuExecutor,
    art: &'a Artifact,
    pos: usize,
    /// Per buffer: a KV cache's rows of every position so far (empty for others).
    caches: Vec<Vec<f32>>,
    /// Memory of the plan's temp slots.
    slots: Vec<Vec<f32>>,
    /// The bytes each slot needs at the last call's `seq` (decode repeats it).
    slot_bytes: Option<(u64, Vec<usize>)>,
    /// Per buffer: a weight's data (`None` for others).
    weights: Vec<Option<WeightData>>,
    /// Per-kernel wall time and calls, when `$SPARSEC_PROFILE` is set or a
    /// caller asked (`profile_kernels`).
    profile: Option<HashMap<String, (f64, u64)>>,
    /// Print the profile when the session ends (`$SPARSEC_PROFILE`).
    profile_print: bool,
}

impl Drop for CpuSession<'_> {
    fn drop(&mut self) {
        if self.profile_print {
            let v = self.kernel_times();
            let total: f64 = v.iter().map(|(_, t, _)| t).sum();
            eprintln!("sparsec profile: {total:.1} ms in kernels");
            for (k, t, n) in v {
                eprintln!("  {k:<24} {t:>10.2} ms {n:>8} calls {:>6.1}%", 100.0 * t / total.max(1e-9));
            }
        }
    }
}

impl CpuSession<'_> {
    /// Times every kernel from now on (earlier times are forgotten).
    pub fn profile_kernels(&mut self) {
        self.profile = Some(HashMap::new());
    }

    /// Per kernel: milliseconds and calls since `profile_kernels`, slowest first.
    pub fn kernel_times(&self) -> Vec<(String, f64, u64)> {
        let mut v: Vec<(String, f64, u64)> = self.profile.iter().flatten().map(|(k, (t, n))| (k.clone(), *t, *n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// Bytes the KV caches hold now (a windowed layer's ring stops growing at
    /// its capacity).
    pub fn cache_bytes(&self) -> usize {
        self.caches.iter().map(|c| c.len() * 4).sum()
    }

    /// Positions already consumed.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Per chunked-SVD cache (`#kv(chunked_svd)`): its name and the rank of
    /// every (complete chunk, KV head) it holds now, chunk by chunk.
    pub fn chunk_ranks(&self) -> Vec<(String, Vec<usize>)> {
        let plan = &self.art.manifest.execution;
        plan.buffers
            .iter()
            .zip(&self.caches)
            .filter_map(|(b, c)| {
                let l = b.chunk_layout()?;
                // SAFETY: the cache's f32 words are plain memory it owns; read as bytes.
                let bytes = unsafe { std::slice::from_raw_parts(c.as_ptr() as *const u8, c.len() * 4) };
                let ranks = (0..self.pos / l.chunk)
                    .filter_map(|i| bytes.get(l.residual_bytes() + i * l.chunk_bytes()..l.residual_bytes() + (i + 1) * l.chunk_bytes()))
                    .flat_map(|rec| l.ranks(rec))
                    .collect();
                Some((b.name.clone(), ranks))
            })
            .collect()
    }

    /// Forgets every position (the caches keep their memory).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Forgets the positions from `pos` on (the caches keep their memory): the
    /// next `run` continues at `pos`, as after a shared prompt prefix or a
    /// rejected draft. A ring cache (a windowed layer) has overwritten
    /// positions older than its rows, so it can go back at most its slack.
    pub fn truncate(&mut self, pos: usize) -> RuntimeResult<()> {
        let back = self.pos.saturating_sub(pos);
        if let Some(r) = self.art.manifest.execution.buffers.iter().filter_map(|b| b.ring).find(|r| back > r.max_rows as usize) {
            return Err(RuntimeError::Cpu(format!(
                "cannot go back {back} positions: a windowed layer's ring cache keeps {} rows beyond its window",
                r.max_rows
            )));
        }
        if let Some(why) = compressed_cannot_go_back(&self.art.manifest.execution, self.pos, pos) {
            return Err(RuntimeError::Cpu(why));
        }
        self.pos = self.pos.min(pos);
        Ok(())
    }

    /// Runs the next `seq` positions (`seq` bound by the inputs) and returns the outputs.
    pub fn run(&mut self, inputs: &[ArrayD<f32>]) -> RuntimeResult<Vec<ArrayD<f32>>> {
        self.run_rows(inputs, false)
    }

    /// Like `run`, but returns only the last position's row of each output
    /// (shape `[1, ...]`): what generation needs after a prompt. The plan's
    /// row-local tail (a final norm and an LM head) then runs on that row
    /// alone; without a tail every row is computed and the last returned.
    pub fn run_last(&mut self, inputs: &[ArrayD<f32>]) -> RuntimeResult<Vec<ArrayD<f32>>> {
        self.run_rows(inputs, true)
    }

    fn run_rows(&mut self, inputs: &[ArrayD<f32>], last_only: bool) -> RuntimeResult<Vec<ArrayD<f32>>> {
        let art = self.art;
        let seq = art.bind_seq(inputs)?;
        let plan = &art.manifest.execution;
        art.check_positions(self.pos, seq)?;
        // Long calls run in chunks of at most `MAX_CALL_ROWS` rows (so the
        // temporaries stay small whatever the prompt), and of at most `max_rows`
        // where a ring cache takes no more; their outputs are joined by rows.
        // (A chunked-SVD or sequence-axis DCT cache's ring of exact rows
        // likewise: `ChunkLayout::max_call`, `SeqLayout::max_call`.)
        let ring = plan
            .buffers
            .iter()
            .filter_map(|b| b.ring.map(|r| r.max_rows.max(1) as u64).or_else(|| b.compressed().map(|l| l.max_call() as u64)))
            .min();
        let chunk = ring.unwrap_or(MAX_CALL_ROWS).min(MAX_CALL_ROWS);
        let by_rows = plan.inputs.iter().chain(&plan.outputs).all(|&i| plan.buffers[i].by_rows());
        // A call a ring cannot take in one piece is split or refused (`run_chunks`).
        if seq > chunk && (by_rows || ring.is_some_and(|r| seq > r)) {
            self.run_chunks(inputs, seq, chunk, last_only)
        } else {
            self.run_call(inputs, last_only)
        }
    }

    /// `run_rows` over rows `0..seq` of the inputs in calls of at most `chunk` rows.
    fn run_chunks(&mut self, inputs: &[ArrayD<f32>], seq: u64, chunk: u64, last_only: bool) -> RuntimeResult<Vec<ArrayD<f32>>> {
        let plan = &self.art.manifest.execution;
        if let Some(&i) = plan.inputs.iter().find(|&&i| !plan.buffers[i].by_rows()) {
            return Err(RuntimeError::Cpu(format!("input `{}` is not laid out by rows: cannot split the call", plan.buffers[i].name)));
        }
        let mut joined: Vec<Vec<ArrayD<f32>>> = Vec::new();
        let mut lo = 0;
        while lo < seq {
            let hi = (lo + chunk).min(seq);
            let part: Vec<ArrayD<f32>> =
                inputs.iter().map(|a| a.slice_axis(ndarray::Axis(0), ndarray::Slice::from(lo as usize..hi as usize)).to_owned()).collect();
            let last = hi == seq;
            // Where only the last row is wanted, every chunk computes only its
            // last row's tail (a final norm and LM head), and all but the last
            // chunk's outputs are dropped.
            let outs = self.run_call(&part, last_only)?;
            if !last_only || last {
                joined.push(outs);
            }
            lo = hi;
        }
        if last_only {
            return joined.pop().ok_or_else(|| RuntimeError::Cpu("empty call".into()));
        }
        (0..plan.outputs.len())
            .map(|o| {
                let parts: Vec<_> = joined.iter().map(|outs| outs[o].view()).collect();
                if !plan.buffers[plan.outputs[o]].by_rows() {
                    return Err(RuntimeError::Cpu(format!("output `{}` is not laid out by rows", plan.buffers[plan.outputs[o]].name)));
                }
                ndarray::concatenate(ndarray::Axis(0), &parts).map_err(|e| RuntimeError::Cpu(e.to_string()))
            })
            .collect()
    }

    fn run_call(&mut self, inputs: &[ArrayD<f32>], last_only: bool) -> RuntimeResult<Vec<ArrayD<f32>>> {
        let art = self.art;
        let seq = art.bind_seq(inputs)?;
        let plan = &art.manifest.execution;
        let pos = self.pos;
        // Temps live in slots sized for the largest buffer they hold at this seq.
        if self.slot_bytes.as_ref().is_none_or(|(s, _)| *s != seq) {
            self.slot_bytes = Some((seq, plan.slot_bytes(seq)));
        }
        let slot_bytes = self.slot_bytes.as_ref().map(|(_, v)| v.as_slice()).unwrap_or_default();
        if self.slots.len() < slot_bytes.len() {
            self.slots.resize_with(slot_bytes.len(), Vec::new);
        }
        for (slot, bytes) in self.slots.iter_mut().zip(slot_bytes) {
            if slot.len() * 4 < *bytes {
                slot.resize(bytes.div_ceil(4), 0.0);
            }
        }
        let mut unslotted: HashMap<usize, Vec<f32>> = HashMap::new();
        let mut owned_inputs: Vec<Vec<f32>> = inputs.iter().map(|a| a.iter().copied().collect()).collect();
        let mut input_no = 0;
        let mut ptrs: Vec<(*mut u8, usize)> = Vec::with_capacity(plan.buffers.len());
        for (i, b) in plan.buffers.iter().enumerate() {
            let len = b.bytes(seq);
            let p = match b.kind {
                BufferKind::Weight => self.weights[i]
                    .as_ref()
                    .map(|w| w.ptr_len())
                    .ok_or_else(|| RuntimeError::Cpu(format!("weight `{}` not loaded", b.name)))?,
                BufferKind::Input => {
                    let v = owned_inputs.get_mut(input_no).ok_or_else(|| RuntimeError::Cpu("fewer inputs than the plan".into()))?;
                    input_no += 1;
                    if v.len() * 4 != len {
                        return Err(RuntimeError::Cpu(format!("input `{}` holds a wrong number of elements", b.name)));
                    }
                    (v.as_mut_ptr() as *mut u8, len)
                }
                BufferKind::Temp | BufferKind::Scratch => match b.slot {
                    Some(s) => (self.slots[s].as_mut_ptr() as *mut u8, len),
                    None => {
                        let v = unslotted.entry(i).or_insert_with(|| vec![0f32; len.div_ceil(4)]);
                        (v.as_mut_ptr() as *mut u8, len)
                    }
                },
                BufferKind::BlockCache { .. } => {
                    // A row per block the positions so far fill (`block_rows`).
                    let rows = b.block_rows(pos + seq as usize).unwrap_or(1);
                    let need = rows * b.bytes(1);
                    let c = &mut self.caches[i];
                    if c.len() * 4 < need {
                        c.resize(need.div_ceil(4).max(c.len() * 2), 0.0);
                    }
                    (c.as_mut_ptr() as *mut u8, need)
                }
                BufferKind::KvCache => {
                    // Held as f32 words (4-byte aligned) whatever the cache's
                    // type; grown by at least 64 positions' bytes (not counting
                    // the exact rows a per-channel, chunked or low-pass cache holds once).
                    let row_words = b.position_bytes().div_ceil(4).max(1);
                    let c = &mut self.caches[i];
                    let rows = b.cache_rows(pos + seq as usize);
                    // Quantized per channel, factored per chunk or low-pass per
                    // block: the exact rows, then the groups or records.
                    let packed = b.channel_groups.is_some() || b.compressed_cache();
                    let need = if packed { b.bytes(rows as u64) } else { rows * b.bytes(1) };
                    if c.len() * 4 < need {
                        // Grow geometrically (decode appends one row at a time), a
                        // ring up to its capacity only.
                        let most = b.ring.map_or(usize::MAX, |r| r.capacity() * b.bytes(1).div_ceil(4));
                        c.resize(need.div_ceil(4).max((c.len() * 2).max(row_words * 64).min(most)), 0.0);
                    }
                    (c.as_mut_ptr() as *mut u8, need)
                }
            };
            ptrs.push(p);
        }
        let tail = plan.row_local_tail.filter(|_| last_only && seq > 1);
        // The last row of a buffer laid out by rows (`BufferSpec::by_rows`).
        let last_row = |p: *mut u8, b: &crate::manifest::BufferSpec| {
            let row = b.bytes(1);
            // SAFETY: a buffer by rows holds `seq` rows of `row` bytes, so the last
            // row is inside its allocation.
            (unsafe { p.add(row * (seq as usize - 1)) }, row)
        };
        for (i, step) in plan.steps.iter().enumerate() {
            if tail == Some(i) {
                // From here on, every buffer but the weights is read and written
                // at its last row only, as a one-row sequence at the last position
                // (partition checks that the tail's buffers are by rows).
                for (b, p) in plan.buffers.iter().zip(ptrs.iter_mut()) {
                    if matches!(b.kind, BufferKind::Temp | BufferKind::Input) {
                        *p = last_row(p.0, b);
                    }
                }
            }
            let (seq, pos) = if tail.is_some_and(|t| i >= t) { (1, pos + seq as usize - 1) } else { (seq, pos) };
            match step {
                Step::KvAppend { src, cache, hadamard } => {
                    let (sp, slen) = ptrs[*src];
                    let (cp, _) = ptrs[*cache];
                    let cb = &plan.buffers[*cache];
                    let n = (cb.numel().resolve(seq) as usize).min(slen / 4);
                    // SAFETY: the cache holds `pos + seq` rows, or a ring's capacity
                    // (sized above), of `bytes(1)` bytes each; `src` holds `seq` rows of
                    // as many f32 values; they are distinct allocations; both are
                    // 4-byte aligned.
                    let from = unsafe { std::slice::from_raw_parts(sp as *const f32, n) };
                    let width = cb.numel().resolve(1) as usize;
                    // Row by row where the cache is a ring or packs each row into
                    // blocks, else all rows at once (no allocation: decode
                    // appends twice per layer and token).
                    let by_row = cb.ring.is_some() || cb.dtype.is_quantized() || cb.compressed_cache() || cb.head_blocks.is_some();
                    let runs = if by_row { seq as usize } else { 1 };
                    for i in 0..runs {
                        let (row, part) = match (cb.ring, by_row) {
                            (Some(r), _) => (r.row(pos + i), i * width..(i + 1) * width),
                            (None, true) => (pos + i, i * width..(i + 1) * width),
                            (None, false) => (pos, 0..n),
                        };
                        let from = from.get(part).ok_or_else(|| RuntimeError::Cpu(format!("KV source `{}` is short", cb.name)))?;
                        if cb.channel_groups.is_some() {
                            append_by_channel(cp, cb, row, from, *hadamard)?;
                            continue;
                        }
                        if append_compressed(cp, cb, row, from)?.is_some() {
                            continue;
                        }
                        if let Some(h) = cb.head_blocks {
                            append_head_blocks(cp, cb, h, row, from)?;
                            continue;
                        }
                        // SAFETY: `row` is below the rows the cache was sized for
                        // (a ring's rows are below its capacity).
                        let at = unsafe { cp.add(row * cb.bytes(1)) };
                        match cb.dtype {
                            DType::F16 | DType::F32 => {
                                // SAFETY: as above: the row's `from.len()` values lie
                                // inside the cache, at an offset aligned for the type
                                // (rows of f16 or f32 values), and nothing else refers
                                // to them during the append.
                                unsafe { write_plain(at, cb.dtype == DType::F16, from) };
                            }
                            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
                                // One row (each head rotated first where asked),
                                // packed on its own (`sparsec_ir::quant`): `bytes(1)` bytes.
                                let from = rotate_heads(from, *hadamard);
                                // SAFETY: as above; the row holds `bytes(1)` bytes, and
                                // nothing else refers to them during the append.
                                let to = unsafe { std::slice::from_raw_parts_mut(at, cb.bytes(1)) };
                                sparsec_ir::quant::quantize_into(cb.dtype, &from, to)
                                    .ok_or_else(|| RuntimeError::Cpu(format!("KV cache `{}`: a row does not pack", cb.name)))?;
                            }
                            other => return Err(RuntimeError::Cpu(format!("KV cache `{}` of type {}", cb.name, other.name()))),
                        }
                    }
                }
                Step::Kernel(k) => {
                    let t = self.profile.is_some().then(std::time::Instant::now);
                    self.launch(self.exec.step_fns[i], k, &ptrs, seq, pos)?;
                    if let (Some(t), Some(p)) = (t, self.profile.as_mut()) {
                        let e = p.entry(k.kernel.clone()).or_default();
                        e.0 += t.elapsed().as_secs_f64() * 1e3;
                        e.1 += 1;
                    }
                }
            }
        }
        self.pos += seq as usize;
        plan.outputs
            .iter()
            .map(|&o| {
                let b = &plan.buffers[o];
                let mut shape: Vec<usize> = b.dims.iter().map(|d| d.resolve(seq) as usize).collect();
                let (mut p, mut len) = ptrs[o];
                let by_rows = b.by_rows();
                if last_only && tail.is_none() && by_rows {
                    // No tail: every row was computed; keep the last.
                    (p, len) = last_row(p, b);
                }
                if last_only && by_rows {
                    if let Some(first) = shape.first_mut() {
                        *first = 1;
                    }
                }
                let n: usize = shape.iter().product();
                if b.dtype.is_quantized() || len < n * 4 {
                    return Err(RuntimeError::Cpu(format!("output `{}` is not an f32 buffer", b.name)));
                }
                // SAFETY: `p` points at `len >= 4n` bytes of f32 values that stay alive for this call.
                let v = unsafe { std::slice::from_raw_parts(p as *const f32, n) }.to_vec();
                ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| RuntimeError::Cpu(e.to_string()))
            })
            .collect()
    }

    /// Runs one kernel step (`f`, its address) over its units, split over the pool.
    /// Allocation-free: decode launches a few hundred kernels per token.
    fn launch(&self, f: usize, step: &KernelStep, ptrs: &[(*mut u8, usize)], seq: u64, pos: usize) -> RuntimeResult<()> {
        let buffers = &self.art.manifest.execution.buffers;
        let n = step.args.len();
        let out = *step.args.last().ok_or_else(|| RuntimeError::Cpu(format!("kernel {} has no output", step.kernel)))?;
        let out_ptr = ptrs[out].0;
        if step.args[..n - 1].iter().any(|&a| a == out || ptrs[a].0 == out_ptr) {
            return Err(RuntimeError::Cpu(format!("kernel {} reads its own output", step.kernel)));
        }
        if f == 0 || n > MAX_KERNEL_BUFFERS {
            return Err(RuntimeError::Cpu(format!("kernel {} not loaded", step.kernel)));
        }
        let null = std::ptr::null_mut();
        let mut descs = [MemRef1 { allocated: null, aligned: null, offset: 0, size: 0, stride: 1 }; MAX_KERNEL_BUFFERS];
        for (d, &a) in descs.iter_mut().zip(&step.args) {
            let (p, bytes) = ptrs[a];
            let elems = if buffers[a].as_bytes() { bytes } else { bytes / 4 };
            *d = MemRef1 { allocated: p, aligned: p, offset: 0, size: elems as i64, stride: 1 };
        }
        // Descriptor addresses, then seq, pos, lo, hi.
        let mut args = [0usize; MAX_KERNEL_BUFFERS + 4];
        for (a, d) in args.iter_mut().zip(&descs[..n]) {
            *a = d as *const MemRef1 as usize;
        }
        args[n] = seq as usize;
        args[n + 1] = pos;
        let units = step.units(seq) as usize;
        // Units of a first phase run (all of them) before the others.
        let first = step.cpu_first_phase.map_or(0, |p| (p.resolve(seq) as usize).min(units));
        if first > 0 {
            self.launch_units(f, step, args, n, 0..first)?;
        }
        self.launch_units(f, step, args, n, first..units)
    }

    /// Runs units `range` of a kernel step, split over the pool.
    fn launch_units(
        &self,
        f: usize,
        step: &KernelStep,
        args: [usize; MAX_KERNEL_BUFFERS + 4],
        n: usize,
        range: std::ops::Range<usize>,
    ) -> RuntimeResult<()> {
        let exec = self.exec;
        let (base, units) = (range.start, range.len());
        let enough = (units as u64).saturating_mul(step.cpu_unit_cost.max(1)) >= PARALLEL_MIN_OPS;
        let threads = if enough { exec.threads.min(units).max(1) } else { 1 };
        let chunk = units.div_ceil(threads);
        let failed: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
        let run = |t: usize| {
            let (lo, hi) = (base + (t * chunk).min(units), base + ((t + 1) * chunk).min(units));
            let mut a = args;
            a[n + 2] = lo;
            a[n + 3] = hi;
            // SAFETY: arity and buffer sizes follow the manifest written with these
            // kernels; inputs are only read; the output is not aliased by any input
            // (checked above), and units lo..hi write only their own part of it, so
            // slices run concurrently; the pool returns only when every slice is done.
            if let Err(e) = unsafe { call(f as *const c_void, &a[..n + 4]) } {
                if let Ok(mut g) = failed.lock() {
                    *g = Some(e);
                }
            }
        };
        // The calling thread runs the first slice itself while the workers take the others.
        if !exec.pool.run(threads, &run) {
            return Err(RuntimeError::Cpu(format!("kernel {} panicked", step.kernel)));
        }
        let err = failed.lock().ok().and_then(|mut g| g.take());
        match err {
            Some(e) => Err(RuntimeError::Cpu(e)),
            None => Ok(()),
        }
    }
}

/// A cache row as `--kv-hadamard` stores it: each head of `d` values rotated
/// by the normalized Hadamard matrix (a copy), or the row itself (no copy:
/// decode appends a row per layer and token).
fn rotate_heads(from: &[f32], hadamard: Option<u32>) -> std::borrow::Cow<'_, [f32]> {
    match hadamard {
        Some(d) => {
            let mut r = from.to_vec();
            for head in r.chunks_mut((d as usize).max(1)) {
                sparsec_ir::quant::hadamard(head);
            }
            std::borrow::Cow::Owned(r)
        }
        None => std::borrow::Cow::Borrowed(from),
    }
}

/// Appends position `row` (`from`: its `width` values) to a cache kept per
/// block and KV head (`HeadBlocks`): each head's `d` values at their place.
fn append_head_blocks(
    cp: *mut u8,
    cb: &crate::manifest::BufferSpec,
    h: crate::manifest::HeadBlocks,
    row: usize,
    from: &[f32],
) -> RuntimeResult<()> {
    let width = from.len();
    let d = width / (h.heads as usize).max(1);
    let elem = match cb.dtype {
        DType::F16 => 2,
        DType::F32 => 4,
        other => return Err(RuntimeError::Cpu(format!("KV cache `{}` of type {} kept per head block", cb.name, other.name()))),
    };
    for g in 0..h.heads as usize {
        let part = from.get(g * d..(g + 1) * d).ok_or_else(|| RuntimeError::Cpu(format!("KV source `{}` is short", cb.name)))?;
        // SAFETY: the cache was sized for whole blocks covering `row`
        // (`cache_rows`), so elements `at..at + d` of its type (`at + d` at
        // most the block's end) lie inside it, at an offset aligned for the
        // type; nothing else refers to them during the append.
        unsafe { write_plain(cp.add(h.at(row, g, width) * elem), cb.dtype == DType::F16, part) };
    }
    Ok(())
}

/// Writes `from` at `at` as f16 values (rounded; `f16`) or as f32 values.
///
/// # Safety
/// `at` holds `from.len()` values of that type inside one allocation, aligned
/// for it, and nothing else refers to them during the call.
unsafe fn write_plain(at: *mut u8, f16: bool, from: &[f32]) {
    if f16 {
        use half::slice::HalfFloatSliceExt;
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(at as *mut half::f16, from.len()) }.convert_from_f32_slice(from);
    } else {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(at as *mut f32, from.len()) }.copy_from_slice(from);
    }
}

/// Appends position `row` to a K cache quantized per channel
/// (`BufferSpec::channel_groups`, `sparsec_ir::kv_channel`): the row (each
/// head rotated first where asked) goes to the exact rows of its group, and
/// the group is packed once its last position arrives.
fn append_by_channel(cp: *mut u8, cb: &BufferSpec, row: usize, from: &[f32], hadamard: Option<u32>) -> RuntimeResult<()> {
    use sparsec_ir::kv_channel::{group_bytes, quantize_group, residual_bytes, GROUP};
    let width = from.len();
    let r = rotate_heads(from, hadamard);
    let w = row % GROUP;
    // SAFETY: the cache holds `residual_bytes(width)` exact f32 rows (4-byte
    // aligned) before its groups, and the groups of every position it was
    // sized for (`BufferSpec::try_bytes`); nothing else refers to them
    // during the append.
    let exact = unsafe { std::slice::from_raw_parts_mut(cp as *mut f32, GROUP * width) };
    exact[w * width..(w + 1) * width].copy_from_slice(&r);
    if w + 1 == GROUP {
        let g = row / GROUP;
        // SAFETY: as above: group g lies below the `row + 1` positions the cache holds.
        let to = unsafe { std::slice::from_raw_parts_mut(cp.add(residual_bytes(width) + g * group_bytes(width)), group_bytes(width)) };
        if !quantize_group(exact, width, to) {
            return Err(RuntimeError::Cpu(format!("KV cache `{}`: a group of width {width} does not pack", cb.name)));
        }
    }
    Ok(())
}

/// Why a session at `now` positions cannot go back to `pos` with its
/// compressed caches (`None`: it can): a chunked-SVD cache must still hold
/// the exact rows of the chunk `pos` falls in, a sequence-axis DCT cache
/// those from where the query at `pos` starts reading exact rows; both keep
/// the last `ring` positions.
pub(crate) fn compressed_cannot_go_back(plan: &crate::manifest::ExecutionPlan, now: usize, pos: usize) -> Option<String> {
    if pos >= now {
        return None;
    }
    plan.buffers
        .iter()
        .filter_map(|b| b.compressed())
        .find(|l| l.exact_from(pos) + l.ring() < now)
        .map(|l| format!("cannot go back to position {pos}: a {} cache keeps exact rows of the last {} positions only", l.name(), l.ring()))
}

/// Appends position `row` to a compressed cache (`chunked` or `sequence`,
/// `sparsec_ir::kv_compressed`) whose memory starts at `cp`: the row goes to
/// its exact rows, and a chunk or block its position completes is factored
/// or compressed into its record. `Some` of the byte ranges it wrote, `None`
/// for another cache.
pub(crate) fn append_compressed(
    cp: *mut u8,
    cb: &BufferSpec,
    row: usize,
    from: &[f32],
) -> RuntimeResult<Option<Vec<std::ops::Range<usize>>>> {
    if !cb.compressed_cache() {
        return Ok(None);
    }
    let l = cb.compressed().ok_or_else(|| RuntimeError::Cpu(format!("KV cache `{}`: a compressed layout that does not fit", cb.name)))?;
    let width = l.width();
    if from.len() != width {
        return Err(RuntimeError::Cpu(format!("KV cache `{}`: a row of {} values for {width} channels", cb.name, from.len())));
    }
    // SAFETY: the cache holds its exact f32 rows (4-byte aligned) before its
    // records, and the record of every group the positions it was sized for
    // complete (`Compressed::bytes`); nothing else refers to them during the
    // append.
    let exact = unsafe { std::slice::from_raw_parts_mut(cp as *mut f32, l.exact_rows() * width) };
    let at = l.exact_row(row);
    exact[at * width..(at + 1) * width].copy_from_slice(from);
    let mut wrote = Vec::with_capacity(2);
    wrote.push(at * width * 4..(at + 1) * width * 4);
    if let Some(i) = l.completed_by(row) {
        // The ring holds whole groups: group i's rows are contiguous.
        let first = l.exact_row(l.first(i)) * width;
        let rows = &exact[first..first + l.group() * width];
        let rec = l.record_at(i)..l.record_at(i) + l.record_bytes();
        // SAFETY: as above: group i lies below the `row + 1` positions the cache holds.
        let to = unsafe { std::slice::from_raw_parts_mut(cp.add(rec.start), rec.len()) };
        l.encode(rows, to).ok_or_else(|| RuntimeError::Cpu(format!("KV cache `{}`: record {i} does not encode", cb.name)))?;
        wrote.push(rec);
    }
    Ok(Some(wrote))
}
