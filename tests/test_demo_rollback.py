"""demos/rollback_redis.py end to end, small: redis-server loaded with a fixture, snapshotted once
(`ckpt dump --leave-running`, with --keep-tracking), changed by a test and rolled back with
`ckpt restore IMG --into PID` after each round; then the same data put back by redis's own
FLUSHALL and reload and by a full restore of the killed server.

The demo's exit status is 0 only when every check passed (after each rollback: DEBUG DIGEST and
DBSIZE equal the fixture's, same PID, the connection opened after the snapshot closed, the one
opened before still served on its socket). This module checks that, the rows of its table, and
that nothing is left behind (redis, the ckpt-track process that kept the tracking, the work
directory), also when the demo is interrupted while it holds the tracking. And
benchmarks/rollback.py in its quick mode, whose every rollback is checked byte for byte against
the snapshot's memory. No timing is asserted.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from restore_support import exists
from test_demos import (DEMO_TIMEOUT, DEMOS, ROOT, _have, _interrupt_during_load, _run_demo, assert_gone,  # noqa: F401
                        reaper)

SCRIPT = "rollback_redis.py"
TRACKING_DIR = "/run/ckpt/tracking"


def _need():
    why = _have("redis-server", "redis") or _have("redis-cli", "redis")
    if why:
        pytest.skip(why)


def _named(out):
    """(redis PID, the tracking holder's PID or None, work directories) from the demo's output."""
    m = re.search(r"^redis-server (\d+) on 127\.0\.0\.1:\d+ \(work directory (/\S+?)\)", out, re.M)
    assert m, "the demo did not name its redis-server and work directory:\n%s" % out[-3000:]
    h = re.search(r"tracking held by ckpt-track (\d+)$", out, re.M)
    return int(m.group(1)), int(h.group(1)) if h else None, [m.group(2)]


def _assert_clean(out):
    pid, holder, work = _named(out)
    assert_gone([pid] + ([holder] if holder else []), work)
    assert not os.path.exists(os.path.join(TRACKING_DIR, "%d.json" % pid)), \
        "the demo left the tracking state of redis %d behind" % pid


def test_rollback_demo_small(reaper):  # noqa: F811
    _need()
    rc, out = _run_demo(SCRIPT, "--small", "--rounds", 3)
    assert rc == 0, "%s exited with %d; output:\n%s" % (SCRIPT, rc, out[-8000:])
    assert re.search(r"^all \d+ checks passed$", out, re.M), out[-3000:]
    assert "FAIL" not in out, out[-8000:]
    pid, holder, _ = _named(out)
    assert holder, "the snapshot did not keep the tracking (dump --keep-tracking):\n%s" % out[-3000:]
    # every round changed the data, was rolled back to the fixture, on the same PID
    for k in (1, 2, 3):
        for check in ("round %d: the test changed the data" % k,
                      "round %d: rolled back, DEBUG DIGEST and DBSIZE equal the fixture's" % k,
                      "round %d: the connection opened after the snapshot was closed by the rollback" % k,
                      "round %d: the connection opened before the snapshot still answers on its socket" % k,
                      "round %d: the rollback compared only what was written since the snapshot" % k):
            assert re.search(r"^  \[ok\] %s" % re.escape(check), out, re.M), "no passed check %r:\n%s" % (check, out[-6000:])
        m = re.search(r"^rollback %d: freeze [\d.]+ ms, total \d+ ms .*; tracking True$" % k, out, re.M)
        assert m, "no line for rollback %d:\n%s" % (k, out[-6000:])
    assert re.search(r"round 2: the test changed the data: \d+ commands with FLUSHDB", out), out[-6000:]
    # a fourth round once `ckpt untrack` ended the tracking: rolled back all the same, all pages compared
    for check in ("ckpt untrack: the kept tracking ended", "round 4: the test changed the data",
                  "round 4: rolled back, DEBUG DIGEST and DBSIZE equal the fixture's",
                  "round 4: the connection opened after the snapshot was closed by the rollback",
                  "round 4: the connection opened before the snapshot still answers on its socket"):
        assert re.search(r"^  \[ok\] %s" % re.escape(check), out, re.M), "no passed check %r:\n%s" % (check, out[-6000:])
    assert re.search(r"^rollback 4: .*; tracking False$", out, re.M), out[-6000:]
    assert re.search(r"pid %d$" % pid, out, re.M), out[-6000:]
    for check in ("FLUSHALL + reload: DEBUG DIGEST and DBSIZE equal the fixture's",
                  "full restore (killed, ckpt restore): DEBUG DIGEST and DBSIZE equal the fixture's"):
        assert re.search(r"^  \[ok\] %s" % re.escape(check), out, re.M), "no passed check %r:\n%s" % (check, out[-6000:])
    for row in ("rollback 1 (restore --into)", "rollback 2 (restore --into, FLUSHDB)", "rollback 3 (restore --into)",
                "rollback 4 (restore --into, all pages compared)", "FLUSHALL + reload (redis-cli --pipe)", "full restore (kill, ckpt restore)"):
        assert re.search(r"^  %s +[\d.]+ +\d+ +yes *$" % re.escape(row), out, re.M), \
            "no row %r with its digest ok in the table:\n%s" % (row, out[-3000:])
    _assert_clean(out)


def test_rollback_demo_interrupted_cleans_up(reaper):  # noqa: F811
    """SIGTERM once the snapshot is taken and its tracking kept: the demo exits non-zero, ends
    the tracking, and leaves no redis, no ckpt-track and no work directory behind."""
    _need()

    def holding(out):
        pid, holder, _ = _named(out)
        assert holder and exists(holder) and exists(pid), out

    _interrupt_during_load([os.path.join(DEMOS, SCRIPT), "--small"], "snapshot: ", _assert_clean, holding)


def test_rollback_benchmark_quick(tmp_path):
    """benchmarks/rollback.py --quick (256 MiB, one measurement of each kind): every rollback,
    with and without kept tracking, leaves the writer's memory byte for byte as at the snapshot,
    and so does the fresh restore; the benchmark exits 0 only then. What it measures is not
    checked (no timing assertions), only what it reports."""
    out_json = tmp_path / "rollback.json"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "rollback.py"), "--quick", "--json", str(out_json)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, timeout=DEMO_TIMEOUT)
    assert p.returncode == 0, "rollback.py exited with %d:\n%s\n%s" % (p.returncode, p.stdout[-3000:], p.stderr[-3000:])
    for row in ("| 1% (656 pages) | restore --into, kept tracking |", "| 1% (656 pages) | restore --into, no tracking",
                "| 10% (6,554 pages) | restore --into, kept tracking |", "| 10% (6,554 pages) | restore --into, no tracking",
                "| fresh `ckpt restore` (target killed) |"):
        assert row in p.stdout, "no %r in the report:\n%s" % (row, p.stdout)
    with open(out_json) as f:
        res = json.load(f)["results"]
    assert not res["errors"], res["errors"]
    for key, rs in res["rollback"].items():
        assert len(rs) == 1, (key, rs)
        r = rs[0]
        assert r["tracking"] is key.endswith("tracking"), (key, r["tracking"])
        # the stamped pages are written back (and a few of the program's own: its stack, stdio)
        assert r["stamped"] <= r["pages_written"] <= r["stamped"] + 64, (key, r["stamped"], r["pages_written"])
        if r["tracking"]:
            assert r["pages_compared"] <= r["stamped"] + 64, (key, r["pages_compared"])
    assert len(res["fresh"]) == 1, res["fresh"]
