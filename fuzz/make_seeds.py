#!/usr/bin/env python3
"""Writes the fuzzers' seed corpus (fuzz/corpus/<target>/): small valid inputs
each target starts mutating from. Run from the repository root after
`cargo build` (or --release); the artifact seeds are compiled with that sparsec.
The seeds are committed: tests/fuzz_regressions.rs replays them in CI."""

import json
import pathlib
import shutil
import struct
import subprocess
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def put(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def framed(*parts):
    """Length-prefixed parts (u32 LE), the last one as is (harness::split)."""
    out = b""
    for p in parts[:-1]:
        out += struct.pack("<I", len(p)) + p
    return out + parts[-1]


def ir_text():
    for p in sorted((ROOT / "tests" / "filetests").glob("*.sir")) + sorted((ROOT / "examples").glob("*.sir")):
        if p.stat().st_size < 8192:
            put("ir_text", p.name, p.read_bytes())


def plan():
    plans = {
        "sparse.toml": '[[rule]]\nlayers = "0..2"\ntarget = "mlp.*,attn.q"\nsparsity = { kind = "unstructured", ratio = 0.9 }\nspecialize = "auto"\n',
        "nm.toml": '[[rule]]\ntarget = "mlp.*"\nsparsity = { kind = "nm", n = 2, m = 4 }\nspecialize = "generic"\n',
        "block.toml": '[[rule]]\nlayers = "1,2"\ntarget = "attn.*"\nsparsity = { kind = "block", ratio = 0.5, block = [4, 4] }\n',
        "window.toml": '[[rule]]\nlayers = "1.."\nattention = { window = { schedule = "progressive", start = 64, end = 16, sinks = 4 } }\n',
        "refused.toml": '[[rule]]\nkv = { transform = "dct", keep = 0.5 }\n',
    }
    for name, text in plans.items():
        put("plan", name, text)


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf():
    """A one-layer Llama in GGUF v3, f32 tensors."""
    dim, ffn, vocab, kv = 8, 16, 16, 4
    meta = [
        ("general.architecture", 8, gguf_string("llama")),
        ("llama.context_length", 4, struct.pack("<I", 64)),
        ("llama.embedding_length", 4, struct.pack("<I", dim)),
        ("llama.block_count", 4, struct.pack("<I", 1)),
        ("llama.feed_forward_length", 4, struct.pack("<I", ffn)),
        ("llama.attention.head_count", 4, struct.pack("<I", 2)),
        ("llama.attention.head_count_kv", 4, struct.pack("<I", 1)),
        ("llama.rope.freq_base", 6, struct.pack("<f", 10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", 1e-5)),
        ("general.alignment", 4, struct.pack("<I", 32)),
        ("tokenizer.ggml.model", 8, gguf_string("gpt2")),
        ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, vocab) + b"".join(gguf_string(c) for c in "abcdefghijklmno") + gguf_string("ab")),
        ("tokenizer.ggml.merges", 9, struct.pack("<IQ", 8, 1) + gguf_string("a b")),
        ("tokenizer.ggml.eos_token_id", 4, struct.pack("<I", 1)),
    ]
    tensors = [
        ("token_embd.weight", [dim, vocab]),
        ("blk.0.attn_norm.weight", [dim]),
        ("blk.0.attn_q.weight", [dim, dim]),
        ("blk.0.attn_k.weight", [dim, kv]),
        ("blk.0.attn_v.weight", [dim, kv]),
        ("blk.0.attn_output.weight", [dim, dim]),
        ("blk.0.ffn_norm.weight", [dim]),
        ("blk.0.ffn_gate.weight", [dim, ffn]),
        ("blk.0.ffn_up.weight", [dim, ffn]),
        ("blk.0.ffn_down.weight", [ffn, dim]),
        ("output_norm.weight", [dim]),
    ]
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, ty, v in meta:
        out += gguf_string(k) + struct.pack("<I", ty) + v
    data, offset = b"", 0
    for name, dims in tensors:
        n = 1
        for d in dims:
            n *= d
        out += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", 0, offset)
        blob = struct.pack(f"<{n}f", *[((i * 7919) % 13 - 6) / 10 for i in range(n)])
        blob += b"\0" * (-len(blob) % 32)
        data += blob
        offset += len(blob)
    out += b"\0" * (-len(out) % 32)
    put("gguf", "llama_1layer.gguf", out + data)


def safetensors_dir():
    for name in ("llama_tiny", "gpt2_tiny"):
        d = ROOT / "tests" / "fixtures" / "hf" / name
        put("safetensors_dir", name, framed((d / "config.json").read_bytes(), (d / "model.safetensors").read_bytes()))


def artifact():
    sparsec = next(p for p in (ROOT / "target" / t / "sparsec" for t in ("release", "debug")) if p.exists())
    graphs = {
        "dense": ("f32", ""),
        "q4_1": ("q4_1", ""),
        "csr": ("f32", "#sparsity(unstructured, ratio = 0.8) #specialize(generic)"),
        "nm": ("f32", "#sparsity(nm, n = 2, m = 4) #specialize(generic)"),
        "bsr": ("f32", "#sparsity(block, ratio = 0.5, rows = 4, cols = 4) #specialize(generic)"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, (ty, pat) in graphs.items():
            src = (
                f"graph @{name} {{\n  %x = input : f32[seq, 64]\n  %w = weight \"w\" init normal(seed = 1, std = 0.3) : {ty}[32, 64]\n"
                f"  %h = matmul %x, %w {{transpose_b = true}} {pat}\n"
                "  %y = attention %h, %h, %h {heads = 2, kv_heads = 2}\n  return %y\n}\n"
            )
            g = pathlib.Path(tmp) / f"{name}.sir"
            g.write_text(src)
            out = pathlib.Path(tmp) / f"{name}.sparsec"
            # A portable CPU target: the seeds validate on any x86-64 host with AVX2.
            r = subprocess.run([str(sparsec), "compile", str(g), "-o", str(out), "--no-cache", "--cpu", "x86-64-v3"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"compiling {name}: {r.stderr}")
            parts = [(out / f).read_bytes() for f in ("manifest.json", "graph.sir", "weights.safetensors")]
            put("artifact", f"{name}-sealed", b"\0" + framed(*parts))
            put("artifact", f"{name}-raw", b"\1" + framed(*parts))


if __name__ == "__main__":
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    ir_text()
    plan()
    gguf()
    safetensors_dir()
    artifact()
    for d in sorted(CORPUS.iterdir()):
        print(d.name, len(list(d.iterdir())), "seeds")
