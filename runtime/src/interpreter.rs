//! The reference interpreter: runs any graph op by op with the reference
//! semantics. The oracle every compiled kernel is checked against.

use crate::error::{RuntimeError, RuntimeResult};
use ndarray::{ArrayD, IxDyn};
use sparsec_ir::reference::eval_op;
use sparsec_ir::{Graph, IrError, Op};

/// Runs `g` on `inputs` (graph input order). `weight(name)` supplies checkpoint
/// data; weights it does not know fall back to their `init`.
pub fn interpret(
    g: &Graph,
    inputs: &[ArrayD<f32>],
    weight: &dyn Fn(&str) -> Option<ArrayD<f32>>,
) -> RuntimeResult<Vec<ArrayD<f32>>> {
    let types = sparsec_ir::verify(g)?;
    let mut vals: Vec<Option<ArrayD<f32>>> = vec![None; g.nodes.len()];
    let mut next_input = 0;
    let mut seq: Option<u64> = None;
    for (i, n) in g.nodes.iter().enumerate() {
        let eval_err = |message: String| RuntimeError::Ir(IrError::Eval { op: n.op.keyword(), value: n.name.clone(), message });
        let v = match &n.op {
            Op::Input => {
                let a = inputs.get(next_input).ok_or_else(|| RuntimeError::Input {
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
                next_input += 1;
                a.clone()
            }
            Op::Weight { name, init } => {
                let shape = types[i].resolve(0);
                match weight(name) {
                    Some(a) if a.shape() == shape.as_slice() => a,
                    Some(a) => return Err(eval_err(format!("weight `{name}` has shape {:?}, expected {shape:?}", a.shape()))),
                    None => match init {
                        Some(init) => ArrayD::from_shape_vec(IxDyn(&shape), init.generate(shape.iter().product()))
                            .map_err(|e| eval_err(e.to_string()))?,
                        None => return Err(eval_err(format!("no data for weight `{name}`"))),
                    },
                }
            }
            Op::Positions => {
                let s = seq.unwrap_or(1) as usize;
                ArrayD::from_shape_vec(IxDyn(&[s]), (0..s).map(|p| p as f32).collect()).map_err(|e| eval_err(e.to_string()))?
            }
            Op::Constant { values } => {
                ArrayD::from_shape_vec(IxDyn(&types[i].resolve(0)), values.clone()).map_err(|e| eval_err(e.to_string()))?
            }
            op => {
                let args: Vec<&ArrayD<f32>> = n.operands.iter().filter_map(|o| vals[o.0].as_ref()).collect();
                eval_op(op, &n.patterns, &args).map_err(eval_err)?
            }
        };
        vals[i] = Some(v);
    }
    Ok(g.outputs.iter().filter_map(|o| vals[o.0].clone()).collect())
}
