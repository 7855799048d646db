#!/usr/bin/env python3
"""Redis CPU per message of publish.lua, and of stripped variants that split it.

Starts nothing: run `redis-server --port 7799 --save '' --appendonly no` first. Each
variant is loaded with SCRIPT LOAD and called CALLS times with PER messages (each to
another of NCHAN channels, one subscriber connection subscribed to all of them, as a
node is), pipelined 32 calls deep, with the same argument layout as the broker. Prints
Redis CPU (INFO cpu, user + sys) per message and INFO commandstats per message.

    python3 lua_cost.py [path/to/publish.lua]      # default: the repository's

TAGGED=1 names the keys and channels with hash tags (`{N}:m`, `{N}:s`, `{N}:c`), so
that the script also runs on a cluster-enabled Redis that owns every slot, one channel
per call (`PER=1`). r4 used it to compare one Redis with a cluster node, each alone on
the machine (docs/bench/2026-12-01-r4/lua_cost_tagged.txt):

    redis-server --port 7799 --save '' --appendonly no
    redis-server --port 7798 --cluster-enabled yes --cluster-config-file n.conf --save ''
    redis-cli -p 7798 cluster addslotsrange 0 16383
    TAGGED=1 PORT=7799 PER=1 python3 lua_cost.py; TAGGED=1 PORT=7798 PER=1 python3 lua_cost.py
"""
import os, random, socket, sys, threading

PORT = int(os.environ.get("PORT", "7799"))
NCHAN = int(os.environ.get("NCHAN", "1000"))
PER = int(os.environ.get("PER", "4"))
CALLS = int(os.environ.get("CALLS", "20000"))
# Key and channel names of channel N (see TAGGED above).
if os.environ.get("TAGGED") == "1":
    META, STREAM, PUBSUB = "{%d}:m", "{%d}:s", "{%d}:c"
else:
    META, STREAM, PUBSUB = "m:%d", "s:%d", "ps:%d"
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    HERE, "../../../server/src/backend/redis/publish.lua")


def enc(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self):
        self.s = socket.create_connection(("127.0.0.1", PORT))
        self.f = self.s.makefile("rb")

    def read(self):
        line = self.f.readline()
        t, rest = line[:1], line[1:-2]
        if t == b"-":
            raise RuntimeError(line)
        if t in b"+:":
            return rest
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self.f.read(n + 2)[:-2]
        if t == b"*":
            return [self.read() for _ in range(max(int(rest), 0))]
        raise RuntimeError(line)

    def cmd(self, *args):
        self.s.sendall(enc(*args))
        return self.read()


def info(c):
    d = {}
    for line in c.cmd("INFO", "all").decode().split("\r\n"):
        if ":" in line:
            k, v = line.split(":", 1)
            d[k] = v
    return d


def run(name, script):
    c = Conn()
    c.cmd("FLUSHALL")
    sha = c.cmd("SCRIPT", "LOAD", script).decode()
    sub = Conn()
    sub.s.sendall(enc("SUBSCRIBE", *[PUBSUB % i for i in range(NCHAN)]))
    for _ in range(NCHAN):
        sub.read()
    threading.Thread(target=lambda: [None for _ in iter(lambda: sub.s.recv(1 << 20), b"")],
                     daemon=True).start()
    payload = b'{"seq":123456,"t":1764600000000,"pad":"' + b"x" * 40 + b'"}'
    reqs = []
    for _ in range(CALLS):
        keys, argv = [], ["100", "300000", "3600000", "PUBLISH", "", "e%d" % random.getrandbits(30)]
        for ch in random.sample(range(NCHAN), PER):
            keys += [META % ch, STREAM % ch]
            argv += [PUBSUB % ch, "1", "", payload]
        reqs.append(enc("EVALSHA", sha, len(keys), *keys, *argv))
    c.cmd("CONFIG", "RESETSTAT")
    cpu = lambda d: float(d["used_cpu_sys"]) + float(d["used_cpu_user"])
    before = cpu(info(c))
    for k in range(0, CALLS, 32):
        c.s.sendall(b"".join(reqs[k:k + 32]))
        for _ in reqs[k:k + 32]:
            c.read()
    after = info(c)
    msgs = CALLS * PER
    stats = []
    for k, v in after.items():
        if k.startswith("cmdstat_") and k not in ("cmdstat_info", "cmdstat_config|resetstat"):
            f = dict(x.split("=") for x in v.split(","))
            stats.append("%s %.2f" % (k[8:], float(f["usec"]) / msgs))
    print("%-24s %6.2f µs/msg   commandstats µs/msg: %s" % (
        name, (cpu(after) - before) * 1e6 / msgs, ", ".join(stats)))
    sub.s.close()
    c.s.close()


def main():
    real = open(SCRIPT).read()
    # Not a vararg function: Lua 5.1 would build an `arg` table at every call.
    fake = ("local function fake(c) if c == 'HMGET' then return {'e', '5', false, "
            "'99999999999999'} elseif c == 'TIME' then return {'1', '2'} elseif c == "
            "'XRANGE' then return {} end return 1 end\n")
    variants = [
        ("empty script", "return 1"),
        ("4 EXISTS per message", "for g = 1, #KEYS / 2 do for i = 1, 4 do "
         "redis.call('EXISTS', KEYS[2 * g - 1]) end end return 1"),
        ("publish.lua, no redis", fake + real.replace("redis.call(", "fake(")),
        ("publish.lua", real),
    ]
    print("%d calls of %d messages, %d channels, Redis on port %d" % (CALLS, PER, NCHAN, PORT))
    for name, script in variants:
        run(name, script)


main()
