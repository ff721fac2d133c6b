"""Live dumps (async mode, --leave-running --verify) of targets that write their memory in every
way the tracker must see: threads storing, the kernel copying pipe data into buffers,
MADV_DONTNEED, mremap/mmap/munmap, fork, and the Python interpreter's own heap.

--verify compares the image with all memory while the target is still frozen: that is the
consistency check. Afterwards the target must run on exactly as before (target_clean) and its
own self-check must pass, with progress.
"""
import json
import os

import pytest

from conftest import dump_json, one_line_error, run_ckpt, target_clean

LIVE_TARGETS = [
    pytest.param("writer", (64, 4, 0), id="writer-4-threads"),
    pytest.param("piper", (32,), id="pipe-read-into-buffers"),
    pytest.param("madviser", (64, 2), id="madvise-dontneed"),
    pytest.param("remapper", (64,), id="mremap-mmap-munmap"),
    pytest.param("forker", (64,), id="fork-loop"),
    pytest.param("pytarget.py", (150000,), id="python"),
]


def _dump_verified(target, tmp_path, *extra):
    out = tmp_path / "out"
    out.mkdir()
    img = out / "image.ckpt"
    rc, so, se = run_ckpt("dump", target.pid, "-o", img, "--leave-running", "--verify", "--json", *extra)
    assert rc == 0, "dump of %s failed: %s" % (target.name, se)
    return out, img, dump_json(so)


@pytest.mark.parametrize("name,args", LIVE_TARGETS)
def test_live_dump_is_consistent_and_target_runs_on(spawn, tmp_path, name, args):
    t = spawn(name, *args)
    before = t.assert_ok()
    out, img, res = _dump_verified(t, tmp_path, "--mode", "async")
    assert res["pid"] == t.pid
    assert res["mode"] == "async"
    assert res["verified"] is True
    assert res["pages_verified"] > 0
    target_clean(t, out, ["image.ckpt"])
    t.assert_progress(before)
    rc, so, se = run_ckpt("verify", img)
    assert rc == 0, se
    rc, so, se = run_ckpt("info", img, "--json")
    assert rc == 0, se
    assert json.loads(so)["process"]["pid"] == t.pid


def test_dump_twice_in_a_row(spawn, tmp_path):
    """A second dump of the same live target finds it as the first left it: untraced, no
    uffd, nothing registered, so it works the same way."""
    t = spawn("remapper", 32)
    before = t.assert_ok()
    for i in range(2):
        img = tmp_path / ("image%d" % i)
        rc, so, se = run_ckpt("dump", t.pid, "-o", img, "--leave-running", "--verify", "--json")
        assert rc == 0, se
        assert dump_json(so)["verified"] is True
        target_clean(t, tmp_path, ["image%d" % j for j in range(i + 1)])
        before = t.assert_progress(before)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_mapping_moved_back_next_to_its_origin(spawn, tmp_path, mode):
    """The mergeback target moves a small mapping away and, once ckpt has registered it, back
    next to the big mapping it came from: the kernel merges them and drops the registration
    of the whole merged VMA while its pages keep their write-protect bits. ckpt registers it
    again, and must still see every later write (it clears the old bits first). Three dumps
    in a row, each verified: the sequence needs the dump to catch the target at the right
    moment, which it does in a good share of dumps, not in all."""
    t = spawn("mergeback", 32)
    for i in range(3):
        img = tmp_path / ("image%d" % i)
        rc, so, se = run_ckpt("dump", t.pid, "-o", img, "--leave-running", "--verify", "--json", "--mode", mode)
        assert rc == 0, "dump %d: %s" % (i, se)
        assert dump_json(so)["verified"] is True
    target_clean(t, tmp_path, ["image0", "image1", "image2"])
    t.assert_progress(t.assert_ok())


def test_shared_memory_of_the_target_is_copied_while_frozen(spawn, tmp_path):
    """Shared memory the target maps but does not write (MAP_SHARED|MAP_ANONYMOUS and a
    memfd, written by a child process that is stopped now) is copied whole in the frozen
    phase: the image equals the target's view of it."""
    t = spawn("shm", 16)
    before = t.assert_ok()
    child = _shm_writer_child(t)
    os.kill(child, 19)                  # SIGSTOP: its writes are done before the dump starts
    try:
        out, img, res = _dump_verified(t, tmp_path, "--mode", "async")
        assert res["verified"] is True
        target_clean(t, out, ["image.ckpt"])
        info = json.loads(run_ckpt("info", img, "--json")[1])
        shmem = [m for m in info["mappings"] if m["kind"] == "shmem"]
        assert len(shmem) == 2 and all(m["pages_in_image"] == (m["end"] - m["start"]) // 4096 for m in shmem), shmem
    finally:
        os.kill(child, 18)              # SIGCONT
    t.assert_progress(before)


def test_shared_memory_written_by_a_running_second_process_leaves_target_clean(spawn, tmp_path):
    """Whatever the outcome of a dump while a second process keeps writing the target's shared
    memory, the target is left exactly as before and runs on; a failure is the verification
    naming the shared mapping, and leaves no file."""
    t = spawn("shm", 16, 64)
    before = t.assert_ok()
    out = tmp_path / "out"
    out.mkdir()
    rc, so, se = run_ckpt("dump", t.pid, "-o", out / "image.ckpt", "--leave-running", "--verify", "--json")
    if rc:
        line = one_line_error(se)
        assert "verification failed" in line and "shmem mapping" in line, line
    target_clean(t, out, ["image.ckpt"] if rc == 0 else [])
    t.assert_progress(before)


def test_shared_memory_written_by_a_running_second_process_is_consistent(spawn, tmp_path):
    """The second process is the target's child: it is dumped with it (the tree), frozen with
    it, so the shared memory it writes is an instant of both (was a known bug when ckpt froze
    the target alone)."""
    t = spawn("shm", 16, 64)
    rc, so, se = run_ckpt("dump", t.pid, "-o", tmp_path / "image.ckpt", "--leave-running", "--verify")
    assert rc == 0, se


def _shm_writer_child(t):
    """The PID of the shm target's writer child."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == t.pid:
                kids.append(int(d))
    assert len(kids) == 1, kids
    return kids[0]
