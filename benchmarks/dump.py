#!/usr/bin/env python3
"""Live dump against stop-the-world, side by side in one run.

For every configuration (target size x load x threads) one writer target (tests/targets/writer.c)
is built, started and left to stamp all its pages; then, alternately, a live dump
(`--mode async --leave-running`) and a stop-the-world dump (`--mode stop-the-world
--leave-running`) are taken through the CLI, REPS times each. Images go to a temporary directory
on /tmp and are deleted after each dump. The target is killed (SIGKILL) before the next one is
started, so only one target lives at a time.

The target's real write rate is measured, not assumed: every page of the writer carries its
address, its owner thread and that thread's stamp counter, so the sum over threads of the largest
counter found in memory is the number of pages written so far. It is sampled before the dumps
(a quiet window with the target alone) and after them (the rate while being dumped).

usage: python3 benchmarks/dump.py [--sizes 256,1024,4096] [--reps 5] [--quick] [--json [FILE]]
Tables go to stdout (markdown), progress to stderr.
"""
import argparse
import ctypes
import datetime
import json
import os
import platform
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WRITER_C = os.path.join(REPO, "tests", "targets", "writer.c")
PAGE = 4096
PHASES = ("stop_threads", "state", "maps", "final_scan", "final_copy")
IDLE_RATE = 2   # pages per second per thread: the threads exist but sleep. Not 0 (flat out) nor 1
# (writer.c then asks nanosleep for tv_nsec = 1e9, which fails with EINVAL: it runs flat out too)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine
def machine():
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "mem_gib": round(mem / 2**30, 1), "kernel": platform.release(),
            "arch": platform.machine(), "cpu": cpu, "python": platform.python_version()}


def cpu_busy(seconds=1.0):
    """Fraction of all CPUs busy over `seconds` (other sessions' load would skew the numbers)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]   # total, idle + iowait
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def top_cpu(n=3):
    """The processes using most CPU right now (ps), to name what else runs."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=10).stdout.decode().splitlines()[1:n + 2]
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in out:
        f = line.split(None, 2)
        if len(f) == 3 and int(f[0]) != os.getpid():
            rows.append("%s %s%% %s" % (f[0], f[1], f[2][:60]))
    return rows[:n]


def run_header(title, started, mach, command, elapsed, code, busy0, top0):
    """The heading and the first lines of a benchmark's report: when, on what, which code, how
    busy the machine was before the run."""
    print("## %s, %s" % (title, started.strftime("%Y-%m-%d %H:%M %Z")))
    print()
    print("- machine: %s, %d CPUs (nproc), %.1f GiB RAM, kernel %s, Python %s"
          % (mach["cpu"], mach["nproc"], mach["mem_gib"], mach["kernel"], mach["python"]))
    print("- command: `%s` (took %.0f s)" % (command, elapsed))
    print("- ckpt measured: %s" % code)
    print("- CPU busy before the run: %.0f%% (top: %s)" % (busy0 * 100, "; ".join(top0[:2])))


def code_identity():
    """Which ckpt is measured: the git commit of REPO (and whether its tree differs), if any."""
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=10)
        if head.returncode != 0:
            return "%s (not a git checkout)" % REPO
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=10).stdout.decode()
        n = len([x for x in dirty.splitlines() if x.strip()])
        return "%s at commit %s%s" % (REPO, head.stdout.decode().strip(),
                                      ", with %d modified tracked files" % n if n else ", clean tree")
    except (OSError, subprocess.TimeoutExpired):
        return REPO


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- target
class Target:
    """A running writer, with its stdout read by a thread."""

    def __init__(self, exe, size_mb, threads, rate):
        self.size_mb, self.threads, self.rate = size_mb, threads, rate
        libc = ctypes.CDLL(None, use_errno=True)

        def child():
            libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG: never outlive the benchmark

        self.proc = subprocess.Popen([exe, str(size_mb), str(threads), str(rate)], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, preexec_fn=child)
        self.pid = self.proc.pid
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").strip())
        self.lines.put(None)

    def expect(self, prefix, timeout):
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise RuntimeError("target %d: no %r line within %.0f s" % (self.pid, prefix, timeout))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError("target %d exited (status %s) before printing %r"
                                   % (self.pid, self.proc.poll(), prefix))
            if line.startswith(prefix) or line.startswith("BAD"):
                return line

    def alive(self):
        return self.proc.poll() is None

    def latency(self, timeout=60):
        """The target's page-write latency since the last call (writer.c, SIGUSR2): a dict of
        n, p50, p99, p999, max in microseconds."""
        os.kill(self.pid, signal.SIGUSR2)
        words = self.expect("lat", timeout).split()
        return {k: float(v) for k, v in zip(words[1::2], words[2::2])}

    def self_check(self, timeout=300):
        os.kill(self.pid, signal.SIGUSR1)
        return self.expect("ok", timeout)

    def kill(self):
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.proc.stdout.close()


def stamps(pid, chunk=64 << 20):
    """Pages written so far by all worker threads: the sum over owners of the largest stamp
    counter found in a consistent page header (address, counter, owner, checksum)."""
    try:
        import numpy as np
    except ImportError:
        np = None
    maps = []
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 5 and parts[1].startswith("rw"):
                s, e = (int(x, 16) for x in parts[0].split("-"))
                maps.append((s, e))
    best = {}
    buf = bytearray(chunk)
    fd = os.open("/proc/%d/mem" % pid, os.O_RDONLY)
    try:
        for s, e in maps:
            for a in range(s, e, chunk):
                n = min(chunk, e - a)
                try:
                    got = os.preadv(fd, [memoryview(buf)[:n]], a)
                except OSError:
                    continue
                got -= got % PAGE
                if not got:
                    continue
                if np is not None:
                    h = np.frombuffer(buf, dtype=np.uint64, count=got // 8).reshape(-1, PAGE // 8)[:, :4]
                    addrs = np.uint64(a) + np.arange(len(h), dtype=np.uint64) * np.uint64(PAGE)
                    ok = (h[:, 0] == addrs) & (h[:, 3] == (h[:, 0] ^ h[:, 1] ^ h[:, 2])) & (h[:, 2] < 256)
                    if ok.any():
                        owners, counters = h[ok, 2], h[ok, 1]
                        for o in np.unique(owners):
                            m = int(counters[owners == o].max())
                            best[int(o)] = max(best.get(int(o), 0), m)
                else:
                    q = memoryview(buf)[:got].cast("Q")
                    for i in range(got // PAGE):
                        ad, c, o, sm = q[i * 512:i * 512 + 4]
                        if ad == a + i * PAGE and sm == ad ^ c ^ o and o < 256 and c > best.get(o, 0):
                            best[o] = c
    finally:
        os.close(fd)
    return sum(best.values())


def measure_rate(pid, min_seconds=2.0):
    """Pages per second, from two counter samples. A sample reads all of the target's memory and
    sees each thread's latest stamp somewhere within that read, so the window is made at least
    ten times as long as one read to keep that uncertainty under 10%."""
    t0 = time.perf_counter()
    c0 = stamps(pid)
    scan = time.perf_counter() - t0
    time.sleep(max(min_seconds, 10 * scan) - scan)
    t1 = time.perf_counter()
    c1 = stamps(pid)
    return (c1 - c0) / (t1 - t0), (t1, c1)


# --------------------------------------------------------------------------- dumps
def run_dump(pid, image, mode, compress, timeout):
    cmd = [sys.executable, "-m", "ckpt", "dump", str(pid), "-o", image, "--leave-running", "--json",
           "--mode", mode, "--compress", compress]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, env=env,
                       stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    try:
        os.unlink(image)
    except FileNotFoundError:
        pass
    if p.returncode != 0:
        raise RuntimeError("ckpt dump (%s) failed with status %d: %s"
                           % (mode, p.returncode, p.stderr.decode(errors="replace").strip()[-2000:]))
    res = json.loads(p.stdout.decode().strip().splitlines()[-1])
    res["wall_s"] = round(wall, 4)
    return res


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(dumps):
    if not dumps:
        return None
    s = {
        "n": len(dumps),
        "mode": dumps[0]["mode"],
        "freeze_ms": med([d["freeze_ms"] for d in dumps]),
        "freeze_ms_min": min(d["freeze_ms"] for d in dumps),
        "freeze_ms_max": max(d["freeze_ms"] for d in dumps),
        "elapsed_s": med([d["elapsed_s"] for d in dumps]),
        "wall_s": med([d["wall_s"] for d in dumps]),
        "live_copy_gbps": med([d.get("live_copy_gbps") for d in dumps]),
        "image_bytes": med([d["image_bytes"] for d in dumps]),
        "pages_written": med([d["pages_written"] for d in dumps]),
        "rounds": med([len(d["rounds"]) for d in dumps]),
        "final_pages": med([d["rounds"][-1] for d in dumps]),
        "breakdown_ms": {},
        # every stop of the target (arm, re-arm, the uffd's creation, the freeze)
        "max_stop_ms": med([d.get("max_stop_ms") for d in dumps]),
        "stops": med([len(d.get("stops_ms", [])) for d in dumps]),
        "stopped_total_ms": med([d.get("stopped_total_ms") for d in dumps]),
    }
    for ph in PHASES:
        s["breakdown_ms"][ph] = med([d.get("freeze_breakdown_ms", {}).get(ph) for d in dumps])
    s["breakdown_ms"]["release"] = med([d["freeze_ms"] - sum(d.get("freeze_breakdown_ms", {}).values())
                                        for d in dumps])
    return s


def run_config(exe, tmp, size_mb, threads, load, reps, compress, timeout, wait_quiet=0):
    rate = IDLE_RATE if load == 0 else max(1, load // threads)
    cfg = {"size_mb": size_mb, "threads": threads, "load": load, "rate_per_thread_arg": rate,
           "live": [], "stw": [], "errors": []}
    need = size_mb * 2**20 * 2 + (1 << 30)   # the target, the frozen copy of stop-the-world, slack
    if mem_available() < need:
        cfg["errors"].append("skipped: %.1f GiB available, %.1f GiB needed"
                             % (mem_available() / 2**30, need / 2**30))
        log("  " + cfg["errors"][-1])
        return cfg
    cfg["busy_before"] = cpu_busy()
    deadline = time.monotonic() + wait_quiet
    while cfg["busy_before"] > 0.10 and time.monotonic() < deadline:
        log("  waiting for a quiet machine (%.0f%% busy: %s)" % (cfg["busy_before"] * 100, "; ".join(top_cpu(2))))
        time.sleep(5)
        cfg["busy_before"] = cpu_busy()
    if cfg["busy_before"] > 0.10:
        log("  warning: the machine is %.0f%% busy before the target starts: %s"
            % (cfg["busy_before"] * 100, "; ".join(top_cpu())))
    tgt = Target(exe, size_mb, threads, rate)
    try:
        t = time.perf_counter()
        tgt.expect("ready", timeout=600)
        cfg["populate_s"] = round(time.perf_counter() - t, 2)
        time.sleep(0.5)
        cfg["rate_before"], (t_a, c_a) = measure_rate(tgt.pid)
        log("  target %d ready after %.1f s, writing %.0f pages/s" % (tgt.pid, cfg["populate_s"], cfg["rate_before"]))
        # the threads' own cost: write latency with no dump, over a window as long as a dump
        tgt.latency()
        time.sleep(1.0)
        cfg["lat_nodump"] = tgt.latency()
        cfg["lat_live"], cfg["lat_stw"] = [], []
        for i in range(reps):
            for key, mode in (("live", "async"), ("stw", "stop-the-world")):
                img = os.path.join(tmp, "bench-%d-%s-%d.img" % (tgt.pid, key, i))
                try:
                    tgt.latency()
                    r = run_dump(tgt.pid, img, mode, compress, timeout)
                    cfg["lat_" + key].append(tgt.latency())
                except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                    cfg["errors"].append("%s #%d: %s" % (key, i + 1, e))
                    log("  " + cfg["errors"][-1])
                    if not tgt.alive():
                        raise RuntimeError("target died") from e
                    continue
                cfg[key].append(r)
                log("  %-4s #%d: freeze %9.3f ms, total %6.2f s, live copy %s GB/s, rounds %s"
                    % (key, i + 1, r["freeze_ms"], r["elapsed_s"], r.get("live_copy_gbps"), r["rounds"]))
                if not tgt.alive():
                    raise RuntimeError("target %d died after a %s dump" % (tgt.pid, key))
                time.sleep(0.3)
        t_b, c_b = time.perf_counter(), stamps(tgt.pid)
        # while running: the frozen time of all the dumps taken out (the writer cannot write then)
        frozen_s = sum(d["freeze_ms"] for d in cfg["live"] + cfg["stw"]) / 1000
        cfg["rate_during"] = (c_b - c_a) / max(1e-3, t_b - t_a - frozen_s)
        cfg["self_check"] = tgt.self_check()
        log("  self-check: %s" % cfg["self_check"])
    except Exception as e:   # noqa: BLE001 - one configuration failing must not stop the table
        cfg["errors"].append("configuration failed: %s" % e)
        log("  " + cfg["errors"][-1])
    finally:
        tgt.kill()
    cfg["live_summary"] = summarize(cfg["live"])
    cfg["stw_summary"] = summarize(cfg["stw"])
    return cfg


# --------------------------------------------------------------------------- output
def fmt(v, spec, none="–"):
    return none if v is None else format(v, spec)


def load_name(load):
    return "idle" if load == 0 else "%d" % load


def tables(results, reps):
    out = []
    out.append("### Freeze window, total time, throughput (median of %d dumps each)" % reps)
    out.append("")
    out.append("| size | threads | load (pages/s) | measured rate: alone / during the dumps (pages/s) "
               "| live freeze (ms) | STW freeze (ms) | STW / live "
               "| live total (s) | STW total (s) | live copy (GB/s) | live image (MiB) | STW image (MiB) "
               "| live rounds: count, final pages | self-check | CPU busy before |")
    out.append("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for c in results:
        lv, st = c.get("live_summary"), c.get("stw_summary")
        ratio = (st["freeze_ms"] / lv["freeze_ms"]) if lv and st and lv["freeze_ms"] else None
        size = "%d MiB" % c["size_mb"] if c["size_mb"] < 1024 else "%g GiB" % (c["size_mb"] / 1024)
        rates = "%s / %s" % (fmt(c.get("rate_before"), ",.0f"), fmt(c.get("rate_during"), ",.0f"))
        out.append("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            size, c["threads"], load_name(c["load"]), rates,
            fmt(lv and lv["freeze_ms"], ".2f"), fmt(st and st["freeze_ms"], ".1f"),
            fmt(ratio, ",.0f") + ("×" if ratio else ""),
            fmt(lv and lv["elapsed_s"], ".2f"), fmt(st and st["elapsed_s"], ".2f"),
            fmt(lv and lv["live_copy_gbps"], ".2f"),
            fmt(lv and lv["image_bytes"] / 2**20, ".1f"), fmt(st and st["image_bytes"] / 2**20, ".1f"),
            ("%d, %d" % (lv["rounds"], lv["final_pages"])) if lv else "–",
            (c.get("self_check") or "–") + (" (%d errors)" % len(c["errors"]) if c["errors"] else ""),
            "–" if c.get("busy_before") is None else "%.0f%%" % (c["busy_before"] * 100)))
    out.append("")
    out.append("### Where the freeze goes (median ms per phase)")
    out.append("")
    out.append("`release` is what follows the final copy until the last thread is resumed.")
    out.append("")
    cols = PHASES + ("release",)
    out.append("| size | threads | load | mode | freeze | " + " | ".join(cols) + " |")
    out.append("|---:|---:|---|---|---:|" + "---:|" * len(cols))
    for c in results:
        size = "%d MiB" % c["size_mb"] if c["size_mb"] < 1024 else "%g GiB" % (c["size_mb"] / 1024)
        for name, key in (("live", "live_summary"), ("STW", "stw_summary")):
            s = c.get(key)
            if not s:
                continue
            out.append("| %s | %d | %s | %s | %.2f | %s |" % (
                size, c["threads"], load_name(c["load"]), name, s["freeze_ms"],
                " | ".join(fmt(s["breakdown_ms"].get(p), ".2f") for p in cols)))
    out.append("")
    out.append("### The target's own threads: page-write latency (microseconds)")
    out.append("")
    out.append("Every page write of the writer is timed (writer.c); over a dump (from its start to its end) "
               "against the same length of time with no dump. p50 / p99 / p999: medians over the dumps; "
               "max: the largest.")
    out.append("")
    out.append("| size | threads | load | no dump p50 / p99 / max | live dump p50 / p99 / p999 / max "
               "| stop-the-world p50 / p99 / max |")
    out.append("|---:|---:|---|---|---|---|")
    for c in results:
        if not c.get("lat_nodump"):
            continue
        size = "%d MiB" % c["size_mb"] if c["size_mb"] < 1024 else "%g GiB" % (c["size_mb"] / 1024)

        def q(samples, keys):
            if not samples:
                return "–"
            vals = []
            for k in keys:
                xs = [x[k] for x in samples]
                vals.append(fmt(max(xs) if k == "max" else med(xs), ".1f"))
            return " / ".join(vals)
        out.append("| %s | %d | %s | %s | %s | %s |" % (
            size, c["threads"], load_name(c["load"]), q([c["lat_nodump"]], ("p50", "p99", "max")),
            q(c.get("lat_live"), ("p50", "p99", "p999", "max")), q(c.get("lat_stw"), ("p50", "p99", "max"))))
    out.append("")
    out.append("### Every stop of the target (live dumps, medians)")
    out.append("")
    out.append("Besides the freeze, the target's threads stop while the uffd is created and while "
               "mappings are registered (arm, and re-arm in rounds that find new mappings).")
    out.append("")
    out.append("| size | threads | load | freeze (ms) | longest stop (ms) | stops | stopped in all (ms) | longest / freeze |")
    out.append("|---:|---:|---|---:|---:|---:|---:|---:|")
    for c in results:
        s_ = c.get("live_summary")
        if not s_ or s_.get("max_stop_ms") is None:
            continue
        size = "%d MiB" % c["size_mb"] if c["size_mb"] < 1024 else "%g GiB" % (c["size_mb"] / 1024)
        out.append("| %s | %d | %s | %.2f | %.2f | %s | %.2f | %.2f |" % (
            size, c["threads"], load_name(c["load"]), s_["freeze_ms"], s_["max_stop_ms"], fmt(s_["stops"], ".0f"),
            s_["stopped_total_ms"], s_["max_stop_ms"] / s_["freeze_ms"] if s_["freeze_ms"] else 0))
    errors = [(c, e) for c in results for e in c["errors"]]
    if errors:
        out.append("")
        out.append("### Errors")
        out.append("")
        for c, e in errors:
            out.append("- %d MiB, %d threads, load %s: %s" % (c["size_mb"], c["threads"], load_name(c["load"]), e))
    return "\n".join(out)


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256,1024,4096", help="target sizes in MiB (default 256,1024,4096)")
    ap.add_argument("--threads", default="1,8", help="writer thread counts (default 1,8)")
    ap.add_argument("--loads", default="0,10000,100000",
                    help="total pages written per second, 0 = idle (default 0,10000,100000)")
    ap.add_argument("--reps", type=int, default=5, help="dumps per mode and configuration (default 5)")
    ap.add_argument("--quick", action="store_true", help="only 256 MiB, 3 dumps each")
    ap.add_argument("--compress", default="lz4", choices=("lz4", "none"))
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed for one dump")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each configuration, wait up to SECONDS for the machine to be under 10%% busy")
    ap.add_argument("--note", action="append", default=[], help="a line to add to the header (repeatable)")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE",
                    help="also write the raw results as JSON (to FILE, or stdout after the tables)")
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.sizes.split(",") if x]
    reps = a.reps
    if a.quick:
        sizes, reps = [256], 3
    threads = [int(x) for x in a.threads.split(",") if x]
    loads = [int(x) for x in a.loads.split(",") if x]
    if not os.path.exists(WRITER_C):
        sys.exit("cannot find the writer target at %s" % WRITER_C)
    if not shutil.which("gcc"):
        sys.exit("gcc is needed to build the writer target")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # SIGTERM still kills the target
    mach = machine()
    code = code_identity()
    busy0 = cpu_busy()
    top0 = top_cpu()
    if busy0 > 0.10:
        log("warning: the machine is %.0f%% busy before the benchmark: %s" % (busy0 * 100, "; ".join(top0)))
    started = datetime.datetime.now().astimezone()
    command = shlex.join(["python3", "benchmarks/dump.py"] + list(sys.argv[1:] if argv is None else argv))
    results = []
    build = tempfile.mkdtemp(prefix="ckpt-bench-build-")
    images = tempfile.mkdtemp(prefix="ckpt-bench-img-", dir="/tmp")
    try:
        exe = os.path.join(build, "writer")
        subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, WRITER_C], check=True)
        for size in sizes:
            for load in loads:
                for th in threads:
                    log("%d MiB, %d thread(s), load %s" % (size, th, load_name(load)))
                    results.append(run_config(exe, images, size, th, load, reps, a.compress, a.timeout,
                                              a.wait_quiet))
    finally:
        shutil.rmtree(build, ignore_errors=True)
        shutil.rmtree(images, ignore_errors=True)
    elapsed = (datetime.datetime.now().astimezone() - started).total_seconds()

    run_header("ckpt dump: live (async) against stop-the-world", started, mach, command, elapsed, code, busy0, top0)
    for line in a.note:
        print("- %s" % line)
    print("- each dump: `python3 -m ckpt dump PID -o IMG --leave-running --json --compress %s "
          "--mode async|stop-the-world`, alternating live and STW, images on %s, deleted after each dump"
          % (a.compress, "/tmp"))
    print("- target: tests/targets/writer.c, `writer SIZE THREADS RATE` with RATE = load / threads per thread "
          "(idle: %d page/s per thread); all pages stamped before the first dump. The measured rate is read "
          "from the stamp counters in the target's memory: alone, over a window of at least 2 s (and 10 "
          "times one memory read) before the dumps; during, over the whole dump sequence less the time "
          "the target was frozen. The writer's 1 ms pacing rounds the rate down" % IDLE_RATE)
    print("- freeze: first PTRACE_INTERRUPT to the release of the last thread; total: ckpt's own elapsed time "
          "(process start excluded); live copy: pages of the live rounds / their time")
    print()
    print(tables(results, reps))
    if a.json:
        doc = {"machine": mach, "code": code, "busy_before": busy0, "notes": a.note,
               "started": started.isoformat(), "command": command, "reps": reps,
               "results": results}
        if a.json == "-":
            print()
            print("```json")
            print(json.dumps(doc, indent=1))
            print("```")
        else:
            with open(a.json, "w") as f:
                json.dump(doc, f, indent=1)
    return 0 if not any(c["errors"] for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
