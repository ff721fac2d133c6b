#!/usr/bin/env python3
"""Rollback of a live process (`ckpt restore IMG --into PID`), with and without kept tracking,
against a fresh `ckpt restore IMG` of the killed process, side by side in one run.

The target is the writer (ckpt/data/writer.c) in its "ctl" mode: SIZE MiB of stamped pages, no
thread writing on its own, commands on stdin. Each measurement:

  1. snapshot: `ckpt dump PID -o IMG --leave-running` (--keep-tracking for the "kept tracking"
     rows: then the rollback compares only the pages written since the snapshot); the target's
     writable memory read through /proc/PID/mem right after it (the reference: the target
     waits for a command and writes nothing meanwhile)
  2. the target stamps a deterministic set of pages: every 100th page (1%) or every 10th (10%)
  3. `ckpt restore IMG --into PID --json`: freeze, ckpt's own time, pages compared and written;
     the wall time of the command (process start included) beside it
  4. the check: every writable mapping read again and compared with the reference, byte for
     byte (the layout too), but for the fields of struct rseq the kernel rewrites with the CPU
     a thread runs on; the target then answers "ping" with the stamp count it had at the
     snapshot and its own page check with "ok". Any difference fails the benchmark.

Then the target is killed and restored fresh from the last image (`ckpt restore IMG --json`),
and checked against that image's reference the same way.

usage: python3 benchmarks/rollback.py [--size 1024] [--reps 3] [--quick] [--json FILE]
Tables go to stdout (markdown), progress to stderr. Exit status 1 if any check failed.
"""
import argparse
import ctypes
import datetime
import json
import os
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
sys.path.insert(0, HERE)
from dump import code_identity, cpu_busy, machine, run_header, top_cpu  # noqa: E402

WRITER_C = os.path.join(REPO, "ckpt", "data", "writer.c")
PAGE = 4096
CHUNK = 64 << 20
FRACTIONS = ((1, 100), (10, 10))        # (percent, stride): every stride-th page stamped
PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG = 36, 1
_libc = ctypes.CDLL(None, use_errno=True)


class CheckFailed(Exception):
    pass


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def ckpt(*args, timeout=900, stdin=subprocess.DEVNULL):
    """`python3 -m ckpt ARGS`; output through files (a restored process may inherit ckpt's
    stdout). Returns (parsed JSON of the last stdout line or None, wall seconds)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "ckpt"] + [str(a) for a in args], stdout=out, stderr=err,
                           stdin=stdin, timeout=timeout, env=env(), cwd=REPO)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        o, e = out.read(), err.read()
    if p.returncode != 0:
        raise CheckFailed("ckpt %s failed (exit %d): %s" % (" ".join(map(str, args)), p.returncode, e.strip()[-2000:]))
    lines = o.strip().splitlines()
    return (json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None), wall


# --------------------------------------------------------------------------- the target
class Target:
    """The writer in ctl mode, commands on its stdin, its answers read by a thread."""

    def __init__(self, exe, size_mb):
        def child():
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)   # never outlive the benchmark

        self.proc = subprocess.Popen([exe, str(size_mb), "0", "0", "ctl"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, preexec_fn=child)
        self.pid = self.proc.pid
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        words = self.expect("ready", 600).split()      # ready PID buf ADDR bytes N
        self.buf, self.nbytes = int(words[3], 16), int(words[5])

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").strip())
        self.lines.put(None)

    def expect(self, prefix, timeout=120):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise CheckFailed("target %d: no answer within %d s (wanted %r)" % (self.pid, timeout, prefix)) from None
        if line is None:
            raise CheckFailed("target %d exited (status %s), wanted %r" % (self.pid, self.proc.poll(), prefix))
        if not line.startswith(prefix):
            raise CheckFailed("target %d answered %r, wanted %r" % (self.pid, line, prefix))
        return line

    def command(self, cmd, prefix, timeout=300):
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        return self.expect(prefix, timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def writable_maps(pid):
    """(start, end, name) of the process's writable private mappings, but the kernel's own."""
    out = []
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            p = line.split(None, 5)
            if p[1][1] != "w" or p[1][3] != "p":
                continue
            name = p[5].strip() if len(p) > 5 else ""
            if name in ("[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]"):
                continue
            s, e = (int(x, 16) for x in p[0].split("-"))
            out.append((s, e, name))
    return out


def kernel_written(image):
    """Byte ranges the kernel itself writes into the process whenever a thread returns to user
    space, and that therefore say nothing about a rollback: in each thread's struct rseq,
    cpu_id_start and cpu_id (offsets 0-7), node_id and mm_cid (20-27), the CPU it last ran on.
    Read from the image's thread records."""
    sys.path.insert(0, REPO)
    from ckpt.image.reader import open_chain
    r = open_chain(image)
    try:
        threads = r.metas()["threads"]
    finally:
        r.close()
    out = []
    for t in threads:
        rs = t.get("rseq")
        if rs and rs.get("ptr"):
            out += [(rs["ptr"], rs["ptr"] + 8), (rs["ptr"] + 20, rs["ptr"] + 28)]
    return out


def _read(fd, a, n, ignore):
    data = os.pread(fd, n, a)
    hits = [(max(s, a), min(e, a + n)) for s, e in ignore if s < a + n and e > a]
    if not hits:
        return data
    data = bytearray(data)
    for s, e in hits:
        data[s - a:e - a] = bytes(e - s)
    return bytes(data)


def read_memory(pid, ignore=()):
    """The content of every writable private mapping: {(start, end, name): [chunks]}, the byte
    ranges `ignore` as zeros."""
    mem = {}
    fd = os.open("/proc/%d/mem" % pid, os.O_RDONLY)
    try:
        for s, e, name in writable_maps(pid):
            mem[(s, e, name)] = [_read(fd, a, min(CHUNK, e - a), ignore) for a in range(s, e, CHUNK)]
    finally:
        os.close(fd)
    mem[None] = list(ignore)
    return mem


def differing_pages(a, b):
    try:
        import numpy as np
        x = np.frombuffer(a, dtype=np.uint64).reshape(-1, PAGE // 8)
        y = np.frombuffer(b, dtype=np.uint64).reshape(-1, PAGE // 8)
        return [int(i) for i in np.nonzero((x != y).any(axis=1))[0]]
    except ImportError:
        return [i for i in range(len(a) // PAGE) if a[i * PAGE:(i + 1) * PAGE] != b[i * PAGE:(i + 1) * PAGE]]


def compare_memory(pid, ref):
    """Pages of pid's writable memory that differ from ref: (count, first few 'addr name'),
    a mapping missing or added counting whole."""
    now = writable_maps(pid)
    diffs, where = 0, []
    ignore = ref[None]
    keys = set(ref) - {None}
    for k in keys - set(now):
        diffs += (k[1] - k[0]) // PAGE
        where.append("%#x %s (mapping gone)" % (k[0], k[2]))
    for k in set(now) - keys:
        diffs += (k[1] - k[0]) // PAGE
        where.append("%#x %s (new mapping)" % (k[0], k[2]))
    fd = os.open("/proc/%d/mem" % pid, os.O_RDONLY)
    try:
        for k in sorted(keys & set(now)):
            s, e, name = k
            for n, a in enumerate(range(s, e, CHUNK)):
                got = _read(fd, a, min(CHUNK, e - a), ignore)
                if got != ref[k][n]:
                    pages = differing_pages(got, ref[k][n])
                    diffs += len(pages)
                    where += ["%#x %s" % (a + i * PAGE, name) for i in pages[:3]]
    finally:
        os.close(fd)
    return diffs, where[:5]


# --------------------------------------------------------------------------- measurements
def untrack(pid):
    if os.path.exists("/run/ckpt/tracking/%d.json" % pid):
        ckpt("untrack", pid)


def one_rollback(tgt, img, percent, stride, tracking):
    untrack(tgt.pid)
    dump, dump_wall = ckpt("dump", tgt.pid, "-o", img, "--leave-running", "--json",
                           *(("--keep-tracking",) if tracking else ()))
    ref = read_memory(tgt.pid, kernel_written(img))
    gen = tgt.command("ping", "pong").split()[1]
    stamped = int(tgt.command("stamp %d 0" % stride, "stamped").split()[1])
    before = compare_memory(tgt.pid, ref)[0]
    if before < stamped:
        raise CheckFailed("after stamping %d pages only %d differ from the snapshot" % (stamped, before))
    res, wall = ckpt("restore", img, "--into", tgt.pid, "--json")
    diffs, where = compare_memory(tgt.pid, ref)
    if diffs:
        raise CheckFailed("rollback (%d%%, %s): %d pages differ from the snapshot: %s"
                          % (percent, "kept tracking" if tracking else "no tracking", diffs, "; ".join(where)))
    gen2 = tgt.command("ping", "pong").split()[1]
    if gen2 != gen:
        raise CheckFailed("rolled back, the target counts %s stamps, %s at the snapshot" % (gen2, gen))
    tgt.command("check", "ok")
    if res.get("pid") != tgt.pid:
        raise CheckFailed("rollback reports pid %s, not %d" % (res.get("pid"), tgt.pid))
    if tracking and res.get("tracking") is not True:
        raise CheckFailed("rollback after --keep-tracking did not use the kept tracking (tracking %r)"
                          % res.get("tracking"))
    res["wall_s"] = round(wall, 4)
    res["stamped"] = stamped
    res["differing_before"] = before
    res["snapshot_freeze_ms"] = dump["freeze_ms"] if dump else None
    log("  %2d%% %-13s freeze %8.2f ms, ckpt %6.3f s, wall %6.3f s; pages compared %d, written %d, dropped %d"
        % (percent, "kept tracking" if tracking else "no tracking", res["freeze_ms"], res["elapsed_s"], wall,
           res.get("pages_compared", -1), res.get("pages_written", -1), res.get("pages_dropped", -1)))
    return res


def reap(pid, timeout=60):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not os.path.exists("/proc/%d" % pid):
                return
        time.sleep(0.01)


def fresh_restores(img, ref, reps):
    out = []
    for i in range(reps):
        # --shell-job: the restored writer's stdin is ckpt's, a pipe kept open and silent until
        # it is checked, so that it waits for a command exactly as at the snapshot (on
        # /dev/null it would read its end of input at once, and its stdio state would change)
        r, w = os.pipe()
        try:
            res, wall = ckpt("restore", img, "--json", "--shell-job", stdin=r)
        finally:
            os.close(r)
        pid = res["pid"]
        try:
            diffs, where = compare_memory(pid, ref)
            if diffs:
                raise CheckFailed("fresh restore: %d pages differ from the snapshot: %s" % (diffs, "; ".join(where)))
        finally:
            reap(pid)
            os.close(w)
        res["wall_s"] = round(wall, 4)
        out.append(res)
        log("  fresh restore #%d: restore_ms %.0f, wall %.3f s; pages written %s"
            % (i + 1, res["restore_ms"], wall, res.get("pages_written")))
    return out


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, spec, none="–"):
    return none if v is None else format(v, spec)


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="target size in MiB (default 1024)")
    ap.add_argument("--reps", type=int, default=3, help="measurements of each kind (default 3)")
    ap.add_argument("--quick", action="store_true", help="256 MiB, 1 measurement of each kind")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON to FILE")
    a = ap.parse_args(argv)
    size, reps = (256, 1) if a.quick else (a.size, a.reps)
    if not shutil.which("gcc"):
        sys.exit("gcc is needed to build the writer target")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # the finally blocks still run
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)    # restored targets become ours: reaped
    mach, code = machine(), code_identity()
    busy0, top0 = cpu_busy(), top_cpu()
    if busy0 > 0.10:
        log("warning: the machine is %.0f%% busy before the benchmark: %s" % (busy0 * 100, "; ".join(top0)))
    started = datetime.datetime.now().astimezone()
    command = shlex.join(["python3", "benchmarks/rollback.py"] + list(sys.argv[1:] if argv is None else argv))
    tmp = tempfile.mkdtemp(prefix="ckpt-bench-rollback-", dir="/tmp")
    results = {"rollback": {}, "fresh": [], "errors": []}
    tgt = None
    try:
        exe = os.path.join(tmp, "writer")
        subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, WRITER_C], check=True)
        img = os.path.join(tmp, "snapshot.img")
        t = time.perf_counter()
        tgt = Target(exe, size)
        log("target %d: %d MiB stamped in %.1f s" % (tgt.pid, size, time.perf_counter() - t))
        for rep in range(reps):
            for tracking in (False, True):
                for percent, stride in FRACTIONS:
                    key = "%d%% %s" % (percent, "tracking" if tracking else "full")
                    results["rollback"].setdefault(key, []).append(one_rollback(tgt, img, percent, stride, tracking))
        # the fresh restore of the last image (kept tracking, 10%): its reference is the snapshot's
        untrack(tgt.pid)
        ckpt("dump", tgt.pid, "-o", img, "--leave-running")
        ref = read_memory(tgt.pid, kernel_written(img))
        tgt.kill()
        tgt = None
        results["fresh"] = fresh_restores(img, ref, reps)
        del ref
    except (CheckFailed, subprocess.TimeoutExpired) as e:
        results["errors"].append(str(e))
        log("FAILED: %s" % e)
    finally:
        if tgt is not None:
            tgt.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = (datetime.datetime.now().astimezone() - started).total_seconds()

    run_header("ckpt restore --into (rollback) against a fresh restore", started, mach, command, elapsed, code, busy0,
               top0)
    print("- target: ckpt/data/writer.c `writer %d 0 0 ctl` (%d MiB of stamped pages, one thread, nothing "
          "written but on command); after each snapshot (`ckpt dump --leave-running [--keep-tracking]`) it "
          "stamps every 100th page (1%%) or every 10th (10%%), then `ckpt restore IMG --into PID --json`; "
          "each rollback checked against the snapshot's memory (every writable mapping, byte for byte, read "
          "through /proc/PID/mem) and by the target itself; median of %d" % (size, size, reps))
    print("- freeze: ckpt's freeze_ms (the process stopped); total, ckpt: its own elapsed_s (a fresh restore: "
          "restore_ms, first clone3 to the release); total, wall: the `ckpt` command as run, Python's start included")
    print()
    print("| target | written since the snapshot | method | freeze (ms) | total, ckpt (s) | total, wall (s) "
          "| pages compared | pages written | pages dropped | checked |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
    sz = "%d MiB" % size if size < 1024 else "%g GiB" % (size / 1024)
    for percent, _ in FRACTIONS:
        for tracking in (True, False):
            rs = results["rollback"].get("%d%% %s" % (percent, "tracking" if tracking else "full"), [])
            if not rs:
                continue
            print("| %s | %d%% (%s pages) | restore --into, %s | %s | %s | %s | %s | %s | %s | %d of %d identical |" % (
                sz, percent, fmt(med([r["stamped"] for r in rs]), ",.0f"),
                "kept tracking" if tracking else "no tracking (all compared)",
                fmt(med([r["freeze_ms"] for r in rs]), ".2f"), fmt(med([r["elapsed_s"] for r in rs]), ".3f"),
                fmt(med([r["wall_s"] for r in rs]), ".3f"), fmt(med([r.get("pages_compared") for r in rs]), ",.0f"),
                fmt(med([r.get("pages_written") for r in rs]), ",.0f"),
                fmt(med([r.get("pages_dropped") for r in rs]), ",.0f"), len(rs), len(rs)))
    fr = results["fresh"]
    if fr:
        print("| %s | any | fresh `ckpt restore` (target killed) | – (no process meanwhile) | %s | %s | – | %s | – "
              "| %d of %d identical |" % (
            sz, fmt(med([r["restore_ms"] / 1000 for r in fr]), ".3f"), fmt(med([r["wall_s"] for r in fr]), ".3f"),
            fmt(med([r.get("pages_written") for r in fr]), ",.0f"), len(fr), len(fr)))
    phases = []
    for rs in results["rollback"].values():
        for r in rs:
            phases += [k for k in r.get("freeze_breakdown_ms", {}) if k not in phases]
    if phases:
        print()
        print("Where the rollback's freeze goes (median ms per phase, from `freeze_breakdown_ms`):")
        print()
        print("| written since the snapshot | method | freeze | " + " | ".join(phases) + " |")
        print("|---:|---|---:|" + "---:|" * len(phases))
        for percent, _ in FRACTIONS:
            for tracking in (True, False):
                rs = results["rollback"].get("%d%% %s" % (percent, "tracking" if tracking else "full"), [])
                if rs:
                    print("| %d%% | %s | %s | %s |" % (
                        percent, "kept tracking" if tracking else "no tracking", fmt(med([r["freeze_ms"] for r in rs]), ".2f"),
                        " | ".join(fmt(med([r.get("freeze_breakdown_ms", {}).get(p) for r in rs]), ".2f") for p in phases)))
    if results["errors"]:
        print()
        print("### Errors")
        print()
        for e in results["errors"]:
            print("- %s" % e)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": mach, "code": code, "busy_before": busy0, "started": started.isoformat(),
                       "command": command, "reps": reps, "size_mb": size, "results": results}, f, indent=1)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
