#!/usr/bin/env python3
"""Long-context attention on this machine, side by side in one run: SmolLM2-135M
Q4_1 with an N-token prompt (default 8000, the start of GPL-3 repeated) and
greedy decode steps, for llama.cpp (flash attention off and on, and with its
q8_0 KV cache) and sparsec (dense, each preset given: window schedules with 4
sinks, native sparse attention; and each quantized KV cache type given), with
the same threads. "vs best llama.cpp" compares with the faster of its f16-cache
runs. Reports prefill and decode tokens/s, sparsec's attention milliseconds
per decoded token and peak memory, and the decode bound the memory allows: the
read bandwidth measured here over the bytes one token reads (the f16 KV cache
at that many positions plus the weights). Writes
benches/results/long_context{SUFFIX}.{json,md,svg}.

    python3 benches/long_context.py [--threads 2] [--prompt-len 8000] [--new-tokens 32] [--rounds 2] [--schedules half,quarter,nsa] [--kv-caches q8_0,q4_1]
        [--plans NAME=PLAN.toml,...]   # more sparsec runs, each compiled with its plan (e.g. chunked-SVD caches)
        [--suffix S]                   # appended to the results' file names (another machine's run, a subset)
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_cpp_compare as lcc  # noqa: E402

ROOT = lcc.ROOT
EXE = os.path.join(ROOT, "target", "release", "sparsec")


def read_bandwidth(threads, gib=1.0):
    """Bytes per second `threads` threads read summing a large array (numpy releases the GIL)."""
    import numpy as np
    a = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t))
    return best


def sparsec_bench(art, threads, prompt_len, new_tokens):
    out = subprocess.check_output([EXE, "bench", art, "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens),
                                   "--threads", str(threads), "--repeat", "1", "--json"], cwd=ROOT)
    r = json.loads(out)
    attn = sum(v["ms_per_token"] for k, v in r["decode_kernels"].items() if "attention" in k)
    return {"prefill_tokens_per_s": r["prefill_tokens_per_s"], "decode_tokens_per_s": r["decode_tokens_per_s"],
            "attention_ms_per_token": attn, "peak_rss_bytes": r["peak_rss_bytes"],
            "kv_bytes_per_position": r["kv"]["bytes_per_position"]}


def inspect_bytes(art):
    """Weight bytes and KV cache bytes per position (all layers, K and V) of an artifact."""
    m = json.loads(subprocess.check_output([EXE, "inspect", art, "--json"], cwd=ROOT))
    weights = sum(os.path.getsize(os.path.join(art, f)) for f in os.listdir(art) if f.startswith("weights"))
    per_pos = 0
    for b in m["execution"]["buffers"]:
        if b["kind"] == "kvcache":
            width = 1
            for d in b["dims"]:
                width *= d["Fixed"] if isinstance(d, dict) else 1
            per_pos += width * (2 if b["dtype"] == "f16" else 4)
    return weights, per_pos


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=8000)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--schedules", default="half,quarter,nsa", help="presets compiled besides dense (windows, nsa)")
    ap.add_argument("--kv-caches", default="q8_0,q4_1", help="sparsec --kv-cache types besides f16 (and llama.cpp's q8_0)")
    ap.add_argument("--plans", default="", help="NAME=PLAN.toml,... : sparsec runs compiled with these plans")
    ap.add_argument("--perplexity-tokens", type=int, default=4096,
                    help="also measure each sparsec run's perplexity on this many tokens of GPL-3 (0: no) and plot it against decode speed")
    ap.add_argument("--suffix", default="", help="appended to the results' file names (another machine's run, a subset of runs)")
    a = ap.parse_args()
    lcc.ensure_llama_cpp()
    subprocess.check_call(["cargo", "build", "-q", "--release", "--bin", "sparsec"], cwd=ROOT)
    q41 = lcc.smollm2()
    bw = read_bandwidth(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        arts = {}
        kv = [k for k in a.kv_caches.split(",") if k]
        plans = dict(p.split("=", 1) for p in a.plans.split(",") if p)
        for name in ["dense"] + [s for s in a.schedules.split(",") if s] + [f"{k} cache" for k in kv] + list(plans):
            art = os.path.join(tmp, f"{name.replace(' ', '_')}.sparsec")
            if name == "dense":
                extra = []
            elif name in plans:
                extra = ["--plan", os.path.abspath(plans[name])]
            elif name.endswith(" cache"):
                extra = ["--kv-cache", name.split()[0]]
            else:
                extra = ["--preset", name]
            subprocess.check_call([EXE, "compile", q41, "-o", art] + extra, cwd=ROOT, stdout=subprocess.DEVNULL)
            arts[name] = art
        weights, per_pos = inspect_bytes(arts["dense"])
        runs = {f"llama.cpp{' flash' if fa else ''}": lcc.llama_cpp_rounds(q41, a.threads, a.prompt_len, a.new_tokens, fa)
                for fa in (False, True)}
        if "q8_0" in kv:
            runs["llama.cpp flash q8_0 cache"] = lcc.llama_cpp_rounds(q41, a.threads, a.prompt_len, a.new_tokens, True, "q8_0")
        results = {k: [] for k in list(runs) + [f"sparsec {n}" for n in arts]}
        for _ in range(max(1, a.rounds)):
            for k, f in runs.items():
                results[k].append(f())
            for n, art in arts.items():
                results[f"sparsec {n}"].append(sparsec_bench(art, a.threads, a.prompt_len, a.new_tokens))
        ppl = {}
        if a.perplexity_tokens > 0:
            for n, art in arts.items():
                out = subprocess.check_output([EXE, "eval", art, "--text", lcc.TEXT, "--max-tokens", str(a.perplexity_tokens),
                                               "--threads", str(a.threads), "--json"], cwd=ROOT)
                ppl[f"sparsec {n}"] = json.loads(out)["perplexity"]
    rows = []
    for k, rs in results.items():
        row = {"name": k}
        for key in rs[0]:
            row[key] = statistics.median(r[key] for r in rs)
        if k in ppl:
            row["perplexity"] = ppl[k]
        rows.append(row)
    token_bytes = weights + per_pos * a.prompt_len
    bound = bw / token_bytes
    f16_llama = [r for r in rows if r["name"].startswith("llama") and "cache" not in r["name"]]
    best_llama = max(r["decode_tokens_per_s"] for r in f16_llama)
    best_llama_prefill = max(r["prefill_tokens_per_s"] for r in f16_llama)
    cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    res = {"machine": {"cpu": cpu, "cores": os.cpu_count(), "threads": a.threads}, "prompt_tokens": a.prompt_len,
           "new_tokens": a.new_tokens, "rounds": a.rounds, "read_bandwidth_bytes_per_s": bw, "weight_bytes": weights,
           "kv_bytes_per_position": per_pos, "decode_bound_tokens_per_s": bound, "rows": rows}
    outdir = os.path.join(ROOT, "benches", "results")
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, f"long_context{a.suffix}.json"), "w") as f:
        json.dump(res, f, indent=2)
    md = [f"Machine: {cpu}, {os.cpu_count()} cores, {a.threads} threads; SmolLM2-135M Q4_1, prompt {a.prompt_len} tokens "
          f"(GPL-3 repeated), {a.new_tokens} greedy decode steps; medians of {a.rounds} interleaved rounds; f16 KV caches. "
          f"Read bandwidth {bw / 1e9:.1f} GB/s; one dense token reads {token_bytes / 1e6:.0f} MB "
          f"({weights / 1e6:.0f} MB weights + {per_pos * a.prompt_len / 1e6:.0f} MB cache): bound {bound:.1f} tok/s.", "",
          "| run | decode tok/s | vs best llama.cpp | % of bound | prefill tok/s | vs best llama.cpp | attention ms/token | peak RSS MB | KV B/position |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        attn = f"{r['attention_ms_per_token']:.2f}" if "attention_ms_per_token" in r else "-"
        peak = f"{r['peak_rss_bytes'] / 1e6:.0f}" if "peak_rss_bytes" in r else "-"
        kvb = f"{r['kv_bytes_per_position']:.0f}" if "kv_bytes_per_position" in r else "-"
        md.append(f"| {r['name']} | {r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / best_llama:.2f}x | "
                  f"{100 * r['decode_tokens_per_s'] / bound:.0f}% | {r['prefill_tokens_per_s']:.1f} | "
                  f"{r['prefill_tokens_per_s'] / best_llama_prefill:.2f}x | {attn} | {peak} | {kvb} |")
    if ppl:
        md += ["", f"Perplexity on the first {a.perplexity_tokens} tokens of {os.path.basename(lcc.TEXT)} (sparsec eval, compiled): "
               + ", ".join(f"{k[len('sparsec '):]} {v:.2f}" for k, v in ppl.items()) + f"; plotted against decode tok/s in long_context{a.suffix}.svg."]
        with open(os.path.join(outdir, f"long_context{a.suffix}.svg"), "w") as f:
            f.write(plot([(r["name"][len("sparsec "):], r["decode_tokens_per_s"], r["perplexity"]) for r in rows if "perplexity" in r],
                         f"SmolLM2-135M Q4_1, {a.prompt_len}-token prompt, {a.threads} threads ({cpu})",
                         f"perplexity, {a.perplexity_tokens} tokens"))
    with open(os.path.join(outdir, f"long_context{a.suffix}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


def plot(points, title, ylabel, xlabel="decode tokens/s"):
    """An SVG scatter of (label, x, y) points: decode tok/s and perplexity by default."""
    w, h, m = 720, 440, 70
    xs = [p[1] for p in points]
    ys = [p[2] for p in points]
    x0, x1 = 0, max(xs) * 1.15
    y0, y1 = min(ys) * 0.95, max(ys) * 1.05
    sx = lambda x: m + (x - x0) / (x1 - x0) * (w - 2 * m)
    sy = lambda y: h - m - (y - y0) / (y1 - y0) * (h - 2 * m)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
           f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle">{xlabel}</text>',
           f'<text x="18" y="{h / 2}" text-anchor="middle" transform="rotate(-90 18 {h / 2})">{ylabel}</text>']
    for i in range(6):
        xv = x0 + (x1 - x0) * i / 5
        yv = y0 + (y1 - y0) * i / 5
        out.append(f'<text x="{sx(xv)}" y="{h - m + 16}" text-anchor="middle">{xv:.0f}</text>')
        out.append(f'<text x="{m - 6}" y="{sy(yv) + 4}" text-anchor="end">{yv:.1f}</text>')
    for label, x, y in points:
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="steelblue"/>')
        out.append(f'<text x="{sx(x) + 6:.1f}" y="{sy(y) - 6:.1f}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
