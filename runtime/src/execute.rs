//! One way to run an artifact on a device, timed, and to check its outputs
//! against the reference interpreter; used by `sparsec-run` and `sparsec`.

use crate::artifact::Artifact;
use crate::compare::{compare, Comparison, Tolerance};
use crate::cpu::CpuExecutor;
use crate::cuda::CudaExecutor;
use crate::error::{RuntimeError, RuntimeResult};
use crate::interpreter::interpret;
use ndarray::ArrayD;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// A loaded executor for one device.
pub enum Executor {
    Cpu(CpuExecutor),
    Cuda(CudaExecutor),
}

impl Executor {
    pub fn load(art: &Artifact, device: DeviceKind) -> RuntimeResult<Executor> {
        Ok(match device {
            DeviceKind::Cpu => Executor::Cpu(CpuExecutor::load(art)?),
            DeviceKind::Cuda => {
                if !crate::cuda::cuda_available() {
                    return Err(RuntimeError::NoCuda);
                }
                Executor::Cuda(CudaExecutor::load(art)?)
            }
        })
    }

    pub fn device_name(&self) -> String {
        match self {
            Executor::Cpu(_) => "cpu".into(),
            Executor::Cuda(e) => e.device_name(),
        }
    }

    /// CUDA: whether sessions made after this launch kernels that wait for
    /// their prior grids as programmatic dependents (`CudaExecutor::
    /// set_dependent_launch`); returns how many kernels do. CPU: 0.
    pub fn set_dependent_launch(&mut self, on: bool) -> usize {
        match self {
            Executor::Cpu(_) => 0,
            Executor::Cuda(e) => {
                e.set_dependent_launch(on);
                e.dependent_kernels()
            }
        }
    }

    /// CUDA: whether sessions made after this launch consecutive kernels
    /// that touch disjoint memory side by side on forked streams
    /// (`CudaExecutor::set_side_by_side`). CPU: nothing changes.
    pub fn set_side_by_side(&mut self, on: bool) {
        if let Executor::Cuda(e) = self {
            e.set_side_by_side(on);
        }
    }

    pub fn run(&self, art: &Artifact, inputs: &[ArrayD<f32>]) -> RuntimeResult<Vec<ArrayD<f32>>> {
        match self {
            Executor::Cpu(e) => e.run(art, inputs),
            Executor::Cuda(e) => e.run(art, inputs),
        }
    }

    /// One warm-up run (whose outputs are returned), then `repeat` timed runs;
    /// returns the outputs and the median time in milliseconds.
    pub fn run_timed(&self, art: &Artifact, inputs: &[ArrayD<f32>], repeat: usize) -> RuntimeResult<(Vec<ArrayD<f32>>, f64)> {
        let out = self.run(art, inputs)?;
        let mut times = Vec::with_capacity(repeat.max(1));
        for _ in 0..repeat.max(1) {
            let t = Instant::now();
            self.run(art, inputs)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok((out, times[times.len() / 2]))
    }
}

/// Runs the reference interpreter on the artifact's graph and weights.
pub fn reference_outputs(art: &Artifact, inputs: &[ArrayD<f32>]) -> RuntimeResult<Vec<ArrayD<f32>>> {
    interpret(&art.graph, inputs, &|name| art.weight_array(name).ok().map(std::sync::Arc::new))
}

/// Compares outputs pairwise; a count mismatch fails every comparison.
pub fn compare_all(got: &[ArrayD<f32>], want: &[ArrayD<f32>], tol: Tolerance) -> (bool, Vec<Comparison>) {
    let cmps: Vec<Comparison> = got.iter().zip(want).map(|(g, w)| compare(g, w, tol)).collect();
    let passed = got.len() == want.len() && cmps.iter().all(|c| c.passed);
    (passed, cmps)
}
