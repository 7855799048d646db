#!/bin/bash
# Soak 2: kills and drains rotate over all three nodes (each restarted 30 s later), so
# every failure moves clients (a killed or drained node's clients go to the next URL).
ACTS=()
ops=("kill 1" "drain 2" "kill 3" "drain 1" "kill 2" "drain 3")
for i in $(seq 0 29); do
  t=$((10 + i * 60)); op=${ops[$((i % 6))]}; node=${op#* }
  ACTS+=(--action "at=${t}s ${op% *} node=${node}" --action "at=$((t + 30))s restart node=${node}")
done
timeout 2400 target/release/herald-loadtest chaos --spawn-cluster 3 --users 3000 --rate 1000 \
  --duration 1800 "${ACTS[@]}" --check --report "${REPORT:-soak2.json}"
echo "rc=$?"
