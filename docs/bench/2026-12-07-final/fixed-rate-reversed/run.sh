#!/bin/bash
cd /work/main
for round in 1 2; do
for b in final after before; do
  ./target/release/herald-loadtest push --spawn-cluster 3 --users 1000 --publishers 32 --rate 6000 --duration 20 --drain 5 --herald-bin /tmp/herald-$b --report /tmp/rev/$b-$round.json > /tmp/rev/$b-$round.txt 2>&1
done; done
