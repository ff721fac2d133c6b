#!/usr/bin/env python3
"""Checkpoint a live Python HTTP server under load, then kill it, restore it and check its state.

The server is demos/httpserver_target.py: http.server.ThreadingHTTPServer speaking HTTP/1.1
(keep-alive, one thread per connection) with its whole state in memory, a dict of --keys counters
changed by POST /incr/NAME.

Steps:
  1. start the server on 127.0.0.1 (a free port) with --keys counters
  2. start a load generator (wrk: POST /incr/kN on random counters over --connections keep-alive
     connections) and a latency probe (http.client, one GET at a time on one keep-alive
     connection, every latency recorded with its time)
  3. `ckpt dump --leave-running --verify`, then a plain live dump (`--leave-running`): the freeze
     window from --json, the probe's p99 and worst latency before and during each dump
  4. stop the load; GET /state (count, sum and sha256 of every counter); a held keep-alive
     connection (http.client) and one with half a request sent, both opened before the dump;
     the probe keeps running
  5. `ckpt dump` (kills the server), `ckpt restore`; then: /state equal, the held
     connection is served on the same socket by the same server-side connection (its request
     count goes on), the half-sent request completes, the probe never failed

usage: python3 demos/checkpoint_http.py [--keys 100000] [--connections 8] [--phase-seconds 3] [--keep]
Exits 0 when every check passed, 1 otherwise.
"""
import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (live_dumps, WAIT, Checks, DemoError, LatencyProbe, Run, alive,  # noqa: E402
                     fmt_ms, free_port, log, main_wrapper, probe_row, table, wait_for)

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(HERE, "httpserver_target.py")

WRK_SCRIPT = """
math.randomseed(%(seed)d)
request = function()
  return wrk.format("POST", "/incr/k" .. math.random(0, %(keys)d - 1), nil, "1")
end
"""


class Conn:
    """One keep-alive HTTP connection that is never reopened behind our back (auto_open off)."""

    def __init__(self, port, timeout=WAIT):
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.c.connect()
        self.c.auto_open = 0
        self.sock = self.c.sock

    def request(self, method, path, body=None):
        self.c.request(method, path, body=body)
        r = self.c.getresponse()
        data = r.read()
        if r.status != 200:
            raise DemoError("%s %s: HTTP %d %r" % (method, path, r.status, data[:80]))
        return data, r

    def same_socket(self):
        return self.c.sock is self.sock and self.sock is not None

    def close(self):
        self.c.close()


def state(port):
    c = Conn(port)
    try:
        return json.loads(c.request("GET", "/state")[0])
    finally:
        c.close()


def run_demo(args):
    checks = Checks()
    with Run("http", keep=args.keep) as run:
        port = free_port()
        srv = run.start("http", [sys.executable, TARGET, "--port", str(port), "--keys", str(args.keys)])
        wait_for(lambda: state(port), "the HTTP server on port %d to answer" % port, proc=srv)
        s0 = state(port)
        log("HTTP server %d (python http.server, HTTP/1.1 keep-alive) on 127.0.0.1:%d with %d counters "
            "(work directory %s)" % (srv.pid, port, s0["counters"], run.workdir))
        checks("counters created", s0["counters"] == args.keys and s0["pid"] == srv.pid,
               "%d counters, sum %d" % (s0["counters"], s0["total"]))

        probe_conn = Conn(port)

        def request():
            probe_conn.request("GET", "/get/k%d" % random.randrange(args.keys))
        probe = LatencyProbe(request, interval=args.probe_interval)
        probe.start()

        wrk = shutil.which("wrk")
        if not wrk:
            raise DemoError("wrk is not installed (apt-get install wrk)")
        script = run.path("incr.lua")
        with open(script, "w") as f:
            f.write(WRK_SCRIPT % {"seed": 1, "keys": args.keys})
        load = run.start("load", [wrk, "-t", "1", "-c", str(args.connections), "-d", "3600s", "--timeout", "60s",
                                  "-s", script, "http://127.0.0.1:%d/" % port])
        wait_for(lambda: state(port)["total"] > s0["total"] + 100, "wrk's POSTs to arrive", proc=load)
        log("load: wrk %d (-c %d, POST /incr/kN), probe: one GET at a time every %.1f ms"
            % (load.pid, args.connections, args.probe_interval * 1000))

        # ---- before, two live dumps
        t0 = time.monotonic()
        time.sleep(args.phase_seconds)
        rows = [probe_row("load only", probe.window(t0, time.monotonic()), ["-"])]
        live_dumps(run, srv.pid, probe, checks, load, t0, rows, args.phase_seconds / 2, "server",
                   "Probe latency (one GET at a time, wrk -c %d POSTing)" % args.connections)

        # ---- stop the load; what must survive the kill + restore
        run.stop(load, signal.SIGINT)       # wrk prints its summary on SIGINT
        log("wrk: %s" % run.log_tail("load", 8))
        last = [None]

        def stable():       # a POST wrk sent just before it stopped may still be in a server thread
            s = state(port)
            key = (s["counters"], s["total"], s["digest"])
            same, last[0] = key == last[0], key
            time.sleep(0.05)
            return same and s
        s1 = wait_for(stable, "the counters to settle after wrk stopped")
        checks("load changed the state", s1["total"] > s0["total"],
               "%d counters, sum %d (%d POSTs counted)" % (s1["counters"], s1["total"], s1["total"] - s0["total"]))
        held = Conn(port)
        _, r = held.request("GET", "/ping")
        held_id, held_n = r.getheader("X-Conn-Id"), int(r.getheader("X-Conn-Requests"))
        c = Conn(port)
        k1_value = c.request("GET", "/get/k1")[0]
        c.close()
        half = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        half.sendall(b"GET /get/k1 HTTP/1.1\r\nHost: 127.0.0.1\r\n")     # the blank line after the restore
        s_before = state(port)
        log("")
        log("before the kill dump: %d counters, sum %d, sha256 %s...; held connection is the server's #%s"
            % (s_before["counters"], s_before["total"], s_before["digest"][:16], held_id))

        # ---- kill + restore (the probe keeps going on its connection)
        img = run.path("final.img")
        k0 = time.monotonic()
        res_k, secs_k, _, _ = run.dump(srv.pid, img, tag="dump-kill")
        rc = srv.wait(timeout=WAIT)      # the original, killed by the dump: reap it (frees its PID)
        checks("kill dump done, server killed by it", rc == -9,
               "freeze %.2f ms, %d threads, image %.0f MiB, %.2f s, exit status %s"
               % (res_k["freeze_ms"], res_k["threads"], res_k["image_bytes"] / 2**20, secs_k, rc))
        res_r, secs_r = run.restore(img)
        k1 = time.monotonic()
        pid = res_r["pid"]
        checks("restored with the same PID", pid == srv.pid and alive(pid),
               "pid %d, %d threads, %d pages written in %.1f ms (ckpt restore ran %.2f s)"
               % (pid, len(res_r["threads"]), res_r["pages_written"], res_r["restore_ms"], secs_r))

        _, r = held.request("GET", "/ping")
        held_id2, held_n2 = r.getheader("X-Conn-Id"), int(r.getheader("X-Conn-Requests"))
        checks("held keep-alive connection served on the same socket by the same server connection",
               held.same_socket() and held_id2 == held_id and held_n2 == held_n + 1,
               "connection #%s -> #%s, its request %d -> %d" % (held_id, held_id2, held_n, held_n2))
        half.sendall(b"\r\n")
        resp = http.client.HTTPResponse(half)
        resp.begin()
        body = resp.read()
        checks("request half sent before the dump completes after the restore",
               resp.status == 200 and body == k1_value, "HTTP %d %r (k1 was %r)" % (resp.status, body, k1_value))
        s_after = state(port)
        for k in ("counters", "total", "digest", "pid"):
            checks("state equal after the restore: %s" % k, s_after[k] == s_before[k],
                   "%s before, %s after" % (s_before[k], s_after[k]))
        c = Conn(port)
        v = int(c.request("POST", "/incr/after-restore", body=b"7")[0])
        c.close()
        checks("restored server accepts new connections and updates", v == 7)

        time.sleep(0.5)
        probe.stop()
        outage = probe.window(k0, k1)
        errs = probe.window(t0, time.monotonic())["errors"]
        checks("probe never failed and kept its socket", not errs and probe_conn.same_socket(), "; ".join(errs[:3]))
        table(["step", "freeze ms", "ckpt s", "restore ms", "probe worst ms"], [
            ["ckpt dump (kill)", fmt_ms(res_k["freeze_ms"], 2), "%.2f" % secs_k, "-", "-"],
            ["ckpt restore", "-", "%.2f" % secs_r, fmt_ms(res_r["restore_ms"], 1), "-"],
            ["client's view: dump + restore", "-", "%.2f" % (k1 - k0), "-", fmt_ms(outage["max_ms"], 0)],
        ], title="Kill + restore (%d counters, image %.0f MiB; the probe's worst request spans the gap, "
                 "plus TCP retransmission backoff)" % (s_before["counters"], res_k["image_bytes"] / 2**20))
        half.close()
        held.close()
        probe_conn.close()
    return checks.summary()


def main():
    ap = argparse.ArgumentParser(description="Checkpoint a live Python HTTP server under load, kill, restore, check.")
    ap.add_argument("--keys", type=int, default=100000, help="counters the server holds")
    ap.add_argument("--connections", type=int, default=8, help="wrk connections")
    ap.add_argument("--phase-seconds", type=float, default=3.0, help="probe window before the dumps")
    ap.add_argument("--probe-interval", type=float, default=0.001, help="pause between probe requests (s)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, images)")
    args = ap.parse_args()
    main_wrapper(lambda: run_demo(args))


if __name__ == "__main__":
    main()
