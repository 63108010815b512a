//! The CPU executor: dlopens the artifact's `cpu/kernels.so` and runs the plan.

use crate::artifact::Artifact;
use crate::error::{RuntimeError, RuntimeResult};
use crate::manifest::{BufferKind, CPU_LIBRARY};
use ndarray::{ArrayD, IxDyn};
use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::c_void;

/// MLIR's descriptor of a rank-1 memref (`_mlir_ciface_` ABI).
#[repr(C)]
struct MemRef1 {
    allocated: *mut f32,
    aligned: *mut f32,
    offset: i64,
    size: i64,
    stride: i64,
}

pub struct CpuExecutor {
    // Kept alive for the function pointers below.
    _lib: libloading::Library,
    kernels: HashMap<String, usize>,
    threads: usize,
    pool: rayon::ThreadPool,
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
/// (descriptor pointers, then `seq` as i64).
///
/// # Safety
/// `f` must be a `_mlir_ciface_` kernel of this artifact taking exactly
/// `args.len()` arguments, each descriptor pointer valid for the call, and the
/// buffers large enough for the kernel's shapes at the given `seq`.
unsafe fn call(f: *const c_void, a: &[usize]) -> Result<(), String> {
    use std::mem::transmute;
    type U = usize;
    // On x86-64 System V, pointers and i64 are both INTEGER-class arguments, so
    // one signature of `usize`s per arity is the kernel's real signature.
    unsafe {
        match a.len() {
            2 => transmute::<*const c_void, extern "C" fn(U, U)>(f)(a[0], a[1]),
            3 => transmute::<*const c_void, extern "C" fn(U, U, U)>(f)(a[0], a[1], a[2]),
            4 => transmute::<*const c_void, extern "C" fn(U, U, U, U)>(f)(a[0], a[1], a[2], a[3]),
            5 => transmute::<*const c_void, extern "C" fn(U, U, U, U, U)>(f)(a[0], a[1], a[2], a[3], a[4]),
            6 => transmute::<*const c_void, extern "C" fn(U, U, U, U, U, U)>(f)(a[0], a[1], a[2], a[3], a[4], a[5]),
            7 => transmute::<*const c_void, extern "C" fn(U, U, U, U, U, U, U)>(f)(a[0], a[1], a[2], a[3], a[4], a[5], a[6]),
            8 => transmute::<*const c_void, extern "C" fn(U, U, U, U, U, U, U, U)>(f)(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]),
            n => return Err(format!("no kernel calling convention for {n} arguments")),
        }
    }
    Ok(())
}

impl CpuExecutor {
    pub fn load(art: &Artifact) -> RuntimeResult<CpuExecutor> {
        let path = art.dir.join(CPU_LIBRARY);
        if !path.is_file() {
            return Err(RuntimeError::Artifact { path, message: "no CPU code: compile with --target cpu or all".into() });
        }
        // SAFETY: the library is our own generated code with no initializers.
        let lib = unsafe { libloading::Library::new(&path) }
            .map_err(|e| RuntimeError::Artifact { path: path.clone(), message: e.to_string() })?;
        let mut kernels = HashMap::new();
        for step in &art.manifest.execution.steps {
            let sym = format!("_mlir_ciface_{}", step.kernel);
            // SAFETY: we only take the symbol's address here; `call` checks arity.
            let f: libloading::Symbol<'_, *const c_void> = unsafe { lib.get(sym.as_bytes()) }
                .map_err(|e| RuntimeError::Artifact { path: path.clone(), message: format!("{sym}: {e}") })?;
            kernels.insert(step.kernel.clone(), *f as usize);
        }
        let threads = default_threads();
        Ok(CpuExecutor { _lib: lib, kernels, threads, pool: Self::pool(threads)? })
    }

    fn pool(threads: usize) -> RuntimeResult<rayon::ThreadPool> {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(|e| RuntimeError::Cpu(e.to_string()))
    }

    /// Splits each kernel's units over `n` threads (1: run on the caller's thread).
    pub fn with_threads(mut self, n: usize) -> RuntimeResult<Self> {
        self.threads = n.max(1);
        self.pool = Self::pool(self.threads)?;
        Ok(self)
    }

    /// Runs the plan on `inputs` and returns the outputs.
    pub fn run(&self, art: &Artifact, inputs: &[ArrayD<f32>]) -> RuntimeResult<Vec<ArrayD<f32>>> {
        let seq = art.bind_seq(inputs)?;
        let plan = &art.manifest.execution;
        let mut bufs: Vec<Cow<'_, [f32]>> = Vec::with_capacity(plan.buffers.len());
        let mut input_iter = inputs.iter();
        for b in &plan.buffers {
            let n = b.numel().resolve(seq) as usize;
            bufs.push(match b.kind {
                BufferKind::Weight => art.weights.get(&b.name)?.1,
                BufferKind::Input => {
                    let a = input_iter.next().ok_or_else(|| RuntimeError::Cpu("fewer inputs than the plan".into()))?;
                    Cow::Owned(a.iter().copied().collect())
                }
                BufferKind::Temp => Cow::Owned(vec![0f32; n]),
            });
            if bufs.last().map(|v| v.len()) != Some(n) {
                return Err(RuntimeError::Cpu(format!("buffer `{}` holds a wrong number of elements", b.name)));
            }
        }
        for step in &plan.steps {
            let f = *self.kernels.get(&step.kernel).ok_or_else(|| RuntimeError::Cpu(format!("kernel {} not loaded", step.kernel)))?;
            let out = *step.args.last().ok_or_else(|| RuntimeError::Cpu(format!("kernel {} has no output", step.kernel)))?;
            if step.args[..step.args.len() - 1].contains(&out) {
                return Err(RuntimeError::Cpu(format!("kernel {} reads its own output", step.kernel)));
            }
            let out_ptr = bufs[out].to_mut().as_mut_ptr();
            let descs: Vec<MemRef1> = step
                .args
                .iter()
                .map(|&a| {
                    let p = if a == out { out_ptr } else { bufs[a].as_ptr() as *mut f32 };
                    MemRef1 { allocated: p, aligned: p, offset: 0, size: bufs[a].len() as i64, stride: 1 }
                })
                .collect();
            let mut args: Vec<usize> = descs.iter().map(|d| d as *const MemRef1 as usize).collect();
            args.push(seq as usize);
            let units = step.cpu_units.resolve(seq) as usize;
            let threads = self.threads.min(units).max(1);
            let chunk = units.div_ceil(threads);
            let run = |lo: usize, hi: usize| -> Result<(), String> {
                let mut a = args.clone();
                a.push(lo);
                a.push(hi);
                // SAFETY: arity and buffer sizes follow the manifest written with these
                // kernels; inputs are only read (the const-to-mut cast is never written
                // through); the output is owned, not aliased by any input, and units
                // lo..hi write only their own part of it, so slices run concurrently.
                unsafe { call(f as *const c_void, &a) }
            };
            if threads == 1 {
                run(0, units).map_err(RuntimeError::Cpu)?;
            } else {
                // rayon's pool: spawning into it costs microseconds, not a thread start.
                let results: Vec<Result<(), String>> = self.pool.install(|| {
                    use rayon::prelude::*;
                    (0..threads).into_par_iter().map(|t| run(t * chunk, ((t + 1) * chunk).min(units))).collect()
                });
                for r in results {
                    r.map_err(RuntimeError::Cpu)?;
                }
            }
        }
        plan.outputs
            .iter()
            .map(|&o| {
                let shape: Vec<usize> = plan.buffers[o].dims.iter().map(|d| d.resolve(seq) as usize).collect();
                ArrayD::from_shape_vec(IxDyn(&shape), bufs[o].to_vec()).map_err(|e| RuntimeError::Cpu(e.to_string()))
            })
            .collect()
    }
}
