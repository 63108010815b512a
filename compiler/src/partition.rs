//! Kernel partitioning: one kernel per distinct compute op (identical ops share
//! it), one buffer per value, a KV cache per attention op, and the execution
//! plan the runtime follows; then memory planning gives temporaries whose
//! lifetimes do not overlap one slot.

use crate::error::CompileResult;
use crate::mlir::kernels::{Epilogue, Prologue, Stage};
use crate::mlir::math::Activation;
use crate::mlir::KernelSpec;
use crate::sparse_select::choose;
use sparsec_ir::{DType, Dim, Graph, Op, TensorType};
use sparsec_runtime::manifest::{BufferKind, BufferSpec, ExecutionPlan, KernelStep, Ring, Step};
use std::collections::HashMap;

/// The kernels to compile and the plan to run them.
pub struct Partition {
    pub kernels: Vec<KernelSpec>,
    pub plan: ExecutionPlan,
    /// For each buffer of kind `Weight`, the node that holds its data.
    pub weight_nodes: Vec<(usize, usize)>,
}

pub use sparsec_ir::graph::weight_buffer_name;

/// Splits a typed graph (after `shape-infer`) into kernels and a plan, with the
/// default bake budget for `auto` specialization.
pub fn partition(g: &Graph) -> CompileResult<Partition> {
    partition_with(g, &crate::options::CompileOptions::default())
}

/// `partition` under the options that shape kernels: the budget `auto` may
/// spend on baked kernels, how quantized matmuls take their activations, and
/// the KV caches' element type.
pub fn partition_with(g: &Graph, opts: &crate::options::CompileOptions) -> CompileResult<Partition> {
    let mut left = crate::sparse_select::BakeLeft::new(opts.bake_budget);
    let int8_activations = opts.int8_activations();
    let cpu_isa = opts.cpu.isa();
    let kv_dtype = opts.kv_dtype();
    let types: Vec<TensorType> = sparsec_ir::verify(g)?;
    let mut buffers = Vec::new();
    let mut buffer_of = vec![usize::MAX; g.nodes.len()];
    let mut by_weight_name: HashMap<String, usize> = HashMap::new();
    let mut weight_nodes = Vec::new();
    let mut kernels = Vec::new();
    let mut steps = Vec::new();
    let mut by_signature: HashMap<String, String> = HashMap::new();
    let mut inputs = Vec::new();
    let pruned = sparsec_ir::sparse::pruned_weights(g);
    let tiled = crate::tile_weights::tile_weights(g, &types, opts);
    let fused = crate::fusion::fusions(g, &types);
    let absorbed: std::collections::HashSet<usize> = fused.values().flat_map(|f| f.absorbed.into_iter().flatten()).collect();
    for (i, n) in g.nodes.iter().enumerate() {
        // A node absorbed into a later node's kernel has no kernel or buffer of its own.
        if absorbed.contains(&i) {
            continue;
        }
        let dims = types[i].dims.clone();
        if let Some(wname) = weight_buffer_name(g, i) {
            let id = *by_weight_name.entry(wname.clone()).or_insert_with(|| {
                buffers.push(BufferSpec {
                    name: wname.clone(),
                    kind: BufferKind::Weight,
                    dims: dims.clone(),
                    dtype: types[i].dtype,
                    slot: None,
                    sparse: None,
                    ring: None,
                    channel_groups: None,
                    chunked: None,
                    sequence: None,
                    head_blocks: None,
                    tiles: None,
                });
                weight_nodes.push((buffers.len() - 1, i));
                buffers.len() - 1
            });
            buffer_of[i] = id;
            continue;
        }
        let kind = if n.op == Op::Input { BufferKind::Input } else { BufferKind::Temp };
        buffers.push(BufferSpec {
            name: n.name.clone(),
            kind,
            dims,
            dtype: types[i].dtype,
            slot: None,
            sparse: None,
            ring: None,
            channel_groups: None,
            chunked: None,
            sequence: None,
            head_blocks: None,
            tiles: None,
        });
        let id = buffers.len() - 1;
        buffer_of[i] = id;
        if n.op == Op::Input {
            inputs.push(id);
            continue;
        }
        // The node whose op the kernel computes (this one, or the matmul fused
        // into this add) and the kernel's operands.
        let f = fused.get(&i);
        let src = f.map_or(i, |f| f.src);
        let n = &g.nodes[src];
        let operand_ids: Vec<usize> = match f {
            Some(f) => f.operands().to_vec(),
            None => n.operands.iter().map(|o| o.0).collect(),
        };
        sparsec_ir::pattern::refuse_unimplemented(&n.patterns).map_err(|why| crate::error::CompileError::Unsupported {
            kernel: n.name.clone(),
            op: n.op.keyword(),
            why,
        })?;
        let mut spec = KernelSpec {
            name: String::new(),
            op: n.op.clone(),
            stage: Stage::Op,
            operands: operand_ids.iter().map(|&o| types[o].clone()).collect(),
            result: types[i].clone(),
            patterns: n.patterns.clone(),
            sparse: None,
            epilogue: f.and_then(|f| f.epilogue),
            activation: f.and_then(|f| f.activation),
            prologue: f.and_then(|f| f.prologue),
            int8_activations,
            half_mma_activations: opts.gpu_mma_activations == crate::options::GpuMmaActivations::Half,
            grid_dependency: opts.cuda.grid_dependency(),
            cpu_isa,
            hadamard_kv: false,
            kivi_keys: false,
            cpu_head_blocks: None,
            amx_weight: false,
        };
        let mut head_width = 0;
        let mut chunked_cache = None;
        let mut sequence_cache = None;
        if let Op::Attention { heads, kv_heads } = n.op {
            // The kernel reads its keys and values from the caches, in their type.
            for t in spec.operands.iter_mut().skip(1).take(2) {
                t.dtype = kv_dtype;
            }
            head_width = match spec.operands[0].dims.last() {
                Some(Dim::Fixed(w)) => (*w / (heads as u64).max(1)) as u32,
                _ => 0,
            };
            if opts.kv_hadamard {
                if !kv_dtype.is_quantized()
                    || !head_width.is_power_of_two()
                    || spec.patterns.iter().any(|p| matches!(p, sparsec_ir::Pattern::Nsa(_)))
                {
                    return Err(spec.unsupported(&format!(
                        "--kv-hadamard rotates block-quantized CPU caches (this one is {}) of power-of-two heads (width {head_width}) without #nsa",
                        kv_dtype.name()
                    )));
                }
                spec.hadamard_kv = true;
            }
            if opts.kv_kivi {
                let plain = spec.patterns.iter().all(|p| matches!(p, sparsec_ir::Pattern::Window(sparsec_ir::Window::Full)));
                if kv_dtype != DType::Q4_1 || !plain {
                    return Err(spec.unsupported(&format!(
                        "--kv-kivi quantizes a q4_1 CPU K cache per channel (this one is {}), of attention without windows, #nsa or #kv",
                        kv_dtype.name()
                    )));
                }
                spec.kivi_keys = true;
            }
            let width = kv_heads as usize * head_width as usize;
            if let Some((chunk, _)) = crate::mlir::kernels::chunked_svd_of(&spec) {
                let layout = crate::mlir::kernels::chunked_layout(&spec, kv_heads as usize, head_width as usize)
                    .ok_or_else(|| spec.unsupported("#kv(chunked_svd) does not fit the heads"))?;
                chunked_cache = Some(sparsec_runtime::manifest::ChunkedCache {
                    chunk,
                    ring: layout.ring as u32,
                    slot: layout.slot as u32,
                    head: head_width,
                    energy: layout.energy,
                });
            }
            if crate::mlir::kernels::has_sequence_kv(&spec) {
                let l = crate::mlir::kernels::sequence_layout(&spec, width)
                    .ok_or_else(|| spec.unsupported("#kv(axis = sequence) needs a block, a positive recent and a kept row"))?;
                sequence_cache = Some(sparsec_runtime::manifest::SequenceCache {
                    basis: l.basis,
                    keep: l.keep,
                    block: l.block as u32,
                    rows: l.m as u32,
                    sinks: l.sinks as u32,
                    recent: l.recent as u32,
                    ring: l.ring as u32,
                });
            }
            spec.cpu_head_blocks = crate::mlir::kernels::cpu_head_blocks(&spec);
            if chunked_cache.is_some() || sequence_cache.is_some() {
                // f16 records after f32 exact rows (`sparsec_ir::kv_compressed`),
                // whatever `--kv-cache` says for other caches.
                if kv_dtype.is_quantized() || spec.hadamard_kv || spec.kivi_keys {
                    return Err(spec.unsupported(&format!(
                        "#kv(chunked_svd) and #kv(axis = sequence) caches hold f16 records; they are not combined with {} caches, --kv-hadamard or --kv-kivi",
                        kv_dtype.name()
                    )));
                }
                for t in spec.operands.iter_mut().skip(1).take(2) {
                    t.dtype = DType::F16;
                }
            }
        }
        // A weight stored as AMX tiles (`tile_weights`): its matmuls read tiles.
        if let Some(w) = n.operands.get(1).filter(|_| matches!(n.op, Op::MatMul { transpose_b: true })) {
            let wbuf = buffer_of[w.0];
            if let Some(&t) = buffers.get(wbuf).and_then(|b| tiled.get(&b.name)) {
                buffers[wbuf].tiles = Some(t);
                spec.amx_weight = true;
            }
        }
        if let Some(pw) = n.operands.get(1).and_then(|w| pruned.get(&w.0)).filter(|_| matches!(n.op, Op::MatMul { .. })) {
            let wbuf = buffer_of[n.operands[1].0];
            let choice = choose(&n.patterns, pw, &buffers[wbuf].name, &mut left)?;
            // The weight buffer stores what the choice reads (every use agrees: verifier).
            buffers[wbuf].sparse = choice.storage;
            spec.sparse = Some(choice);
        }
        // Native sparse attention reads its selection as operand 3 (`nsa.rs`).
        let nsa = match n.op {
            Op::Attention { kv_heads, .. } => sparsec_ir::NativeSparse::of(&n.patterns).map(|nsa| (nsa, kv_heads as u64)),
            _ => None,
        };
        let select_type = nsa.map(|(nsa, kvh)| TensorType { dtype: DType::F32, dims: vec![Dim::Seq, Dim::Fixed(nsa.select_words(kvh))] });
        // A linear compression (operand 4) feeds the summary step only.
        let compress = match nsa {
            Some((n, _)) if n.compress == sparsec_ir::NsaCompress::Linear => {
                spec.operands.pop().map(|t| (t, buffer_of[operand_ids[operand_ids.len() - 1]]))
            }
            _ => None,
        };
        spec.operands.extend(select_type.clone());
        // A gated NSA's attention also reads the compressed keys and values
        // of the block cache (last operand).
        let gated_blocks = match nsa {
            Some((n, kvh)) if n.gated() => {
                let d = head_width as u64;
                Some(TensorType { dtype: DType::F32, dims: vec![Dim::Seq, Dim::Fixed(n.block_words(kvh * d))] })
            }
            _ => None,
        };
        spec.operands.extend(gated_blocks);
        let name = intern(&mut kernels, &mut by_signature, &mut spec, n.op.keyword());
        spec.name = name;
        let mut args: Vec<usize> = operand_ids.iter().map(|&o| buffer_of[o]).collect();
        if compress.is_some() {
            args.pop();
        }
        if let Op::Attention { .. } = n.op {
            // Attention reads every position so far: the new keys and values are
            // appended to this op's caches, and the kernel reads the caches.
            // A windowed layer keeps only what its window and sinks read (CPU).
            let ring = crate::mlir::kernels::cpu_ring(crate::mlir::kernels::window_of(&spec)?).map(|(sinks, rows)| Ring {
                sinks,
                rows,
                max_rows: crate::mlir::kernels::RING_SLACK,
            });
            for (slot, role) in [(1, "k_cache"), (2, "v_cache")] {
                let src = args[slot];
                buffers.push(BufferSpec {
                    name: format!("{}.{role}", n.name),
                    kind: BufferKind::KvCache,
                    dims: buffers[src].dims.clone(),
                    dtype: if chunked_cache.is_some() || sequence_cache.is_some() { DType::F16 } else { kv_dtype },
                    slot: None,
                    sparse: None,
                    ring,
                    channel_groups: (spec.kivi_keys && slot == 1).then_some(sparsec_ir::kv_channel::GROUP as u32),
                    chunked: chunked_cache,
                    sequence: sequence_cache,
                    head_blocks: spec.cpu_head_blocks,
                    tiles: None,
                });
                let cache = buffers.len() - 1;
                steps.push(Step::KvAppend { src, cache, hadamard: spec.hadamard_kv.then_some(head_width) });
                args[slot] = cache;
            }
            if let (Some((nsa, _)), Some(select_type)) = (nsa, &select_type) {
                let kvw = match buffers[args[1]].dims.last() {
                    Some(Dim::Fixed(w)) => *w,
                    _ => return Err(spec.unsupported("#nsa needs a fixed key width")),
                };
                let block_type = TensorType { dtype: DType::F32, dims: vec![Dim::Seq, Dim::Fixed(nsa.block_words(kvw))] };
                buffers.push(BufferSpec {
                    name: format!("{}.nsa_blocks", n.name),
                    kind: BufferKind::BlockCache { block: nsa.block },
                    dims: block_type.dims.clone(),
                    dtype: DType::F32,
                    slot: None,
                    sparse: None,
                    ring: None,
                    channel_groups: None,
                    chunked: None,
                    sequence: None,
                    head_blocks: None,
                    tiles: None,
                });
                let blocks = buffers.len() - 1;
                buffers.push(BufferSpec {
                    name: format!("{}.nsa_select", n.name),
                    kind: BufferKind::Temp,
                    dims: select_type.dims.clone(),
                    dtype: DType::F32,
                    slot: None,
                    sparse: None,
                    ring: None,
                    channel_groups: None,
                    chunked: None,
                    sequence: None,
                    head_blocks: None,
                    tiles: None,
                });
                let select = buffers.len() - 1;
                let k_type = spec.operands[1].clone();
                let q_type = spec.operands[0].clone();
                // The summary reads the K cache; gated, the V cache and the
                // linear compression as well.
                let (mut sum_operands, mut sum_args) = (vec![k_type.clone()], vec![args[1]]);
                if nsa.gated() {
                    sum_operands.push(spec.operands[2].clone());
                    sum_args.push(args[2]);
                }
                if let Some((t, buf)) = &compress {
                    sum_operands.push(t.clone());
                    sum_args.push(*buf);
                }
                sum_args.push(blocks);
                for (stage, operands, result, step_args) in [
                    (Stage::NsaSummary, sum_operands, block_type.clone(), sum_args),
                    (Stage::NsaSelect, vec![q_type, block_type], select_type.clone(), vec![args[0], blocks, select]),
                ] {
                    let mut step_spec = KernelSpec { stage, operands, result, sparse: None, ..spec.clone() };
                    intern(&mut kernels, &mut by_signature, &mut step_spec, n.op.keyword());
                    steps.push(Step::Kernel(KernelStep {
                        kernel: step_spec.name.clone(),
                        args: step_args,
                        gpu_threads: step_spec.work()?,
                        gpu_mma_warps: None,
                        gpu_mma_rows: None,
                        gpu_mma_block: None,
                        gpu_decode_threads: None,
                        cpu_units: step_spec.cpu_work()?,
                        cpu_seq_block: step_spec.cpu_seq_block(),
                        cpu_unit_cost: step_spec.cpu_unit_cost(),
                        cpu_first_phase: step_spec.cpu_first_phase()?,
                    }));
                }
                args.push(select);
                if nsa.gated() {
                    args.push(blocks);
                }
            }
        }
        if let Some(words) = spec.scratch_words()? {
            buffers.push(BufferSpec {
                name: format!("{}.scratch", n.name),
                kind: BufferKind::Scratch,
                dims: vec![Dim::Fixed(words.max(1))],
                dtype: DType::F32,
                slot: None,
                sparse: None,
                ring: None,
                channel_groups: None,
                chunked: None,
                sequence: None,
                head_blocks: None,
                tiles: None,
            });
            args.push(buffers.len() - 1);
        }
        args.push(id);
        steps.push(Step::Kernel(KernelStep {
            kernel: spec.name.clone(),
            args,
            gpu_threads: spec.work()?,
            gpu_mma_warps: spec.gpu_mma_warps(),
            gpu_mma_rows: spec.gpu_mma_rows(),
            gpu_mma_block: spec.gpu_mma_block(),
            gpu_decode_threads: spec.gpu_decode_threads(),
            cpu_units: spec.cpu_work()?,
            cpu_seq_block: spec.cpu_seq_block(),
            cpu_unit_cost: spec.cpu_unit_cost(),
            cpu_first_phase: spec.cpu_first_phase()?,
        }));
    }
    let outputs: Vec<usize> = g.outputs.iter().map(|o| buffer_of[o.0]).collect();
    let row_local_tail = row_local_tail(&kernels, &buffers, &steps, &outputs);
    let mut plan = ExecutionPlan { buffers, inputs, outputs, steps, row_local_tail };
    assign_slots(&mut plan);
    Ok(Partition { kernels, plan, weight_nodes })
}

/// The kernel that computes `spec`: ops with the same attributes, types and
/// patterns share one kernel (a model's layers compile once, not once per
/// layer); a kernel that bakes a weight's structure serves that weight only.
/// Registers a new kernel named after its op (and what is fused into it).
fn intern(kernels: &mut Vec<KernelSpec>, by_signature: &mut HashMap<String, String>, spec: &mut KernelSpec, keyword: &str) -> String {
    let baked = spec.sparse.as_ref().filter(|c| c.bakes()).map(|c| c.weight.clone());
    let level = spec.sparse.as_ref().map(|c| (c.level, c.storage));
    let signature = format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}",
        spec.op,
        spec.stage,
        spec.operands,
        spec.result,
        spec.patterns,
        level,
        baked,
        spec.epilogue,
        spec.activation,
        spec.prologue,
        spec.hadamard_kv
    ) + if spec.kivi_keys { "|kivi" } else { "" }
        + if spec.amx_weight { "|amx" } else { "" };
    let name = match by_signature.get(&signature) {
        Some(name) => String::clone(name),
        None => {
            let fused = match (spec.stage, spec.prologue, spec.epilogue, spec.activation) {
                (Stage::NsaSummary, ..) => "_nsa_summary",
                (Stage::NsaSelect, ..) => "_nsa_select",
                (Stage::Op, Some(Prologue::Silu), _, _) => "_silu",
                (Stage::Op, _, Some(_), Some(Activation::Gelu(_))) => "_add_gelu",
                (Stage::Op, _, Some(_), Some(Activation::Silu)) => "_add_silu",
                (Stage::Op, _, Some(Epilogue::BiasResidual), None) => "_add_add",
                (Stage::Op, _, Some(_), None) => "_add",
                (Stage::Op, ..) => "",
            };
            spec.name = format!("k{}_{keyword}{fused}", kernels.len());
            by_signature.insert(signature, spec.name.clone());
            kernels.push(spec.clone());
            spec.name.clone()
        }
    };
    spec.name = name.clone();
    name
}

/// The first step of the longest suffix of row-local kernels whose every
/// non-weight buffer is `[seq, ...]` with one `seq` (so row r sits at r times
/// the row's bytes), provided it produces every output; `None` when empty.
fn row_local_tail(kernels: &[KernelSpec], buffers: &[BufferSpec], steps: &[Step], outputs: &[usize]) -> Option<usize> {
    let mut start = steps.len();
    for (i, step) in steps.iter().enumerate().rev() {
        let Step::Kernel(k) = step else { break };
        let Some(spec) = kernels.iter().find(|s| s.name == k.kernel) else { break };
        let rows_ok = k.args.iter().all(|&a| buffers[a].kind == BufferKind::Weight || buffers[a].by_rows());
        if !spec.row_local() || !rows_ok {
            break;
        }
        start = i;
    }
    let produced = |o: &usize| steps[start..].iter().any(|s| matches!(s, Step::Kernel(k) if k.args.last() == Some(o)));
    (start < steps.len() && outputs.iter().all(produced)).then_some(start)
}

/// Memory planning: walks the steps in order and gives each temporary a slot
/// that no live temporary holds, preferring a free slot that last held a buffer
/// of the same size; a temporary frees its slot after its last reader. Graph
/// outputs keep their own slots. The runtime sizes each slot for its largest buffer.
pub fn assign_slots(plan: &mut ExecutionPlan) {
    let n = plan.buffers.len();
    let mut last_read = vec![None::<usize>; n];
    for (s, step) in plan.steps.iter().enumerate() {
        let reads: Vec<usize> = match step {
            Step::Kernel(k) => k.args[..k.args.len().saturating_sub(1)].to_vec(),
            Step::KvAppend { src, .. } => vec![*src],
        };
        for r in reads {
            last_read[r] = Some(s);
        }
    }
    let mut slot_size: Vec<sparsec_ir::SymSize> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    for s in 0..plan.steps.len() {
        if let Step::Kernel(k) = &plan.steps[s] {
            let out = *k.args.last().unwrap_or(&usize::MAX);
            if out < n && plan.buffers[out].kind == BufferKind::Temp && plan.buffers[out].slot.is_none() {
                let size = plan.buffers[out].numel();
                let pick = free.iter().position(|&f| slot_size[f] == size).or(if free.is_empty() { None } else { Some(0) });
                let slot = match pick {
                    Some(i) => free.remove(i),
                    None => {
                        slot_size.push(size);
                        slot_size.len() - 1
                    }
                };
                slot_size[slot] = size;
                plan.buffers[out].slot = Some(slot);
            }
        }
        // Temps whose last reader is this step free their slots (after the
        // output took one, so a step never writes over its own inputs).
        for (b, read) in last_read.iter().enumerate().take(n) {
            if *read == Some(s) && plan.buffers[b].kind == BufferKind::Temp && !plan.outputs.contains(&b) {
                if let Some(slot) = plan.buffers[b].slot {
                    free.push(slot);
                }
            }
        }
    }
    // Scratch lives only inside the step that takes it: every scratch buffer
    // shares one slot of its own.
    let scratch_slot = slot_size.len();
    for b in plan.buffers.iter_mut() {
        if b.kind == BufferKind::Scratch {
            b.slot = Some(scratch_slot);
        }
    }
}
