"""The writer dumped in every mode, single- and multi-threaded; what `dump --json` reports;
the image file itself (mode 0600, accepted by `ckpt info` and `ckpt verify`); and the default
(hibernate) behaviour, which kills the target once the image is safe."""
import json
import os
import signal
import stat

import pytest

from conftest import dump_json, run_ckpt, target_clean


@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("mode", ["async", "sync", "stop-the-world"])
def test_writer_in_every_mode(spawn, tmp_path, mode, threads):
    t = spawn("writer", 64, threads, 0)
    before = t.assert_ok()
    img = tmp_path / "image"
    rc, so, se = run_ckpt("dump", t.pid, "-o", img, "--leave-running", "--verify", "--mode", mode, "--json")
    assert rc == 0, se
    res = dump_json(so)
    assert res["mode"] == mode
    assert res["verified"] is True
    assert res["threads"] == threads + 1
    target_clean(t, tmp_path, ["image"])
    t.assert_progress(before)
    assert run_ckpt("verify", img)[0] == 0


def test_json_report(spawn, tmp_path):
    t = spawn("writer", 32, 2, 20000)
    img = tmp_path / "image"
    rc, so, se = run_ckpt("dump", t.pid, "-o", img, "--leave-running", "--verify", "--json")
    assert rc == 0, se
    assert len(so.strip().splitlines()) == 1, "--json prints one object: %r" % so
    res = dump_json(so)
    assert res["pid"] == t.pid
    assert res["mode"] == "async"            # auto picks async on this kernel
    assert isinstance(res["freeze_ms"], (int, float)) and res["freeze_ms"] >= 0
    rounds = res["rounds"]
    assert isinstance(rounds, list) and len(rounds) >= 2, rounds   # round 0 ... final copy
    assert all(isinstance(r, int) and r >= 0 for r in rounds)
    # round 0 streams at least the 32 MiB the writer stamped
    assert rounds[0] >= 32 * 256
    assert res["pages_written"] == sum(rounds)
    assert res["image_bytes"] == os.path.getsize(img)
    assert res["elapsed_s"] > 0
    assert res["verified"] is True
    target_clean(t, tmp_path, ["image"])
    t.assert_ok()


def test_json_without_verify_says_unverified(spawn, tmp_path):
    t = spawn("writer", 8, 1, 1000)
    rc, so, se = run_ckpt("dump", t.pid, "-o", tmp_path / "image", "--leave-running", "--json")
    assert rc == 0, se
    assert dump_json(so)["verified"] is False
    target_clean(t, tmp_path, ["image"])


def test_image_file_is_private_and_readable_by_info_and_verify(spawn, tmp_path):
    t = spawn("writer", 16, 2, 1000)
    img = tmp_path / "image"
    # even with a permissive umask the image is created 0600
    rc, so, se = run_ckpt("dump", t.pid, "-o", img, "--leave-running", "--json", preexec_fn=lambda: os.umask(0))
    assert rc == 0, se
    assert stat.S_IMODE(os.stat(img).st_mode) == 0o600
    rc, so, se = run_ckpt("verify", img)
    assert rc == 0, se
    assert "ok" in so
    rc, so, se = run_ckpt("info", img, "--json")
    assert rc == 0, se
    info = json.loads(so)
    assert info["process"]["pid"] == t.pid
    assert sorted(info["threads"]) == sorted(int(x) for x in os.listdir("/proc/%d/task" % t.pid))
    assert info["dump"]["mode"] == "async"
    # the writer's 16 MiB buffer is an anonymous mapping held whole in the image
    assert any(m["kind"] == "anon" and m["end"] - m["start"] == 16 << 20 and m["pages_in_image"] == 16 * 256
               for m in info["mappings"]), info["mappings"]
    rc, so, se = run_ckpt("info", img)
    assert rc == 0, se
    assert "process %d" % t.pid in so
    target_clean(t, tmp_path, ["image"])


def test_default_mode_kills_the_target(spawn, tmp_path):
    t = spawn("writer", 32, 2, 0)
    img = tmp_path / "image"
    rc, so, se = run_ckpt("dump", t.pid, "-o", img, "--verify", "--json")
    assert rc == 0, se
    res = dump_json(so)
    assert res["left_running"] is False
    code, status = t.wait_exit()
    assert code == os.CLD_KILLED and status == signal.SIGKILL, (code, status)
    assert sorted(os.listdir(tmp_path)) == ["image"]
    assert run_ckpt("verify", img)[0] == 0
