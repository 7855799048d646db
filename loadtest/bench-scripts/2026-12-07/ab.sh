#!/usr/bin/env bash
# Alternating A/B pairs of two herald builds on this machine: push at maximum rate,
# broadcast to 50,000 over 3 nodes, and idle memory at 19,000 connections per node.
# Usage (from the repository root, after `cargo build --release -p herald-loadtest`):
#   loadtest/bench-scripts/2026-12-07/ab.sh BEFORE_BIN AFTER_BIN OUT_DIR [PAIRS]
# Pair i runs before-then-after when i is odd and after-then-before when it is even, so
# a drift of the machine's speed during the run does not favour one build.
# Summarise with loadtest/bench-scripts/2026-12-07/ab_summary.py OUT_DIR.
set -euo pipefail
before=$1 after=$2 out=$3 pairs=${4:-3}
B=target/release/herald-loadtest
mkdir -p "$out"
run() { # name build bin
  local name=$1 build=$2 bin=$3 i=$4
  case $name in
    push) $B push --spawn-cluster 3 --users 1000 --publishers 32 --rate 0 --duration 20 --drain 5 \
            --herald-bin "$bin" --report "$out/push-$build-$i.json" >"$out/push-$build-$i.txt" 2>&1 ;;
    bcast) $B broadcast --spawn-cluster 3 --subscribers 50000 --messages 20 --connect-rate 8000 \
            --herald-bin "$bin" --report "$out/bcast-$build-$i.json" >"$out/bcast-$build-$i.txt" 2>&1 ;;
    mem) $B connections --spawn-cluster 3 --connections 57000 --rate 6000 --duration 10 \
            --herald-bin "$bin" --report "$out/mem-$build-$i.json" >"$out/mem-$build-$i.txt" 2>&1 ;;
  esac
}
for i in $(seq 1 "$pairs"); do
  for name in push bcast mem; do
    if [ $((i % 2)) -eq 1 ]; then
      run $name before "$before" $i; run $name after "$after" $i
    else
      run $name after "$after" $i; run $name before "$before" $i
    fi
    echo "pair $i $name done" >&2
  done
done
