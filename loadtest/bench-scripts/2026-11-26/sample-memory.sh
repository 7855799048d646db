#!/bin/bash
# Samples node and Redis memory every 30 s while the soak runs.
while true; do
  t=$(date +%s)
  for p in $(pgrep -f "release/herald$"); do
    port=$(tr '\0' ' ' < /proc/$p/environ 2>/dev/null | tr " " "\n" | grep "^HERALD_NODE_ID=" | cut -d= -f2)
    echo "$t node id=$port pid=$p rss_kib=$(awk '/VmRSS/{print $2}' /proc/$p/status 2>/dev/null) fds=$(ls /proc/$p/fd 2>/dev/null | wc -l)"
  done
  rp=$(pgrep -f "redis-server" | head -1)
  if [ -n "$rp" ]; then
    rport=$(tr '\0' ' ' < /proc/$rp/cmdline | grep -o -- '--port [0-9]*' | awk '{print $2}')
    [ -z "$rport" ] && rport=$(ss -ltnp 2>/dev/null | grep "pid=$rp," | head -1 | awk '{print $4}' | awk -F: '{print $NF}')
    echo "$t redis pid=$rp rss_kib=$(awk '/VmRSS/{print $2}' /proc/$rp/status) used_memory=$(redis-cli -p $rport info memory 2>/dev/null | grep '^used_memory:' | cut -d: -f2 | tr -d '\r') keys=$(redis-cli -p $rport dbsize 2>/dev/null)"
  fi
  sleep 30
done
