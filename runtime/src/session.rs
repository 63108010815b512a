//! One decoding session on whichever device an `Executor` loaded: the CPU's
//! `CpuSession` or the GPU's `CudaSession` behind one API (positions consumed,
//! `run`, `run_last`, `reset`, `truncate`), so that generation, evaluation and
//! benchmarks are written once.

use crate::artifact::Artifact;
use crate::cpu::CpuSession;
use crate::cuda_session::{CudaSession, SessionCapacity};
use crate::error::RuntimeResult;
use crate::execute::Executor;
use ndarray::ArrayD;

pub enum Session<'a> {
    Cpu(CpuSession<'a>),
    /// Boxed: the GPU session (arena, steps, captured graph) is the larger.
    Cuda(Box<CudaSession<'a>>),
}

impl Executor {
    /// A session over `art`. The CPU's caches grow as needed and ignore `cap`;
    /// the GPU's arena is planned for `cap` once, here.
    pub fn session<'a>(&'a self, art: &'a Artifact, cap: SessionCapacity) -> RuntimeResult<Session<'a>> {
        Ok(match self {
            Executor::Cpu(e) => Session::Cpu(e.session(art)?),
            Executor::Cuda(e) => Session::Cuda(Box::new(e.session(art, cap)?)),
        })
    }
}

impl Session<'_> {
    /// Positions already consumed.
    pub fn pos(&self) -> usize {
        match self {
            Session::Cpu(s) => s.pos(),
            Session::Cuda(s) => s.pos(),
        }
    }

    /// Runs the next `seq` positions and returns every row of the outputs.
    pub fn run(&mut self, inputs: &[ArrayD<f32>]) -> RuntimeResult<Vec<ArrayD<f32>>> {
        match self {
            Session::Cpu(s) => s.run(inputs),
            Session::Cuda(s) => s.run(inputs),
        }
    }

    /// Runs the next `seq` positions and returns the last row of each output.
    pub fn run_last(&mut self, inputs: &[ArrayD<f32>]) -> RuntimeResult<Vec<ArrayD<f32>>> {
        match self {
            Session::Cpu(s) => s.run_last(inputs),
            Session::Cuda(s) => s.run_last(inputs),
        }
    }

    /// Greedy decoding: `first` is the input id at the current position; `n`
    /// decode steps follow, each fed the argmax of the one before (the last
    /// of equal maxima, `sampling::argmax`). Returns the `n` chosen ids. The
    /// GPU keeps the logits on the device (`CudaSession::greedy_steps`); the
    /// CPU takes the argmax of each step's last row.
    pub fn greedy_steps(&mut self, first: u32, n: usize) -> RuntimeResult<Vec<u32>> {
        match self {
            Session::Cpu(s) => crate::lm_session::greedy_loop(first, n, |id| s.run_last(&[crate::lm_session::ids_input(&[id])])),
            Session::Cuda(s) => s.greedy_steps(first, n),
        }
    }

    /// Whether GPU decode steps replay a captured CUDA graph (the default) or
    /// launch every kernel; CPU sessions launch kernels directly, so on the
    /// CPU this changes nothing.
    pub fn set_graphs(&mut self, on: bool) {
        match self {
            Session::Cpu(_) => {}
            Session::Cuda(s) => s.set_graphs(on),
        }
    }

    /// Per chunked-SVD cache, the ranks of its complete chunks' heads
    /// (`CpuSession::chunk_ranks`); the GPU session keeps no such caches.
    pub fn chunk_ranks(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Session::Cpu(s) => s.chunk_ranks(),
            Session::Cuda(_) => Vec::new(),
        }
    }

    /// Forgets every position.
    pub fn reset(&mut self) {
        match self {
            Session::Cpu(s) => s.reset(),
            Session::Cuda(s) => s.reset(),
        }
    }

    /// Forgets the positions from `pos` on (the CPU refuses to go back past
    /// what a windowed layer's ring still holds; both refuse to go back past
    /// the exact rows a compressed cache still holds).
    pub fn truncate(&mut self, pos: usize) -> RuntimeResult<()> {
        match self {
            Session::Cpu(s) => s.truncate(pos),
            Session::Cuda(s) => s.truncate(pos),
        }
    }

    /// Times every kernel from now on (on the GPU each launch is then
    /// synchronized, which slows the run).
    pub fn profile_kernels(&mut self) {
        match self {
            Session::Cpu(s) => s.profile_kernels(),
            Session::Cuda(s) => s.profile_kernels(),
        }
    }

    /// Per kernel: milliseconds and calls since `profile_kernels`, slowest first.
    pub fn kernel_times(&self) -> Vec<(String, f64, u64)> {
        match self {
            Session::Cpu(s) => s.kernel_times(),
            Session::Cuda(s) => s.kernel_times(),
        }
    }
}
