//! Reading a K cache quantized per channel (`--kv-kivi`, layout in
//! `sparsec_ir::kv_channel`): keys of complete groups are 4-bit codes with a
//! scale and minimum per (group, channel); the newest group's keys are exact
//! f32 rows at the front of the buffer. The CPU split attention widens a key
//! into its f32 tile from whichever holds it: per 32 channels, one 16-byte
//! load of codes split into nibbles, and the channels' scales and minimums as
//! two 16-lane f16 loads each.

use super::quant_planes::nibbles;
use super::VQ;
use crate::mlir::builder::{KernelBuilder, V};
use sparsec_ir::kv_channel::{group_bytes, min_offset, residual_bytes, scale_offset, GROUP};

/// A per-channel quantized K cache of `kvw` channels (a byte parameter).
pub(super) struct KiviKeys {
    bytes: V,
    halves: V,
    floats: V,
    kvw: u64,
}

impl KiviKeys {
    pub(super) fn new(b: &mut KernelBuilder, buf: &str, kvw: u64) -> KiviKeys {
        let halves = b.f16_view(buf);
        let zero = b.index(0);
        let four = b.index(4);
        let n = b.def(format!("memref.dim {buf}, {zero} : memref<?xi8>"));
        let n = b.divui(&n, &four);
        let floats = b.def(format!("memref.view {buf}[{zero}][{n}] : memref<?xi8> to memref<?xf32>"));
        KiviKeys { bytes: buf.to_string(), halves, floats, kvw }
    }

    /// Positions in complete groups once the call's rows are appended
    /// (`pos + seq` keys): the keys below are quantized, the rest exact.
    pub(super) fn quantized_keys(&self, b: &mut KernelBuilder) -> V {
        let (pos, seq) = (b.pos(), b.seq());
        let n = b.addi(&pos, &seq);
        let g = b.index(GROUP as u64);
        let groups = b.divui(&n, &g);
        b.muli(&groups, &g)
    }

    /// Byte offsets for key `t`, row `w` (= t mod GROUP) of its group: where
    /// the group starts, and where the key's row of codes does.
    fn group_of(&self, b: &mut KernelBuilder, t: &str, w: &str) -> (V, V) {
        let kvw = self.kvw as usize;
        let gc = b.index(GROUP as u64);
        let g = b.divui(t, &gc);
        let gb = b.index(group_bytes(kvw) as u64);
        let r = b.index(residual_bytes(kvw) as u64);
        let base = b.muli(&g, &gb);
        let base = b.addi(&base, &r);
        let rowb = b.index((kvw / 2) as u64);
        let codes = b.muli(w, &rowb);
        (base.clone(), b.addi(&base, &codes))
    }

    /// Prefetches for key `t` what key `t + ahead` (whole groups ahead) reads:
    /// its row of codes, and one line of its group's scales and minimums
    /// (a group's keys walk all of them). Clamped to the buffer's `last` byte.
    pub(super) fn prefetch(&self, b: &mut KernelBuilder, t: &str, ahead_groups: u64, last: &str) {
        let kvw = self.kvw as usize;
        let gc = b.index(GROUP as u64);
        let w = b.remui(t, &gc);
        let (base, codes) = self.group_of(b, t, &w);
        let ahead = ahead_groups * group_bytes(kvw) as u64;
        b.prefetch_ahead(&self.bytes, &codes, ahead, last, "i8");
        let step = b.index((kvw / 8) as u64);
        let params = b.muli(&w, &step);
        let params = b.addi(&base, &params);
        b.prefetch_ahead(&self.bytes, &params, ahead + scale_offset(kvw) as u64, last, "i8");
    }

    /// Writes the `d` features of key `t` from channel `khd` on into
    /// `tile[at..]`; keys below `nq` come from their group, the rest from the
    /// exact rows.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn widen(&self, b: &mut KernelBuilder, t: &str, khd: &str, d: u64, nq: &str, tile: &str, at: &str) {
        let kvw = self.kvw as usize;
        let quantized = b.def(format!("arith.cmpi ult, {t}, {nq} : index"));
        let gc = b.index(GROUP as u64);
        let w = b.remui(t, &gc);
        b.if_else(
            &quantized,
            |b| {
                let (base, codes) = self.group_of(b, t, &w);
                let two = b.index(2);
                let base_h = b.divui(&base, &two);
                let (so, mo) = (b.index((scale_offset(kvw) / 2) as u64), b.index((min_offset(kvw) / 2) as u64));
                let scales = b.addi(&base_h, &so);
                let mins = b.addi(&base_h, &mo);
                let vf = KernelBuilder::vty(VQ);
                for c in 0..d / 32 {
                    let o = b.index(c * 32);
                    let ch = b.addi(khd, &o);
                    let byte = b.divui(&ch, &two);
                    let at_codes = b.addi(&codes, &byte);
                    let (lo, hi) = nibbles(b, &self.bytes, &at_codes);
                    for (half, q) in [(0u64, lo), (16, hi)] {
                        let q = b.def(format!("arith.extui {q} : vector<{VQ}xi8> to vector<{VQ}xi32>"));
                        let f = b.def(format!("arith.sitofp {q} : vector<{VQ}xi32> to {vf}"));
                        let ho = b.index(half);
                        let chh = b.addi(&ch, &ho);
                        let si = b.addi(&scales, &chh);
                        let mi = b.addi(&mins, &chh);
                        let s = b.vload_f16(&self.halves, &si, VQ);
                        let m = b.vload_f16(&self.halves, &mi, VQ);
                        let k = b.vfma(&f, &s, &m, VQ);
                        let oo = b.index(c * 32 + half);
                        let dst = b.addi(at, &oo);
                        b.vstore(&k, tile, &dst, VQ);
                    }
                }
            },
            |b| {
                let kvwc = b.index(kvw as u64);
                let rb = b.muli(&w, &kvwc);
                let src0 = b.addi(&rb, khd);
                for c in 0..d / VQ as u64 {
                    let o = b.index(c * VQ as u64);
                    let src = b.addi(&src0, &o);
                    let x = b.vload(&self.floats, &src, VQ);
                    let dst = b.addi(at, &o);
                    b.vstore(&x, tile, &dst, VQ);
                }
            },
        );
    }
}
