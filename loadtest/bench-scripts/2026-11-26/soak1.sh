#!/bin/bash
# Soak 1: kill and drain nodes 1 and 2 in turn (each restarted 30 s later); node 3 is never touched.
ACTS=()
for c in 0 240 480 720 960 1200 1440 1680; do
  ACTS+=(--action "at=$((c+10))s kill node=1" --action "at=$((c+40))s restart node=1"
         --action "at=$((c+70))s drain node=2" --action "at=$((c+100))s restart node=2"
         --action "at=$((c+130))s kill node=2" --action "at=$((c+160))s restart node=2"
         --action "at=$((c+190))s drain node=1" --action "at=$((c+220))s restart node=1")
done
timeout 2400 target/release/herald-loadtest chaos --spawn-cluster 3 --users 3000 --rate 1000 \
  --duration 1800 "${ACTS[@]}" --check --report soak1.json
echo "rc=$?"
