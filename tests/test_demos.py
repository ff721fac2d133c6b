"""The server demos (demos/checkpoint_*.py) run end to end with small sizes.

Each demo starts a real server (redis-server, memcached, the Python HTTP server of
demos/httpserver_target.py) with its own load generator and latency probe, dumps it live twice
(`--leave-running --verify`, then `--leave-running`), kills it with a dump, restores it, and
checks the state with the server's own clients (every key, digest, connections opened before
the dump still served). The demo's exit status is 0 only when every check passed; the test also
checks that the demo left nothing behind: the processes it named are gone and its work directory
removed. No timing is asserted.

The demos make themselves child subreapers and reap what they restore; this module does too
(restored processes of a demo that died would become ours), and kills and reaps any child left
at the end of each test.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from restore_support import WAIT, exists, kill_and_reap, subreaper_on, subreaper_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMOS = os.path.join(ROOT, "demos")
DEMO_TIMEOUT = 900


def _have(binary, module):
    if not shutil.which(binary):
        return "%s is not installed" % binary
    try:
        __import__(module)
    except ImportError:
        return "the %s client library is not installed (pip install -e '.[demos]')" % module
    return None


def _children():
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        out.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return out


@pytest.fixture
def reaper():
    old = subreaper_on()
    yield
    for pid in _children():
        kill_and_reap(pid)
    subreaper_set(old)


def _run_demo(script, *args):
    p = subprocess.Popen([sys.executable, os.path.join(DEMOS, script)] + [str(a) for a in args],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                         text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=DEMO_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)      # the demo cleans up on SIGTERM
        try:
            out, _ = p.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
        raise AssertionError("%s did not finish within %ds; output:\n%s" % (script, DEMO_TIMEOUT, out[-4000:]))
    return p.returncode, out


def _started(out):
    """PIDs the demo said it started (server, load generator) and its work directory."""
    pids = [int(m) for m in re.findall(r"^(?:redis-server|memcached|HTTP server) (\d+)", out, re.M)]
    pids += [int(m) for m in re.findall(r"^load: (?:redis-benchmark|process|wrk) (\d+)", out, re.M)]
    work = re.findall(r"work directory (/\S+?)\)", out)
    return pids, work


def _assert_clean(out):
    pids, work = _started(out)
    assert pids and work, "the demo did not name its processes and work directory:\n%s" % out[-3000:]
    assert_gone(pids, work)


def assert_gone(pids, work):
    """Every process a demo started has exited, and its work directories are removed."""
    deadline = time.monotonic() + WAIT
    for pid in pids:
        while exists(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not exists(pid), "process %d started by the demo is still there after it exited" % pid
    for d in work:
        assert not os.path.exists(d), "the demo left its work directory %s" % d


DEMO_RUNS = [
    ("checkpoint_redis.py", ("redis-server", "redis"), ["--keys", 20000, "--phase-seconds", 0.5]),
    ("checkpoint_memcached.py", ("memcached", "pymemcache"), ["--keys", 20000, "--phase-seconds", 0.5]),
    ("checkpoint_http.py", ("wrk", "http"), ["--keys", 2000, "--phase-seconds", 0.5]),
]


@pytest.mark.parametrize("script,needs,args", DEMO_RUNS, ids=[r[0][len("checkpoint_"):-3] for r in DEMO_RUNS])
def test_demo_full_cycle(reaper, script, needs, args):
    why = _have(*needs)
    if why:
        pytest.skip(why)
    rc, out = _run_demo(script, *args)
    assert rc == 0, "%s exited with %d; output:\n%s" % (script, rc, out[-6000:])
    assert re.search(r"^all \d+ checks passed$", out, re.M), out[-3000:]
    assert "FAIL" not in out, out[-6000:]
    _assert_clean(out)


def _interrupt_during_load(argv, prefix, assert_clean, while_loaded=None):
    """Run a demo (argv after the interpreter) until it prints a line starting with `prefix`
    (its load runs), call while_loaded(output so far), send it SIGTERM: it must exit non-zero,
    say it was interrupted, and pass assert_clean(output)."""
    p = subprocess.Popen([sys.executable] + argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, cwd=ROOT, text=True, start_new_session=True)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if line.startswith(prefix):
                break
        assert lines and lines[-1].startswith(prefix), "".join(lines)
        if while_loaded is not None:
            while_loaded("".join(lines))
        os.kill(p.pid, signal.SIGTERM)
        rest, _ = p.communicate(timeout=WAIT)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    out = "".join(lines) + rest
    assert p.returncode != 0, out
    assert "interrupted" in out, out
    assert_clean(out)


def test_demo_interrupted_cleans_up(reaper):
    """SIGTERM while the server, its load and the probe run: the demo exits non-zero and leaves
    no process and no work directory behind."""
    why = _have("redis-server", "redis")
    if why:
        pytest.skip(why)
    _interrupt_during_load([os.path.join(DEMOS, "checkpoint_redis.py"), "--keys", "20000", "--phase-seconds", "30"],
                           "load: ", _assert_clean)


def test_server_benchmark_runs(reaper, tmp_path):
    """benchmarks/servers.py with a small redis, one rep: it completes and reports every row
    (what it measures is not checked: no timing assertions)."""
    why = _have("redis-server", "redis")
    if why:
        pytest.skip(why)
    out_json = tmp_path / "servers.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "servers.py"), "--keys", "20000",
                        "--reps", "1", "--settle", "0.2", "--json", str(out_json)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, timeout=DEMO_TIMEOUT)
    assert p.returncode == 0, "servers.py exited with %d:\n%s\n%s" % (p.returncode, p.stdout[-3000:], p.stderr[-3000:])
    for row in ("| load only (no dump) |", "| redis BGSAVE (fork) |", "| ckpt dump --mode async (live) |",
                "| ckpt dump --mode stop-the-world |", "Kill + restore"):
        assert row in p.stdout, "no %r in the report:\n%s" % (row, p.stdout)
    with open(out_json) as f:
        res = json.load(f)["results"]
    assert len(res["async"]) == 1 and len(res["stop-the-world"]) == 1 and len(res["bgsave"]) == 1, res
    assert res["restore"]["dbsize_after"] == res["restore"]["dbsize_before"] >= 20000, res["restore"]
