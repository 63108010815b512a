//! Round-trip and diagnostics of the IR text form.

use proptest::prelude::*;
use sparsec_ir::*;

/// One graph that uses every op, every attribute and every pattern variant.
const EVERY_OP: &str = r#"graph @every_op {
  %x = input : f32[seq, 64]
  %w = weight "layers.0.mlp.up" init normal(seed = 7, std = 0.02) : f32[64, 128]
  %wp = weight "layers.0.mlp.gate" init normal(seed = 8, std = 0.02) : f32[64, 128]
  %wn = weight "layers.1.mlp.up" init normal(seed = 9, std = 0.02) : f32[64, 128]
  %wb = weight "layers.1.mlp.gate" init normal(seed = 10, std = 0.02) : f32[64, 128]
  %wt = weight "layers.0.mlp.down" init uniform(seed = 3, bound = 0.5) : f32[64, 128]
  %wd = weight "layers.1.mlp.down" init normal(seed = 11, std = 0.02) : f32[64, 128]
  %wl = weight "layers.2.mlp.up" : f32[128, 64]
  %wr = weight "layers.2.mlp.gate" : f32[64, 128]
  %g = weight "ln.g" init ones : f32[64]
  %b = weight "ln.b" init zeros : f32[64]
  %plain = weight "from.checkpoint" : f32[64, 64]
  %c = const [1.0, -2.5, 1e-7, 3.0] : f32[4]
  %h = layer_norm %x, %g, %b {eps = 1e-5} : f32[seq, 64]
  %r = rms_norm %x, %g {eps = 1e-6} : f32[seq, 64]
  %u = matmul %h, %wp #sparsity(unstructured, ratio = 0.9) #values(q8) #specialize(auto) : f32[seq, 128]
  %u2 = matmul %h, %wn #sparsity(nm, n = 2, m = 4) #values(q4) #specialize(indices) : f32[seq, 128]
  %u3 = matmul %h, %wb #sparsity(block, ratio = 0.5, rows = 4, cols = 4) #specialize(full) : f32[seq, 128]
  %u4 = matmul %h, %wl {transpose_b = true} #low_rank(rank = 16, basis = "attn.g0") : f32[seq, 128]
  %u5 = matmul %h, %wr #low_rank(rank = 8) : f32[seq, 128]
  %u6 = matmul %h, %wd #sparsity(unstructured, ratio = 0.5) #specialize(generic) : f32[seq, 128]
  %u7 = matmul %h, %wd #sparsity(unstructured, ratio = 0.5) #specialize(dense) : f32[seq, 128]
  %d = matmul %u, %wt {transpose_b = true} : f32[seq, 64]
  %a = add %d, %r : f32[seq, 64]
  %m = mul %a, %g : f32[seq, 64]
  %gt = gelu %u {approx = tanh} : f32[seq, 128]
  %ge = gelu %u2 {approx = erf} : f32[seq, 128]
  %s = silu %u3 : f32[seq, 128]
  %sm = softmax %u4 : f32[seq, 128]
  %q = matmul %h, %plain : f32[seq, 64]
  %k = matmul %h, %w : f32[seq, 128]
  %kv = matmul %k, %wt {transpose_b = true} : f32[seq, 64]
  %at = attention %q, %kv, %kv {heads = 4, kv_heads = 4} #window(sliding, size = 16, sinks = 2) #kv(dct, keep = 0.25, axis = feature, block = 64) : f32[seq, 64]
  %at2 = attention %q, %kv, %kv {heads = 2, kv_heads = 2} #window(full) #kv(pswf, keep = 0.5, axis = feature, bandwidth = 0.1) : f32[seq, 64]
  %at3 = attention %q, %kv, %kv {heads = 1, kv_heads = 1} #nsa(block = 16, top_n = 4, window = 32, sinks = 4, score = bound) : f32[seq, 64]
  %at4 = attention %q, %kv, %kv {heads = 2, kv_heads = 2} #kv(chunked_svd, chunk = 32, energy = 0.95, max_rank = 8) : f32[seq, 64]
  %at6 = attention %q, %kv, %kv {heads = 4, kv_heads = 4} #kv(chunked_svd, chunk = 64, rank = 8) : f32[seq, 64]
  %at7 = attention %q, %kv, %kv {heads = 4, kv_heads = 4} #kv(dct, keep = 0.25, axis = sequence, block = 64, sinks = 4, recent = 256) : f32[seq, 64]
  %at8 = attention %q, %kv, %kv {heads = 4, kv_heads = 4} #kv(pswf, keep = 0.25, axis = sequence, block = 64, bandwidth = 0.0625, sinks = 4, recent = 256) : f32[seq, 64]
  %kc = matmul %h, %plain : f32[seq, 64]
  %kb = weight "layers.0.kv.kb" : f32[64, 32]
  %at5 = attention %q, %kc, %kv, %kb {heads = 2, kv_heads = 2} #kv(pre_rope, rank = 32, theta = 10000.0, adjacent = true) : f32[seq, 64]
  %ids = input : i32[seq]
  %pos = positions : i32[seq]
  %tok = embedding %w, %ids : f32[seq, 128]
  %pe = embedding %plain, %pos : f32[seq, 64]
  %rq = rope %q {heads = 4, theta = 10000.0, adjacent = true} : f32[seq, 64]
  %rk = rope %kv {heads = 2, theta = 500000.0, adjacent = false} : f32[seq, 64]
  return %m, %gt, %ge, %s, %sm, %c, %at, %at2, %at3, %at4, %at6, %at7, %at8, %at5, %u5, %u6, %u7, %tok, %pe, %rq, %rk
}
"#;

#[test]
fn every_op_and_pattern_round_trips_exactly() {
    let g = parse_graph(EVERY_OP).expect("parses");
    verify(&g).expect("verifies");
    let printed = print_graph(&g);
    assert_eq!(printed, EVERY_OP, "printer output differs from the canonical input");
    assert_eq!(parse_graph(&printed).unwrap(), g);
}

#[test]
fn every_keyword_appears_in_the_round_trip_graph() {
    for kw in Op::KEYWORDS {
        assert!(EVERY_OP.contains(&format!("= {kw} ")), "op `{kw}` missing from EVERY_OP");
    }
    for p in [
        "#sparsity(unstructured",
        "#sparsity(nm",
        "#sparsity(block",
        "#low_rank",
        "#kv(dct",
        "#kv(pswf",
        "#kv(chunked_svd, chunk = 64, rank",
        "energy =",
        "#window(full",
        "#window(sliding",
        "#nsa",
    ] {
        assert!(EVERY_OP.contains(p), "{p} missing");
    }
    for s in Specialize::ALL {
        assert!(EVERY_OP.contains(&format!("#specialize({})", s.name())));
    }
}

#[test]
fn an_op_without_operands_may_precede_the_next_definition() {
    let src = "graph @g {\n  %p = positions\n  %x = input : f32[seq, 2]\n  return %p, %x\n}\n";
    let g = parse_graph(src).unwrap();
    assert!(g.nodes[0].operands.is_empty());
    assert_eq!(print_graph(&g), src);
}

#[test]
fn types_may_be_omitted_and_are_inferred() {
    let src = "graph @g {\n  %x = input : f32[seq, 8]\n  %w = weight \"w\" init ones : f32[8, 3]\n  %y = matmul %x, %w\n  return %y\n}\n";
    let g = parse_graph(src).unwrap();
    let types = verify(&g).unwrap();
    assert_eq!(types[2].to_string(), "f32[seq, 3]");
    assert_eq!(print_graph(&g), src);
}

fn parse_err(src: &str) -> (u32, u32, String) {
    match parse_graph(src) {
        Err(IrError::Parse { line, col, message }) => (line, col, message),
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn unknown_op_is_reported_at_its_location() {
    let (l, c, m) = parse_err("graph @g {\n  %x = input : f32[4]\n  %y = frobnicate %x\n  return %y\n}");
    assert_eq!((l, c), (3, 8));
    assert!(m.contains("unknown op `frobnicate`"), "{m}");
}

#[test]
fn malformed_text_errors_carry_line_and_column() {
    let cases: &[(&str, (u32, u32), &str)] = &[
        ("graph @g {\n  %x = input f32[4]\n  return %x\n}", (2, 14), "needs its type"),
        ("graph @g {\n  %x = input : f33[4]\n  return %x\n}", (2, 16), "unknown element type `f33`"),
        ("graph @g {\n  %x = input : f32[0]\n  return %x\n}", (2, 20), "positive extent"),
        ("graph @g {\n  %y = add %x, %x\n  return %y\n}", (2, 12), "undefined value `%x`"),
        ("graph @g {\n  %x = input : f32[4]\n  %x = input : f32[4]\n  return %x\n}", (3, 3), "defined twice"),
        ("graph @g {\n  %x = input : f32[4]\n  return %x\n", (4, 1), "expected `}`"),
        ("graph @g {\n  %x = input : f32[4] $\n  return %x\n}", (2, 23), "unexpected character"),
        ("graph @g {\n  %w = weight \"w : f32[4]\n  return %w\n}", (2, 15), "unterminated string"),
        ("graph @g {\n  %x = input : f32[4]\n  %y = gelu %x {approx = cubic}\n  return %y\n}", (3, 8), "unknown approx"),
        ("graph @g {\n  %x = input : f32[4]\n  %y = softmax %x {axis = 0}\n  return %y\n}", (3, 8), "unknown attribute `axis`"),
        ("graph @g {\n  %x = input : f32[4, 4]\n  %w = weight \"w\" : f32[4, 4]\n  %y = matmul %x, %w #sparsity(diagonal)\n  return %y\n}", (4, 22), "unknown kind `diagonal`"),
        ("graph @g {\n  %x = input : f32[4]\n  %y = silu %x #frob(a)\n  return %y\n}", (3, 16), "unknown pattern `#frob`"),
        ("graph @g {\n  %w = weight \"w\" init normal(seed = 1) : f32[4]\n  return %w\n}", (2, 24), "missing `std`"),
    ];
    for (src, at, needle) in cases {
        let (l, c, m) = parse_err(src);
        assert!(m.contains(needle), "for {src:?}: message {m:?} lacks {needle:?}");
        assert_eq!((l, c), *at, "for {src:?}: {m}");
    }
}

fn verify_err(src: &str) -> String {
    let g = parse_graph(src).unwrap_or_else(|e| panic!("{src}: {e}"));
    match verify(&g) {
        Err(e @ IrError::Verify { .. }) => e.to_string(),
        other => panic!("expected a verifier error for {src}, got {other:?}"),
    }
}

#[test]
fn mismatched_shapes_name_op_operand_and_location() {
    let m = verify_err("graph @g {\n  %x = input : f32[seq, 8]\n  %w = weight \"w\" : f32[7, 3]\n  %y = matmul %x, %w\n  return %y\n}");
    assert_eq!(m, "4:3: matmul %y: operand 1 has type f32[7, 3], expected f32[8, N] to match operand 0's f32[seq, 8]");
    let m = verify_err(
        "graph @g {\n  %x = input : f32[seq, 8]\n  %w = weight \"w\" : f32[8, 3]\n  %y = matmul %x, %w : f32[seq, 4]\n  return %y\n}",
    );
    assert!(m.starts_with("4:3: matmul %y: declared type f32[seq, 4] but its operands give f32[seq, 3]"), "{m}");
    let m = verify_err("graph @g {\n  %x = input : f32[seq, 8]\n  %b = input : f32[7]\n  %y = add %x, %b\n  return %y\n}");
    assert!(m.contains("add %y") && m.contains("trailing suffix"), "{m}");
    let m = verify_err("graph @g {\n  %x = input : f32[seq, 8]\n  %g = weight \"g\" : f32[4]\n  %y = rms_norm %x, %g\n  return %y\n}");
    assert!(m.contains("operand 1 has type f32[4], expected f32[8]"), "{m}");
    let m = verify_err("graph @g {\n  %t = weight \"t\" : f32[10, 4]\n  %i = input : f32[seq]\n  %e = embedding %t, %i\n  return %e\n}");
    assert!(m.starts_with("4:3: embedding %e: operand 1 (ids) has type f32[seq], expected i32[n]"), "{m}");
    let m = verify_err("graph @g {\n  %x = input : f32[seq, 12]\n  %r = rope %x {heads = 4, theta = 10000.0}\n  return %r\n}");
    assert!(m.contains("rope %r") && m.contains("even head_dim"), "{m}");
    let m = verify_err("graph @g {\n  %c = const [1.0, 2.0] : f32[3]\n  return %c\n}");
    assert!(m.contains("has 2 values, its type f32[3] needs 3"), "{m}");
}

#[test]
fn pattern_invariants_are_verified() {
    let base = |pat: &str| {
        format!("graph @g {{\n  %x = input : f32[seq, 8]\n  %w = weight \"w\" : f32[8, 6]\n  %y = matmul %x, %w {pat}\n  return %y\n}}")
    };
    for (pat, needle) in [
        ("#sparsity(unstructured, ratio = 1.0)", "outside [0, 1)"),
        ("#sparsity(unstructured, ratio = -0.1)", "outside [0, 1)"),
        ("#sparsity(nm, n = 4, m = 2)", "n <= m"),
        ("#sparsity(nm, n = 1, m = 3)", "do not divide the reduction dimension 8"),
        ("#sparsity(block, ratio = 0.5, rows = 4, cols = 4)", "does not divide"),
        ("#low_rank(rank = 7)", "rank 7 exceeds min(8, 6)"),
        ("#low_rank(rank = 0)", "rank must be positive"),
        ("#low_rank(rank = 9, basis = \"b\")", "rank 9 of shared basis \"b\" exceeds the input width 8"),
        ("#low_rank(rank = 2, basis = \"w\")", "basis \"w\" is also the name of a weight"),
        ("#low_rank(rank = 2) #sparsity(unstructured, ratio = 0.5)", "does not combine with #sparsity"),
        ("#low_rank(rank = 2) #specialize(dense)", "does not combine with #specialize"),
        ("#window(full)", "applies to attention ops only"),
        ("#specialize(dense) #specialize(full)", "given twice"),
        ("#values(q4)", "#values(q4) stores the kept values of a #sparsity pattern; this matmul has none"),
        ("#sparsity(nm, n = 2, m = 4) #values(q4) #values(q8)", "pattern #values is given twice"),
    ] {
        let m = verify_err(&base(pat));
        assert!(m.contains(needle), "{pat}: {m}");
        assert!(m.starts_with("4:3: matmul %y:"), "{m}");
    }
    let att = |pat: &str| {
        format!("graph @g {{\n  %q = input : f32[seq, 8]\n  %y = attention %q, %q, %q {{heads = 2, kv_heads = 2}} {pat}\n  return %y\n}}")
    };
    for (pat, needle) in [
        ("#kv(dct, keep = 0.0)", "outside (0, 1]"),
        ("#kv(pswf, keep = 0.5, bandwidth = 0.7)", "bandwidth"),
        ("#kv(chunked_svd, chunk = 4, rank = 8)", "exceeds the chunk length"),
        ("#kv(chunked_svd, chunk = 4, energy = 0.9, max_rank = 8)", "max_rank 8 exceeds the chunk length"),
        ("#kv(chunked_svd, chunk = 4, rank = 2) #window(sliding, size = 4)", "not combined with #window"),
        ("#kv(dct, keep = 0.5, axis = sequence, sinks = 4, recent = 8)", "needs a block length"),
        ("#kv(dct, keep = 0.5, axis = feature, block = 4, sinks = 4)", "belong to the sequence axis"),
        ("#kv(dct, keep = 0.1, axis = sequence, block = 4, recent = 8)", "keeps no position"),
        ("#window(sliding, size = 0)", "window size must be positive"),
        ("#nsa(block = 4, top_n = 2, window = 8) #window(sliding, size = 4)", "own sliding window"),
        ("#nsa(block = 4, top_n = 0, window = 8)", "top_n"),
        ("#sparsity(nm, n = 2, m = 4)", "applies to matmul ops only"),
        ("#kv(pre_rope, rank = 2, theta = 10000.0)", "takes 4 operands"),
    ] {
        let m = verify_err(&att(pat));
        assert!(m.contains(needle), "{pat}: {m}");
    }
    // Keys before RoPE: coefficients [seq, kv_heads·rank], a basis [kv_heads·rank, d].
    let pre = |k: &str, basis: &str, pat: &str| {
        format!("graph @g {{\n  %q = input : f32[seq, 8]\n  %k = input : f32[seq, {k}]\n  %b = weight \"b\" : f32[{basis}]\n  %y = attention %q, %k, %q, %b {{heads = 2, kv_heads = 2}} #kv(pre_rope, rank = 2, theta = 10000.0){pat}\n  return %y\n}}")
    };
    verify(&parse_graph(&pre("4", "4, 4", "")).unwrap()).expect("rank 2 of 2 heads of width 4");
    for (k, basis, pat, needle) in [
        ("6", "4, 4", "", "expected f32[seq, 8]"),
        ("4", "4, 3", "", "expected f32[seq, 8]"),
        ("4", "6, 4", "", "expected f32[seq, 8]"),
        ("4", "4, 4", " #window(sliding, size = 4)", "no sliding #window"),
    ] {
        let m = verify_err(&pre(k, basis, pat));
        assert!(m.contains(needle), "{k} {basis}{pat}: {m}");
    }
}

// ---- property-based round trip over generated graphs ----

fn arb_pattern_matmul() -> impl Strategy<Value = Vec<Pattern>> {
    let sparsity = prop_oneof![
        (0.0f32..0.99).prop_map(|ratio| Pattern::Sparsity(Sparsity::Unstructured { ratio })),
        (1u32..4).prop_map(|n| Pattern::Sparsity(Sparsity::NM { n, m: 4 })),
        (0.0f32..0.99).prop_map(|ratio| Pattern::Sparsity(Sparsity::Block { ratio, rows: 2, cols: 4 })),
    ];
    let spec = prop::sample::select(Specialize::ALL.to_vec()).prop_map(Pattern::Specialize);
    // #low_rank stands alone; a shared basis's name carries its rank (members agree on it).
    (prop::option::of(sparsity), prop::option::of(spec), prop::option::of((1u32..4, any::<bool>()))).prop_map(|(s, sp, lr)| match lr {
        Some((rank, shared)) => vec![Pattern::LowRank(LowRank { rank, basis: shared.then(|| format!("g\"{rank}\\x")) })],
        None => s.into_iter().chain(sp).collect(),
    })
}

fn arb_graph() -> impl Strategy<Value = Graph> {
    let step = (0u8..7, any::<u32>(), arb_pattern_matmul(), -1e6f32..1e6, 1e-8f32..1e-2);
    (prop::collection::vec(step, 1..12), any::<u64>()).prop_map(|(steps, seed)| {
        let mut g = Graph::new("prop");
        let d = 8u64;
        let x = g.push(Node::new("x", Op::Input, vec![]).with_type(TensorType::f32(&[Dim::Seq, Dim::Fixed(d)])));
        let w = g.push(
            Node::new("w", Op::Weight { name: "w.0".into(), init: Some(Init::Normal { seed, std: 0.5 }) }, vec![])
                .with_type(TensorType::f32(&[Dim::Fixed(d), Dim::Fixed(d)])),
        );
        let gamma = g.push(
            Node::new("g", Op::Constant { values: (0..d).map(|i| i as f32 * 0.25 - 1.0).collect() }, vec![])
                .with_type(TensorType::f32(&[Dim::Fixed(d)])),
        );
        let mut cur = x;
        for (i, (kind, pick, pats, cval, eps)) in steps.into_iter().enumerate() {
            let name = format!("v{i}");
            let other = ValueId((pick as usize) % g.nodes.len()).max(x);
            let other = if g.node(other).ty.as_ref().is_some_and(|t| t.dims == [Dim::Seq, Dim::Fixed(d)]) { other } else { cur };
            // A pruned weight is pruned for all its uses, a factored one factored
            // once: sparse and factored matmuls get their own.
            let w = if pats.iter().any(|p| matches!(p, Pattern::Sparsity(_) | Pattern::LowRank(_))) && kind == 0 {
                g.push(
                    Node::new(
                        format!("w{i}"),
                        Op::Weight { name: format!("w.{}", i + 1), init: Some(Init::Normal { seed, std: 0.5 }) },
                        vec![],
                    )
                    .with_type(TensorType::f32(&[Dim::Fixed(d), Dim::Fixed(d)])),
                )
            } else {
                w
            };
            let node = match kind {
                0 => Node::new(name, Op::MatMul { transpose_b: pick % 2 == 0 }, vec![cur, w]).with_patterns(pats),
                1 => Node::new(name, Op::Add, vec![cur, other]),
                2 => Node::new(name, Op::Mul, vec![cur, gamma]),
                3 => Node::new(name, Op::Gelu { approx: if pick % 2 == 0 { GeluApprox::Tanh } else { GeluApprox::Erf } }, vec![cur]),
                4 => Node::new(name, Op::LayerNorm { eps }, vec![cur, gamma, gamma]),
                5 => Node::new(name, Op::Constant { values: vec![cval; d as usize] }, vec![]).with_type(TensorType::f32(&[Dim::Fixed(d)])),
                _ => Node::new(name, Op::Softmax, vec![cur]),
            };
            let is_const = matches!(node.op, Op::Constant { .. });
            let v = g.push(node);
            if !is_const {
                cur = v;
            }
        }
        g.outputs = vec![cur];
        g
    })
}

proptest! {
    #[test]
    fn generated_graphs_round_trip(g in arb_graph()) {
        let text = print_graph(&g);
        let back = parse_graph(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&back, &g);
        prop_assert_eq!(print_graph(&back), text);
        // Generated graphs are well typed by construction; inference must agree.
        verify(&back).map_err(|e| TestCaseError::fail(format!("{e}\n{}", print_graph(&back))))?;
    }

    #[test]
    fn parser_never_panics_on_mutated_text(g in arb_graph(), cut in any::<usize>(), junk in "[%@#=,:\\[\\]{}()a-z0-9\" .-]{0,6}") {
        let text = print_graph(&g);
        let at = cut % (text.len() + 1);
        let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let mutated = format!("{}{}{}", &text[..at], junk, &text[at..]);
        let _ = parse_graph(&mutated).map(|g| verify(&g));
    }
}

#[test]
fn a_shared_basis_agrees_across_its_members() {
    let g = |a: &str, b: &str, wb: &str| {
        format!("graph @g {{\n  %x = input : f32[seq, 8]\n  %w0 = weight \"w0\" : f32[8, 6]\n  %w1 = weight \"w1\" : {wb}\n  %a = matmul %x, %w0 {a}\n  %b = matmul %x, %w1 {b}\n  return %a, %b\n}}")
    };
    let ok = g("#low_rank(rank = 4, basis = \"s\")", "{transpose_b = true} #low_rank(rank = 4, basis = \"s\")", "f32[5, 8]");
    verify(&parse_graph(&ok).unwrap()).expect("one basis, two layers of one input width");
    let m = verify_err(&g("#low_rank(rank = 4, basis = \"s\")", "#low_rank(rank = 3, basis = \"s\")", "f32[8, 6]"));
    assert!(m.starts_with("6:3: matmul %b:") && m.contains("basis \"s\" has rank 4 at `%a`, 3 here"), "{m}");
    let m = verify_err("graph @g {\n  %x = input : f32[seq, 8]\n  %z = input : f32[seq, 4]\n  %w0 = weight \"w0\" : f32[8, 6]\n  %w1 = weight \"w1\" : f32[6, 4]\n  %a = matmul %x, %w0 #low_rank(rank = 4, basis = \"s\")\n  %b = matmul %z, %w1 {transpose_b = true} #low_rank(rank = 4, basis = \"s\")\n  return %a, %b\n}");
    assert!(m.contains("basis \"s\" spans inputs of width 4 here but `%a` multiplies a different width"), "{m}");
    let m = verify_err("graph @g {\n  %x = input : f32[seq, 4]\n  %c = const [1.0, 2.0, 3.0, 4.0] : f32[4, 1]\n  %y = matmul %x, %c #low_rank(rank = 1)\n  return %y\n}");
    assert!(m.contains("#low_rank factors a weight; operand 1 is a constant"), "{m}");
}

#[test]
fn pruned_weights_are_f32_and_pruned_alike_everywhere() {
    let tied = "graph @g {\n  %x = input : f32[seq, 8]\n  %w = weight \"w\" : f32[8, 8]\n  %a = matmul %x, %w #sparsity(nm, n = 2, m = 4)\n  %b = matmul %a, %w\n  return %b\n}";
    let m = verify_err(tied);
    assert!(m.contains("tied weight must be pruned for all its uses"), "{m}");
    let same = "graph @g {\n  %x = input : f32[seq, 8]\n  %w = weight \"w\" : f32[8, 8]\n  %a = matmul %x, %w #sparsity(nm, n = 2, m = 4)\n  %b = matmul %a, %w #sparsity(nm, n = 2, m = 4)\n  return %b\n}";
    verify(&parse_graph(same).unwrap()).expect("pruned alike is fine");
    let quant = "graph @g {\n  %x = input : f32[seq, 32]\n  %w = weight \"w\" : q8_0[8, 32]\n  %a = matmul %x, %w {transpose_b = true} #sparsity(unstructured, ratio = 0.5)\n  return %a\n}";
    let m = verify_err(quant);
    assert!(m.contains("prunes f32 weights"), "{m}");
}
