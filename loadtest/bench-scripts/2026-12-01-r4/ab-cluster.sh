#!/usr/bin/env bash
# A/B of publish calls per master (new) against per slot (old, 72e1a77) on a Redis
# Cluster of three masters, alternating runs. HERALD_OLD / HERALD_NEW: the two
# `herald` release builds; reports land next to this script.
set -eu
cd "$(dirname "$0")/../../.."
B=target/release/herald-loadtest
D=docs/bench/2026-12-01-r4
for i in 1 2 3; do
  for v in old new; do
    bin=$([ $v = old ] && echo "$HERALD_OLD" || echo "$HERALD_NEW")
    $B push --spawn-cluster 3 --redis cluster --herald-bin "$bin" --users 1000 --publishers 32 \
      --rate 0 --duration 20 --drain 5 --report $D/ab-cluster-$v-$i.json > $D/ab-cluster-$v-$i.txt 2>&1
    grep -E "throughput|node CPU|redis CPU|evalsha|p99" $D/ab-cluster-$v-$i.txt | sed "s/^/$v $i: /"
  done
done
