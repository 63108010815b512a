//! sparsec's graph IR: typed tensor ops carrying pattern attributes, a text form
//! that round-trips, the verifier, and the reference semantics of every op.

pub mod attr;
pub mod error;
pub mod graph;
pub mod kv_basis;
pub mod kv_channel;
pub mod kv_chunked;
pub mod kv_compressed;
pub mod kv_sequence;
pub mod lexer;
pub mod op;
pub mod parser;
pub mod pattern;
pub mod printer;
pub mod quant;
pub mod reference;
pub mod shape;
pub mod simd_state;
pub mod sparse;
pub mod sparse_calibrated;
pub mod sparse_detect;
pub mod sparse_quant;
pub mod stored;
pub mod tiles;
pub mod types;
pub mod verifier;

pub use error::{IrError, IrResult};
pub use graph::{Graph, Loc, Node, ValueId};
pub use op::{GeluApprox, Init, Op};
pub use parser::parse_graph;
pub use pattern::{
    f16_down, f16_up, KvAxis, KvCompression, LowRank, NativeSparse, NsaCompress, NsaGate, NsaScore, Pattern, Sparsity, Specialize, SvdRank,
    ValueCoding, Window,
};
pub use printer::print_graph;
pub use types::{DType, Dim, SymSize, TensorType};
pub use verifier::verify;
