#!/usr/bin/env python3
"""Passkey retrieval: a five-digit number hidden at several depths of filler
text, the model asked for it at the end, greedy decoding; for SmolLM2-135M
dense and with each window schedule given (4 sinks), through sparsec's
compiled model (and with each plan given by `--plans`). A trial passes when
the number appears in the first tokens generated. Writes
benches/results/passkey.{json,md}.

    python3 benches/passkey.py [--lengths 1000,2000,4000] [--depths 0.1,0.5,0.9] [--keys 3] [--schedules half,quarter]
                               [--plans NAME=PLAN.toml,...] [--no-dense] [--out passkey]
"""
import argparse, json, os, random, subprocess, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXE = os.path.join(ROOT, "target", "release", "sparsec")
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will ask you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
# About 3.1 characters per SmolLM2 token on the filler.
CHARS_PER_TOKEN = 3.1


def prompt(tokens, depth, key):
    n = max(1, int(tokens * CHARS_PER_TOKEN / len(FILLER)))
    at = int(n * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return INTRO + FILLER * at + needle + FILLER * (n - at) + QUESTION


def ask(art, text, threads):
    out = subprocess.check_output([EXE, "run", art, "--prompt", text, "--max-new-tokens", "8", "--threads", str(threads), "--json"],
                                  cwd=ROOT)
    r = json.loads(out)
    return r["text"], r["prompt_tokens"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1000,2000,4000")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--keys", type=int, default=3)
    ap.add_argument("--schedules", default="half,quarter")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plans", default="", help="NAME=PLAN.toml,... : models compiled with these plans")
    ap.add_argument("--no-dense", action="store_true", help="leave out the dense baseline")
    ap.add_argument("--out", default="passkey", help="results name under benches/results (NAME.json, NAME.md)")
    a = ap.parse_args()
    rng = random.Random(7)
    keys = [rng.randrange(10000, 100000) for _ in range(a.keys)]
    lengths = [int(x) for x in a.lengths.split(",")]
    depths = [float(x) for x in a.depths.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plans = dict(p.split("=", 1) for p in a.plans.split(",") if p)
        for i, name in enumerate(([] if a.no_dense else ["dense"]) + [s for s in a.schedules.split(",") if s] + list(plans)):
            art = os.path.join(tmp, f"{i}.sparsec")
            if name in plans:
                extra = ["--plan", os.path.abspath(plans[name])]
            else:
                extra = [] if name == "dense" else ["--preset", name]
            subprocess.check_call([EXE, "compile", "smollm2", "-o", art] + extra, cwd=ROOT, stdout=subprocess.DEVNULL)
            for length in lengths:
                for depth in depths:
                    hits, tokens = 0, 0
                    for key in keys:
                        text, tokens = ask(art, prompt(length, depth, key), a.threads)
                        hits += str(key) in text.replace(" ", "")
                    rows.append({"model": name, "tokens": tokens, "depth": depth, "found": hits, "trials": len(keys)})
                    print(f"{name} {tokens} tokens depth {depth}: {hits}/{len(keys)}", flush=True)
    cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    outdir = os.path.join(ROOT, "benches", "results")
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, f"{a.out}.json"), "w") as f:
        json.dump({"machine": cpu, "keys": keys, "rows": rows}, f, indent=2)
    models = list(dict.fromkeys(r["model"] for r in rows))
    md = [f"SmolLM2-135M Q4_1 through sparsec (compiled), greedy; passkeys found of {len(keys)} per cell; "
          f"windows with 4 sinks. Columns: prompt tokens @ depth.", "",
          "| model | " + " | ".join(f"{r['tokens']} @ {r['depth']:.0%}" for r in rows if r["model"] == models[0]) + " |",
          "| --- |" + " --- |" * sum(r["model"] == models[0] for r in rows)]
    for m in models:
        md.append(f"| {m} | " + " | ".join(f"{r['found']}/{r['trials']}" for r in rows if r["model"] == m) + " |")
    with open(os.path.join(outdir, f"{a.out}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
