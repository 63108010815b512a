import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; ki = h.index('Kernel Name'); vi = h.index('Metric Value'); gi = h.index('Grid Size')
t = collections.defaultdict(lambda: [0.0, 0, ''])
for r in rows[1:]:
    e = t[r[ki].split('(')[0]]; e[0] += float(r[vi].replace(',', '')) / 1e3; e[1] += 1; e[2] = r[gi]
print(f'== ncu {sys.argv[2]}: {sum(e[1] for e in t.values())} launches, {sum(e[0] for e in t.values())/1e3:.3f} ms of kernel time')
for k, (us, n, g) in sorted(t.items(), key=lambda x: -x[1][0]):
    print(f'  {k:<24} {n:4d} launches {us/1e3:8.3f} ms {us/n:9.1f} us each  grid {g}')
