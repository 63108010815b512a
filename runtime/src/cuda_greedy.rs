//! Greedy decoding without leaving the GPU: a kernel the runtime brings itself
//! takes the argmax of a logits row (the largest value, the last of equal
//! ones, NaN skipped: `sampling::argmax`), writes it as the next step's input
//! id and into an id log at the current position, and advances the position
//! the kernels read. A decode step and this kernel, captured together as one
//! CUDA graph, replay back to back with no copy to the host between tokens.

use crate::cuda::cu;
use crate::error::RuntimeResult;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Threads of the one block (32 warps).
const GREEDY_BLOCK: u32 = 1024;

/// The PTX of `sparsec_greedy(logits, vocab, input, ids, positions, pos_ptr)`:
/// thread t scans elements t + 4096·k + {0, 1024, 2048, 3072} (four loads in
/// flight), keeping the last of its maxima; warps combine (value, index) pairs
/// by butterfly shuffles, taking the larger value and, on equal values, the
/// larger index; warp 0 combines the 32 warps' pairs from shared memory.
/// Thread 0 then stores the id at `ids[*pos]` (when `*pos < positions`), as
/// f32 at `input[0]`, and advances `*pos` by one. PTX 7.0 for sm_52 and later.
pub fn greedy_ptx() -> String {
    // (value, index) in (%f1, %r2) takes the pair in (%f6, %r3) when it wins.
    let combine = "    setp.gt.f32 %p2, %f6, %f1;\n    setp.eq.f32 %p3, %f6, %f1;\n    setp.gt.u32 %p4, %r3, %r2;\n    and.pred %p3, %p3, %p4;\n    or.pred %p2, %p2, %p3;\n    @%p2 mov.f32 %f1, %f6;\n    @%p2 mov.u32 %r2, %r3;\n";
    // The four loaded values in index order: each one at least the best so
    // far replaces it (so the last of equals wins; NaN never does).
    let scan: String = [("%f2", "%rd3"), ("%f3", "%rd6"), ("%f4", "%rd7"), ("%f5", "%rd8")]
        .iter()
        .map(|(f, i)| format!("    setp.ge.f32 %p2, {f}, %f1;\n    @%p2 mov.f32 %f1, {f};\n    @%p2 cvt.u32.u64 %r2, {i};\n"))
        .collect();
    let butterfly: String = [16, 8, 4, 2, 1]
        .iter()
        .map(|o| format!("    shfl.sync.bfly.b32 %f6, %f1, {o}, 31, -1;\n    shfl.sync.bfly.b32 %r3, %r2, {o}, 31, -1;\n{combine}"))
        .collect();
    format!(
        r#".version 7.0
.target sm_52
.address_size 64
.shared .align 4 .b32 sparsec_greedy_val[32];
.shared .align 4 .b32 sparsec_greedy_idx[32];
.visible .entry sparsec_greedy(.param .u64 logits, .param .u64 vocab, .param .u64 input, .param .u64 ids, .param .u64 positions, .param .u64 pos_ptr)
{{
    .reg .pred %p<8>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<24>;
    .reg .f32 %f<8>;
    mov.u32 %r1, %tid.x;
    ld.param.u64 %rd1, [logits];
    cvta.to.global.u64 %rd1, %rd1;
    ld.param.u64 %rd2, [vocab];
    mov.f32 %f1, 0fFF800000;
    mov.u32 %r2, 0;
    cvt.u64.u32 %rd3, %r1;
SCAN:
    setp.ge.u64 %p1, %rd3, %rd2;
    @%p1 bra WARP;
    shl.b64 %rd4, %rd3, 2;
    add.u64 %rd5, %rd1, %rd4;
    add.u64 %rd6, %rd3, 1024;
    add.u64 %rd7, %rd3, 2048;
    add.u64 %rd8, %rd3, 3072;
    setp.lt.u64 %p3, %rd6, %rd2;
    setp.lt.u64 %p4, %rd7, %rd2;
    setp.lt.u64 %p5, %rd8, %rd2;
    mov.f32 %f3, 0f7FC00000;
    mov.f32 %f4, 0f7FC00000;
    mov.f32 %f5, 0f7FC00000;
    ld.global.f32 %f2, [%rd5];
    @%p3 ld.global.f32 %f3, [%rd5+4096];
    @%p4 ld.global.f32 %f4, [%rd5+8192];
    @%p5 ld.global.f32 %f5, [%rd5+12288];
{scan}    add.u64 %rd3, %rd3, 4096;
    bra SCAN;
WARP:
{butterfly}    and.b32 %r4, %r1, 31;
    shr.u32 %r5, %r1, 5;
    mov.u64 %rd9, sparsec_greedy_val;
    mov.u64 %rd10, sparsec_greedy_idx;
    setp.ne.u32 %p6, %r4, 0;
    @%p6 bra SHARED;
    mul.wide.u32 %rd11, %r5, 4;
    add.u64 %rd12, %rd9, %rd11;
    add.u64 %rd13, %rd10, %rd11;
    st.shared.f32 [%rd12], %f1;
    st.shared.u32 [%rd13], %r2;
SHARED:
    bar.sync 0;
    setp.ne.u32 %p6, %r5, 0;
    @%p6 bra DONE;
    mul.wide.u32 %rd11, %r4, 4;
    add.u64 %rd12, %rd9, %rd11;
    add.u64 %rd13, %rd10, %rd11;
    ld.shared.f32 %f1, [%rd12];
    ld.shared.u32 %r2, [%rd13];
{butterfly}    setp.ne.u32 %p6, %r1, 0;
    @%p6 bra DONE;
    ld.param.u64 %rd14, [pos_ptr];
    cvta.to.global.u64 %rd14, %rd14;
    ld.global.u64 %rd15, [%rd14];
    ld.param.u64 %rd16, [positions];
    setp.ge.u64 %p7, %rd15, %rd16;
    @%p7 bra ADVANCE;
    ld.param.u64 %rd17, [ids];
    cvta.to.global.u64 %rd17, %rd17;
    shl.b64 %rd18, %rd15, 2;
    add.u64 %rd18, %rd17, %rd18;
    st.global.u32 [%rd18], %r2;
ADVANCE:
    ld.param.u64 %rd19, [input];
    cvta.to.global.u64 %rd19, %rd19;
    cvt.rn.f32.u32 %f7, %r2;
    st.global.f32 [%rd19], %f7;
    add.u64 %rd15, %rd15, 1;
    st.global.u64 [%rd14], %rd15;
DONE:
    ret;
}}
"#
    )
}

/// Where one greedy step reads and writes (device addresses).
#[derive(Clone, Copy, Debug)]
pub struct GreedyStep {
    /// The logits row: `vocab` f32 values.
    pub logits: u64,
    pub vocab: u64,
    /// The model's id input (one f32).
    pub input: u64,
    /// The id log: `positions` u32 values, id of position p + 1 at p.
    pub ids: u64,
    pub positions: u64,
    /// The session's position (one i64).
    pub pos_ptr: u64,
}

/// The loaded greedy kernel.
pub struct Greedy {
    f: CudaFunction,
}

impl Greedy {
    pub fn load(ctx: &Arc<CudaContext>) -> RuntimeResult<Greedy> {
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(greedy_ptx())).map_err(cu("load the greedy kernel"))?;
        Ok(Greedy { f: module.load_function("sparsec_greedy").map_err(cu("sparsec_greedy"))? })
    }

    /// One greedy step as `g` says.
    ///
    /// # Safety
    /// `g.logits` must hold `g.vocab` f32 values, `g.input` one f32, `g.ids`
    /// `g.positions` u32 values and `g.pos_ptr` one i64, when the stream runs
    /// the launch; `g.vocab` must be below 2^24 (ids travel as exact f32).
    pub unsafe fn launch(&self, stream: &CudaStream, g: &GreedyStep) -> RuntimeResult<()> {
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (GREEDY_BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut l = stream.launch_builder(&self.f);
        l.arg(&g.logits);
        l.arg(&g.vocab);
        l.arg(&g.input);
        l.arg(&g.ids);
        l.arg(&g.positions);
        l.arg(&g.pos_ptr);
        // SAFETY: the entry takes six u64 parameters, passed here; the caller
        // guarantees the extents.
        unsafe { l.launch(cfg) }.map_err(cu("launch the greedy step"))?;
        Ok(())
    }
}
