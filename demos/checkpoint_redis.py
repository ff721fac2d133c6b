#!/usr/bin/env python3
"""Checkpoint a live redis-server under load, then kill it, restore it and check every key.

Steps:
  1. start redis-server on 127.0.0.1 (a free port, no persistence: --save "" --appendonly no,
     in a temporary directory) and load --keys keys with DEBUG POPULATE
  2. start a load generator (redis-benchmark -t set,get -c CLIENTS -l) and a latency probe
     (redis-py, one GET at a time on one connection, every latency recorded with its time)
  3. BGSAVE once, for redis's own fork time (INFO latest_fork_usec) and the probe during it
  4. `ckpt dump --leave-running --verify`, then a plain live dump (`--leave-running`): the freeze
     window from --json, the probe's p99 and worst latency before and during each dump
  5. stop the load; DBSIZE and DEBUG DIGEST; a held connection (CLIENT SETNAME, CLIENT ID) and a
     client blocked in BLPOP, both opened before the dump; the probe keeps running
  6. `ckpt dump` (kills redis), `ckpt restore`; then with redis's own client: DBSIZE and
     DEBUG DIGEST equal; the held connection answers on the same socket with the same CLIENT ID
     and name; the blocked BLPOP gets its element; the probe never failed and kept its socket

usage: python3 demos/checkpoint_redis.py [--keys 1000000] [--clients 20] [--value-size 100]
       [--phase-seconds 3] [--keep]
Exits 0 when every check passed, 1 otherwise.
"""
import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (live_dumps, WAIT, Checks, DemoError, LatencyProbe, Run, alive, children_of,  # noqa: E402
                     fmt_ms, free_port, log, main_wrapper, probe_row, table, wait_for)

try:
    import redis
except ImportError:     # pragma: no cover - the demos extra
    sys.exit("this demo needs the redis client library: pip install redis (or pip install -e '.[demos]')")

LIST_KEY = "ckpt:demo:blocked"


class RedisServer:
    """A redis-server started by a Run, with the helpers the demo and the benchmark share."""

    def __init__(self, run, port):
        self.run = run
        self.port = port
        self.proc = None
        self.pid = None

    def start(self):
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.run.workdir, "--dbfilename", "bgsave.rdb",
                "--daemonize", "no", "--enable-debug-command", "local", "--loglevel", "warning"]
        self.proc = self.run.start("redis", argv)
        self.pid = self.proc.pid
        wait_for(lambda: self.client().ping(), "redis-server on port %d to answer" % self.port, proc=self.proc)
        return self

    def client(self, timeout=WAIT):
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=10)

    def connection(self, timeout=WAIT):
        """One redis-py connection, opened now, never retried or reopened behind our back."""
        c = redis.Connection(host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=10)
        c.connect()
        return c

    def populate(self, keys, size):
        c = self.client(timeout=600)
        c.execute_command("DEBUG", "POPULATE", keys, "key", size)
        n = c.dbsize()
        c.close()
        return n

    def info(self, section):
        c = self.client()
        try:
            return c.info(section)
        finally:
            c.close()

    def used_memory(self):
        return self.info("memory")["used_memory"]

    def bgsave(self):
        """BGSAVE and wait until it is done and its child reaped. Returns (fork ms, t0, t1)."""
        c = self.client()
        try:
            saves = c.info("persistence")["rdb_saves"]
            t0 = time.monotonic()
            c.bgsave()

            def done():
                p = c.info("persistence")
                return p["rdb_bgsave_in_progress"] == 0 and p["rdb_saves"] > saves and p
            p = wait_for(done, "BGSAVE to finish", timeout=WAIT, interval=0.005)
            t1 = time.monotonic()
            # redis has reaped its child when it reports the save done; a dump must not see it
            wait_for(lambda: not children_of(self.pid), "the BGSAVE child to be reaped")
            if p["rdb_last_bgsave_status"] != "ok":
                raise DemoError("BGSAVE failed: %s" % p["rdb_last_bgsave_status"])
            fork_ms = c.info("stats")["latest_fork_usec"] / 1000.0
        finally:
            c.close()
        try:
            os.unlink(self.run.path("bgsave.rdb"))
        except FileNotFoundError:
            pass
        return fork_ms, t0, t1

    def start_load(self, clients, keys, size, name="load"):
        """redis-benchmark SET/GET on random keys in a loop until stopped."""
        argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(self.port), "-t", "set,get", "-c", str(clients),
                "-n", "200000", "-r", str(max(1, keys)), "-d", str(size), "-q", "-l"]
        p = self.run.start(name, argv)
        # running when its clients are connected
        wait_for(lambda: self.info("clients")["connected_clients"] >= clients, "redis-benchmark to connect",
                 proc=p)
        return p


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def probe_request(conn, keys):
    def request():
        conn.send_command("GET", "key:%d" % random.randrange(max(1, keys)))
        conn.read_response()
    return request


def run_demo(args):
    checks = Checks()
    with Run("redis", keep=args.keep) as run:
        srv = RedisServer(run, free_port()).start()
        log("redis-server %d on 127.0.0.1:%d (work directory %s)" % (srv.pid, srv.port, run.workdir))
        t = time.monotonic()
        n = srv.populate(args.keys, args.value_size)
        log("loaded %d keys of %d bytes in %.1f s (DEBUG POPULATE); used_memory %.0f MiB"
            % (n, args.value_size, time.monotonic() - t, srv.used_memory() / 2**20))
        checks("keys loaded", n == args.keys, "DBSIZE %d, wanted %d" % (n, args.keys))

        probe_conn = srv.connection()
        probe_sock = probe_conn._sock
        probe = LatencyProbe(probe_request(probe_conn, args.keys), interval=args.probe_interval)
        probe.start()
        load = srv.start_load(args.clients, args.keys, args.value_size)
        log("load: redis-benchmark %d (-t set,get -c %d -l), probe: one GET at a time every %.1f ms"
            % (load.pid, args.clients, args.probe_interval * 1000))

        # ---- before, BGSAVE, two live dumps
        t0 = time.monotonic()
        time.sleep(args.phase_seconds)
        before = probe.window(t0, time.monotonic())
        fork_ms, b0, b1 = srv.bgsave()
        during_bgsave = probe.window(b0, b1)
        time.sleep(args.phase_seconds / 2)

        rows = [probe_row("load only", before, ["-", "-"]),
                probe_row("BGSAVE (redis forks)", during_bgsave, ["-", fmt_ms(fork_ms, 2)])]
        live_dumps(run, srv.pid, probe, checks, load, t0, rows, args.phase_seconds / 2, "redis",
                   "Probe latency (one GET at a time, redis-benchmark -c %d running)" % args.clients,
                   extra_headers=["redis fork ms"])

        # ---- stop the load; what must survive the kill + restore
        run.stop(load)
        c = srv.client()
        wait_for(lambda: c.info("clients")["connected_clients"] <= 2, "redis-benchmark's connections to close")
        dbsize, digest = c.dbsize(), _text(c.execute_command("DEBUG", "DIGEST"))
        server_before = c.info("server")
        c.close()
        held = srv.connection()
        held_sock = held._sock
        held.send_command("CLIENT", "SETNAME", "held-across-restore")
        held.read_response()
        held.send_command("CLIENT", "ID")
        held_id = held.read_response()
        blocked = srv.connection()
        blocked_sock = blocked._sock
        blocked.send_command("BLPOP", LIST_KEY, 0)
        wait_for(lambda: srv.info("clients")["blocked_clients"] == 1, "the BLPOP client to block")
        log("")
        log("before the kill dump: DBSIZE %d, DEBUG DIGEST %s; held connection CLIENT ID %s; one client in BLPOP"
            % (dbsize, digest, held_id))

        # ---- kill + restore (the probe keeps going on its connection)
        img = run.path("final.img")
        k0 = time.monotonic()
        res_k, secs_k, _, _ = run.dump(srv.pid, img, tag="dump-kill")
        rc = srv.proc.wait(timeout=WAIT)      # the original, killed by the dump: reap it (frees its PID)
        checks("kill dump done, redis killed by it", rc == -9,
               "freeze %.2f ms, image %.0f MiB, %.2f s, exit status %s"
               % (res_k["freeze_ms"], res_k["image_bytes"] / 2**20, secs_k, rc))
        res_r, secs_r = run.restore(img)
        k1 = time.monotonic()
        pid = res_r["pid"]
        checks("restored with the same PID", pid == srv.pid and alive(pid),
               "pid %d, %d threads, %d pages written in %.1f ms (ckpt restore ran %.2f s)"
               % (pid, len(res_r["threads"]), res_r["pages_written"], res_r["restore_ms"], secs_r))

        c = srv.client()
        dbsize2, digest2 = c.dbsize(), _text(c.execute_command("DEBUG", "DIGEST"))
        server_after = c.info("server")
        checks("every key is there: DBSIZE equal", dbsize2 == dbsize, "%d before, %d after" % (dbsize, dbsize2))
        checks("DEBUG DIGEST equal", digest2 == digest, "%s before, %s after" % (digest, digest2))
        checks("same redis instance (run_id, process_id)",
               server_after["run_id"] == server_before["run_id"] and server_after["process_id"] == srv.pid,
               "run_id %s, process_id %s" % (server_after["run_id"], server_after["process_id"]))

        held.send_command("CLIENT", "ID")
        held_id2 = held.read_response()
        held.send_command("CLIENT", "GETNAME")
        name2 = held.read_response()
        held.send_command("PING")
        pong = held.read_response()
        checks("held connection served on the same socket",
               held._sock is held_sock and held_id2 == held_id and name2 == b"held-across-restore" and pong in (b"PONG", "PONG", True),
               "CLIENT ID %s -> %s, name %s, PING %s" % (held_id, held_id2, _text(name2), _text(pong)))

        c.lpush(LIST_KEY, "hello")
        got = blocked.read_response()
        checks("client blocked in BLPOP before the dump gets the element pushed after the restore",
               blocked._sock is blocked_sock and got == [LIST_KEY.encode(), b"hello"], "got %r" % (got,))

        c.set("ckpt:demo:after", "restored")
        checks("restored redis accepts new connections and writes", c.get("ckpt:demo:after") == b"restored")
        c.close()

        time.sleep(0.5)
        probe.stop()
        outage = probe.window(k0, k1)
        whole = probe.window(t0, time.monotonic())
        checks("probe never failed and kept its socket", not whole["errors"] and probe_conn._sock is probe_sock,
               "; ".join(whole["errors"][:3]))
        table(["step", "freeze ms", "ckpt s", "restore ms", "probe worst ms"], [
            ["ckpt dump (kill)", fmt_ms(res_k["freeze_ms"], 2), "%.2f" % secs_k, "-", "-"],
            ["ckpt restore", "-", "%.2f" % secs_r, fmt_ms(res_r["restore_ms"], 1), "-"],
            ["client's view: dump + restore", "-", "%.2f" % (k1 - k0), "-", fmt_ms(outage["max_ms"], 0)],
        ], title="Kill + restore (%d keys, image %.0f MiB; the probe's worst request spans the gap, "
                 "plus TCP retransmission backoff)" % (dbsize, res_k["image_bytes"] / 2**20))
        for h in (held, blocked, probe_conn):
            h.disconnect()
    return checks.summary()


def main():
    ap = argparse.ArgumentParser(description="Checkpoint a live redis-server under load, kill, restore, check.")
    ap.add_argument("--keys", type=int, default=1000000, help="keys loaded with DEBUG POPULATE")
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--clients", type=int, default=20, help="redis-benchmark connections")
    ap.add_argument("--phase-seconds", type=float, default=3.0, help="probe window before the dumps")
    ap.add_argument("--probe-interval", type=float, default=0.001, help="pause between probe requests (s)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, images)")
    args = ap.parse_args()
    main_wrapper(lambda: run_demo(args))


if __name__ == "__main__":
    main()
