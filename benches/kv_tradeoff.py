#!/usr/bin/env python3
"""Compressed KV caches of SmolLM2-135M Q4_1, side by side in one run:
perplexity on the first N tokens of GPL-3 (default 4096) against the KV bytes
one position takes (all 30 layers, K and V), for the block-quantized caches
(with and without Hadamard rotation and KIVI's per-channel keys), the
feature-axis PCA basis after RoPE, keys before RoPE in a score-fitted
basis, chunked-SVD caches (chunks of 64 positions at fixed ranks and at
energy thresholds) and sequence-axis DCT and PSWF caches (blocks of 64 older
than the last 256 positions read low-pass, 4 sinks; PSWF at its default
bandwidth, keep/4); the KV bytes of the last two are
a record's share per position (their exact rows, a fixed 0.2-0.3 MB per
cache, are left out). `--only` measures some rows again and keeps the
others from the last results. Bases calibrate on the plan's default text (GPL-2 + LGPL-2.1 +
Artistic). Writes benches/results/kv_tradeoff.{json,md,svg}.

    python3 benches/kv_tradeoff.py [--tokens 4096] [--only NAME,...]
"""
import argparse, json, os, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import long_context as lc  # noqa: E402

ROOT = lc.ROOT
EXE = lc.EXE
GPL3 = "/usr/share/common-licenses/GPL-3"


def kv_rule(table):
    return f'[[rule]]\nlayers = "all"\nkv = {{ {table} }}\n'


# name, compile flags, plan (None: none)
CONFIGS = [
    ("f16", [], None),
    ("q8_0", ["--kv-cache", "q8_0"], None),
    ("q4_1", ["--kv-cache", "q4_1"], None),
    ("q4_1 hadamard", ["--kv-cache", "q4_1", "--kv-hadamard"], None),
    ("q4_1 kivi", ["--kv-cache", "q4_1", "--kv-kivi"], None),
    ("q4_1 kivi hadamard", ["--kv-cache", "q4_1", "--kv-kivi", "--kv-hadamard"], None),
    ("q4_0 hadamard", ["--kv-cache", "q4_0", "--kv-hadamard"], None),
    ("pca 0.75", [], kv_rule('transform = "pca", keep = 0.75')),
    ("pca 0.5", [], kv_rule('transform = "pca", keep = 0.5')),
    ("pre-rope 0.75", [], kv_rule('transform = "pca", keep = 0.75, rope = "before", fit = "scores"')),
    ("pre-rope 0.5", [], kv_rule('transform = "pca", keep = 0.5, rope = "before", fit = "scores"')),
    ("pre-rope 0.25", [], kv_rule('transform = "pca", keep = 0.25, rope = "before", fit = "scores"')),
    ("pre-rope 0.5 q8_0", ["--kv-cache", "q8_0"], kv_rule('transform = "pca", keep = 0.5, rope = "before", fit = "scores"')),
    ("pre-rope 0.5 q4_1", ["--kv-cache", "q4_1"], kv_rule('transform = "pca", keep = 0.5, rope = "before", fit = "scores"')),
    ("chunked svd r32", [], kv_rule('transform = "chunked_svd", chunk = 64, rank = 32')),
    ("chunked svd r16", [], kv_rule('transform = "chunked_svd", chunk = 64, rank = 16')),
    ("chunked svd r8", [], kv_rule('transform = "chunked_svd", chunk = 64, rank = 8')),
    ("chunked svd e0.99", [], kv_rule('transform = "chunked_svd", chunk = 64, energy = 0.99')),
    ("chunked svd e0.95", [], kv_rule('transform = "chunked_svd", chunk = 64, energy = 0.95')),
    ("chunked svd e0.9", [], kv_rule('transform = "chunked_svd", chunk = 64, energy = 0.9')),
    ("sequence dct 0.75", [], kv_rule('transform = "dct", axis = "sequence", keep = 0.75, block = 64, sinks = 4, recent = 256')),
    ("sequence dct 0.5", [], kv_rule('transform = "dct", axis = "sequence", keep = 0.5, block = 64, sinks = 4, recent = 256')),
    ("sequence dct 0.25", [], kv_rule('transform = "dct", axis = "sequence", keep = 0.25, block = 64, sinks = 4, recent = 256')),
    ("sequence pswf 0.75", [], kv_rule('transform = "pswf", axis = "sequence", keep = 0.75, block = 64, sinks = 4, recent = 256')),
    ("sequence pswf 0.5", [], kv_rule('transform = "pswf", axis = "sequence", keep = 0.5, block = 64, sinks = 4, recent = 256')),
    ("sequence pswf 0.25", [], kv_rule('transform = "pswf", axis = "sequence", keep = 0.25, block = 64, sinks = 4, recent = 256')),
]


def run(cmd):
    return subprocess.check_output(cmd, cwd=ROOT, stderr=subprocess.DEVNULL, text=True)


def measure(tmp, name, flags, plan, tokens):
    art = os.path.join(tmp, name.replace(" ", "_") + ".sparsec")
    cmd = [EXE, "compile", "smollm2", "-o", art] + flags
    if plan:
        path = art + ".toml"
        with open(path, "w") as f:
            f.write(plan)
        cmd += ["--plan", path]
    run(cmd)
    out = run([EXE, "eval", art, "--text", GPL3, "--max-tokens", str(tokens)])
    ppl = float(next(l for l in out.splitlines() if l.startswith("perplexity:")).split()[1])
    kv = json.loads(run([EXE, "bench", art, "--prompt-len", "16", "--new-tokens", "1", "--json"]))["kv"]
    return {"name": name, "flags": flags, "plan": plan, "perplexity": ppl, "kv_bytes_per_position": kv["bytes_per_position"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    subprocess.check_call(["cargo", "build", "--release", "--workspace"], cwd=ROOT)
    only = [n for n in a.only.split(",") if n]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags, plan in CONFIGS:
            if only and name not in only:
                continue
            r = measure(tmp, name, flags, plan, a.tokens)
            print(f"{name}: perplexity {r['perplexity']:.2f}, {r['kv_bytes_per_position']} KV bytes per position", flush=True)
            rows.append(r)
    if only:
        # Keep the other rows of the last run, in CONFIGS order.
        path = os.path.join(ROOT, "benches", "results", "kv_tradeoff.json")
        old = {r["name"]: r for r in json.load(open(path))["rows"]} if os.path.exists(path) else {}
        new = {r["name"]: r for r in rows}
        rows = [new.get(n) or old[n] for n, _, _ in CONFIGS if n in new or n in old]
    base = next((r for r in rows if r["name"] == "f16"), None)
    outdir = os.path.join(ROOT, "benches", "results")
    with open(os.path.join(outdir, "kv_tradeoff.json"), "w") as f:
        json.dump({"tokens": a.tokens, "text": GPL3, "rows": rows}, f, indent=1)
    md = [f"SmolLM2-135M Q4_1, perplexity on the first {a.tokens} tokens of GPL-3; KV bytes per position over 30 layers, K and V.", "",
          "| cache | KV bytes per position | vs f16 | perplexity | vs f16 |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        rb = f"{r['kv_bytes_per_position'] / base['kv_bytes_per_position']:.0%}" if base else ""
        rp = f"{(r['perplexity'] / base['perplexity'] - 1) * 100:+.1f}%" if base else ""
        md.append(f"| {r['name']} | {r['kv_bytes_per_position']} | {rb} | {r['perplexity']:.2f} | {rp} |")
    with open(os.path.join(outdir, "kv_tradeoff.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(outdir, "kv_tradeoff.svg"), "w") as f:
        f.write(lc.plot([(r["name"], r["kv_bytes_per_position"], r["perplexity"]) for r in rows],
                        f"SmolLM2 KV caches: perplexity (GPL-3, {a.tokens} tokens) against bytes", "perplexity", "KV bytes per position"))
    print("\n".join(md))


if __name__ == "__main__":
    main()
