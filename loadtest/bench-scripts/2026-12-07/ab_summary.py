#!/usr/bin/env python3
"""Summarises loadtest/bench-scripts/2026-12-07/ab.sh's reports: per pair, the after/before
ratio of each figure, and the median ratio over the pairs (the figure the regression
rule reads: within 5%)."""
import json, os, statistics, sys

out = sys.argv[1]

def load(name, build, i):
    p = os.path.join(out, f"{name}-{build}-{i}.json")
    return json.load(open(p)) if os.path.exists(p) else None

def figures(name, d):
    if name == "push":
        return {"publishes/s": d["throughput_per_s"],
                "deliveries per node CPU-s": d["deliveries_per_node_cpu_s"],
                "Redis us/msg": d["redis_cpu_us_per_message"],
                "p99 ms": d["latency_ms"]["p99"],
                "lost+dup+reord": d["lost"] + d["duplicates"] + d["reordered"]}
    if name == "bcast":
        return {"deliveries per node CPU-s": d["deliveries_per_node_cpu_s"],
                "last delivery p50 ms": d["broadcast"]["last_ms_p50"],
                "lost+dup+reord": d["lost"] + d["duplicates"] + d["reordered"]}
    if name == "mem":
        per = [n["bytes_per_connection"] for n in d["node_memory"]]
        return {"bytes per idle connection": sum(per) / len(per),
                "open at end": d["connect"]["open_at_end"]}

for name in ("push", "bcast", "mem"):
    ratios = {}
    print(f"## {name}")
    i = 1
    while True:
        b, a = load(name, "before", i), load(name, "after", i)
        if not (b and a):
            break
        fb, fa = figures(name, b), figures(name, a)
        row = []
        for k in fb:
            row.append(f"{k}: {fb[k]:.1f} -> {fa[k]:.1f}")
            if fb[k]:
                ratios.setdefault(k, []).append(fa[k] / fb[k])
        print(f"pair {i}: " + "; ".join(row))
        i += 1
    for k, r in ratios.items():
        print(f"median after/before {k}: {statistics.median(r):.3f} over {len(r)} pairs")
    print()
