#!/usr/bin/env python3
"""The table of run.sh's results (JSON files in the folder given): decode
tokens/s of sparsec (CUDA graph and not), PyTorch eager and PyTorch's CUDA-graph
static-cache decode, the weight bandwidth decode reaches, and greedy-id agreement."""
import json
import os
import sys

J, ART = sys.argv[1], sys.argv[2]


def load(name):
    try:
        return json.load(open(os.path.join(J, name)))
    except Exception as e:  # a missing run is shown, not hidden
        return {"error": str(e)}


def weight_bytes(art):
    m = json.load(open(os.path.join(ART, art + ".sparsec", "manifest.json")))
    total = 0
    for b in m["execution"]["buffers"]:
        if b["kind"] != "weight":
            continue
        n = 1
        for d in b["dims"]:
            n *= d["Fixed"] if isinstance(d, dict) else 1
        total += n * {"f32": 4, "f16": 2, "bf16": 2}.get(b["dtype"], 4)
    return total


def agree(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


print("| artifact | sparsec graph tok/s | ms/token | no graph tok/s | prefill 128 ms | weight GB/s (graph) |")
print("| --- | --- | --- | --- | --- | --- |")
for a in ["gpt2-f16", "llama-bf16", "gpt2-f32", "llama-f32"]:
    g, n = load(a + "-g.json").get("bench", {}), load(a + "-n.json").get("bench", {})
    if not g:
        print(f"| {a} | missing |")
        continue
    wb = weight_bytes(a)
    ms = g["decode_ms_per_token"]
    print(f"| {a} | {g['decode_tokens_per_s']:.1f} | {ms:.3f} | {n.get('decode_tokens_per_s', float('nan')):.1f} | "
          f"{1e3 * g['timing']['prefill_s']:.2f} | {wb / (ms * 1e-3) / 1e9:.0f} ({wb / 1e6:.0f} MB/token) |")
for f, a in [("gpt2", "gpt2-f16"), ("llama", "llama-bf16")]:
    t, s = load(f + "-torch.json"), load(a + "-g.json").get("bench", {})
    if "eager_decode_tokens_per_s" not in t:
        print(f"torch {f}: {t}")
        continue
    line = f"torch {f} {t['dtype']}: eager {t['eager_decode_tokens_per_s']:.1f} tok/s"
    if "graph_decode_tokens_per_s" in t:
        line += f", CUDA-graph static cache {t['graph_decode_tokens_per_s']:.1f} tok/s (ids agree with eager {t['graph_ids_agree_with_eager']}/128)"
    else:
        line += f", graph failed: {t.get('graph_error')}"
    if s:
        line += f"; sparsec {a} ids agree with torch eager {agree(s['ids'], t['eager_ids'])}/128"
        if "graph_ids" in t:
            line += f", with torch graph {agree(s['ids'], t['graph_ids'])}/128"
    print(line)
for a in ["gpt2-f16", "llama-bf16"]:
    p = load(a + "-n.json").get("profile_ms_per_token", {})
    top = sorted(p.items(), key=lambda kv: -kv[1]["ms"])[:6]
    print(f"{a} profile (no graph, each launch synchronized), ms/token: " + ", ".join(f"{k} {v['ms']:.3f}" for k, v in top))
l, t = load("gpt2-f16-long.json").get("bench", {}), load("gpt2-torch-long.json")
if l:
    line = f"long context (960-token prompt, 64 new): sparsec gpt2-f16 {l['decode_tokens_per_s']:.1f} tok/s"
    if "graph_decode_tokens_per_s" in t:
        line += f"; torch f16 eager {t['eager_decode_tokens_per_s']:.1f}, CUDA-graph static cache {t['graph_decode_tokens_per_s']:.1f}"
        line += f"; ids agree with torch eager {agree(l['ids'], t['eager_ids'])}/64"
    else:
        line += f"; torch: {t}"
    print(line)
