#!/usr/bin/env python3
"""Sparse GEMV: sparsec's kernels against its own dense kernel and scipy.sparse,
side by side in one run on this machine, one thread, on the same matrices.

For each MLP shape of SmolLM2 and GPT-2, sparsec compiles a graph of matmuls
with `init` weights (dense f32; 90% unstructured as CSR; 2:4 as N:M; 80% 4x4
blocks as BSR, all `generic`), and `sparsec bench --seq 1` times it. scipy gets
the very same pruned matrices: the script reads the CSR bytes back from the
artifact (`ir/src/sparse.rs` documents the layout) into `scipy.sparse.csr_matrix`.

Two regimes: `hot` runs one matrix over and over (it stays in cache); `cold`
runs enough copies (at least 128 MB of dense weights) that every matrix comes
from memory, as in a model's decode step. Times are per matrix.

    python3 benches/sparse_gemv_compare.py [--repeat 300]   # SPARSEC=path/to/sparsec to skip the release build

Writes benches/results/sparse_gemv_compare.{md,json}.
"""
import argparse, json, os, platform, struct, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [("SmolLM2 mlp.up", 1536, 576), ("SmolLM2 mlp.down", 576, 1536), ("GPT-2 mlp.up", 3072, 768), ("GPT-2 mlp.down", 768, 3072)]
VARIANTS = [
    ("dense", ""),
    ("csr 90%", "#sparsity(unstructured, ratio = 0.9) #specialize(generic)"),
    ("2:4", "#sparsity(nm, n = 2, m = 4) #specialize(generic)"),
    ("bsr 4x4 80%", "#sparsity(block, ratio = 0.8, rows = 4, cols = 4) #specialize(generic)"),
]
COLD_BYTES = 128 << 20


def ensure(mod, pkg):
    try:
        __import__(mod)
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "install", pkg])


def sparsec_bin():
    if os.environ.get("SPARSEC"):
        return os.environ["SPARSEC"]
    exe = os.path.join(ROOT, "target", "release", "sparsec")
    if not os.path.exists(exe):
        subprocess.check_call(["cargo", "build", "--release", "-q", "--bin", "sparsec"], cwd=ROOT)
    return exe


def graph(name, n, k, pattern, copies):
    lines = [f"graph @{name} {{", f"  %x = input : f32[seq, {k}]"]
    for c in range(copies):
        lines.append(f'  %w{c} = weight "w{c}" init normal(seed = {c + 1}, std = 0.02) : f32[{n}, {k}]')
        lines.append(f"  %y{c} = matmul %x, %w{c} {{transpose_b = true}} {pattern}")
    lines.append("  return " + ", ".join(f"%y{c}" for c in range(copies)))
    lines.append("}")
    return "\n".join(lines) + "\n"


def read_csr(artifact, name, n, k):
    """The CSR bytes of weight `name` from the artifact, as a scipy matrix."""
    import numpy as np, scipy.sparse as sp
    with open(os.path.join(artifact, "weights.safetensors"), "rb") as f:
        hlen = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(hlen))
        base = 8 + hlen
        start, end = header[name]["data_offsets"]
        f.seek(base + start)
        raw = f.read(end - start)
    ptr = np.frombuffer(raw, dtype="<u4", count=n + 1)
    nnz = int(ptr[-1])
    vals = np.frombuffer(raw, dtype="<f4", count=nnz, offset=(n + 1) * 4)
    cols = np.frombuffer(raw, dtype="<u2" if k <= 65536 else "<u4", count=nnz, offset=(n + 1) * 4 + nnz * 4)
    return sp.csr_matrix((vals.astype(np.float32), cols.astype(np.int32), ptr.astype(np.int32)), shape=(n, k))


def bench_sparsec(exe, sir, art, repeat):
    subprocess.check_call([exe, "compile", sir, "-o", art, "--no-cache"], stdout=subprocess.DEVNULL)
    env = dict(os.environ, SPARSEC_THREADS="1")
    out = subprocess.check_output([exe, "bench", art, "--seq", "1", "--repeat", str(repeat), "--json"], env=env)
    return json.loads(out)["run_cpu_ms_median"] * 1e3  # µs


def bench_scipy(mats, k, repeat):
    import numpy as np
    x = np.random.default_rng(0).standard_normal(k).astype(np.float32)
    for m in mats:
        m @ x
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for m in mats:
            m @ x
        times.append((time.perf_counter() - t) * 1e6)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=300)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ensure("numpy", "numpy")
    ensure("scipy", "scipy")
    import scipy
    exe = sparsec_bin()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, n, k in SHAPES:
            for regime in ("hot", "cold"):
                copies = 1 if regime == "hot" else max(2, -(-COLD_BYTES // (n * k * 4)))
                res = {"shape": label, "n": n, "k": k, "regime": regime, "copies": copies}
                for vname, pattern in VARIANTS:
                    sir = os.path.join(tmp, "g.sir")
                    art = os.path.join(tmp, "g.sparsec")
                    with open(sir, "w") as f:
                        f.write(graph("g", n, k, pattern, copies))
                    us = bench_sparsec(exe, sir, art, a.repeat if copies == 1 else max(10, a.repeat // copies))
                    res[vname] = us / copies
                    if vname == "csr 90%":
                        mats = [read_csr(art, f"w{c}", n, k) for c in range(copies)]
                        res["scipy csr 90%"] = bench_scipy(mats, k, a.repeat if copies == 1 else max(10, a.repeat // copies)) / copies
                    subprocess.run(["rm", "-rf", art])
                res["csr/dense"] = res["dense"] / res["csr 90%"]
                res["csr/scipy"] = res["scipy csr 90%"] / res["csr 90%"]
                res["2:4/dense"] = res["dense"] / res["2:4"]
                res["bsr/dense"] = res["dense"] / res["bsr 4x4 80%"]
                rows.append(res)
                print(json.dumps(res), file=sys.stderr)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; scipy {scipy.__version__}"
    md = [f"Sparse GEMV, one thread, µs per matrix (median); {machine}", "",
          "| shape | regime | dense | csr 90% | scipy csr 90% | 2:4 | bsr 4x4 80% | csr vs dense | csr vs scipy | 2:4 vs dense | bsr vs dense |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['shape']} ({r['n']}x{r['k']}) | {r['regime']} | {r['dense']:.1f} | {r['csr 90%']:.1f} | {r['scipy csr 90%']:.1f} | {r['2:4']:.1f} | {r['bsr 4x4 80%']:.1f} | {r['csr/dense']:.2f}x | {r['csr/scipy']:.2f}x | {r['2:4/dense']:.2f}x | {r['bsr/dense']:.2f}x |")
    out = os.path.join(ROOT, "benches", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sparse_gemv_compare.json"), "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=2)
    with open(os.path.join(out, "sparse_gemv_compare.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
