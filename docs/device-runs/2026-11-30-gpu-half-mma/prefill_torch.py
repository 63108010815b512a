import json, sys, time, torch
from transformers import AutoModelForCausalLM
hf, dtype = sys.argv[1], getattr(torch, sys.argv[2])
m = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=dtype).cuda().eval()
out = {}
for n in [128, 512, 960]:
    ids = torch.randint(0, m.config.vocab_size, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        for _ in range(3): m(ids, use_cache=True)
        ts = []
        for _ in range(7):
            torch.cuda.synchronize(); t = time.perf_counter(); m(ids, use_cache=True); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
        ts.sort(); out[f"eager_{n}_ms"] = 1e3 * ts[3]
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3): m(ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g): o = m(ids, use_cache=False)
        ts = []
        for _ in range(7):
            torch.cuda.synchronize(); t = time.perf_counter(); g.replay(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
        ts.sort(); out[f"graph_{n}_ms"] = 1e3 * ts[3]
print(json.dumps(out))
