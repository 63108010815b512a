//! The reference interpreter: runs any graph op by op with the reference
//! semantics. The oracle every compiled kernel is checked against.

use crate::error::{RuntimeError, RuntimeResult};
use ndarray::{ArrayD, IxDyn};
use sparsec_ir::reference::{attention, eval_op, rope};
use sparsec_ir::{Graph, IrError, Op};
use std::collections::HashMap;
use std::sync::Arc;

/// Supplies a weight's data by tensor name, shared rather than copied.
pub type WeightFn<'a> = &'a dyn Fn(&str) -> Option<Arc<ArrayD<f32>>>;

/// The KV cache of a decoding session: how many positions were consumed, and
/// the keys and values every attention op has seen so far.
#[derive(Default)]
pub struct KvState {
    pub pos: usize,
    caches: HashMap<usize, (ArrayD<f32>, ArrayD<f32>)>,
    /// Weights pruned by `#sparsity`, by node: pruned once per session.
    pruned: HashMap<usize, Arc<ArrayD<f32>>>,
}

impl KvState {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Runs `g` on `inputs` (graph input order) as one whole sequence. `weight(name)`
/// supplies checkpoint data; weights it does not know fall back to their `init`.
pub fn interpret(g: &Graph, inputs: &[ArrayD<f32>], weight: WeightFn<'_>) -> RuntimeResult<Vec<ArrayD<f32>>> {
    interpret_cached(g, inputs, weight, &mut KvState::new())
}

/// Runs `g` on the next `seq` positions: positions and RoPE continue from
/// `state.pos`, attention sees the cached keys and values, and the cache grows.
/// Prefill is one call with the prompt; decode is one call per token.
pub fn interpret_cached(g: &Graph, inputs: &[ArrayD<f32>], weight: WeightFn<'_>, state: &mut KvState) -> RuntimeResult<Vec<ArrayD<f32>>> {
    let mut run = Stepper::new(g, inputs, state)?;
    run.run_until(g.nodes.len(), weight)?;
    Ok(run.finish())
}

/// One run of a graph that can stop before any node and resume: what
/// calibration needs to advance many sequences in step, read the input of a
/// matmul before it runs and swap in a weight's new data (`replace`).
pub struct Stepper<'a> {
    g: &'a Graph,
    inputs: &'a [ArrayD<f32>],
    state: &'a mut KvState,
    types: Vec<sparsec_ir::TensorType>,
    vals: Vec<Option<Arc<ArrayD<f32>>>>,
    last_use: Vec<usize>,
    prunes: HashMap<usize, sparsec_ir::sparse::PrunedWeight>,
    next: usize,
    next_input: usize,
    seq: Option<u64>,
}

impl<'a> Stepper<'a> {
    pub fn new(g: &'a Graph, inputs: &'a [ArrayD<f32>], state: &'a mut KvState) -> RuntimeResult<Self> {
        let types = sparsec_ir::verify(g)?;
        // Values are dropped after their last use, so a whole model's activations
        // (and weights) are not all alive at once.
        let mut last_use = vec![usize::MAX; g.nodes.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            for o in &n.operands {
                last_use[o.0] = i;
            }
        }
        for o in &g.outputs {
            last_use[o.0] = usize::MAX;
        }
        let prunes = sparsec_ir::sparse::pruned_weights(g);
        Ok(Stepper { g, inputs, state, types, vals: vec![None; g.nodes.len()], last_use, prunes, next: 0, next_input: 0, seq: None })
    }

    /// The next node to run.
    pub fn position(&self) -> usize {
        self.next
    }

    /// The value of node `i`, if it was computed and is still alive.
    pub fn value(&self, i: usize) -> Option<&Arc<ArrayD<f32>>> {
        self.vals.get(i).and_then(|v| v.as_ref())
    }

    /// Replaces the value of node `i` where it is alive (a weight whose data
    /// changed after it was loaded); later nodes read the new value.
    pub fn replace(&mut self, i: usize, v: Arc<ArrayD<f32>>) {
        if let Some(slot @ Some(_)) = self.vals.get_mut(i) {
            *slot = Some(v);
        }
    }

    /// The graph outputs, once every node ran; the KV state moves on by the
    /// sequence's length.
    pub fn finish(self) -> Vec<ArrayD<f32>> {
        self.state.pos += self.seq.unwrap_or(1) as usize;
        self.g.outputs.iter().filter_map(|o| self.vals[o.0].as_deref().cloned()).collect()
    }

    /// Runs nodes from `position()` up to (not including) `until`.
    pub fn run_until(&mut self, until: usize, weight: WeightFn<'_>) -> RuntimeResult<()> {
        let until = until.min(self.g.nodes.len());
        while self.next < until {
            self.step(weight)?;
        }
        Ok(())
    }

    fn step(&mut self, weight: WeightFn<'_>) -> RuntimeResult<()> {
        let (g, i) = (self.g, self.next);
        self.next += 1;
        let n = &g.nodes[i];
        let (types, vals, state, seq) = (&self.types, &mut self.vals, &mut *self.state, &mut self.seq);
        let eval_err = |message: String| RuntimeError::Ir(IrError::Eval { op: n.op.keyword(), value: n.name.clone(), message });
        let v = match &n.op {
            Op::Input => {
                let next_input = self.next_input;
                let a = self.inputs.get(next_input).ok_or_else(|| RuntimeError::Input {
                    index: next_input,
                    name: n.name.clone(),
                    message: "missing".into(),
                })?;
                for (ext, d) in a.shape().iter().zip(&types[i].dims) {
                    if *d == sparsec_ir::Dim::Seq {
                        seq.get_or_insert(*ext as u64);
                    }
                }
                let s = seq.unwrap_or(1);
                if a.shape() != types[i].resolve(s).as_slice() {
                    return Err(RuntimeError::Input {
                        index: next_input,
                        name: n.name.clone(),
                        message: format!("shape {:?}, expected {}", a.shape(), types[i]),
                    });
                }
                self.next_input += 1;
                a.clone()
            }
            Op::Weight { .. } if state.pruned.contains_key(&i) => {
                vals[i] = state.pruned.get(&i).cloned();
                return Ok(());
            }
            Op::Weight { name, init } => {
                let shape = types[i].resolve(0);
                let loaded = match weight(name) {
                    Some(a) if a.shape() == shape.as_slice() => a,
                    Some(a) => return Err(eval_err(format!("weight `{name}` has shape {:?}, expected {shape:?}", a.shape()))),
                    None => match init {
                        Some(init) => Arc::new(
                            ArrayD::from_shape_vec(IxDyn(&shape), init.generate(shape.iter().product()))
                                .map_err(|e| eval_err(e.to_string()))?,
                        ),
                        None => return Err(eval_err(format!("no data for weight `{name}`"))),
                    },
                };
                // A weight under `#sparsity` is magnitude-pruned (what the compiler packs).
                let v = match self.prunes.get(&i) {
                    Some(pw) => {
                        let mut w: Vec<f32> = loaded.iter().copied().collect();
                        pw.materialize(&mut w);
                        let a = Arc::new(ArrayD::from_shape_vec(IxDyn(&shape), w).map_err(|e| eval_err(e.to_string()))?);
                        state.pruned.insert(i, a.clone());
                        a
                    }
                    None => loaded,
                };
                vals[i] = Some(v);
                return Ok(());
            }
            Op::Positions => {
                let s = seq.unwrap_or(1) as usize;
                ArrayD::from_shape_vec(IxDyn(&[s]), (state.pos..state.pos + s).map(|p| p as f32).collect())
                    .map_err(|e| eval_err(e.to_string()))?
            }
            Op::Rope { heads, theta, adjacent } => {
                let x = vals[n.operands[0].0].as_deref().ok_or_else(|| eval_err("operand not computed".into()))?;
                rope(x, *heads as usize, *theta, *adjacent, state.pos).map_err(eval_err)?
            }
            Op::Attention { heads, kv_heads } => {
                let get = |k: usize| vals[n.operands[k].0].as_deref().ok_or_else(|| eval_err("operand not computed".into()));
                let (q, k_new, v_new) = (get(0)?, get(1)?, get(2)?);
                let (k_all, v_all) = match state.caches.remove(&i) {
                    Some((k_old, v_old)) => {
                        let cat = |a: &ArrayD<f32>, b: &ArrayD<f32>| {
                            ndarray::concatenate(ndarray::Axis(0), &[a.view(), b.view()]).map_err(|e| eval_err(e.to_string()))
                        };
                        (cat(&k_old, k_new)?, cat(&v_old, v_new)?)
                    }
                    None => (k_new.clone(), v_new.clone()),
                };
                let extra = (3..n.operands.len()).map(get).collect::<Result<Vec<_>, _>>()?;
                let out =
                    attention(*heads as usize, *kv_heads as usize, &n.patterns, q, &k_all, &v_all, &extra, state.pos).map_err(eval_err)?;
                state.caches.insert(i, (k_all, v_all));
                out
            }
            Op::Constant { values } => {
                ArrayD::from_shape_vec(IxDyn(&types[i].resolve(0)), values.clone()).map_err(|e| eval_err(e.to_string()))?
            }
            op => {
                let args: Vec<&ArrayD<f32>> = n.operands.iter().filter_map(|o| vals[o.0].as_deref()).collect();
                eval_op(op, &n.patterns, &args).map_err(eval_err)?
            }
        };
        vals[i] = Some(Arc::new(v));
        for o in &n.operands {
            if self.last_use[o.0] == i {
                vals[o.0] = None;
            }
        }
        Ok(())
    }
}
