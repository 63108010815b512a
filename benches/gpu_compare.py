#!/usr/bin/env python3
"""sparsec against PyTorch on the same random checkpoints, on the GPU machine.

Subcommands:
  make DIR --family gpt2|llama [--placeholder] [--vocab N] [--layers N]
      A seeded random checkpoint in Hugging Face layout (config.json,
      model.safetensors): GPT-2 124M, or a SmolLM2-135M-shaped Llama. With
      torch (the GPU machine): normal(0, 0.02) weights, norms near 1. With
      --placeholder (no torch needed, pure Python): deterministic values of
      the same shapes, only for compiling the artifact on a machine without
      torch; the weights are then replaced on the GPU machine by `pack`.
  pack HF_DIR ARTIFACT
      Writes ARTIFACT/weights.safetensors from the HF checkpoint in the
      artifact's role names and layout (GPT-2: Conv1D weights transposed, fused
      QKV split; Llama: as HF stores them), in each weight's type (f32, or
      f16/bf16 rounded to nearest even, as the compiler packs them). Run
      sparsec-run with --trust afterwards (the file's hash in the manifest is
      the placeholder's). Dense artifacts only; the runtime's own packing
      (an artifact compiled with `--strip-weights`, run as `sparsec-run
      ARTIFACT --weights HF_DIR`) also prunes and packs sparse weights and
      needs neither this step nor --trust.
  torch HF_DIR --prompt-ids FILE --new-tokens N --dtype float32|float16|bfloat16
      Decode tokens/s at batch 1 after the prompt: transformers eager with its
      dynamic KV cache, and PyTorch's best here: a hand-written static-KV-cache
      decode step (the HF weights, the HF model's arithmetic) captured once as
      a CUDA graph (torch.cuda.CUDAGraph) and replayed, the argmax and the
      position's advance inside the graph. With --hf-compile also transformers'
      static cache under torch.compile(mode="reduce-overhead"). Prints one JSON
      line, with the greedy ids (to check against sparsec's on the same weights).
  torch-prefill HF_DIR --dtype float16|bfloat16 [--lengths 128,512,960]
      One forward over a seeded random prompt of each length, as transformers
      runs it (eager, median of 7 after 3 warm-ups) and captured once as a CUDA
      graph and replayed (median of 7). Prints one JSON line of milliseconds.
  ncu-summary CSV LABEL
      Kernel time by kernel from `ncu --csv --metrics gpu__time_duration.sum`:
      launches, total and mean per launch, and the last launch's grid.
"""
import argparse
import array
import json
import os
import struct
import sys
import time

GPT2 = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def config(family):
    if family == "gpt2":
        c = dict(GPT2, model_type="gpt2", architectures=["GPT2LMHeadModel"], activation_function="gelu_new",
                 layer_norm_epsilon=1e-5, n_inner=None, bos_token_id=50256, eos_token_id=50256,
                 attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, scale_attn_weights=True, torch_dtype="float32")
    else:
        c = dict(SMOLLM2, model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                 attention_bias=False, mlp_bias=False, bos_token_id=0, eos_token_id=0, torch_dtype="float32")
    return c


def shapes(family):
    """HF tensor names and shapes."""
    out = []
    if family == "gpt2":
        d, L, v, p = GPT2["n_embd"], GPT2["n_layer"], GPT2["vocab_size"], GPT2["n_positions"]
        out += [("transformer.wte.weight", [v, d]), ("transformer.wpe.weight", [p, d])]
        for i in range(L):
            h = f"transformer.h.{i}."
            out += [(h + "ln_1.weight", [d]), (h + "ln_1.bias", [d]), (h + "attn.c_attn.weight", [d, 3 * d]),
                    (h + "attn.c_attn.bias", [3 * d]), (h + "attn.c_proj.weight", [d, d]), (h + "attn.c_proj.bias", [d]),
                    (h + "ln_2.weight", [d]), (h + "ln_2.bias", [d]), (h + "mlp.c_fc.weight", [d, 4 * d]),
                    (h + "mlp.c_fc.bias", [4 * d]), (h + "mlp.c_proj.weight", [4 * d, d]), (h + "mlp.c_proj.bias", [d])]
        out += [("transformer.ln_f.weight", [d]), ("transformer.ln_f.bias", [d])]
    else:
        c = SMOLLM2
        d, f, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
        kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
        out += [("model.embed_tokens.weight", [v, d])]
        for i in range(L):
            h = f"model.layers.{i}."
            out += [(h + "input_layernorm.weight", [d]), (h + "self_attn.q_proj.weight", [d, d]),
                    (h + "self_attn.k_proj.weight", [kv, d]), (h + "self_attn.v_proj.weight", [kv, d]),
                    (h + "self_attn.o_proj.weight", [d, d]), (h + "post_attention_layernorm.weight", [d]),
                    (h + "mlp.gate_proj.weight", [f, d]), (h + "mlp.up_proj.weight", [f, d]),
                    (h + "mlp.down_proj.weight", [d, f])]
        out += [("model.norm.weight", [d])]
    return out


def write_safetensors(path, tensors):
    """tensors: list of (name, shape, bytes of f32 little-endian) or (name, shape, bytes, dtype)."""
    header, off = {}, 0
    for t in tensors:
        name, shape, data = t[:3]
        header[name] = {"dtype": t[3] if len(t) > 3 else "F32", "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for t in tensors:
            f.write(t[2])
    os.replace(path + ".tmp", path)


def cmd_make(a):
    # Smaller variants (--vocab, --layers) for runs whose artifacts must travel
    # with their weights (a sparse model: the GPU machine cannot prune).
    for key, val in (("vocab", a.vocab), ("layers", a.layers)):
        if val:
            if a.family == "gpt2":
                GPT2[{"vocab": "vocab_size", "layers": "n_layer"}[key]] = val
            else:
                SMOLLM2[{"vocab": "vocab_size", "layers": "num_hidden_layers"}[key]] = val
    os.makedirs(a.dir, exist_ok=True)
    with open(os.path.join(a.dir, "config.json"), "w") as f:
        json.dump(config(a.family), f, indent=1)
    names = shapes(a.family)
    tensors = []
    if a.placeholder:
        # A block of deterministic small values (an LCG), repeated: shapes only.
        x, block = 12345, array.array("f")
        for _ in range(1 << 16):
            x = (1103515245 * x + 12345) % (1 << 31)
            block.append((x / (1 << 31) - 0.5) * 0.04)
        for name, shape in names:
            n = 1
            for s in shape:
                n *= s
            vals = (block * (n // len(block) + 1))[:n]
            if len(shape) == 1 and ("ln" in name or "norm" in name):
                vals = array.array("f", [1.0 + v for v in vals])
            tensors.append((name, shape, vals.tobytes()))
    else:
        import torch
        g = torch.Generator().manual_seed(a.seed)
        for name, shape in names:
            t = torch.randn(shape, generator=g) * 0.02
            if len(shape) == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                t = t + 1.0
            tensors.append((name, shape, t.float().contiguous().numpy().tobytes()))
    write_safetensors(os.path.join(a.dir, "model.safetensors"), tensors)


def cmd_pack(a):
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(a.hf, "config.json")))
    hf = load_file(os.path.join(a.hf, "model.safetensors"))
    man = json.load(open(os.path.join(a.artifact, "manifest.json")))
    roles = {}
    if cfg["model_type"] == "gpt2":
        d = cfg["n_embd"]
        t = lambda n: hf["transformer." + n]
        roles["embed"] = t("wte.weight")
        roles["pos_embed"] = t("wpe.weight")
        roles["final_norm"], roles["final_norm.bias"] = t("ln_f.weight"), t("ln_f.bias")
        for i in range(cfg["n_layer"]):
            h = lambda n: t(f"h.{i}.{n}")
            l = f"layers.{i}."
            roles[l + "attn_norm"], roles[l + "attn_norm.bias"] = h("ln_1.weight"), h("ln_1.bias")
            roles[l + "mlp_norm"], roles[l + "mlp_norm.bias"] = h("ln_2.weight"), h("ln_2.bias")
            for j, p in enumerate("qkv"):
                roles[l + f"attn.{p}"] = h("attn.c_attn.weight")[:, j * d:(j + 1) * d].t()
                roles[l + f"attn.{p}.bias"] = h("attn.c_attn.bias")[j * d:(j + 1) * d]
            roles[l + "attn.o"], roles[l + "attn.o.bias"] = h("attn.c_proj.weight").t(), h("attn.c_proj.bias")
            roles[l + "mlp.up"], roles[l + "mlp.up.bias"] = h("mlp.c_fc.weight").t(), h("mlp.c_fc.bias")
            roles[l + "mlp.down"], roles[l + "mlp.down.bias"] = h("mlp.c_proj.weight").t(), h("mlp.c_proj.bias")
    else:
        roles["embed"] = hf["model.embed_tokens.weight"]
        roles["final_norm"] = hf["model.norm.weight"]
        roles["lm_head"] = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
        pairs = [("attn_norm", "input_layernorm"), ("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"),
                 ("attn.v", "self_attn.v_proj"), ("attn.o", "self_attn.o_proj"), ("mlp_norm", "post_attention_layernorm"),
                 ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"), ("mlp.down", "mlp.down_proj")]
        for i in range(cfg["num_hidden_layers"]):
            for r, n in pairs:
                roles[f"layers.{i}.{r}"] = hf[f"model.layers.{i}.{n}.weight"]
    tensors = []
    import torch
    # Weights no checkpoint role names (constants such as fixed NSA gates)
    # travel in constants.safetensors, kept when the compile's weights file
    # was removed (`keep-constants`).
    extra = {}
    side = os.path.join(a.artifact, "constants.safetensors")
    if os.path.exists(side):
        from safetensors.torch import load_file
        extra = load_file(side)
    for b in man["execution"]["buffers"]:
        if b["kind"] != "weight":
            continue
        if b["dtype"] not in ("f32", "f16", "bf16") or b.get("sparse"):
            sys.exit(f"pack: weight {b['name']} is {b['dtype']}; only dense f32/f16/bf16 artifacts are packed here")
        if b["name"] not in roles and b["name"] not in extra:
            sys.exit(f"pack: weight {b['name']} is neither a checkpoint role nor in {side}")
        t = (roles[b["name"]] if b["name"] in roles else extra[b["name"]]).float().contiguous()
        if b["dtype"] == "f32":
            tensors.append((b["name"], list(t.shape), t.numpy().tobytes()))
        else:
            # 16-bit weights are packed bytes (U8, padded to 64) as the compiler
            # writes them; torch rounds to nearest even as sparsec does.
            half = t.to(torch.float16 if b["dtype"] == "f16" else torch.bfloat16).contiguous()
            data = half.view(torch.uint8).numpy().tobytes()
            data += bytes(-len(data) % 64)
            tensors.append((b["name"], [len(data)], data, "U8"))
    write_safetensors(os.path.join(a.artifact, "weights.safetensors"), tensors)
    print(f"packed {len(tensors)} tensors into {a.artifact}/weights.safetensors")


def cmd_keep_constants(a):
    """Copies the tensors of an artifact's weights.safetensors that name no
    checkpoint role (`const.*`) into constants.safetensors beside it (no
    dependencies: runs where the artifact was compiled)."""
    path = os.path.join(a.artifact, "weights.safetensors")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        tensors = []
        for name, t in header.items():
            if name == "__metadata__" or not name.startswith("const."):
                continue
            lo, hi = t["data_offsets"]
            f.seek(base + lo)
            tensors.append((name, t["shape"], f.read(hi - lo)))
    write_safetensors(os.path.join(a.artifact, "constants.safetensors"), tensors)
    print(f"kept {len(tensors)} constants of {path}")


class StaticDecoder:
    """One decode step of GPT-2 or Llama over static KV caches of `max_len`
    positions, written against the HF model's weights with its arithmetic
    (GPT-2: LayerNorm, tanh GELU; Llama: RMSNorm in f32, rotate-half RoPE,
    GQA). Every shape is fixed and the position is a device tensor, so the
    step can be captured as a CUDA graph."""

    def __init__(self, model, cfg, max_len):
        import torch
        self.torch, self.cfg, self.max_len = torch, cfg, max_len
        self.gpt2 = cfg["model_type"] == "gpt2"
        sd = {k: v for k, v in model.state_dict().items()}
        self.sd, dev, dt = sd, next(model.parameters()).device, next(model.parameters()).dtype
        if self.gpt2:
            self.L, self.H, self.d = cfg["n_layer"], cfg["n_head"], cfg["n_embd"]
            self.kvh = self.H
        else:
            self.L, self.H, self.d = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
            self.kvh = cfg["num_key_value_heads"]
            hd = self.d // self.H
            inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
            f = torch.outer(torch.arange(max_len, device=dev, dtype=torch.float32), inv)
            emb = torch.cat([f, f], dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()
        self.hd = self.d // self.H
        shape = (1, self.kvh, max_len, self.hd)
        self.k = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(self.L)]
        self.v = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(self.L)]
        self.ar = torch.arange(max_len, device=dev)

    def step(self, tok, pos):
        """tok: long[1], pos: long[1] (device). Returns logits [1, vocab]."""
        torch, F, sd = self.torch, self.torch.nn.functional, self.sd
        mask = (self.ar <= pos).view(1, 1, 1, -1)
        H, kvh, hd = self.H, self.kvh, self.hd

        def attend(l, q, k, v):
            self.k[l].index_copy_(2, pos, k)
            self.v[l].index_copy_(2, pos, v)
            o = F.scaled_dot_product_attention(q, self.k[l], self.v[l], attn_mask=mask, enable_gqa=kvh != H)
            return o.transpose(1, 2).reshape(1, self.d)

        if self.gpt2:
            p = "transformer."
            x = sd[p + "wte.weight"][tok] + sd[p + "wpe.weight"][pos]
            eps = self.cfg["layer_norm_epsilon"]
            for l in range(self.L):
                w = lambda n: sd[f"{p}h.{l}.{n}"]
                h = F.layer_norm(x, (self.d,), w("ln_1.weight"), w("ln_1.bias"), eps)
                qkv = torch.addmm(w("attn.c_attn.bias"), h, w("attn.c_attn.weight"))
                q, k, v = (t.view(1, 1, H, hd).transpose(1, 2) for t in qkv.split(self.d, dim=-1))
                x = x + torch.addmm(w("attn.c_proj.bias"), attend(l, q, k, v), w("attn.c_proj.weight"))
                h = F.layer_norm(x, (self.d,), w("ln_2.weight"), w("ln_2.bias"), eps)
                h = F.gelu(torch.addmm(w("mlp.c_fc.bias"), h, w("mlp.c_fc.weight")), approximate="tanh")
                x = x + torch.addmm(w("mlp.c_proj.bias"), h, w("mlp.c_proj.weight"))
            x = F.layer_norm(x, (self.d,), sd[p + "ln_f.weight"], sd[p + "ln_f.bias"], eps)
            return x @ sd[p + "wte.weight"].t()
        eps = self.cfg["rms_norm_eps"]

        def rms(x, w):
            xf = x.float()
            return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

        cos, sin = self.cos[pos].view(1, 1, 1, hd), self.sin[pos].view(1, 1, 1, hd)

        def rope(t):
            t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
            return (t.float() * cos + torch.cat([-t2, t1], dim=-1).float() * sin).to(t.dtype)

        x = sd["model.embed_tokens.weight"][tok]
        for l in range(self.L):
            w = lambda n: sd[f"model.layers.{l}.{n}.weight"]
            h = rms(x, w("input_layernorm"))
            q = (h @ w("self_attn.q_proj").t()).view(1, 1, H, hd).transpose(1, 2)
            k = (h @ w("self_attn.k_proj").t()).view(1, 1, kvh, hd).transpose(1, 2)
            v = (h @ w("self_attn.v_proj").t()).view(1, 1, kvh, hd).transpose(1, 2)
            x = x + attend(l, rope(q), rope(k), v) @ w("self_attn.o_proj").t()
            h = rms(x, w("post_attention_layernorm"))
            x = x + (F.silu(h @ w("mlp.gate_proj").t()) * (h @ w("mlp.up_proj").t())) @ w("mlp.down_proj").t()
        x = rms(x, sd["model.norm.weight"])
        head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        return x @ head.t()


def static_graph_decode(model, cfg, ids, n, repeat):
    """PyTorch's best here: the static-cache step captured as one CUDA graph
    (argmax and position advance inside), replayed once per token. Returns
    (tokens/s, greedy ids)."""
    import torch
    dec = StaticDecoder(model, cfg, len(ids) + n + 1)
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")

    def body():
        nxt = dec.step(tok, pos).argmax(-1)
        tok.copy_(nxt)
        pos.add_(1)
        return nxt

    with torch.inference_mode():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # warm-up outside the graph (allocator, cuBLAS handles)
                body()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = body()

        def run():
            for l in range(dec.L):
                dec.k[l].zero_()
                dec.v[l].zero_()
            pos.zero_()
            # The prompt through the same graph (its argmax ignored), then
            # the last prompt token's prediction starts the decode.
            for t in ids:
                tok.fill_(t)
                g.replay()
            got = [out.clone()]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n - 1):
                g.replay()
                got.append(out.clone())
            torch.cuda.synchronize()
            return time.perf_counter() - t0, [int(x) for x in torch.cat(got).tolist()]

        run()
        times = []
        for _ in range(repeat):
            t, got = run()
            times.append(t)
        times.sort()
        return (n - 1) / times[len(times) // 2], got


def cmd_torch(a):
    import torch
    from transformers import AutoModelForCausalLM
    dt = getattr(torch, a.dtype)
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=dt).cuda().eval()
    ids = json.load(open(a.prompt_ids))
    x = torch.tensor([ids], device="cuda")
    n = a.new_tokens
    out = {"dtype": a.dtype, "device": torch.cuda.get_device_name(), "prompt_tokens": len(ids), "new_tokens": n,
           "torch": torch.__version__}

    @torch.inference_mode()
    def eager():
        o = model(x, use_cache=True)
        past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        got = []
        for _ in range(n):
            got.append(int(nxt))
            o = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t, got

    eager()
    times = []
    for _ in range(a.repeat):
        s, got = eager()
        times.append(s)
    times.sort()
    out["eager_decode_tokens_per_s"] = n / times[len(times) // 2]
    out["eager_ids"] = got

    try:
        cfg = json.load(open(os.path.join(a.hf, "config.json")))
        tps, gids = static_graph_decode(model, cfg, ids, n, a.repeat)
        out["graph_decode_tokens_per_s"] = tps
        out["graph_ids"] = gids
        out["graph_ids_agree_with_eager"] = next((i for i, (p, q) in enumerate(zip(gids, got)) if p != q), min(len(gids), len(got)))
    except Exception as e:  # reported, not hidden
        out["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if not a.hf_compile:
        print(json.dumps(out))
        return

    # PyTorch's best as transformers offers it: a static KV cache and the
    # forward compiled with mode="reduce-overhead" (CUDA graphs). generate()
    # of n tokens minus generate() of 1 token is the decode time of n - 1.
    try:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

        @torch.inference_mode()
        def gen(k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            o = model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            return time.perf_counter() - t, o[0, len(ids):].tolist()

        gen(n)
        gen(1)
        tn = sorted(gen(n)[0] for _ in range(a.repeat))[a.repeat // 2]
        t1 = sorted(gen(1)[0] for _ in range(a.repeat))[a.repeat // 2]
        out["compiled_decode_tokens_per_s"] = (n - 1) / max(tn - t1, 1e-9)
        out["compiled_ids"] = gen(n)[1]
    except Exception as e:  # reported, not hidden
        out["compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(out))


def cmd_torch_prefill(a):
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(a.hf, dtype=getattr(torch, a.dtype)).cuda().eval()
    out = {"dtype": a.dtype, "device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def median_ms(f):
        ts = []
        for _ in range(7):
            torch.cuda.synchronize()
            t = time.perf_counter()
            f()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return 1e3 * sorted(ts)[3]

    for n in [int(x) for x in a.lengths.split(",")]:
        gen = torch.Generator("cuda").manual_seed(0)
        ids = torch.randint(0, m.config.vocab_size, (1, n), device="cuda", generator=gen)
        with torch.no_grad():
            for _ in range(3):
                m(ids, use_cache=True)
            out[f"eager_{n}_ms"] = median_ms(lambda: m(ids, use_cache=True))
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    m(ids, use_cache=False)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                m(ids, use_cache=False)
            out[f"graph_{n}_ms"] = median_ms(g.replay)
    print(json.dumps(out))


def cmd_ncu_summary(a):
    import collections
    import csv
    rows = [r for r in csv.reader(open(a.csv)) if len(r) > 10]
    if not rows:
        sys.exit(f"{a.csv}: no ncu rows")
    h = rows[0]
    ki, vi, gi = h.index("Kernel Name"), h.index("Metric Value"), h.index("Grid Size")
    # Per kernel: microseconds, launches, and each grid with its launches (a
    # kernel's launches differ in grid: the last row's tail runs one row).
    t = collections.defaultdict(lambda: [0.0, 0, collections.Counter()])
    for r in rows[1:]:
        e = t[r[ki].split("(")[0]]
        e[0] += float(r[vi].replace(",", "")) / 1e3
        e[1] += 1
        e[2][r[gi]] += 1
    total = sum(e[0] for e in t.values())
    print(f"== ncu {a.label}: {sum(e[1] for e in t.values())} launches, {total / 1e3:.3f} ms of kernel time")
    for k, (us, n, g) in sorted(t.items(), key=lambda x: -x[1][0]):
        grids = ", ".join(f"{grid} x{c}" for grid, c in g.most_common())
        print(f"  {k:<24} {n:4d} launches {us / 1e3:8.3f} ms {us / n:9.1f} us each  grids {grids}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    m.add_argument("--family", choices=["gpt2", "llama"], required=True)
    m.add_argument("--placeholder", action="store_true")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--vocab", type=int, help="vocabulary size instead of the model's")
    m.add_argument("--layers", type=int, help="layers instead of the model's")
    k = sub.add_parser("pack")
    k.add_argument("hf")
    k.add_argument("artifact")
    c = sub.add_parser("keep-constants")
    c.add_argument("artifact")
    t = sub.add_parser("torch")
    t.add_argument("hf")
    t.add_argument("--prompt-ids", required=True)
    t.add_argument("--new-tokens", type=int, default=128)
    t.add_argument("--dtype", default="float32")
    t.add_argument("--repeat", type=int, default=3)
    t.add_argument("--hf-compile", action="store_true", help="also transformers' static cache under torch.compile")
    f = sub.add_parser("torch-prefill")
    f.add_argument("hf")
    f.add_argument("--dtype", default="float16")
    f.add_argument("--lengths", default="128,512,960")
    n = sub.add_parser("ncu-summary")
    n.add_argument("csv")
    n.add_argument("label")
    a = p.parse_args()
    cmds = {"make": cmd_make, "pack": cmd_pack, "torch": cmd_torch, "keep-constants": cmd_keep_constants,
            "torch-prefill": cmd_torch_prefill, "ncu-summary": cmd_ncu_summary}
    cmds[a.cmd](a)


if __name__ == "__main__":
    main()
