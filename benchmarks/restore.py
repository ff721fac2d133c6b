#!/usr/bin/env python3
"""Restore benchmark: time to bring back 256 MiB, 1 GiB and 4 GiB targets, with the bytes
actually written, beside the time a plain copy of the same bytes into fresh memory takes on this
machine, measured in the same run.

usage: python3 benchmarks/restore.py [--sizes 256,1024,4096] [--reps 3] [--quick] [--json FILE]

Each rep: start the C writer target (every page stamped), dump it (default mode: killed), reap
it, restore it with `ckpt restore --json`, read restore_ms and bytes_written, kill the restored
process. The plain copy: a fresh anonymous mapping of bytes_written bytes filled from a buffer
by memcpy (a child process, so that it starts from fresh memory too).
"""
import argparse
import json
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRITER = os.path.join(ROOT, "tests", "targets", "writer.c")


def build(tmp):
    exe = os.path.join(tmp, "writer")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, WRITER, "-I", os.path.dirname(WRITER)], check=True)
    return exe


def ckpt(*args):
    # output through a file, not a pipe: a restored process inherits ckpt's stdout (its own
    # stdout was a pipe leading out), so a pipe would stay open as long as it lives
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.run([sys.executable, "-m", "ckpt", *args], stdout=out, stderr=err,
                           stdin=subprocess.DEVNULL, timeout=600)
        out.seek(0)
        err.seek(0)
        if p.returncode:
            raise RuntimeError("ckpt %s failed: %s" % (" ".join(args), err.read().strip()))
        return out.read()


def wait_gone(pid, timeout=10):
    end = time.monotonic() + timeout
    while os.path.exists("/proc/%d" % pid) and time.monotonic() < end:
        time.sleep(0.01)


def one_restore(exe, size_mb, tmp):
    proc = subprocess.Popen([exe, str(size_mb), "1", "2"], stdout=subprocess.PIPE, text=True)
    restored = None
    try:
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError("target did not start: %r" % line)
        img = os.path.join(tmp, "bench.img")
        ckpt("dump", str(proc.pid), "-o", img)
        proc.wait(timeout=30)
        res = json.loads(ckpt("restore", img, "--json"))
        restored = res["pid"]
        os.unlink(img)
        return res
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if restored:
            try:
                os.kill(restored, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_gone(restored)


def plain_copy_ms(nbytes):
    """memcpy of nbytes into fresh anonymous memory, in a fresh child process."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        src = bytearray(os.urandom(1 << 20))
        dst = mmap.mmap(-1, max(nbytes, 4096))
        t = time.perf_counter()
        view = memoryview(dst)
        for off in range(0, nbytes, len(src)):
            n = min(len(src), nbytes - off)
            view[off:off + n] = src[:n]
        ms = (time.perf_counter() - t) * 1000
        os.write(w, ("%f" % ms).encode())
        os._exit(0)
    os.close(w)
    data = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return float(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,1024,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="256 MiB only, 2 reps")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    sizes = [256] if a.quick else [int(x) for x in a.sizes.split(",")]
    reps = 2 if a.quick else a.reps
    tmp = tempfile.mkdtemp(prefix="ckpt-restore-bench-")
    rows, raw = [], []
    try:
        exe = build(tmp)
        for size in sizes:
            results = [one_restore(exe, size, tmp) for _ in range(reps)]
            copies = [plain_copy_ms(results[0]["bytes_written"]) for _ in range(reps)]
            med = statistics.median(r["restore_ms"] for r in results)
            wp = statistics.median(r["timings_ms"]["write_pages"] for r in results)
            cp = statistics.median(copies)
            nbytes = results[0]["bytes_written"]
            rows.append((size, med, wp, nbytes, cp, med - wp))
            raw.append({"size_mb": size, "restores": results, "plain_copy_ms": copies})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("| target | restore (median of %d) | of which writing pages | other steps | bytes written | plain copy of those bytes into fresh memory | restore / plain copy |" % reps)
    print("|---|---|---|---|---|---|---|")
    for size, med, wp, nbytes, cp, other in rows:
        print("| %d MiB | %.0f ms | %.0f ms | %.0f ms | %.1f MiB | %.0f ms | %.2f |"
              % (size, med, wp, other, nbytes / 2**20, cp, med / cp if cp else float("nan")))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
