//! The one kernel the CUDA runtime brings itself (the runtime has no code
//! generator): appending a call's new keys or values to a KV cache, at the
//! position the session keeps in device memory. `f32` caches copy the rows;
//! `f16` caches round each value to nearest even as it is stored (what the
//! CPU runtime's append does). Reading the position on the device keeps a
//! captured decode step valid at every position.

use crate::cuda::cu;
use crate::error::{RuntimeError, RuntimeResult};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use sparsec_ir::DType;
use std::sync::Arc;

/// Threads per block of an append.
const APPEND_BLOCK: u32 = 256;

/// One entry of the append kernels: `ENTRY` and `STORE` (the f32 `%f` to
/// element `%rd9` of the cache at `%rd6`) are filled in per cache type, and
/// `PAIR` by `ptx_pair_select`, `THREAD` by `PTX_THREAD_INDEX`. Two
/// appends of equal rows in one launch (a layer's keys and values): threads
/// `n .. 2n` (n = rows × row_elems) take the second pair `(src1, cache1)`.
const APPEND_ENTRY: &str = r#"
.visible .entry ENTRY(.param .u64 src0, .param .u64 cache0, .param .u64 src1, .param .u64 cache1, .param .u64 row_elems, .param .u64 rows, .param .u64 pairs, .param .u64 pos_ptr)
{
    .reg .pred %p<2>;
    .reg .b16 %h;
    .reg .b32 %r<4>;
    .reg .b64 %rd<16>;
    .reg .f32 %f;
THREAD
    ld.param.u64 %rd3, [row_elems];
    ld.param.u64 %rd4, [rows];
    mul.lo.u64 %rd4, %rd4, %rd3;
    ld.param.u64 %rd12, [pairs];
    mul.lo.u64 %rd12, %rd12, %rd4;
    setp.ge.u64 %p0, %rd1, %rd12;
    @%p0 bra DONE;
PAIR
    ld.param.u64 %rd7, [pos_ptr];
    cvta.to.global.u64 %rd5, %rd5;
    cvta.to.global.u64 %rd6, %rd6;
    cvta.to.global.u64 %rd7, %rd7;
    ld.global.u64 %rd8, [%rd7];
    mad.lo.u64 %rd9, %rd8, %rd3, %rd1;
    shl.b64 %rd10, %rd1, 2;
    add.u64 %rd10, %rd5, %rd10;
    ld.global.f32 %f, [%rd10];
STORE
DONE:
    ret;
}
"#;

/// PTX that sets `%rd1` to the thread's index in the grid (one dimension;
/// `%r1`-`%r3` and `%rd2` are scratch).
pub(crate) const PTX_THREAD_INDEX: &str =
    "    mov.u32 %r1, %ctaid.x;\n    mov.u32 %r2, %ntid.x;\n    mov.u32 %r3, %tid.x;\n    mul.wide.u32 %rd1, %r1, %r2;\n    cvt.u64.u32 %rd2, %r3;\n    add.u64 %rd1, %rd1, %rd2;";

/// PTX that picks a thread's pair in a launch of one or two (source, cache)
/// pairs whose threads follow one another, `per` a pair: with `i` the
/// thread's index, `src`/`cache` are loaded from the parameters `src0`/`cache0`,
/// or from `src1`/`cache1` (through the second registers) where `i >= per`,
/// and then `i` counts within its pair (`tmp` is scratch; `p` the predicate).
pub(crate) fn ptx_pair_select(
    p: &str,
    (i, per): (&str, &str),
    (src, src1): (&str, &str),
    (cache, cache1): (&str, &str),
    tmp: &str,
) -> String {
    format!(
        "    setp.ge.u64 {p}, {i}, {per};\n    ld.param.u64 {src}, [src0];\n    ld.param.u64 {src1}, [src1];\n    selp.b64 {src}, {src1}, {src}, {p};\n    \
         ld.param.u64 {cache}, [cache0];\n    ld.param.u64 {cache1}, [cache1];\n    selp.b64 {cache}, {cache1}, {cache}, {p};\n    \
         sub.u64 {tmp}, {i}, {per};\n    selp.b64 {i}, {tmp}, {i}, {p};"
    )
}

/// The module: two entries, `sparsec_append_f32` and `sparsec_append_f16`,
/// with the parameters `(src0, cache0, src1, cache1, row_elems, rows, pairs,
/// pos_ptr)`: for each of the first `pairs` (1 or 2) pairs, thread i < rows ×
/// row_elems stores `src[i]` at element `*pos_ptr × row_elems + i` of its cache. PTX 7.0 for sm_52 and later: the driver compiles it for the
/// card at load.
pub fn append_ptx() -> String {
    let f32_store = "    shl.b64 %rd11, %rd9, 2;\n    add.u64 %rd11, %rd6, %rd11;\n    st.global.f32 [%rd11], %f;";
    let f16_store =
        "    cvt.rn.f16.f32 %h, %f;\n    shl.b64 %rd11, %rd9, 1;\n    add.u64 %rd11, %rd6, %rd11;\n    st.global.b16 [%rd11], %h;";
    let pair = ptx_pair_select("%p1", ("%rd1", "%rd4"), ("%rd5", "%rd13"), ("%rd6", "%rd14"), "%rd15");
    let entry = |name: &str, store: &str| {
        APPEND_ENTRY.replace("ENTRY", name).replace("STORE", store).replace("PAIR", &pair).replace("THREAD", PTX_THREAD_INDEX)
    };
    format!(
        ".version 7.0\n.target sm_52\n.address_size 64\n{}{}",
        entry("sparsec_append_f32", f32_store),
        entry("sparsec_append_f16", f16_store)
    )
}

/// One launch of KV appends: rows of `row_elems` f32 values at device address
/// `src` into the cache of element type `dtype` at device address `cache`,
/// and as many from `second.0` into `second.1` when there is a second
/// (a layer's keys and values, appended by one launch).
#[derive(Clone, Copy, Debug)]
pub struct KvAppend {
    pub dtype: DType,
    pub src: u64,
    pub cache: u64,
    pub row_elems: u64,
    pub second: Option<(u64, u64)>,
}

/// The loaded append kernels.
pub struct Appender {
    f32: CudaFunction,
    f16: CudaFunction,
}

impl Appender {
    pub fn load(ctx: &Arc<CudaContext>) -> RuntimeResult<Appender> {
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(append_ptx())).map_err(cu("load the KV append kernels"))?;
        let f32 = module.load_function("sparsec_append_f32").map_err(cu("sparsec_append_f32"))?;
        let f16 = module.load_function("sparsec_append_f16").map_err(cu("sparsec_append_f16"))?;
        Ok(Appender { f32, f16 })
    }

    /// Appends `rows` rows to the cache (or caches) as `a` says, at row `*pos_ptr`.
    ///
    /// # Safety
    /// Each source must hold `rows × a.row_elems` f32 values; each cache must
    /// hold at least `*pos_ptr + rows` rows of `a.row_elems` elements of
    /// `a.dtype` when the stream runs the launch; `pos_ptr` must point at one
    /// device i64.
    pub unsafe fn launch(&self, stream: &CudaStream, a: &KvAppend, rows: u64, pos_ptr: u64) -> RuntimeResult<()> {
        let f = match a.dtype {
            DType::F32 => &self.f32,
            DType::F16 => &self.f16,
            DType::BF16 | DType::I32 | DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
                return Err(RuntimeError::Cuda(format!("a KV cache of {} (f32 or f16 only)", a.dtype.name())))
            }
        };
        let (src, cache, row_elems) = (a.src, a.cache, a.row_elems);
        let ((src1, cache1), pairs) = match a.second {
            Some(p) => (p, 2u64),
            None => ((src, cache), 1u64),
        };
        let n = rows.saturating_mul(row_elems).saturating_mul(pairs);
        let grid = u32::try_from(n.div_ceil(APPEND_BLOCK as u64).max(1)).map_err(|_| RuntimeError::Cuda("KV append too large".into()))?;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (APPEND_BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut l = stream.launch_builder(f);
        l.arg(&src);
        l.arg(&cache);
        l.arg(&src1);
        l.arg(&cache1);
        l.arg(&row_elems);
        l.arg(&rows);
        l.arg(&pairs);
        l.arg(&pos_ptr);
        // SAFETY: the entry takes eight u64 parameters, passed here; the caller
        // guarantees the extents of the sources, the caches and `pos_ptr`.
        unsafe { l.launch(cfg) }.map_err(cu("launch a KV append"))?;
        Ok(())
    }
}
