#!/usr/bin/env python3
"""Checkpoint a live memcached under load, then kill it, restore it and check every key.

Steps:
  1. start memcached on 127.0.0.1 (a free port, -U 0: no UDP, -t THREADS worker threads, enough
     memory that nothing is evicted) and load --keys keys key:N with pymemcache (set_many)
  2. start a load generator (a second process: pymemcache clients, one request at a time each,
     getting key:N and setting load:N) and a latency probe (pymemcache, one get at a time on one
     connection, every latency recorded with its time)
  3. `ckpt dump --leave-running --verify`, then a plain live dump (`--leave-running`): the freeze
     window from --json, the probe's p99 and worst latency before and during each dump
  4. stop the load; read every key (get_many); a held connection (raw socket, `version`) and
     one with half a command sent, both opened before the dump; the probe keeps running
  5. `ckpt dump` (kills memcached), `ckpt restore`; then: every key with its value
     (get_many over all keys), the held connection answers on the same socket and memcached
     still lists it (stats conns), the half-sent command completes, the probe never failed

usage: python3 demos/checkpoint_memcached.py [--keys 1000000] [--value-size 100] [--threads 4]
       [--clients 4] [--phase-seconds 3] [--keep]
Exits 0 when every check passed, 1 otherwise.
"""
import argparse
import os
import random
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (live_dumps, WAIT, Checks, DemoError, LatencyProbe, Run, alive,  # noqa: E402
                     fmt_ms, free_port, log, main_wrapper, probe_row, table, wait_for)

try:
    from pymemcache.client.base import Client
except ImportError:     # pragma: no cover - the demos extra
    sys.exit("this demo needs the pymemcache client library: pip install pymemcache (or pip install -e '.[demos]')")

BATCH = 2000
LOAD_KEYS = 10000       # the load generator writes load:0 .. load:LOAD_KEYS-1


def value(i, size):
    return (b"%d:" % i).ljust(size, b"v")


def client(port, timeout=WAIT):
    c = Client(("127.0.0.1", port), timeout=timeout, connect_timeout=10, no_delay=True)
    c.version()         # connects now
    return c


def load_keys(port, keys, size):
    c = client(port)
    try:
        for lo in range(0, keys, BATCH):
            c.set_many({"key:%d" % i: value(i, size) for i in range(lo, min(keys, lo + BATCH))}, noreply=True)
        c.version()     # a round trip: every set before it has been processed
    finally:
        c.close()


def read_all(port, keys):
    """{key: value} of key:0.. key:keys-1 and load:0.. load:LOAD_KEYS-1 that exist."""
    c = client(port)
    out = {}
    try:
        names = ["key:%d" % i for i in range(keys)] + ["load:%d" % i for i in range(LOAD_KEYS)]
        for lo in range(0, len(names), BATCH):
            out.update(c.get_many(names[lo:lo + BATCH]))
    finally:
        c.close()
    return out


def stats(port, *args):
    c = client(port)
    try:
        return c.stats(*args)
    finally:
        c.close()


def raw(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def raw_reply(s, end=b"\r\n"):
    buf = b""
    while not buf.endswith(end):
        chunk = s.recv(65536)
        if not chunk:
            raise DemoError("memcached closed the connection (after %r)" % buf[-80:])
        buf += chunk
    return buf


def server_fd_of(port, sock):
    """The fd number memcached serves `sock` on (from `stats conns`), or None."""
    me = "127.0.0.1:%d" % sock.getsockname()[1]
    for k, v in stats(port, "conns").items():
        k = k.decode() if isinstance(k, bytes) else k
        v = v.decode() if isinstance(v, bytes) else str(v)
        if k.endswith(":addr") and v.endswith(me):
            return int(k.split(":")[0])
    return None


def load_worker(port, keys, clients, size):
    """The load generator process: `clients` connections, one request at a time each, round robin."""
    cs = [client(port) for _ in range(clients)]
    rng = random.Random(1)
    n = 0
    while True:
        c = cs[n % clients]
        if n & 1:
            c.get("key:%d" % rng.randrange(keys))
        else:
            c.set("load:%d" % rng.randrange(LOAD_KEYS), value(rng.randrange(1 << 30), size), noreply=False)
        n += 1


def run_demo(args):
    checks = Checks()
    with Run("memcached", keep=args.keep) as run:
        port = free_port()
        mem_mb = max(64, int(args.keys * (args.value_size + 120) * 1.5 / 2**20) + 64)
        argv = ["memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-t", str(args.threads),
                "-m", str(mem_mb), "-c", "4096"]
        if os.geteuid() == 0:
            argv += ["-u", "root"]
        mc = run.start("memcached", argv)
        wait_for(lambda: client(port).version(), "memcached on port %d to answer" % port, proc=mc)
        log("memcached %d on 127.0.0.1:%d, %d worker threads, -m %d (work directory %s)"
            % (mc.pid, port, args.threads, mem_mb, run.workdir))
        t = time.monotonic()
        load_keys(port, args.keys, args.value_size)
        st = stats(port)
        log("loaded %d keys of %d bytes in %.1f s (pymemcache set_many); %.0f MiB used"
            % (args.keys, args.value_size, time.monotonic() - t, st[b"bytes"] / 2**20))
        checks("keys loaded", st[b"curr_items"] == args.keys and st[b"evictions"] == 0,
               "curr_items %d, evictions %d" % (st[b"curr_items"], st[b"evictions"]))

        probe_client = client(port)
        probe_sock = probe_client.sock

        def request():
            probe_client.get("key:%d" % random.randrange(args.keys))
        probe = LatencyProbe(request, interval=args.probe_interval)
        probe.start()
        load = run.start("load", [sys.executable, os.path.abspath(__file__), "--load-worker", "--port", str(port),
                                  "--keys", str(args.keys), "--clients", str(args.clients),
                                  "--value-size", str(args.value_size)])
        wait_for(lambda: stats(port)[b"curr_connections"] >= args.clients + 2, "the load generator to connect",
                 proc=load)
        log("load: process %d with %d pymemcache clients (get key:N / set load:N), probe: one get at a time "
            "every %.1f ms" % (load.pid, args.clients, args.probe_interval * 1000))

        # ---- before, two live dumps
        t0 = time.monotonic()
        time.sleep(args.phase_seconds)
        rows = [probe_row("load only", probe.window(t0, time.monotonic()), ["-"])]
        live_dumps(run, mc.pid, probe, checks, load, t0, rows, args.phase_seconds / 2, "memcached",
                   "Probe latency (one get at a time, %d load clients running)" % args.clients)

        # ---- stop the load; what must survive the kill + restore
        run.stop(load)
        wait_for(lambda: stats(port)[b"curr_connections"] <= 3, "the load generator's connections to close")
        t = time.monotonic()
        before = read_all(port, args.keys)
        read_s = time.monotonic() - t
        expected_ok = all(before.get("key:%d" % i) == value(i, args.value_size) for i in range(args.keys))
        checks("every loaded key has its value before the dump", expected_ok,
               "%d keys + %d load keys read in %.1f s" % (args.keys, len(before) - args.keys, read_s))
        st_before = stats(port)
        held = raw(port)
        held.sendall(b"version\r\n")
        version = raw_reply(held)
        held_fd = server_fd_of(port, held)
        half = raw(port)
        half.sendall(b"get key:1")          # the rest after the restore
        log("")
        log("before the kill dump: %d items; held connection is memcached's fd %s (%s); half a `get` sent on another"
            % (st_before[b"curr_items"], held_fd, version.decode().strip()))

        # ---- kill + restore (the probe keeps going on its connection)
        img = run.path("final.img")
        k0 = time.monotonic()
        res_k, secs_k, _, _ = run.dump(mc.pid, img, tag="dump-kill")
        rc = mc.wait(timeout=WAIT)       # the original, killed by the dump: reap it (frees its PID)
        checks("kill dump done, memcached killed by it", rc == -9,
               "freeze %.2f ms, image %.0f MiB, %.2f s, exit status %s"
               % (res_k["freeze_ms"], res_k["image_bytes"] / 2**20, secs_k, rc))
        res_r, secs_r = run.restore(img)
        k1 = time.monotonic()
        pid = res_r["pid"]
        checks("restored with the same PID", pid == mc.pid and alive(pid),
               "pid %d, %d threads, %d pages written in %.1f ms (ckpt restore ran %.2f s)"
               % (pid, len(res_r["threads"]), res_r["pages_written"], res_r["restore_ms"], secs_r))

        held.sendall(b"version\r\n")
        version2 = raw_reply(held)
        held_fd2 = server_fd_of(port, held)
        checks("held connection served on the same socket, still memcached's fd %s" % held_fd,
               version2 == version and held_fd2 == held_fd and held_fd is not None,
               "%r, fd %s -> %s" % (version2, held_fd, held_fd2))
        half.sendall(b"\r\n")
        got = raw_reply(half, b"END\r\n")
        want = b"VALUE key:1 0 %d\r\n%s\r\nEND\r\n" % (args.value_size, value(1, args.value_size))
        checks("command half sent before the dump completes after the restore", got == want, "got %r" % got[:80])

        t = time.monotonic()
        after = read_all(port, args.keys)
        st_after = stats(port)
        missing = [k for k in before if k not in after]
        differ = [k for k in before if k in after and after[k] != before[k]]
        checks("every key with its value after the restore (get_many over all keys)",
               not missing and not differ and len(after) == len(before),
               "%d keys read in %.1f s; %d missing, %d differ, %d extra" % (
                   len(after), time.monotonic() - t, len(missing), len(differ), len(after) - len(before) + len(missing)))
        checks("same memcached instance (pid, uptime went on)",
               st_after[b"pid"] == mc.pid and st_after[b"uptime"] >= st_before[b"uptime"],
               "pid %d, uptime %d -> %d s" % (st_after[b"pid"], st_before[b"uptime"], st_after[b"uptime"]))
        c = client(port)
        c.set("after-restore", b"restored")
        checks("restored memcached accepts new connections and writes", c.get("after-restore") == b"restored")
        c.close()

        time.sleep(0.5)
        probe.stop()
        outage = probe.window(k0, k1)
        errs = probe.window(t0, time.monotonic())["errors"]
        checks("probe never failed and kept its socket", not errs and probe_client.sock is probe_sock,
               "; ".join(errs[:3]))
        table(["step", "freeze ms", "ckpt s", "restore ms", "probe worst ms"], [
            ["ckpt dump (kill)", fmt_ms(res_k["freeze_ms"], 2), "%.2f" % secs_k, "-", "-"],
            ["ckpt restore", "-", "%.2f" % secs_r, fmt_ms(res_r["restore_ms"], 1), "-"],
            ["client's view: dump + restore", "-", "%.2f" % (k1 - k0), "-", fmt_ms(outage["max_ms"], 0)],
        ], title="Kill + restore (%d items, image %.0f MiB; the probe's worst request spans the gap, "
                 "plus TCP retransmission backoff)" % (st_before[b"curr_items"], res_k["image_bytes"] / 2**20))
        for s in (held, half):
            s.close()
        probe_client.close()
    return checks.summary()


def main():
    ap = argparse.ArgumentParser(description="Checkpoint a live memcached under load, kill, restore, check.")
    ap.add_argument("--keys", type=int, default=1000000, help="keys loaded with pymemcache")
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=4, help="memcached worker threads (-t)")
    ap.add_argument("--clients", type=int, default=4, help="connections of the load generator")
    ap.add_argument("--phase-seconds", type=float, default=3.0, help="probe window before the dumps")
    ap.add_argument("--probe-interval", type=float, default=0.001, help="pause between probe requests (s)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, images)")
    ap.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_worker:
        load_worker(args.port, args.keys, args.clients, args.value_size)
        return
    main_wrapper(lambda: run_demo(args))


if __name__ == "__main__":
    main()
