#!/usr/bin/env python3
"""A process tree dumped live against stop-the-world, side by side in one run.

The tree: four writer processes (tests/targets/writer.c), a parent and three children, each with
SIZE/4 MiB of its own memory and one thread writing RATE/4 pages per second, so that the tree
holds SIZE MiB in all and writes RATE pages per second. Then, alternately, a live dump
(`--mode async --leave-running`) and a stop-the-world one of the parent (the whole tree) are
taken through the CLI, REPS times each; the freeze window (every thread of the four processes
stopped, from the first interrupt to the release) and its phases are reported, medians. At the
end every writer checks all its pages (SIGUSR1) and must answer "ok".

usage: python3 benchmarks/tree.py [--size 1024] [--rate 20000] [--reps 5] [--json [FILE]]
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dump as bench  # noqa: E402  (the single-process benchmark: builds the writer, runs dumps)

PROCESSES = 4


class Tree(bench.Target):
    def __init__(self, exe, size_mb, rate):
        import queue
        import threading
        self.size_mb, self.threads, self.rate = size_mb, 1, rate
        one = "%s %d 1 %d" % (exe, size_mb // PROCESSES, max(1, rate // PROCESSES))
        self.proc = subprocess.Popen(["sh", "-c", "%s & %s & %s & exec %s" % (one, one, one, one)],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def members(self):
        from ckpt.kernel import procfs
        return [self.pid] + [i["pid"] for i in procfs.descendants(self.pid)]

    def self_check(self, timeout=300):
        pids = self.members()
        for p in pids:
            os.kill(p, signal.SIGUSR1)
        return [self.expect("ok", timeout) for _ in pids]

    def kill(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc.stdout.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="MiB in the whole tree (default 1024)")
    ap.add_argument("--rate", type=int, default=20000, help="pages/s written by the whole tree (default 20000)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compress", default="lz4", choices=("lz4", "none"))
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE")
    args = ap.parse_args(argv)
    exe = bench.build_writer() if hasattr(bench, "build_writer") else None
    if exe is None:
        exe = os.path.join(tempfile.mkdtemp(prefix="ckpt-tree-bench-"), "writer")
        subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, bench.WRITER_C], check=True)
    tmp = tempfile.mkdtemp(prefix="ckpt-tree-img-")
    res = {"size_mb": args.size, "rate": args.rate, "processes": PROCESSES, "live": [], "stw": [], "errors": []}
    tree = Tree(exe, args.size, args.rate)
    try:
        for _ in range(PROCESSES):
            tree.expect("ready", timeout=600)
        time.sleep(0.5)
        res["members"] = tree.members()
        bench.log("tree %s ready" % res["members"])
        for i in range(args.reps):
            for key, mode in (("live", "async"), ("stw", "stop-the-world")):
                img = os.path.join(tmp, "tree-%s-%d.img" % (key, i))
                r = bench.run_dump(tree.pid, img, mode, args.compress, 900)
                if len(r["processes"]) != PROCESSES:
                    res["errors"].append("%s #%d took %s" % (key, i + 1, r["processes"]))
                res[key].append(r)
                bench.log("  %-4s #%d: freeze %9.3f ms %s, rounds %s" % (key, i + 1, r["freeze_ms"],
                                                                       r.get("freeze_breakdown_ms"), r["rounds"]))
                time.sleep(0.3)
        res["self_check"] = tree.self_check()
    finally:
        tree.kill()
    res["live_summary"] = bench.summarize(res["live"])
    res["stw_summary"] = bench.summarize(res["stw"])
    lv, st = res["live_summary"], res["stw_summary"]
    print("| tree (%d processes) | mode | freeze ms (median, min-max) | %s | final pages | image MiB |"
          % (PROCESSES, " | ".join(bench.PHASES)))
    print("|---|---|---:|%s---:|---:|" % ("---:|" * len(bench.PHASES)))
    for name, s in (("live", lv), ("stop-the-world", st)):
        print("| %d MiB, %d pages/s | %s | %.2f (%.2f-%.2f) | %s | %d | %.1f |" % (
            args.size, args.rate, name, s["freeze_ms"], s["freeze_ms_min"], s["freeze_ms_max"],
            " | ".join(bench.fmt(s["breakdown_ms"].get(ph), ".2f") for ph in bench.PHASES),
            s["final_pages"], s["image_bytes"] / 2**20))
    print("\nself-check: %s; stop-the-world / live freeze: %.0fx" % (res["self_check"], st["freeze_ms"] / lv["freeze_ms"]))
    if args.json:
        text = json.dumps(res, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
