#!/usr/bin/env python3
"""Kernel times per decode step from ncu CSVs (gpu__time_duration.sum, run as
ncu.sh does: a 4-token prompt, then 3 decode steps without graphs). The last
two decode steps are summed by kernel name and halved. ncu runs each kernel
alone with its caches flushed, so these are upper bounds of what a replayed
graph spends; they rank kernels, they do not add up to a token's time."""
import collections
import csv
import sys

for f in sys.argv[1:]:
    rows = [r for r in csv.reader(open(f)) if len(r) > 10]
    h, rows = rows[0], rows[1:]
    ki, vi, ui = h.index("Kernel Name"), h.index("Metric Value"), h.index("Metric Unit")
    scale = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "nsecond": 1e-3, "ms": 1e3}
    ks = [(r[ki], float(r[vi].replace(",", "")) * scale[r[ui]]) for r in rows]
    # A decode step starts with the embedding; take the last two steps.
    starts = [i for i, (k, _) in enumerate(ks) if k.endswith("_embedding") or k.endswith("_positions")]
    first_of_step = [s for j, s in enumerate(starts) if j == 0 or s != starts[j - 1] + 1]
    lo = first_of_step[-2]
    agg = collections.OrderedDict()
    for k, t in ks[lo:]:
        a = agg.setdefault(k, [0, 0.0])
        a[0] += 1
        a[1] += t
    total = sum(t for _, t in ks[lo:]) / 2
    print(f"{f}: {len(ks[lo:]) // 2} launches per decode step, {total:.1f} us of kernel time")
    for k, (c, t) in sorted(agg.items(), key=lambda x: -x[1][1]):
        print(f"  {k:24s} {c / 2:5.1f} launches {t / 2:7.1f} us  {t / c:5.2f} us each")
