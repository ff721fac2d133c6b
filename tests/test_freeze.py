"""The freeze and every other stop of the target: reported, and leaving nothing behind."""
import json
import os
import signal

from restore_support import (dump, procs, read_lines, rs_built, subreaper, wait_file_line)  # noqa: F401


def _maps(pid):
    with open("/proc/%d/maps" % pid) as f:
        return [line.split()[:2] for line in f]


def test_every_stop_is_reported(procs, tmp_path):
    """--json lists each stop of the target (the uffd's creation, arming, the freeze, re-arming
    when a round finds new mappings) with its length; the longest and the total follow."""
    out = tmp_path / "compute.out"
    p, _ = procs.start("compute", 2, 10 ** 9, 1000, 32, -1, 0, stdout=out)
    res = dump(p.pid, tmp_path / "image", "--leave-running")
    whats = [s["what"] for s in res["stops"]]
    assert whats[0] == "uffd" and "arm" in whats and whats[-1] == "freeze", whats
    assert res["stops_ms"] == [s["ms"] for s in res["stops"]]
    assert res["max_stop_ms"] == max(res["stops_ms"]) and res["stops_ms"][-1] == res["freeze_ms"]
    assert abs(res["stopped_total_ms"] - sum(res["stops_ms"])) < 0.01
    assert all(s["ms"] > 0 and s["pid"] == p.pid for s in res["stops"])


def test_state_read_as_one_piece_of_code_leaves_nothing(procs, tmp_path):
    """The compute target has 16 signal handlers: their batch runs as a blob of generated code
    (ckpt/state/blob.py) mapped in the freeze. After live dumps, the target's mappings are
    exactly what they were, and at its end it finds every handler as it set it."""
    out = tmp_path / "compute.out"
    p, _ = procs.start("compute", 2, 2000, 100, 8, 1500, 0, stdout=out)
    wait_file_line(out, lambda s: s.startswith("iter 100 "), proc=p)
    before = _maps(p.pid)
    for k in range(3):
        res = dump(p.pid, tmp_path / ("image%d" % k), "--leave-running")
        assert len(json.loads(json.dumps(res))["stops"]) >= 3
        assert _maps(p.pid) == before, "a mapping the dump made is left in the target"
    os.kill(p.pid, signal.SIGUSR2)       # past the gate
    wait_file_line(out, lambda s: s.startswith("done "), proc=p)
    assert not [s for s in read_lines(out) if s.startswith(("BAD", "ERROR", "CRASH"))], read_lines(out)[-5:]
