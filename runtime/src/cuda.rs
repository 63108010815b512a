//! The CUDA executor: loads the artifact's PTX with the driver API (cudarc,
//! libcuda loaded at run time) and runs the plan on device 0.

use crate::artifact::Artifact;
use crate::error::{RuntimeError, RuntimeResult};
use crate::manifest::{BufferKind, Step, CUDA_DIR};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use ndarray::{ArrayD, IxDyn};
use std::collections::HashMap;
use std::sync::Arc;

/// Threads per block for every launch.
pub const BLOCK: u32 = 256;

/// Whether the CUDA driver library can be loaded here.
pub fn cuda_available() -> bool {
    // SAFETY: only tries to dlopen the driver library; never panics.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A driver error as a `RuntimeError` saying what was being done.
pub(crate) fn cu<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> RuntimeError + '_ {
    move |e| RuntimeError::Cuda(format!("{what}: {e}"))
}

/// The parameter count of PTX entry `name` (`.entry name(.param ..., ...)`),
/// `None` when the text has no such entry.
pub fn entry_params(ptx: &str, name: &str) -> Option<usize> {
    let key = format!(".entry {name}(");
    let start = ptx.find(&key)? + key.len();
    let end = start + ptx[start..].find(')')?;
    Some(ptx[start..end].matches(".param").count())
}

/// Whether a kernel's PTX waits for the grids before it before it reads
/// anything (the compiler's `griddepcontrol` prologue, sm_90 and later): only
/// such a kernel may be launched while the kernel before it still runs.
pub fn waits_for_prior_grids(ptx: &str) -> bool {
    ptx.contains("griddepcontrol.wait;")
}

/// Launches `f` on `stream` with `params` (a pointer to each argument's value,
/// in the entry's order). `dependent`: with programmatic stream serialization,
/// so the launch may begin while the kernel before it finishes; on capture
/// into a CUDA graph this becomes a programmatic edge.
///
/// # Safety
/// `params` must match the entry's parameters (count, types, and device
/// pointers valid for what the kernel touches); `dependent` only for a
/// kernel that `waits_for_prior_grids` (it reads nothing before the wait).
pub(crate) unsafe fn launch_kernel(
    stream: &CudaStream,
    f: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut std::ffi::c_void],
    dependent: bool,
) -> Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    stream.context().bind_to_thread()?;
    // SAFETY: a zeroed attribute is a valid value of the plain C union; the
    // field set is the one the attribute id names.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: if dependent { &mut attr } else { std::ptr::null_mut() },
        numAttrs: u32::from(dependent),
    };
    // SAFETY: the config outlives the call and names this stream; `params`
    // is the caller's (see above); no `extra` options.
    unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }.result()
}

pub struct CudaExecutor {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) kernels: HashMap<String, CudaFunction>,
    /// The kernels that `waits_for_prior_grids`, on a device of compute
    /// capability 9.0 or later: sessions launch them with programmatic stream
    /// serialization while `dependent_launch` holds.
    waiting: std::collections::HashSet<String>,
    dependent_launch: bool,
    /// Whether sessions made after this launch runs of kernels that touch
    /// disjoint memory side by side (`cuda_side`).
    side_by_side: bool,
    /// Weight buffers (f32 values or packed quantized blocks), uploaded once.
    pub(crate) weights: HashMap<usize, CudaSlice<u8>>,
    /// The runtime's own KV append kernels (`cuda_append`).
    pub(crate) appender: crate::cuda_append::Appender,
    /// The runtime's sequence-axis cache append (`cuda_seq_append`).
    pub(crate) seq_appender: crate::cuda_seq_append::SeqAppender,
    /// The runtime's greedy step (`cuda_greedy`).
    pub(crate) greedy: crate::cuda_greedy::Greedy,
    /// The loaded artifact's manifest hash: sessions serve that artifact only.
    pub(crate) artifact: String,
}

impl CudaExecutor {
    pub fn load(art: &Artifact) -> RuntimeResult<CudaExecutor> {
        if !cuda_available() {
            return Err(RuntimeError::NoCuda);
        }
        let ctx = CudaContext::new(0).map_err(cu("create context"))?;
        // A stream of its own (not the legacy default stream): sessions
        // capture decode steps on it as CUDA graphs.
        let stream = ctx.new_stream().map_err(cu("create a stream"))?;
        let appender = crate::cuda_append::Appender::load(&ctx)?;
        let seq_appender = crate::cuda_seq_append::SeqAppender::load(&ctx)?;
        let greedy = crate::cuda_greedy::Greedy::load(&ctx)?;
        let mut kernels = HashMap::new();
        let mut waiting = std::collections::HashSet::new();
        let dependent_capable = ctx.compute_capability().map_err(cu("compute capability"))?.0 >= 9;
        for step in &art.manifest.execution.steps {
            let Step::Kernel(step) = step else { continue };
            if kernels.contains_key(&step.kernel) {
                continue;
            }
            let path = art.dir.join(CUDA_DIR).join(format!("{}.ptx", step.kernel));
            let ptx = std::fs::read_to_string(&path).map_err(|error| RuntimeError::Io { path: path.clone(), error })?;
            if ptx.contains('\0') {
                return Err(RuntimeError::Artifact { path, message: "PTX contains a NUL byte".into() });
            }
            // The entry takes the step's buffers as pointers, then `seq` and `pos`.
            let want = step.args.len() + 2;
            match entry_params(&ptx, &step.kernel) {
                Some(n) if n == want => {}
                got => {
                    return Err(RuntimeError::Artifact {
                        path,
                        message: format!("entry `{}` takes {got:?} parameters; the plan launches it with {want}", step.kernel),
                    })
                }
            }
            if dependent_capable && waits_for_prior_grids(&ptx) {
                waiting.insert(step.kernel.clone());
            }
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)).map_err(cu(&format!("load {}", path.display())))?;
            let f = module.load_function(&step.kernel).map_err(cu(&format!("function {}", step.kernel)))?;
            kernels.insert(step.kernel.clone(), f);
        }
        let mut weights = HashMap::new();
        for (i, b) in art.manifest.execution.buffers.iter().enumerate() {
            if b.kind == BufferKind::Weight {
                let data = art.weights.at(art.weight_range(b)?);
                weights.insert(i, stream.clone_htod(data).map_err(cu("upload weight"))?);
            }
        }
        Ok(CudaExecutor {
            ctx,
            stream,
            kernels,
            waiting,
            dependent_launch: true,
            side_by_side: true,
            weights,
            appender,
            seq_appender,
            greedy,
            artifact: art.manifest.integrity.clone(),
        })
    }

    /// Whether sessions made after this launch the compiled kernels that wait
    /// for their prior grids with programmatic stream serialization (the
    /// default where the device has it); `false` launches every kernel after
    /// the one before has completed, for comparison.
    pub fn set_dependent_launch(&mut self, on: bool) {
        self.dependent_launch = on;
    }

    /// Whether sessions made after this launch consecutive kernels that
    /// touch disjoint memory on forked streams, side by side, in calls of
    /// several rows (the default), or every kernel on the session's stream
    /// in turn.
    pub fn set_side_by_side(&mut self, on: bool) {
        self.side_by_side = on;
    }

    /// Whether sessions made after this launch kernels side by side.
    pub(crate) fn side_by_side(&self) -> bool {
        self.side_by_side
    }

    /// Whether kernel `name` launches as a dependent.
    pub(crate) fn launches_dependent(&self, name: &str) -> bool {
        self.dependent_launch && self.waiting.contains(name)
    }

    /// How many of the loaded kernels launch as dependents.
    pub fn dependent_kernels(&self) -> usize {
        if self.dependent_launch {
            self.waiting.len()
        } else {
            0
        }
    }

    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|e| format!("<unknown: {e}>"))
    }

    /// Runs the plan on `inputs` as one whole sequence (no earlier positions: a
    /// KV cache is then exactly the new keys or values, so it aliases them);
    /// outputs are copied back to the host. f16 caches are not the new values
    /// (they are rounded as appended): such a plan runs in a session of one call.
    pub fn run(&self, art: &Artifact, inputs: &[ArrayD<f32>]) -> RuntimeResult<Vec<ArrayD<f32>>> {
        let seq = art.bind_seq(inputs)?;
        let plan = &art.manifest.execution;
        if plan.buffers.iter().any(|b| b.kind == BufferKind::KvCache && b.dtype != sparsec_ir::DType::F32) {
            let rows = usize::try_from(seq).map_err(|_| RuntimeError::Cuda(format!("{seq} rows")))?;
            let cap = crate::cuda_session::SessionCapacity { positions: rows, seq: rows };
            return self.session(art, cap)?.run(inputs);
        }
        art.check_positions(0, seq)?;
        let mut owned: HashMap<usize, CudaSlice<f32>> = HashMap::new();
        let mut alias: HashMap<usize, usize> = HashMap::new();
        let mut input_iter = inputs.iter();
        for (i, b) in plan.buffers.iter().enumerate() {
            match b.kind {
                BufferKind::Weight => {}
                BufferKind::Input => {
                    let a = input_iter.next().ok_or_else(|| RuntimeError::Cuda("fewer inputs than the plan".into()))?;
                    let host: Vec<f32> = a.iter().copied().collect();
                    owned.insert(i, self.stream.clone_htod(&host).map_err(cu("upload input"))?);
                }
                BufferKind::KvCache => {}
                BufferKind::BlockCache { .. } => {
                    let rows = b.block_rows(seq as usize).unwrap_or(1) as u64;
                    let n = (b.numel().resolve(rows) as usize).max(1);
                    owned.insert(i, self.stream.alloc_zeros::<f32>(n).map_err(cu("alloc"))?);
                }
                BufferKind::Temp | BufferKind::Scratch => {
                    let n = (b.numel().resolve(seq) as usize).max(1);
                    owned.insert(i, self.stream.alloc_zeros::<f32>(n).map_err(cu("alloc"))?);
                }
            }
        }
        // No earlier positions: `pos` (read from device memory) is 0.
        let seq_arg = seq as i64;
        let pos_buf = self.stream.clone_htod(&[0i64]).map_err(cu("upload pos"))?;
        for step in &plan.steps {
            let step = match step {
                Step::KvAppend { hadamard: Some(_), .. } => {
                    return Err(RuntimeError::Cuda("rotated (Hadamard) KV caches are kept on the CPU only".into()))
                }
                Step::KvAppend { src, cache, hadamard: None } => {
                    alias.insert(*cache, *src);
                    continue;
                }
                Step::Kernel(k) => k,
            };
            let f = self.kernels.get(&step.kernel).ok_or_else(|| RuntimeError::Cuda(format!("kernel {} not loaded", step.kernel)))?;
            let out = *step.args.last().ok_or_else(|| RuntimeError::Cuda(format!("kernel {} has no output", step.kernel)))?;
            let mut out_buf = owned.remove(&out).ok_or_else(|| RuntimeError::Cuda(format!("kernel {} writes a weight", step.kernel)))?;
            let (grid, block) =
                step.gpu_launch_at(seq).ok_or_else(|| RuntimeError::Cuda(format!("kernel {}: too many threads", step.kernel)))?;
            let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
            let result = {
                let mut launch = self.stream.launch_builder(f);
                for &a in &step.args[..step.args.len() - 1] {
                    let a = alias.get(&a).copied().unwrap_or(a);
                    match (self.weights.get(&a), owned.get(&a)) {
                        (Some(w), _) => launch.arg(w),
                        (None, Some(o)) => launch.arg(o),
                        (None, None) => return Err(RuntimeError::Cuda(format!("buffer {a} missing"))),
                    };
                }
                launch.arg(&mut out_buf);
                launch.arg(&seq_arg);
                launch.arg(&pos_buf);
                // SAFETY: the kernel's parameters are the step's buffers (device
                // pointers, sized for `seq` by the plan), then `seq` as i64 and a
                // pointer to `pos` (one i64), exactly the signature the compiler generated.
                unsafe { launch.launch(cfg) }.map(|_| ())
            };
            result.map_err(cu(&format!("launch {}", step.kernel)))?;
            owned.insert(out, out_buf);
        }
        self.stream.synchronize().map_err(cu("synchronize"))?;
        plan.outputs
            .iter()
            .map(|&o| {
                let shape: Vec<usize> = plan.buffers[o].dims.iter().map(|d| d.resolve(seq) as usize).collect();
                let buf = owned.get(&o).ok_or_else(|| RuntimeError::Cuda(format!("output {o} is not computed on the device")))?;
                let mut host = self.stream.clone_dtoh(buf).map_err(cu("download"))?;
                self.stream.synchronize().map_err(cu("synchronize"))?;
                host.truncate(shape.iter().product());
                ArrayD::from_shape_vec(IxDyn(&shape), host).map_err(|e| RuntimeError::Cuda(e.to_string()))
            })
            .collect()
    }
}
