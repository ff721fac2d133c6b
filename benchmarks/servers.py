#!/usr/bin/env python3
"""redis-server under load: ckpt's live dump against its stop-the-world dump, beside redis's own
BGSAVE fork, as a client sees them.

One redis-server (no persistence, --keys keys of --value-size bytes from DEBUG POPULATE) runs
with redis-benchmark (-t set,get -c CLIENTS -l, random keys) hammering it and a latency probe (a
redis-py connection in this process, one GET at a time with a 1 ms pause, every latency recorded
with its start time). Then REPS times, in this order, with a settle pause between steps:

  BGSAVE                       redis forks a child to write its RDB: INFO latest_fork_usec is
                               the time redis is stopped for the fork; the probe over the save
  ckpt dump --mode async       live: `--leave-running --json`, freeze window from ckpt's JSON
  ckpt dump --mode stop-the-world  the same, freezing first and copying everything frozen

For each: the probe's p99 and worst latency over the requests that overlapped the step (the
dump's whole run, from ckpt's start to its exit). Medians over the reps are printed as a table
(markdown, stdout); the per-rep numbers go to stderr. With --restore (default on), a final
`ckpt dump` (kill) and `ckpt restore` give the restore time and the probe's longest wait across
both (its connection is carried over).

usage: python3 benchmarks/servers.py [--keys 1000000] [--reps 3] [--clients 20] [--json FILE]
No timing is checked: this only measures. Needs redis-server, redis-benchmark, redis-py.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "demos"))
sys.path.insert(0, HERE)

from _common import DemoError, LatencyProbe, Run, free_port, wait_for  # noqa: E402
from checkpoint_redis import RedisServer, probe_request  # noqa: E402
from dump import PHASES, code_identity, cpu_busy, machine, top_cpu  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec="%.2f"):
    return "–" if v is None else spec % v


def measure(args):
    results = {"bgsave": [], "async": [], "stop-the-world": [], "restore": None}
    with Run("bench-redis") as run:
        srv = RedisServer(run, free_port()).start()
        t = time.monotonic()
        n = srv.populate(args.keys, args.value_size)
        if n != args.keys:
            raise DemoError("DEBUG POPULATE made %d keys, not %d" % (n, args.keys))
        mem = srv.used_memory()
        log("redis-server %d: %d keys of %d bytes loaded in %.1f s, used_memory %.0f MiB"
            % (srv.pid, n, args.value_size, time.monotonic() - t, mem / 2**20))
        conn = srv.connection()
        probe = LatencyProbe(probe_request(conn, args.keys), interval=0.001)
        probe.start()
        load = srv.start_load(args.clients, args.keys, args.value_size)
        t0 = time.monotonic()
        time.sleep(args.settle * 2)
        results["load_only"] = probe.window(t0, time.monotonic())
        for rep in range(args.reps):
            fork_ms, b0, b1 = srv.bgsave()
            st = probe.window(b0, b1)
            results["bgsave"].append({"fork_ms": fork_ms, "seconds": b1 - b0, "p99_ms": st["p99_ms"],
                                      "max_ms": st["max_ms"], "requests": st["n"]})
            log("rep %d: BGSAVE fork %.2f ms, save %.2f s, probe p99 %s worst %s ms"
                % (rep + 1, fork_ms, b1 - b0, fmt(st["p99_ms"]), fmt(st["max_ms"])))
            time.sleep(args.settle)
            for mode in ("async", "stop-the-world"):
                img = run.path("bench.img")
                res, secs, d0, d1 = run.dump(srv.pid, img, "--leave-running", "--mode", mode, tag="dump-" + mode)
                size = os.path.getsize(img)
                os.unlink(img)
                st = probe.window(d0, d1)
                results[mode].append({"freeze_ms": res["freeze_ms"], "seconds": secs, "ckpt_elapsed_s": res["elapsed_s"],
                                      "p99_ms": st["p99_ms"], "max_ms": st["max_ms"], "requests": st["n"],
                                      "image_mib": size / 2**20, "rounds": res["rounds"],
                                      "breakdown_ms": res.get("freeze_breakdown_ms", {})})
                log("rep %d: %s freeze %.2f ms, ckpt %.2f s, probe p99 %s worst %s ms, image %.0f MiB, rounds %s"
                    % (rep + 1, mode, res["freeze_ms"], secs, fmt(st["p99_ms"]), fmt(st["max_ms"]), size / 2**20,
                       res["rounds"]))
                if st["errors"]:
                    raise DemoError("the probe failed during the %s dump: %s" % (mode, st["errors"][:3]))
                time.sleep(args.settle)
            if load.poll() is not None:
                raise DemoError("redis-benchmark stopped: %s" % run.log_tail("load"))
        if args.restore:
            run.stop(load)
            c = srv.client()
            wait_for(lambda: c.info("clients")["connected_clients"] <= 2, "redis-benchmark's connections to close")
            before = c.dbsize()
            c.close()
            img = run.path("final.img")
            k0 = time.monotonic()
            res, secs, _, _ = run.dump(srv.pid, img, tag="dump-kill")
            srv.proc.wait(timeout=120)
            rres, rsecs = run.restore(img)
            k1 = time.monotonic()
            wait_for(lambda: probe.samples and probe.samples[-1][0] > k1, "the probe to be served again")
            st = probe.window(k0, k1)
            c = srv.client()
            ok = c.dbsize()
            c.close()
            if ok != before:
                raise DemoError("DBSIZE %d before the kill dump, %d after the restore" % (before, ok))
            results["restore"] = {"kill_freeze_ms": res["freeze_ms"], "dump_s": secs, "restore_ms": rres["restore_ms"],
                                  "restore_s": rsecs, "gap_s": k1 - k0, "probe_max_ms": st["max_ms"],
                                  "pages_written": rres["pages_written"], "dbsize_before": before,
                                  "dbsize_after": ok}
            log("kill + restore: dump %.2f s (freeze %.2f ms), restore %.1f ms (ckpt restore %.2f s), probe's longest "
                "wait %s ms, DBSIZE after %d" % (secs, res["freeze_ms"], rres["restore_ms"], rsecs,
                                                 fmt(st["max_ms"], "%.0f"), ok))
        probe.stop()
        errs = probe.window(0, time.monotonic())["errors"]
        if errs:
            raise DemoError("the probe failed: %s" % errs[:3])
        results["used_memory_mib"] = mem / 2**20
    return results


def report(args, res, started, took):
    m = machine()
    out = []
    out.append("## redis-server under redis-benchmark load: ckpt live vs stop-the-world vs BGSAVE fork, %s UTC"
               % started.strftime("%Y-%m-%d %H:%M"))
    out.append("")
    out.append("- machine: %s, %d CPUs, %.1f GiB RAM, kernel %s, Python %s"
               % (m["cpu"], m["nproc"], m["mem_gib"], m["kernel"], m["python"]))
    out.append("- command: `python3 benchmarks/servers.py %s` (took %.0f s)" % (" ".join(sys.argv[1:]), took))
    out.append("- ckpt measured: %s" % code_identity())
    out.append("- redis-server %s: %d keys of %d bytes (DEBUG POPULATE), used_memory %.0f MiB; load: "
               "`redis-benchmark -t set,get -c %d -r %d -d %d -l`; probe: one GET at a time, 1 ms apart"
               % (args.redis_version, args.keys, args.value_size, res["used_memory_mib"], args.clients, args.keys,
                  args.value_size))
    out.append("- CPU busy before the run: %.0f%% (top: %s)" % (args.busy * 100, "; ".join(args.top) or "-"))
    out.append("- median of %d reps; probe latency over the requests overlapping the step (for a dump: ckpt's "
               "whole run)" % args.reps)
    out.append("")
    out.append("| step | redis stopped (ms) | probe p99 (ms) | probe worst (ms) | step duration (s) | image (MiB) |")
    out.append("|---|---:|---:|---:|---:|---:|")
    lo = res["load_only"]
    out.append("| load only (no dump) | – | %s | %s | – | – |" % (fmt(lo["p99_ms"]), fmt(lo["max_ms"])))
    b = res["bgsave"]
    out.append("| redis BGSAVE (fork) | %s (fork) | %s | %s | %s | – |"
               % (fmt(med(x["fork_ms"] for x in b)), fmt(med(x["p99_ms"] for x in b)),
                  fmt(med(x["max_ms"] for x in b)), fmt(med(x["seconds"] for x in b))))
    for mode, label in (("async", "ckpt dump --mode async (live)"), ("stop-the-world", "ckpt dump --mode stop-the-world")):
        d = res[mode]
        out.append("| %s | %s (freeze) | %s | %s | %s | %s |"
                   % (label, fmt(med(x["freeze_ms"] for x in d)), fmt(med(x["p99_ms"] for x in d)),
                      fmt(med(x["max_ms"] for x in d)), fmt(med(x["seconds"] for x in d)),
                      fmt(med(x["image_mib"] for x in d), "%.0f")))
    out.append("")
    out.append("Where the freeze goes (median ms; `state` = threads, process and the fd table with its sockets; "
               "`rest` = release and what follows the final copy):")
    out.append("")
    out.append("| mode | " + " | ".join(PHASES) + " | rest |")
    out.append("|---|" + "---:|" * (len(PHASES) + 1))
    for mode in ("async", "stop-the-world"):
        d = res[mode]
        cells = [fmt(med(x["breakdown_ms"].get(ph) for x in d)) for ph in PHASES]
        rest = med(x["freeze_ms"] - sum(x["breakdown_ms"].values()) for x in d if x["breakdown_ms"])
        out.append("| %s | %s | %s |" % (mode, " | ".join(cells), fmt(rest)))
    a, s = med(x["freeze_ms"] for x in res["async"]), med(x["freeze_ms"] for x in res["stop-the-world"])
    if a and s:
        out.append("")
        out.append("Stop-the-world freeze / live freeze: %.0f×; live freeze / BGSAVE fork: %.1f×"
                   % (s / a, a / med(x["fork_ms"] for x in b)))
    r = res.get("restore")
    if r:
        out.append("")
        out.append("Kill + restore (one run, load stopped): `ckpt dump` %.2f s (freeze %.2f ms), `ckpt restore` %.2f s "
                   "(restore %.0f ms, %d pages written); the probe's longest wait across both %s ms (its connection "
                   "carried over; TCP retransmission backoff included); DBSIZE after %d"
                   % (r["dump_s"], r["kill_freeze_ms"], r["restore_s"], r["restore_ms"], r["pages_written"],
                      fmt(r["probe_max_ms"], "%.0f"), r["dbsize_after"]))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1000000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--settle", type=float, default=1.0, help="pause between steps (s)")
    ap.add_argument("--no-restore", dest="restore", action="store_false", help="skip the final kill + restore")
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers as JSON")
    args = ap.parse_args()
    import subprocess
    args.redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    args.busy = cpu_busy()
    args.top = top_cpu()
    started = datetime.datetime.now(datetime.timezone.utc)
    t = time.monotonic()
    try:
        res = measure(args)
    except DemoError as e:
        log("FAILED: %s" % e)
        sys.exit(1)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
    print(report(args, res, started, time.monotonic() - t))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "results": res}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
