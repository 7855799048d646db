#!/bin/bash
# The 2026-12-01 r3 soak: soak 2 of 2026-11-26 (kills and drains rotating over three
# nodes, 30 min), run from the repository root, its report written here.
REPORT=docs/bench/2026-12-01-r3/soak.json exec "$(dirname "$0")/../2026-11-26/soak2.sh"
