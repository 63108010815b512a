//! Appending to sequence-axis DCT and PSWF caches on the GPU
//! (`BufferSpec::sequence`, layout in `sparsec_ir::kv_sequence`), so that a
//! CUDA session with these caches needs no host round trip and its decode
//! step can be captured as a graph. One launch per layer (its K and V caches
//! together) stores a call's rows in the exact rows (a sink's row, or the
//! ring's row of the position) and compresses every block the call completes
//! into its `m` low-pass f16 rows by the layout's `m × block` matrix
//! (`SeqLayout::resampling`, uploaded in f64).
//!
//! A block's rows are read from the call's source rows where the call brings
//! them and from the ring otherwise: the ring's rows this launch writes are
//! never ones a block it compresses reads (a block spans `block` positions, a
//! call at most `max_call`, and the ring holds `max_call + recent + block`),
//! so one launch needs no ordering between its threads. Each low-pass value is
//! summed in f64 in the CPU appender's order, without fused multiply-adds,
//! and rounded once to f16: the device's records equal `SeqLayout::compress`'s
//! bit for bit. The position is read on the device (`pos_ptr`), as the plain
//! appends read it.

use crate::cuda::cu;
use crate::error::{RuntimeError, RuntimeResult};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use sparsec_ir::kv_sequence::SeqLayout;
use std::sync::Arc;

/// Threads per block of a sequence append.
const SEQ_APPEND_BLOCK: u32 = 256;

/// The entry `sparsec_append_sequence` (`THREAD`, `PAIR`: `cuda_append`'s PTX pieces). Parameters: `src0, cache0, src1,
/// cache1, pairs` (one or two (source, cache) pairs: a layer's keys and
/// values), `matrix` (f64, `m × block`), `width, rows, sinks, ring, block, m,
/// low` (the f16 element where the low-pass rows start: the exact rows'
/// bytes / 2), `pos_ptr`. Per pair, threads `0 .. rows·width` copy the rows
/// (thread i: row i / width, channel i % width), and the next `nb·m·width`
/// (nb = ⌈rows / block⌉, the most blocks `rows` positions complete) write
/// low-pass value (block b of the call's completed ones, row j, channel c);
/// a thread whose block the call does not complete does nothing.
const SEQ_APPEND_PTX: &str = r#"
.visible .entry sparsec_append_sequence(.param .u64 src0, .param .u64 cache0, .param .u64 src1, .param .u64 cache1, .param .u64 pairs, .param .u64 matrix, .param .u64 width, .param .u64 rows, .param .u64 sinks, .param .u64 ring, .param .u64 block, .param .u64 m, .param .u64 low, .param .u64 pos_ptr)
{
    .reg .pred %p<8>;
    .reg .b16 %h;
    .reg .b32 %r<4>;
    .reg .b64 %rd<48>;
    .reg .f32 %f;
    .reg .f64 %fd<4>;
THREAD
    ld.param.u64 %rd3, [width];
    ld.param.u64 %rd4, [rows];
    ld.param.u64 %rd5, [block];
    ld.param.u64 %rd6, [m];
    ld.param.u64 %rd7, [sinks];
    ld.param.u64 %rd8, [ring];
    // E = rows*width, nb = ceil(rows / block), T = E + nb*m*width per pair.
    mul.lo.u64 %rd9, %rd4, %rd3;
    add.u64 %rd10, %rd4, %rd5;
    sub.u64 %rd10, %rd10, 1;
    div.u64 %rd10, %rd10, %rd5;
    mul.lo.u64 %rd11, %rd6, %rd3;
    mul.lo.u64 %rd12, %rd10, %rd11;
    add.u64 %rd12, %rd12, %rd9;
    ld.param.u64 %rd13, [pairs];
    mul.lo.u64 %rd14, %rd13, %rd12;
    setp.ge.u64 %p0, %rd1, %rd14;
    @%p0 bra DONE;
    // The pair: the second one's threads follow the first's.
PAIR
    cvta.to.global.u64 %rd15, %rd15;
    cvta.to.global.u64 %rd17, %rd17;
    ld.param.u64 %rd20, [pos_ptr];
    cvta.to.global.u64 %rd20, %rd20;
    ld.global.u64 %rd21, [%rd20];
    setp.ge.u64 %p2, %rd1, %rd9;
    @%p2 bra COMPRESS;
    // Exact row: position pos + i / width into its sink or ring row.
    div.u64 %rd22, %rd1, %rd3;
    rem.u64 %rd23, %rd1, %rd3;
    add.u64 %rd24, %rd21, %rd22;
    sub.u64 %rd25, %rd24, %rd7;
    rem.u64 %rd25, %rd25, %rd8;
    add.u64 %rd25, %rd25, %rd7;
    setp.lt.u64 %p3, %rd24, %rd7;
    selp.b64 %rd25, %rd24, %rd25, %p3;
    mad.lo.u64 %rd26, %rd25, %rd3, %rd23;
    shl.b64 %rd26, %rd26, 2;
    add.u64 %rd26, %rd17, %rd26;
    shl.b64 %rd27, %rd1, 2;
    add.u64 %rd27, %rd15, %rd27;
    ld.global.f32 %f, [%rd27];
    st.global.f32 [%rd26], %f;
    bra DONE;
COMPRESS:
    // Block b of the call's, low-pass row j, channel c.
    sub.u64 %rd1, %rd1, %rd9;
    div.u64 %rd22, %rd1, %rd11;
    rem.u64 %rd23, %rd1, %rd11;
    div.u64 %rd28, %rd23, %rd3;
    rem.u64 %rd29, %rd23, %rd3;
    // The call's positions pos .. pos + rows; none past the sinks: nothing.
    add.u64 %rd30, %rd21, %rd4;
    setp.le.u64 %p4, %rd30, %rd7;
    @%p4 bra DONE;
    // The block of the call's first position past the sinks, then b on.
    max.u64 %rd31, %rd21, %rd7;
    sub.u64 %rd31, %rd31, %rd7;
    div.u64 %rd31, %rd31, %rd5;
    add.u64 %rd31, %rd31, %rd22;
    // Its last position sinks + (blk + 1)*block - 1 must fall in the call.
    add.u64 %rd32, %rd31, 1;
    mad.lo.u64 %rd32, %rd32, %rd5, %rd7;
    setp.gt.u64 %p5, %rd32, %rd30;
    @%p5 bra DONE;
    // First position q0 = sinks + blk*block; k = 0 .. block.
    mad.lo.u64 %rd33, %rd31, %rd5, %rd7;
    ld.param.u64 %rd34, [matrix];
    cvta.to.global.u64 %rd34, %rd34;
    mul.lo.u64 %rd35, %rd28, %rd5;
    shl.b64 %rd35, %rd35, 3;
    add.u64 %rd34, %rd34, %rd35;
    mov.f64 %fd0, 0d0000000000000000;
    mov.u64 %rd36, 0;
LOOP:
    add.u64 %rd37, %rd33, %rd36;
    setp.ge.u64 %p6, %rd37, %rd21;
    @%p6 bra FROM_SRC;
    // An earlier call's position: its ring row (past the sinks).
    sub.u64 %rd38, %rd37, %rd7;
    rem.u64 %rd38, %rd38, %rd8;
    add.u64 %rd38, %rd38, %rd7;
    mad.lo.u64 %rd38, %rd38, %rd3, %rd29;
    shl.b64 %rd38, %rd38, 2;
    add.u64 %rd38, %rd17, %rd38;
    bra LOAD;
FROM_SRC:
    sub.u64 %rd38, %rd37, %rd21;
    mad.lo.u64 %rd38, %rd38, %rd3, %rd29;
    shl.b64 %rd38, %rd38, 2;
    add.u64 %rd38, %rd15, %rd38;
LOAD:
    ld.global.f32 %f, [%rd38];
    cvt.f64.f32 %fd1, %f;
    shl.b64 %rd39, %rd36, 3;
    add.u64 %rd39, %rd34, %rd39;
    ld.global.f64 %fd2, [%rd39];
    mul.rn.f64 %fd3, %fd2, %fd1;
    add.rn.f64 %fd0, %fd0, %fd3;
    add.u64 %rd36, %rd36, 1;
    setp.lt.u64 %p7, %rd36, %rd5;
    @%p7 bra LOOP;
    // Low-pass element low + (blk*m + j)*width + c, in f16.
    cvt.rn.f16.f64 %h, %fd0;
    mad.lo.u64 %rd40, %rd31, %rd6, %rd28;
    mad.lo.u64 %rd40, %rd40, %rd3, %rd29;
    ld.param.u64 %rd41, [low];
    add.u64 %rd40, %rd40, %rd41;
    shl.b64 %rd40, %rd40, 1;
    add.u64 %rd40, %rd17, %rd40;
    st.global.b16 [%rd40], %h;
DONE:
    ret;
}
"#;

/// The module of `sparsec_append_sequence`. PTX 7.0 for sm_60 and later
/// (f64 adds; the driver compiles it for the card at load).
pub fn seq_append_ptx() -> String {
    let pair = crate::cuda_append::ptx_pair_select("%p1", ("%rd1", "%rd12"), ("%rd15", "%rd16"), ("%rd17", "%rd18"), "%rd19");
    format!(
        ".version 7.0\n.target sm_60\n.address_size 64\n{}",
        SEQ_APPEND_PTX.replace("PAIR", &pair).replace("THREAD", crate::cuda_append::PTX_THREAD_INDEX)
    )
}

/// One launch of sequence appends: a call's rows (f32, `layout.width` a row)
/// at device address `src` into the cache at `cache`, and as many from
/// `second.0` into `second.1` when there is a second (a layer's keys and
/// values, of one layout); `matrix` is the layout's resampling matrix on the
/// device (`m × block` f64).
#[derive(Clone, Copy, Debug)]
pub struct SeqAppend {
    pub layout: SeqLayout,
    pub src: u64,
    pub cache: u64,
    pub matrix: u64,
    pub second: Option<(u64, u64)>,
}

/// The loaded sequence append kernel.
pub struct SeqAppender {
    f: CudaFunction,
}

impl SeqAppender {
    pub fn load(ctx: &Arc<CudaContext>) -> RuntimeResult<SeqAppender> {
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(seq_append_ptx())).map_err(cu("load the sequence-axis append kernel"))?;
        let f = module.load_function("sparsec_append_sequence").map_err(cu("sparsec_append_sequence"))?;
        Ok(SeqAppender { f })
    }

    /// The layout's resampling matrix as the kernel reads it (`m × block`
    /// f64, row-major); `None` where the layout has none.
    pub fn matrix(layout: &SeqLayout) -> Option<Vec<f64>> {
        let r = layout.resampling()?;
        (r.len() == layout.m * layout.block).then(|| r.to_vec())
    }

    /// Appends `rows` rows (at most `layout.max_call()`) at position
    /// `*pos_ptr`, compressing the blocks they complete.
    ///
    /// # Safety
    /// Each source must hold `rows × width` f32 values; each cache must be a
    /// sequence cache of `a.layout` sized for at least `*pos_ptr + rows`
    /// positions (`SeqLayout::bytes`); `a.matrix` must hold the layout's
    /// `m × block` f64 matrix; `pos_ptr` must point at one device i64.
    pub unsafe fn launch(&self, stream: &CudaStream, a: &SeqAppend, rows: u64, pos_ptr: u64) -> RuntimeResult<()> {
        let l = &a.layout;
        if rows as usize > l.max_call() {
            return Err(RuntimeError::Cuda(format!("a sequence-axis append of {rows} rows (at most {})", l.max_call())));
        }
        let (width, block, m) = (l.width as u64, l.block as u64, l.m as u64);
        let ((src1, cache1), pairs) = match a.second {
            Some(p) => (p, 2u64),
            None => ((a.src, a.cache), 1u64),
        };
        let per_pair = rows * width + rows.div_ceil(block) * m * width;
        let n = per_pair.saturating_mul(pairs);
        let grid = u32::try_from(n.div_ceil(SEQ_APPEND_BLOCK as u64).max(1))
            .map_err(|_| RuntimeError::Cuda("sequence-axis append too large".into()))?;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (SEQ_APPEND_BLOCK, 1, 1), shared_mem_bytes: 0 };
        let (sinks, ring, low) = (l.sinks as u64, l.ring as u64, (l.exact_bytes() / 2) as u64);
        let mut b = stream.launch_builder(&self.f);
        for x in [&a.src, &a.cache, &src1, &cache1, &pairs, &a.matrix, &width, &rows, &sinks, &ring, &block, &m, &low, &pos_ptr] {
            b.arg(x);
        }
        // SAFETY: the entry takes fourteen u64 parameters, passed here in its
        // order; the caller guarantees the sources, caches, matrix and `pos_ptr`.
        unsafe { b.launch(cfg) }.map_err(cu("launch a sequence-axis append"))?;
        Ok(())
    }
}
