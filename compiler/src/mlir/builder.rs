//! A structured writer of MLIR kernel functions (func/arith/math/scf plus memref
//! on the CPU, llvm pointers and nvvm thread ids on NVIDIA). Kernel bodies are
//! written once against this API and come out right for either target.

use super::math::Activation;
use sparsec_ir::SymSize;
use std::collections::HashMap;

/// Which code the kernel is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// One call runs all the work in loops; buffers are `memref<?xf32>`.
    Cpu,
    /// One thread per unit of work; buffers are `!llvm.ptr`.
    Nvptx,
}

/// SSA name of a value.
pub type V = String;

/// One addend of a fused epilogue: the buffer, and for a bias the length
/// its index wraps at.
pub type Addend = (V, Option<V>);

/// The cache level a software prefetch fills (LLVM's locality 3 and 2:
/// `prefetcht0` and `prefetcht1` on x86).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefetchTo {
    L1,
    /// L2 only: a stream from memory that keeps more lines in flight than L1's
    /// miss buffers hold.
    L2,
}

pub struct KernelBuilder {
    device: Device,
    /// Parameters that are byte buffers (packed quantized weights).
    byte_params: Vec<V>,
    consts: Vec<String>,
    /// Module-level constant tables (`memref.global`), by name.
    globals: Vec<(String, String)>,
    /// A fused add applied by `store_result`: the addend buffer, for a bias its
    /// length, and an activation applied after the add.
    epilogue: Option<(Vec<Addend>, Option<Activation>)>,
    const_ids: HashMap<String, V>,
    body: Vec<String>,
    indent: usize,
    next: usize,
    /// NVIDIA: the kernel waits for the grids before it (`griddepcontrol`)
    /// before it reads anything, so it may be launched while they finish.
    grid_dependency: bool,
    /// Lines emitted before that wait (`before_wait`).
    pre_wait: Vec<String>,
}

impl KernelBuilder {
    pub fn new(device: Device) -> Self {
        KernelBuilder {
            device,
            byte_params: Vec::new(),
            consts: Vec::new(),
            globals: Vec::new(),
            epilogue: None,
            const_ids: HashMap::new(),
            body: Vec::new(),
            indent: 2,
            next: 0,
            grid_dependency: false,
            pre_wait: Vec::new(),
        }
    }

    /// Emits what `body` emits ahead of the kernel's wait for the grids
    /// before it (NVIDIA with `set_grid_dependency`; elsewhere simply first):
    /// it runs while those grids finish, so it may read only what no kernel
    /// writes (weights) and touch no `pos`; prefetches, say.
    pub fn before_wait(&mut self, body: impl FnOnce(&mut Self)) {
        let saved = std::mem::take(&mut self.body);
        let indent = std::mem::replace(&mut self.indent, 2);
        body(self);
        let lines = std::mem::replace(&mut self.body, saved);
        self.indent = indent;
        self.pre_wait.extend(lines);
    }

    /// NVIDIA: prefetches the 128-byte line at `ptr` into L2 (no value; a
    /// prefetch cannot fault).
    pub fn prefetch_l2(&mut self, ptr: &str) {
        self.line(format!("llvm.inline_asm has_side_effects \"prefetch.L2 [$0];\", \"l\" {ptr} : (!llvm.ptr) -> ()"));
    }

    /// NVIDIA (sm_90 and later): the kernel opens with `griddepcontrol.wait`
    /// (the grids launched before it have completed and their writes are
    /// visible) and then `griddepcontrol.launch_dependents` (the next grid may
    /// be scheduled), so the runtime can launch it with programmatic stream
    /// serialization and its launch overlaps the kernel before it. Without
    /// that launch attribute both instructions do nothing.
    pub fn set_grid_dependency(&mut self, on: bool) {
        self.grid_dependency = on;
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn fresh(&mut self) -> V {
        self.next += 1;
        format!("%v{}", self.next)
    }

    /// A fresh name for an op's `n` results: how the op declares it (`%v` or
    /// `%v:n`) and the values (`%v`, or `%v#0` .. `%v#(n-1)`).
    fn results(&mut self, n: usize) -> (String, Vec<V>) {
        let res = self.fresh();
        if n == 1 {
            (res.clone(), vec![res])
        } else {
            (format!("{res}:{n}"), (0..n).map(|i| format!("{res}#{i}")).collect())
        }
    }

    /// One statement without a result, as written (an escape hatch like `def`).
    pub(in crate::mlir) fn line(&mut self, s: String) {
        self.body.push(format!("{}{s}", "  ".repeat(self.indent)));
    }

    /// `lhs = rhs` with a fresh name: an escape hatch for one-off ops.
    pub fn def(&mut self, rhs: String) -> V {
        let v = self.fresh();
        self.line(format!("{v} = {rhs}"));
        v
    }

    fn constant(&mut self, literal: String) -> V {
        if let Some(v) = self.const_ids.get(&literal) {
            return v.clone();
        }
        let v = format!("%c{}", self.const_ids.len());
        self.consts.push(format!("    {v} = arith.constant {literal}"));
        self.const_ids.insert(literal, v.clone());
        v
    }

    pub fn index(&mut self, n: u64) -> V {
        self.constant(format!("{n} : index"))
    }

    pub fn f32(&mut self, x: f32) -> V {
        // Hex bit pattern: exact, and valid for every value.
        self.constant(format!("0x{:08X} : f32", x.to_bits()))
    }

    pub fn f64(&mut self, x: f64) -> V {
        self.constant(format!("0x{:016X} : f64", x.to_bits()))
    }

    pub fn i64(&mut self, n: i64) -> V {
        self.constant(format!("{n} : i64"))
    }

    pub fn i32(&mut self, n: i32) -> V {
        self.constant(format!("{n} : i32"))
    }

    pub fn i16(&mut self, n: i16) -> V {
        self.constant(format!("{n} : i16"))
    }

    /// The f16 half of word `idx` of the f32 buffer `buf` that holds channel
    /// `c` (an index: its low half for even `c`), widened to f32: buffers of
    /// f16 pairs stored as f32 words (NSA's bound summaries), on both devices.
    pub fn f16_half(&mut self, buf: &str, idx: &str, c: &str) -> V {
        let w = self.load(buf, idx);
        let bits = self.def(format!("arith.bitcast {w} : f32 to i32"));
        let one = self.index(1);
        let odd = self.def(format!("arith.andi {c}, {one} : index"));
        let odd = self.def(format!("arith.index_castui {odd} : index to i32"));
        let four = self.i32(4);
        let shift = self.def(format!("arith.shli {odd}, {four} : i32"));
        let h = self.def(format!("arith.shrui {bits}, {shift} : i32"));
        let h = self.def(format!("arith.trunci {h} : i32 to i16"));
        let h = self.def(format!("arith.bitcast {h} : i16 to f16"));
        self.def(format!("arith.extf {h} : f16 to f32"))
    }

    /// The run-time `seq` argument (rows of this call), as an index.
    pub fn seq(&self) -> V {
        "%seq".into()
    }

    /// The run-time `pos` argument (positions already in the KV caches), as an
    /// index: by value on the CPU, read from a device pointer on NVPTX.
    pub fn pos(&self) -> V {
        "%pos".into()
    }

    /// Declares the buffer parameter `param` a byte buffer (`memref<?xi8>` on the
    /// CPU): packed quantized data, read with the byte and f16 loads below.
    pub fn byte_param(&mut self, param: &str) {
        self.byte_params.push(param.to_string());
    }

    /// NVPTX: the address of element `idx` (an index) of type `elem` at `base`.
    fn element_ptr(&mut self, base: &str, idx: &str, elem: &str) -> V {
        let i = self.def(format!("arith.index_cast {idx} : index to i64"));
        self.def(format!("llvm.getelementptr inbounds {base}[{i}] : (!llvm.ptr, i64) -> !llvm.ptr, {elem}"))
    }

    /// NVPTX: `buf[idx] += val` as one atomic read-modify-write of global
    /// memory; returns the value before.
    pub fn atomic_add(&mut self, buf: &str, idx: &str, val: &str) -> V {
        let p = self.element_ptr(buf, idx, "f32");
        self.def(format!("llvm.atomicrmw fadd {p}, {val} acq_rel : !llvm.ptr, f32"))
    }

    /// NVPTX: a memory fence (acquire and release, system scope): this
    /// thread's writes before it are seen by any thread that sees a write
    /// after it, and its reads after it see what such a thread wrote before.
    pub fn fence(&mut self) {
        self.line("llvm.fence acq_rel".into());
    }

    /// NVPTX: `buf[idx]` read from memory itself (`ld.volatile`: never from
    /// this multiprocessor's L1, which other blocks' writes do not update).
    pub fn load_volatile(&mut self, buf: &str, idx: &str) -> V {
        let p = self.element_ptr(buf, idx, "f32");
        self.def(format!("llvm.load volatile {p} : !llvm.ptr -> f32"))
    }

    /// The byte at `buf[idx]`, zero- (`signed`: sign-) extended to i32.
    pub fn load_byte(&mut self, buf: &str, idx: &str, signed: bool) -> V {
        let b = self.load_elem(buf, idx, "i8");
        let ext = if signed { "extsi" } else { "extui" };
        self.def(format!("arith.{ext} {b} : i8 to i32"))
    }

    /// The f16 plane of `count` values at byte offset `byte_off` of the byte
    /// buffer `buf`: a `memref<?xf16>` view on the CPU, a pointer on NVIDIA.
    pub fn f16_plane(&mut self, buf: &str, byte_off: u64, count: u64) -> V {
        self.plane(buf, byte_off, count, "f16")
    }

    /// The plane of `count` values of type `elem` (`f32`, `i32`, `i16`, `i8`) at
    /// byte offset `byte_off` of the byte buffer `buf` (packed sparse weights).
    pub fn plane(&mut self, buf: &str, byte_off: u64, count: u64, elem: &str) -> V {
        match self.device {
            Device::Cpu => {
                let off = self.index(byte_off);
                let n = self.index(count);
                self.def(format!("memref.view {buf}[{off}][{n}] : memref<?xi8> to memref<?x{elem}>"))
            }
            Device::Nvptx => {
                let o = self.i64(byte_off as i64);
                self.def(format!("llvm.getelementptr inbounds {buf}[{o}] : (!llvm.ptr, i64) -> !llvm.ptr, i8"))
            }
        }
    }

    /// `plane[idx]` of a `plane` of `elem`, as stored.
    pub fn load_elem(&mut self, plane: &str, idx: &str, elem: &str) -> V {
        match self.device {
            Device::Cpu => self.def(format!("memref.load {plane}[{idx}] : memref<?x{elem}>")),
            Device::Nvptx => {
                let p = self.element_ptr(plane, idx, elem);
                self.def(format!("llvm.load {p} : !llvm.ptr -> {elem}"))
            }
        }
    }

    /// `plane[idx]` of an unsigned integer plane (`i8`, `i16`, `i32`), as an index.
    pub fn load_index(&mut self, plane: &str, idx: &str, elem: &str) -> V {
        let raw = self.load_elem(plane, idx, elem);
        self.def(format!("arith.index_castui {raw} : {elem} to index"))
    }

    /// `plane[idx]` of an `f16_plane`, as f32.
    pub fn load_f16(&mut self, plane: &str, idx: &str) -> V {
        let h = self.load_elem(plane, idx, "f16");
        self.def(format!("arith.extf {h} : f16 to f32"))
    }

    /// The whole byte buffer `buf` (a `byte_param`) as `memref<?xf16>` (CPU).
    pub fn f16_view(&mut self, buf: &str) -> V {
        let zero = self.index(0);
        let two = self.index(2);
        let bytes = self.def(format!("memref.dim {buf}, {zero} : memref<?xi8>"));
        let n = self.divui(&bytes, &two);
        self.def(format!("memref.view {buf}[{zero}][{n}] : memref<?xi8> to memref<?xf16>"))
    }

    /// `width` values at `plane[idx..]` of a `memref<?xf16>`, widened to `vector<widthxf32>` (CPU).
    pub fn vload_f16(&mut self, plane: &str, idx: &str, width: u32) -> V {
        let h = self.def(format!("vector.load {plane}[{idx}] : memref<?xf16>, vector<{width}xf16>"));
        self.def(format!("arith.extf {h} : vector<{width}xf16> to {}", Self::vty(width)))
    }

    /// `n` bytes at `buf[idx..]` as `vector<nxi8>` (on NVPTX `idx` a
    /// multiple of `n` up to 16: one aligned load).
    pub fn vload_bytes(&mut self, buf: &str, idx: &str, n: u32) -> V {
        match self.device {
            Device::Cpu => self.def(format!("vector.load {buf}[{idx}] : memref<?xi8>, vector<{n}xi8>")),
            Device::Nvptx => {
                let i = self.def(format!("arith.index_cast {idx} : index to i64"));
                let p = self.def(format!("llvm.getelementptr inbounds {buf}[{i}] : (!llvm.ptr, i64) -> !llvm.ptr, i8"));
                self.def(format!("llvm.load {p} {{alignment = {} : i64}} : !llvm.ptr -> vector<{n}xi8>", n.min(16)))
            }
        }
    }

    /// Hints that `buf[min(idx + ahead, last)]` (a `memref<?xELEM>`, CPU) will
    /// be read soon: fetches its cache line into L1 ahead of the loads of a
    /// stream the hardware prefetcher does not follow far enough.
    pub fn prefetch_ahead(&mut self, buf: &str, idx: &str, ahead: u64, last: &str, elem: &str) {
        self.prefetch_ahead_to(buf, idx, ahead, last, elem, PrefetchTo::L1);
    }

    /// `prefetch_ahead` into the cache level `to`.
    pub fn prefetch_ahead_to(&mut self, buf: &str, idx: &str, ahead: u64, last: &str, elem: &str, to: PrefetchTo) {
        let a = self.index(ahead);
        let at = self.addi(idx, &a);
        let at = self.def(format!("arith.minui {at}, {last} : index"));
        let locality = match to {
            PrefetchTo::L1 => 3,
            PrefetchTo::L2 => 2,
        };
        self.line(format!("memref.prefetch {buf}[{at}], read, locality<{locality}>, data : memref<?x{elem}>"));
    }

    /// Stores the `vector<nxi8>` `val` at `buf[idx..]` (CPU).
    pub fn vstore_bytes(&mut self, val: &str, buf: &str, idx: &str, n: u32) {
        self.line(format!("vector.store {val}, {buf}[{idx}] : memref<?xi8>, vector<{n}xi8>"));
    }

    /// A constant i32 table `name` at module level (CPU), returned as a
    /// `memref<Nxi32>` value; declared once however often it is asked for.
    pub fn i32_table(&mut self, name: &str, values: &[i32]) -> V {
        let body: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        self.table(name, "i32", &body)
    }

    /// A constant f64 table (exact: the values' bits in hex), like `i32_table`.
    pub fn f64_table(&mut self, name: &str, values: &[f64]) -> V {
        let body: Vec<String> = values.iter().map(|v| format!("0x{:016X}", v.to_bits())).collect();
        self.table(name, "f64", &body)
    }

    fn table(&mut self, name: &str, elem: &str, body: &[String]) -> V {
        let n = body.len();
        if !self.globals.iter().any(|(g, _)| g == name) {
            self.globals.push((
                name.to_string(),
                format!("  memref.global \"private\" constant @{name} : memref<{n}x{elem}> = dense<[{}]>", body.join(", ")),
            ));
        }
        self.def(format!("memref.get_global @{name} : memref<{n}x{elem}>"))
    }

    /// NVPTX: a block's shared array `name` of `n` f32 (declared once), as an
    /// address-space-3 pointer; read and written with `load_shared` and
    /// `store_shared`, ordered by `barrier`.
    pub fn shared_f32(&mut self, name: &str, n: u64) -> V {
        if !self.globals.iter().any(|(g, _)| g == name) {
            self.globals.push((
                name.to_string(),
                format!("  llvm.mlir.global internal @{name}() {{addr_space = 3 : i32, alignment = 16 : i64}} : !llvm.array<{n} x f32>"),
            ));
        }
        self.def(format!("llvm.mlir.addressof @{name} : !llvm.ptr<3>"))
    }

    /// NVPTX: the address of word `idx` of a `shared_f32` array.
    pub fn shared_ptr(&mut self, base: &str, idx: &str) -> V {
        let i = self.def(format!("arith.index_cast {idx} : index to i64"));
        self.def(format!("llvm.getelementptr inbounds {base}[{i}] : (!llvm.ptr<3>, i64) -> !llvm.ptr<3>, f32"))
    }

    /// NVPTX: `base[idx]` of a `shared_f32` array.
    pub fn load_shared(&mut self, base: &str, idx: &str) -> V {
        let p = self.shared_ptr(base, idx);
        self.def(format!("llvm.load {p} : !llvm.ptr<3> -> f32"))
    }

    /// NVPTX: `base[idx] = val` in a `shared_f32` array.
    pub fn store_shared(&mut self, val: &str, base: &str, idx: &str) {
        let p = self.shared_ptr(base, idx);
        self.line(format!("llvm.store {val}, {p} : f32, !llvm.ptr<3>"));
    }

    /// NVPTX: `width` consecutive f32 of a `shared_f32` array from `base[idx]`
    /// (16-byte aligned: `idx` a multiple of 4), as a `vector<width x f32>`.
    pub fn load_shared_vec(&mut self, base: &str, idx: &str, width: u32) -> V {
        let p = self.shared_ptr(base, idx);
        self.def(format!("llvm.load {p} {{alignment = 16 : i64}} : !llvm.ptr<3> -> {}", Self::vty(width)))
    }

    /// NVPTX: stores the `width` f32 lanes of `val` at `base[idx..]` of a
    /// `shared_f32` array (16-byte aligned: `idx` a multiple of 4).
    pub fn store_shared_vec(&mut self, val: &str, base: &str, idx: &str, width: u32) {
        let p = self.shared_ptr(base, idx);
        self.line(format!("llvm.store {val}, {p} {{alignment = 16 : i64}} : {}, !llvm.ptr<3>", Self::vty(width)));
    }

    /// NVPTX: starts an asynchronous copy of 16 bytes from `plane[idx]` (a
    /// plane of `elem`, 16-byte aligned there) to the shared address `dst`
    /// (`cp.async.cg`, through L2 only); it lands by the `cp_async_wait` that
    /// follows its group's `cp_async_commit`.
    pub fn cp_async16(&mut self, dst: &str, plane: &str, idx: &str, elem: &str) {
        let p = self.element_ptr(plane, idx, elem);
        let g = self.def(format!("llvm.addrspacecast {p} : !llvm.ptr to !llvm.ptr<1>"));
        self.line(format!("nvvm.cp.async.shared.global {dst}, {g}, 16, cache = cg : !llvm.ptr<3>, !llvm.ptr<1>"));
    }

    /// NVPTX: closes the group of this thread's `cp_async16` copies issued since the last one.
    pub fn cp_async_commit(&mut self) {
        self.line("nvvm.cp.async.commit.group".into());
    }

    /// NVPTX: waits until at most `pending` of this thread's committed groups
    /// are still in flight (the others have landed in shared memory).
    pub fn cp_async_wait(&mut self, pending: u32) {
        self.line(format!("nvvm.cp.async.wait.group {pending}"));
    }

    /// NVPTX: a barrier over the thread block (`bar.sync 0`); every thread of
    /// the block must reach it.
    pub fn barrier(&mut self) {
        self.line("nvvm.barrier0".into());
    }

    /// CPU (AVX-512): the two bitmap bytes at `bitmap[byte]` (bit `l` of the
    /// little-endian word is lane `l`'s) expand the next f32 values of `vals`
    /// from `from` into their lanes, zeros elsewhere (`vexpandps`). Returns
    /// the vector and the word (as i16, for the count of values taken). The
    /// word is one scalar load bitcast to the mask, so it reaches the mask
    /// register directly (a vector of two bytes went through the stack).
    pub fn expand16(&mut self, bitmap: &str, byte: &str, vals: &str, from: &str) -> (V, V) {
        let vty = Self::vty(16);
        let vz = self.vzero(16);
        let bits = self.def(format!("vector.load {bitmap}[{byte}] : memref<?xi8>, vector<2xi8>"));
        let word = self.def(format!("vector.bitcast {bits} : vector<2xi8> to vector<1xi16>"));
        let word = self.def(format!("vector.extract {word}[0] : i16 from vector<1xi16>"));
        let mask = self.def(format!("llvm.bitcast {word} : i16 to vector<16xi1>"));
        let w = self.def(format!("vector.expandload {vals}[{from}], {mask}, {vz} : memref<?xf32>, vector<16xi1>, {vty} into {vty}"));
        (w, word)
    }

    /// A stack buffer of `n` f32 for the duration of the call (CPU).
    pub fn alloca_f32(&mut self, n: &str) -> V {
        self.def(format!("memref.alloca({n}) : memref<?xf32>"))
    }

    /// A stack buffer of `n` indices (CPU kernels only).
    pub fn alloca_index(&mut self, n: &str) -> V {
        self.def(format!("memref.alloca({n}) : memref<?xindex>"))
    }

    /// Reads index `buf[i]` of an `alloca_index` buffer.
    pub fn index_at(&mut self, buf: &str, i: &str) -> V {
        self.def(format!("memref.load {buf}[{i}] : memref<?xindex>"))
    }

    /// Writes index `v` to `buf[i]` of an `alloca_index` buffer.
    pub fn set_index(&mut self, v: &str, buf: &str, i: &str) {
        self.line(format!("memref.store {v}, {buf}[{i}] : memref<?xindex>"));
    }

    /// `coef * seq^pow` as an index value.
    pub fn sym(&mut self, s: SymSize) -> V {
        let mut v = self.index(s.coef);
        for _ in 0..s.seq_pow {
            let seq = self.seq();
            v = self.def(format!("arith.muli {v}, {seq} : index"));
        }
        v
    }

    pub fn addi(&mut self, a: &str, b: &str) -> V {
        self.def(format!("arith.addi {a}, {b} : index"))
    }
    pub fn muli(&mut self, a: &str, b: &str) -> V {
        self.def(format!("arith.muli {a}, {b} : index"))
    }
    pub fn remui(&mut self, a: &str, b: &str) -> V {
        self.def(format!("arith.remui {a}, {b} : index"))
    }
    pub fn divui(&mut self, a: &str, b: &str) -> V {
        self.def(format!("arith.divui {a}, {b} : index"))
    }

    /// A binary f32 op: `addf`, `subf`, `mulf`, `divf`, `maxnumf`, `minnumf`.
    pub fn fbin(&mut self, op: &str, a: &str, b: &str) -> V {
        self.def(format!("arith.{op} {a}, {b} : f32"))
    }
    pub fn add(&mut self, a: &str, b: &str) -> V {
        self.fbin("addf", a, b)
    }
    pub fn sub(&mut self, a: &str, b: &str) -> V {
        self.fbin("subf", a, b)
    }
    pub fn mul(&mut self, a: &str, b: &str) -> V {
        self.fbin("mulf", a, b)
    }
    pub fn div(&mut self, a: &str, b: &str) -> V {
        self.fbin("divf", a, b)
    }
    /// `a * b + c`, fused.
    pub fn fma(&mut self, a: &str, b: &str, c: &str) -> V {
        self.def(format!("math.fma {a}, {b}, {c} : f32"))
    }
    /// A unary math-dialect op on f32 (`sqrt`, `floor`, `absf`).
    pub fn math(&mut self, op: &str, a: &str) -> V {
        self.def(format!("math.{op} {a} : f32"))
    }
    pub fn neg(&mut self, a: &str) -> V {
        self.def(format!("arith.negf {a} : f32"))
    }
    /// `cond ? a : b` on f32.
    pub fn select_lt0(&mut self, x: &str, a: &str, b: &str) -> V {
        let zero = self.f32(0.0);
        let c = self.def(format!("arith.cmpf olt, {x}, {zero} : f32"));
        self.def(format!("arith.select {c}, {a}, {b} : f32"))
    }

    /// Reads `buf[idx]`.
    pub fn load(&mut self, buf: &str, idx: &str) -> V {
        match self.device {
            Device::Cpu => self.def(format!("memref.load {buf}[{idx}] : memref<?xf32>")),
            Device::Nvptx => {
                let p = self.element_ptr(buf, idx, "f32");
                self.def(format!("llvm.load {p} : !llvm.ptr -> f32"))
            }
        }
    }

    /// Writes `buf[idx] = val`.
    pub fn store(&mut self, val: &str, buf: &str, idx: &str) {
        match self.device {
            Device::Cpu => self.line(format!("memref.store {val}, {buf}[{idx}] : memref<?xf32>")),
            Device::Nvptx => {
                let p = self.element_ptr(buf, idx, "f32");
                self.line(format!("llvm.store {val}, {p} : f32, !llvm.ptr"));
            }
        }
    }

    /// Makes `store_result` add each `addend[idx]` (or `addend[idx % n]` for a
    /// bias of length `n`) in turn, then apply `activation` if any.
    pub fn set_epilogue(&mut self, addends: Vec<Addend>, activation: Option<Activation>) {
        self.epilogue = Some((addends, activation));
    }

    /// Writes a result element `buf[idx] = val`, after the fused epilogue if any.
    pub fn store_result(&mut self, val: &str, buf: &str, idx: &str) {
        let val = match self.epilogue.clone() {
            None => val.to_string(),
            Some((addends, activation)) => {
                let mut y = val.to_string();
                for (addend, modulus) in addends {
                    let at = match modulus {
                        Some(n) => self.remui(idx, &n),
                        None => idx.to_string(),
                    };
                    let c = self.load(&addend, &at);
                    y = self.add(&y, &c);
                }
                match activation {
                    Some(act) => super::math::activation(self, act, &y),
                    None => y,
                }
            }
        };
        self.store(&val, buf, idx);
    }

    /// Writes `buf[idx..idx + width] = val` (a vector of f32), after the fused
    /// epilogue if any: the addends read as vectors (a bias's `idx mod n` does
    /// not wrap inside one: `n` is a multiple of `width`), an activation lane
    /// by lane.
    pub fn vstore_result(&mut self, val: &str, buf: &str, idx: &str, width: u32) {
        let Some((addends, activation)) = self.epilogue.clone() else {
            return self.vstore(val, buf, idx, width);
        };
        let ty = Self::vty(width);
        let mut y = val.to_string();
        for (addend, modulus) in addends {
            let at = match modulus {
                Some(n) => self.remui(idx, &n),
                None => idx.to_string(),
            };
            let c = self.vload(&addend, &at, width);
            y = self.def(format!("arith.addf {y}, {c} : {ty}"));
        }
        let Some(act) = activation else {
            return self.vstore(&y, buf, idx, width);
        };
        for lane in 0..width {
            let e = self.def(format!("vector.extract {y}[{lane}] : f32 from {ty}"));
            let a = super::math::activation(self, act, &e);
            let li = self.index(lane as u64);
            let at = self.addi(idx, &li);
            self.store(&a, buf, &at);
        }
    }

    /// `for iv in lb..ub { body }`.
    pub fn for_each(&mut self, lb: &str, ub: &str, body: impl FnOnce(&mut Self, &str)) {
        let one = self.index(1);
        let iv = self.fresh();
        self.line(format!("scf.for {iv} = {lb} to {ub} step {one} {{"));
        self.indent += 1;
        body(self, &iv);
        self.indent -= 1;
        self.line("}".into());
    }

    /// A loop carrying f32 accumulators: `body(iv, accs) -> new accs`; returns the final values.
    pub fn for_fold(&mut self, lb: &str, ub: &str, init: &[V], body: impl FnOnce(&mut Self, &str, &[V]) -> Vec<V>) -> Vec<V> {
        let typed: Vec<(V, String)> = init.iter().map(|v| (v.clone(), "f32".to_string())).collect();
        self.for_fold_typed(lb, ub, 1, &typed, body)
    }

    /// A loop from `lb` to `ub` by `step` carrying accumulators of the given
    /// types (`f32`, `vector<8xf32>`, ...); returns their final values.
    pub fn for_fold_typed(
        &mut self,
        lb: &str,
        ub: &str,
        step: u64,
        init: &[(V, String)],
        body: impl FnOnce(&mut Self, &str, &[V]) -> Vec<V>,
    ) -> Vec<V> {
        let step = self.index(step);
        let iv = self.fresh();
        let accs: Vec<V> = init.iter().map(|_| self.fresh()).collect();
        let (res_decl, results) = self.results(init.len());
        let iter_args = accs.iter().zip(init).map(|(a, (i, _))| format!("{a} = {i}")).collect::<Vec<_>>().join(", ");
        let tys = init.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join(", ");
        self.line(format!("{res_decl} = scf.for {iv} = {lb} to {ub} step {step} iter_args({iter_args}) -> ({tys}) {{"));
        self.indent += 1;
        let out = body(self, &iv, &accs);
        self.line(format!("scf.yield {} : {tys}", out.join(", ")));
        self.indent -= 1;
        self.line("}".into());
        results
    }

    /// `switch v { case c: body(c) ... default: nothing }` over the given case values (no results).
    pub fn switch(&mut self, v: &str, cases: impl IntoIterator<Item = u64>, mut body: impl FnMut(&mut Self, u64)) {
        self.line(format!("scf.index_switch {v}"));
        for c in cases {
            self.line(format!("case {c} {{"));
            self.indent += 1;
            body(self, c);
            self.line("scf.yield".into());
            self.indent -= 1;
            self.line("}".into());
        }
        self.line("default {".into());
        self.indent += 1;
        self.line("scf.yield".into());
        self.indent -= 1;
        self.line("}".into());
    }

    /// NVPTX: `x` combined over the 32 lanes of a warp by `op` (`addf`,
    /// `maxnumf`), a butterfly of 5 `shfl.sync`; every lane gets the result.
    /// Every lane of the warp must execute it.
    pub fn warp_all(&mut self, x: &str, op: &str) -> V {
        let (mask, clamp) = (self.i32(-1), self.i32(31));
        let mut x = x.to_string();
        for off in [16, 8, 4, 2, 1] {
            let o = self.i32(off);
            let other = self.def(format!("nvvm.shfl.sync bfly {mask}, {x}, {o}, {clamp} : f32 -> f32"));
            x = self.fbin(op, &x, &other);
        }
        x
    }

    /// NVPTX: lane `src`'s `x` (an index below 32, the same in every lane),
    /// one `shfl.sync idx`. Every lane of the warp must execute it.
    pub fn warp_from(&mut self, x: &str, src: &str) -> V {
        let (mask, clamp) = (self.i32(-1), self.i32(31));
        let lane = self.def(format!("arith.index_castui {src} : index to i32"));
        self.def(format!("nvvm.shfl.sync idx {mask}, {x}, {lane}, {clamp} : f32 -> f32"))
    }

    /// NVPTX: `x` (i32) summed over lanes `0..=lane` of the warp (`lane` the
    /// caller's lane index), five `shfl.sync up`. Every lane must execute it.
    pub fn warp_prefix_sum_i32(&mut self, x: &str, lane: &str) -> V {
        let (mask, zero) = (self.i32(-1), self.i32(0));
        let mut x = x.to_string();
        for off in [1u64, 2, 4, 8, 16] {
            let o = self.i32(off as i32);
            let other = self.def(format!("nvvm.shfl.sync up {mask}, {x}, {o}, {zero} : i32 -> i32"));
            let oc = self.index(off);
            let has = self.def(format!("arith.cmpi uge, {lane}, {oc} : index"));
            let sum = self.def(format!("arith.addi {x}, {other} : i32"));
            x = self.def(format!("arith.select {has}, {sum}, {x} : i32"));
        }
        x
    }

    /// `warp_from` for an i32.
    pub fn warp_from_i32(&mut self, x: &str, src: &str) -> V {
        let (mask, clamp) = (self.i32(-1), self.i32(31));
        let lane = self.def(format!("arith.index_castui {src} : index to i32"));
        self.def(format!("nvvm.shfl.sync idx {mask}, {x}, {lane}, {clamp} : i32 -> i32"))
    }

    /// `if cond { then }` (no results).
    pub fn if_then(&mut self, cond: &str, then: impl FnOnce(&mut Self)) {
        self.line(format!("scf.if {cond} {{"));
        self.indent += 1;
        then(self);
        self.indent -= 1;
        self.line("}".into());
    }

    /// `a < b ? a : b` and `a > b ? a : b` on indices.
    pub fn minui(&mut self, a: &str, b: &str) -> V {
        self.def(format!("arith.minui {a}, {b} : index"))
    }
    pub fn maxui(&mut self, a: &str, b: &str) -> V {
        self.def(format!("arith.maxui {a}, {b} : index"))
    }

    /// `a - b` for indices, or 0 where `b` exceeds `a`.
    pub fn sub_or_zero(&mut self, a: &str, b: &str) -> V {
        let zero = self.index(0);
        let more = self.def(format!("arith.cmpi ugt, {a}, {b} : index"));
        let d = self.def(format!("arith.subi {a}, {b} : index"));
        self.def(format!("arith.select {more}, {d}, {zero} : index"))
    }

    /// An index as an exact f32 (below 2^24), for indices a kernel stores in
    /// an f32 buffer.
    pub fn index_to_f32(&mut self, x: &str) -> V {
        let i = self.def(format!("arith.index_castui {x} : index to i64"));
        self.def(format!("arith.uitofp {i} : i64 to f32"))
    }

    /// The index an f32 buffer holds as an exact non-negative integer (`index_to_f32`).
    pub fn f32_to_index(&mut self, x: &str) -> V {
        let i = self.def(format!("arith.fptoui {x} : f32 to i64"));
        self.def(format!("arith.index_castui {i} : i64 to index"))
    }

    /// The byte-buffer parameter `param` (declared so) read as f16 values: a
    /// `memref<?xf16>` view of it on the CPU, its pointer on NVIDIA.
    pub fn f16_param(&mut self, param: &str) -> V {
        self.byte_param(param);
        match self.device {
            Device::Cpu => self.f16_view(param),
            Device::Nvptx => self.f16_plane(param, 0, 0),
        }
    }

    /// `if cond { then } else { els }` (no results).
    pub fn if_else(&mut self, cond: &str, then: impl FnOnce(&mut Self), els: impl FnOnce(&mut Self)) {
        self.line(format!("scf.if {cond} {{"));
        self.indent += 1;
        then(self);
        self.indent -= 1;
        self.line("} else {".into());
        self.indent += 1;
        els(self);
        self.indent -= 1;
        self.line("}".into());
    }

    /// `if cond { then } else { els }` yielding values of the types `tys`
    /// (each branch returns one value per type).
    pub fn if_else_yield(
        &mut self,
        cond: &str,
        tys: &[&str],
        then: impl FnOnce(&mut Self) -> Vec<V>,
        els: impl FnOnce(&mut Self) -> Vec<V>,
    ) -> Vec<V> {
        let (decl, results) = self.results(tys.len());
        let ty = tys.join(", ");
        self.line(format!("{decl} = scf.if {cond} -> ({ty}) {{"));
        for (i, branch) in [Box::new(then) as Box<dyn FnOnce(&mut Self) -> Vec<V>>, Box::new(els)].into_iter().enumerate() {
            if i == 1 {
                self.line("} else {".into());
            }
            self.indent += 1;
            let out = branch(self);
            self.line(format!("scf.yield {} : {ty}", out.join(", ")));
            self.indent -= 1;
        }
        self.line("}".into());
        results
    }

    /// A constant vector of `width` lanes of the integer `n` (`elem` i8, i32, ...).
    pub fn vsplat_int(&mut self, n: i64, width: u32, elem: &str) -> V {
        self.constant(format!("dense<{n}> : vector<{width}x{elem}>"))
    }

    /// The constant vector `0, 1, ..., width - 1` of i32 lanes.
    pub fn viota_i32(&mut self, width: u32) -> V {
        let lanes: Vec<String> = (0..width).map(|i| i.to_string()).collect();
        self.constant(format!("dense<[{}]> : vector<{width}xi32>", lanes.join(", ")))
    }

    /// A constant vector of `width` lanes of the f32 `x`.
    pub fn vsplat_f32(&mut self, x: f32, width: u32) -> V {
        self.constant(format!("dense<0x{:08X}> : vector<{width}xf32>", x.to_bits()))
    }

    /// `for iv in (lb..ub).step_by(step) { body }`.
    pub fn for_step(&mut self, lb: &str, ub: &str, step: u64, body: impl FnOnce(&mut Self, &str)) {
        let step = self.index(step);
        let iv = self.fresh();
        self.line(format!("scf.for {iv} = {lb} to {ub} step {step} {{"));
        self.indent += 1;
        body(self, &iv);
        self.indent -= 1;
        self.line("}".into());
    }

    // ---- vector dialect (CPU only: buffers are memrefs) ----

    /// The type `vector<WxF32>`.
    pub fn vty(width: u32) -> String {
        format!("vector<{width}xf32>")
    }

    /// A vector of zeros.
    pub fn vzero(&mut self, width: u32) -> V {
        self.constant(format!("dense<0.0> : {}", Self::vty(width)))
    }

    /// `buf[idx .. idx + width]`.
    pub fn vload(&mut self, buf: &str, idx: &str, width: u32) -> V {
        self.def(format!("vector.load {buf}[{idx}] : memref<?xf32>, {}", Self::vty(width)))
    }

    pub fn vstore(&mut self, val: &str, buf: &str, idx: &str, width: u32) {
        self.line(format!("vector.store {val}, {buf}[{idx}] : memref<?xf32>, {}", Self::vty(width)));
    }

    pub fn vbroadcast(&mut self, scalar: &str, width: u32) -> V {
        self.def(format!("vector.broadcast {scalar} : f32 to {}", Self::vty(width)))
    }

    /// `a * b + c` lane by lane.
    pub fn vfma(&mut self, a: &str, b: &str, c: &str, width: u32) -> V {
        self.def(format!("vector.fma {a}, {b}, {c} : {}", Self::vty(width)))
    }

    /// Sum of the lanes.
    /// One vector whose lane i is the sum of `vecs[i]`'s lanes (`vecs.len()` =
    /// `width`, a power of two): a butterfly of shuffles and adds, log2(width)
    /// levels, instead of `width` separate lane reductions.
    pub fn vsums(&mut self, vecs: &[V], width: u32) -> V {
        let w = width as usize;
        debug_assert_eq!(vecs.len(), w);
        let ty = Self::vty(width);
        let mut level: Vec<V> = vecs.to_vec();
        let mut g = 1;
        // Before the level with block size g, each vector holds g of the inputs,
        // input l % g in lane l, as w/g partial sums; adding the even and the odd
        // blocks of a pair x, y leaves 2g inputs with half as many partials each.
        while level.len() > 1 {
            let lanes = |odd: bool| -> String {
                (0..w)
                    .map(|l| {
                        let (q, m) = (l / (2 * g), l % (2 * g));
                        let from_y = if m < g { 0 } else { w };
                        (2 * q * g + m % g + if odd { g } else { 0 } + from_y).to_string()
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let (even, odd) = (lanes(false), lanes(true));
            level = level
                .chunks(2)
                .map(|p| {
                    let e = self.def(format!("vector.shuffle {}, {} [{even}] : {ty}, {ty}", p[0], p[1]));
                    let o = self.def(format!("vector.shuffle {}, {} [{odd}] : {ty}, {ty}", p[0], p[1]));
                    self.def(format!("arith.addf {e}, {o} : {ty}"))
                })
                .collect();
            g *= 2;
        }
        level.pop().unwrap_or_default()
    }

    pub fn vsum(&mut self, v: &str, width: u32) -> V {
        // Reassociation lets LLVM sum the lanes as a tree, not one lane at a time.
        self.def(format!("vector.reduction <add>, {v} fastmath<reassoc> : {} into f32", Self::vty(width)))
    }

    /// Runs `body(unit)` for every `unit in 0..work`: on the CPU a loop over the
    /// caller's slice `lo..min(hi, work)` (the runtime splits units over threads),
    /// on NVIDIA one thread per unit with a bounds check.
    pub fn parallel(&mut self, work: &str, body: impl FnOnce(&mut Self, &str)) {
        match self.device {
            Device::Cpu => {
                let ub = self.def(format!("arith.minui %hi, {work} : index"));
                self.for_each("%lo", &ub, body)
            }
            Device::Nvptx => {
                let tid = self.def("nvvm.read.ptx.sreg.tid.x : i32".into());
                let bid = self.def("nvvm.read.ptx.sreg.ctaid.x : i32".into());
                let bdim = self.def("nvvm.read.ptx.sreg.ntid.x : i32".into());
                let tid = self.def(format!("arith.index_castui {tid} : i32 to index"));
                let bid = self.def(format!("arith.index_castui {bid} : i32 to index"));
                let bdim = self.def(format!("arith.index_castui {bdim} : i32 to index"));
                let base = self.muli(&bid, &bdim);
                let unit = self.addi(&base, &tid);
                let inb = self.def(format!("arith.cmpi ult, {unit}, {work} : index"));
                self.line(format!("scf.if {inb} {{"));
                self.indent += 1;
                body(self, &unit);
                self.indent -= 1;
                self.line("}".into());
            }
        }
    }

    /// The whole `func.func` (CPU) or `llvm.func` kernel (NVIDIA), wrapped in a module.
    /// `buffers` are the parameter names of the buffer arguments, in ABI order.
    pub fn finish(self, name: &str, buffers: &[V]) -> String {
        let mut s = String::from("module {\n");
        for (_, g) in &self.globals {
            s.push_str(g);
            s.push('\n');
        }
        match self.device {
            Device::Cpu => {
                let params: Vec<String> =
                    buffers.iter().map(|b| format!("{b}: memref<?x{}>", if self.byte_params.contains(b) { "i8" } else { "f32" })).collect();
                s.push_str(&format!(
                    "  func.func @{name}({}, %seq: index, %pos: index, %lo: index, %hi: index) attributes {{llvm.emit_c_interface}} {{\n",
                    params.join(", ")
                ));
            }
            Device::Nvptx => {
                let params: Vec<String> = buffers.iter().map(|b| format!("{b}: !llvm.ptr {{llvm.noalias}}")).collect();
                // `pos` lives in device memory (one i64 the runtime writes
                // before each call), so a captured CUDA graph of a decode step
                // replays at any position.
                s.push_str(&format!(
                    "  llvm.func @{name}({}, %seq_i64: i64, %pos_ptr: !llvm.ptr) attributes {{nvvm.kernel}} {{\n",
                    params.join(", ")
                ));
                s.push_str("    %seq = arith.index_cast %seq_i64 : i64 to index\n");
                // Constants first: what runs before the wait may use them.
                for c in &self.consts {
                    s.push_str(c);
                    s.push('\n');
                }
                for l in &self.pre_wait {
                    s.push_str(l);
                    s.push('\n');
                }
                if self.grid_dependency {
                    // Before the first read (`pos` included): the kernels
                    // before this one wrote what it reads. Dependents are
                    // released only then, so at most one grid waits ahead.
                    s.push_str("    nvvm.griddepcontrol wait\n");
                    s.push_str("    nvvm.griddepcontrol launch_dependents\n");
                }
                s.push_str("    %pos_i64 = llvm.load %pos_ptr {alignment = 8 : i64} : !llvm.ptr -> i64\n");
                s.push_str("    %pos = arith.index_cast %pos_i64 : i64 to index\n");
            }
        }
        if self.device == Device::Cpu {
            for l in self.consts.iter().chain(&self.pre_wait) {
                s.push_str(l);
                s.push('\n');
            }
        }
        for l in &self.body {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str(match self.device {
            Device::Cpu => "    return\n  }\n}\n",
            Device::Nvptx => "    llvm.return\n  }\n}\n",
        });
        s
    }
}
