"""Memory and mappings of an ordinary process (issue 10): every kind of mapping with every
protection (data written before an mprotect), one file mapped in two access modes, madvise state
(VmFlags), a stack grown by hand (MAP_GROWSDOWN), deleted files still mapped, a deleted working
directory. Each target is dumped with --verify, killed, restored, and checks itself; the test
also compares what /proc says of its mappings before and after.

Targets: tests/targets/restore/{memkinds,madv,growsdown,deleted}.c.
"""
import os
import re
import signal
import subprocess

import pytest

from restore_support import (WAIT, alive, dump, image_meta, procs, reap_killed, restore_ok, rs_built,  # noqa: F401
                             run_ckpt, subreaper)

# flags the kernel sets by itself, or ckpt's own while it dumps: not the process's state
IGNORED_FLAGS = {"sd", "ui", "uw", "um"}


def smaps(pid):
    """[(start, end, perms, path, VmFlags set)] of every mapping."""
    out = []
    with open("/proc/%d/smaps" % pid, "rb") as f:
        for line in f.read().decode(errors="replace").splitlines():
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+ *(.*)$", line)
            if m:
                out.append([int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4), set()])
            elif line.startswith("VmFlags:"):
                out[-1][4] = set(line.split()[1:]) - IGNORED_FLAGS
    return out


def mapping_at(pid, addr, table=None):
    for s, e, perms, path, flags in table if table is not None else smaps(pid):
        if s <= addr < e:
            return {"start": s, "end": e, "perms": perms, "path": path, "flags": flags}
    raise AssertionError("process %d maps nothing at %#x" % (pid, addr))


class Gated:
    """A target that answers each SIGUSR2 with one line (read from its output file)."""

    def __init__(self, procs, tmp_path, name, *args, cwd="/", program=None, user=None):
        self.out = tmp_path / (name + ".out")
        self.p, _ = procs.start(name, *args, stdout=self.out, cwd=cwd, program=program, user=user)
        self.pid = self.p.pid
        self.seen = 1
        self.lines = self._lines()

    def _lines(self):
        with open(self.out, "rb") as f:
            return f.read().decode(errors="replace").splitlines()

    def info(self, prefix):
        """{name: value} of the lines "PREFIX NAME VALUE" it printed at start."""
        return {ln.split()[1]: ln.split()[2] for ln in self.lines if ln.startswith(prefix + " ")}

    def ask(self, pid=None):
        """SIGUSR2, then its answer: the next line that is not a start-up line."""
        import time
        os.kill(pid or self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + WAIT
        while True:
            lines = self._lines()
            answers = [ln for ln in lines if not ln.startswith(("ready ", "region ")) and not re.fullmatch(r"child \d+", ln)]
            if len(answers) >= self.seen:
                self.seen += 1
                return answers[self.seen - 2]
            assert time.monotonic() < deadline, "no answer from %d; output %r" % (pid or self.pid, lines[-5:])
            time.sleep(0.01)


def _cycle(procs, tmp_path, t, *dump_args):
    """Dump (verified, killed), reap, restore: the restored process's PID."""
    img = tmp_path / "image"
    dump(t.pid, img, *dump_args)
    reap_killed(t.p)
    pid, _, err = restore_ok(procs, img)
    assert pid == t.pid
    assert not err.strip(), "restore warned: %s" % err
    return pid, img


def _flags_by_region(pid, regions):
    table = smaps(pid)
    return {name: (mapping_at(pid, int(addr, 16), table)["perms"], mapping_at(pid, int(addr, 16), table)["flags"])
            for name, addr in regions.items()}


# ------------------------------------------------------------------ 1. every kind of mapping
@pytest.mark.parametrize("mode", ["async", "stop-the-world"])
def test_every_kind_of_mapping(procs, tmp_path, mode):
    """anon/file x private/shared x none/r/w/rw/rx/rwx, written before the mprotect to that
    protection; one mapping split four ways by mprotect; a sparse PROT_NONE region; the shared
    file mapped again from a read-only fd. Restored: the same content, permissions and VmFlags,
    the shared file mappings made from a read-write fd may be made writable again (mw), the one
    from a read-only fd may not (EACCES). Before the fix: 'writing 8192 bytes at ...:
    Input/output error' (shared memory mprotect'ed read-only or PROT_NONE was written through
    its mapping), then 'mprotect read-write: Permission denied'."""
    d = tmp_path / "files"
    d.mkdir()
    t = Gated(procs, tmp_path, "memkinds", d)
    regions = t.info("region")
    assert len(regions) == 30
    assert t.ask() == "ok 30 regions"
    before = _flags_by_region(t.pid, regions)
    pid, _ = _cycle(procs, tmp_path, t, "--mode", mode)
    after = _flags_by_region(pid, regions)
    diff = {k: (before[k], after[k]) for k in regions if before[k] != after[k]}
    assert not diff, "permissions or VmFlags differ after the restore: %s" % diff
    assert t.ask() == "ok 30 regions"
    assert t.ask() == "ok 30 regions"


# ------------------------------------------------------------------ 3. madvise, mlock, mseal
MADV_FLAGS = {"dontfork": "dc", "wipeonfork": "wf", "dontdump": "dd", "hugepage": "hg", "nohugepage": "nh",
              "mergeable": "mg", "sequential": "sr", "random": "rr", "locked": "lo", "onfault": "lf",
              "sealed": "sl", "fileseq": "sr"}


def test_madvise_state_survives(procs, tmp_path):
    """MADV_DONTFORK, WIPEONFORK, DONTDUMP, HUGEPAGE, NOHUGEPAGE, MERGEABLE, SEQUENTIAL, RANDOM,
    a combination, DONTFORK on half a mapping, mlock, mlock2(MLOCK_ONFAULT), mseal: the same
    VmFlags after the restore (read from /proc/PID/smaps), and they still mean what they mean
    (the restored process forks: what is DONTFORK is not in the child, what is WIPEONFORK is
    zero there, the rest is its content)."""
    d = tmp_path / "files"
    d.mkdir()
    t = Gated(procs, tmp_path, "madv", d)
    regions = t.info("region")
    assert t.ask() == "ok fork"
    before = _flags_by_region(t.pid, regions)
    for name, flag in MADV_FLAGS.items():
        if name in regions:
            assert flag in before[name][1], "%s: the target's own %s is not in its VmFlags %s" % (name, flag, before[name])
    pid, _ = _cycle(procs, tmp_path, t)
    after = _flags_by_region(pid, regions)
    diff = {k: (before[k], after[k]) for k in regions if before[k] != after[k]}
    assert not diff, "permissions or VmFlags differ after the restore: %s" % diff
    half = int(regions["half"], 16)
    assert "dc" not in mapping_at(pid, half)["flags"] and "dc" in mapping_at(pid, half + 8 * 4096)["flags"]
    assert t.ask() == "ok fork"


# ------------------------------------------------------------------ 4. a stack grown by hand
def test_grown_down_stack_keeps_growing(procs, tmp_path):
    """A MAP_GROWSDOWN mapping grown by writes below its start, and a coroutine's growsdown
    stack grown by its recursion: restored as growsdown (VmFlags gd), both keep growing (the
    restored process used to die with SIGSEGV at the first push past the restored start)."""
    t = Gated(procs, tmp_path, "growsdown")
    regions = t.info("region")
    assert t.ask() == "ok 24 pages, depth 96"
    before = _flags_by_region(t.pid, regions)
    assert all("gd" in f for _, f in before.values()), before
    pid, _ = _cycle(procs, tmp_path, t)
    assert _flags_by_region(pid, regions) == before
    assert t.ask() == "ok 32 pages, depth 144"
    assert t.ask() == "ok 40 pages, depth 192"
    grown = mapping_at(pid, int(regions["grown"], 16))
    assert grown["end"] - grown["start"] == 40 * 4096, grown


# ------------------------------------------------------------------ 5. deleted files, deleted cwd
def _maps_names(pid, regions):
    table = smaps(pid)
    return {name: mapping_at(pid, int(a, 16), table)["path"] for name, a in regions.items()}


def test_deleted_files_still_mapped(procs, tmp_path):
    """A deleted file mapped shared twice, shared read-only and private (copy-on-write pages);
    one whose directory is gone too; one whose name another file has taken since. Restored:
    the same content, still deleted files of the same size, the shared mappings of one file
    one object again (a write through one is seen through the others and in the private
    mapping's pages it has not copied), the names /proc/PID/maps shows: the same where the
    directory and the name are free, else still " (deleted)"."""
    d = tmp_path / "files"
    d.mkdir()
    t = Gated(procs, tmp_path, "deleted", "files", d)
    regions = t.info("region")
    assert t.ask() == "ok files"
    names = _maps_names(t.pid, regions)
    assert names["a1"] == "%s/a (deleted)" % d and names["bpriv"] == "%s/sub/b (deleted)" % d, names
    before = _flags_by_region(t.pid, regions)
    pid, img = _cycle(procs, tmp_path, t)
    shm = image_meta(img)["tree"]["shm"]
    assert sorted(r["deleted_file"]["path"] for r in shm if "deleted_file" in r) == \
        sorted("%s/%s" % (d, n) for n in ("a", "sub/b", "c"))
    after = _flags_by_region(pid, regions)
    assert after == before, "permissions or VmFlags differ after the restore: %s" % {
        k: (before[k], after[k]) for k in regions if before[k] != after[k]}
    now = _maps_names(pid, regions)
    for name in ("a1", "a2", "aro", "apriv"):
        assert now[name] == names[name], now      # restored in its directory under its old name
    assert now["bpriv"] == "/memfd:b (deleted)", now        # its directory is gone: a memfd
    assert now["cshared"].startswith("%s/#" % d) and now["cshared"].endswith(" (deleted)"), now  # name taken
    assert sorted(os.listdir(d)) == ["c"]       # nothing left behind
    assert t.ask() == "ok files"
    assert t.ask() == "ok files"


def test_deleted_files_in_a_tree(procs, tmp_path):
    """The deleted files mapped by a process and by its child (mappings inherited across fork):
    one object per file for the tree, restored once; both processes map the same deleted file
    again, and a write through the parent's shared mapping is seen in the child's."""
    d = tmp_path / "files"
    d.mkdir()
    t = Gated(procs, tmp_path, "deleted", "tree", d)
    child = _wait_child(t)
    regions = t.info("region")
    assert t.ask() == "ok files"
    assert t.ask(child) == "child ok files"
    pid, img = _cycle_tree(procs, tmp_path, t, [child])
    assert image_meta(img)["dump"]["processes"] == [pid, child]
    assert len(image_meta(img)["tree"]["shm"]) == 4     # a, b, c and the shared counter
    for name in ("a1", "apriv", "bpriv", "cshared"):
        addr = int(regions[name], 16)
        files = []
        for p in (pid, child):
            m = mapping_at(p, addr)
            st = os.stat("/proc/%d/map_files/%x-%x" % (p, m["start"], m["end"]))
            files.append((st.st_dev, st.st_ino, st.st_nlink))
        assert files[0] == files[1] and files[0][2] == 0, (name, files)
    assert t.ask() == "ok files"            # writes through a1
    assert t.ask(child) == "child ok files"  # sees it
    assert t.ask(child) == "child ok files"
    assert t.ask() == "ok files"


def _wait_child(t):
    import time
    deadline = time.monotonic() + WAIT
    while True:
        for ln in t._lines():
            if re.fullmatch(r"child \d+", ln):
                return int(ln.split()[1])
        assert time.monotonic() < deadline, "no child line"
        time.sleep(0.01)


def _cycle_tree(procs, tmp_path, t, children):
    from restore_support import reap_orphans
    img = tmp_path / "image"
    dump(t.pid, img)
    reap_killed(t.p)
    reap_orphans(children)
    pid, _, err = restore_ok(procs, img)
    for c in children:
        procs.adopt(c)
    assert pid == t.pid
    assert not err.strip(), "restore warned: %s" % err
    return pid, img


def test_deleted_file_over_the_limit_is_refused(procs, tmp_path):
    """A deleted mapped file larger than CKPT_DELETED_FILE_MAX_MB: refused before the target is
    touched, naming the file; the target runs on."""
    d = tmp_path / "files"
    d.mkdir()
    t = Gated(procs, tmp_path, "deleted", "files", d)
    env = dict(os.environ, CKPT_DELETED_FILE_MAX_MB="0.02")     # a: 22480 bytes, over; b, c under
    res = subprocess.run([__import__("sys").executable, "-m", "ckpt", "dump", str(t.pid), "-o", str(tmp_path / "img")],
                         env=env, capture_output=True, text=True, cwd="/", timeout=WAIT)
    assert res.returncode != 0
    err = res.stderr.strip()
    assert "deleted file %s/a" % d in err and "CKPT_DELETED_FILE_MAX_MB" in err, err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "img").exists()
    assert alive(t.pid) and t.ask() == "ok files"


@pytest.mark.parametrize("parent_gone", [False, True], ids=["parent-there", "parent-gone"])
def test_deleted_working_directory(procs, tmp_path, parent_gone):
    """A process whose working directory was removed: restored in a deleted directory again
    (made anew under the old name and removed), /proc/PID/cwd showing the same path; where its
    parent directory is gone too, made in the nearest ancestor that is left."""
    d = tmp_path / "files"
    d.mkdir()
    t = Gated(procs, tmp_path, "deleted", "cwd", d)
    assert t.ask() == "ok cwd"
    if parent_gone:
        d.rmdir()
    cwd = os.readlink("/proc/%d/cwd" % t.pid)
    assert cwd == "%s/wd (deleted)" % d
    mode = os.stat("/proc/%d/cwd" % t.pid).st_mode
    pid, _ = _cycle(procs, tmp_path, t)
    assert os.readlink("/proc/%d/cwd" % pid) == ("%s/wd (deleted)" % tmp_path if parent_gone else cwd)
    assert os.stat("/proc/%d/cwd" % pid).st_mode == mode
    assert "wd" not in os.listdir(tmp_path) and (parent_gone or os.listdir(d) == [])
    assert t.ask() == "ok cwd"


def test_deleted_working_directory_not_remade_is_refused(procs, tmp_path, nobody_dir):
    """A process (nobody) whose deleted working directory restore could not make again: its
    parent is now root's, where nobody may not create. Refused at dump, before the target is
    touched, saying so; the target runs on."""
    t = Gated(procs, tmp_path, "deleted", "cwd", nobody_dir, user="nobody")
    assert t.ask() == "ok cwd"
    os.chown(nobody_dir, 0, 0)
    rc, out, err = run_ckpt("dump", t.pid, "-o", tmp_path / "img")
    assert rc != 0
    err = err.strip()
    assert len(err.splitlines()) == 1 and "working directory %s/wd was deleted" % nobody_dir in err \
        and "may not create a directory" in err, err
    assert not (tmp_path / "img").exists()
    assert t.ask() == "ok cwd"


def test_deleted_executable(procs, tmp_path, rs_built):
    """A program whose executable was deleted while it runs (an upgrade replaced it): its
    mappings of it restored from the image's copy, and /proc/PID/exe leads to it again, a
    deleted file of the same name."""
    import shutil
    d = tmp_path / "bin"
    d.mkdir()
    prog = d / "growsdown"
    shutil.copy2(rs_built / "rs_growsdown", prog)
    t = Gated(procs, tmp_path, "growsdown", program=prog)
    prog.unlink()
    assert t.ask() == "ok 24 pages, depth 96"
    exe = os.readlink("/proc/%d/exe" % t.pid)
    assert exe == "%s (deleted)" % prog
    pid, _ = _cycle(procs, tmp_path, t)
    assert os.readlink("/proc/%d/exe" % pid) == exe
    assert os.stat("/proc/%d/exe" % pid).st_nlink == 0
    assert all(path == exe for s, e, perms, path, f in smaps(pid) if "growsdown" in path)
    assert os.listdir(d) == []
    assert t.ask() == "ok 32 pages, depth 144"


def test_malformed_records_are_refused(procs, tmp_path):
    """An image whose vm_flags, cwd_deleted or deleted-file record was edited: refused with one
    line naming the field, before anything is created; the image as made restores."""
    from restore_support import rewrite_image
    d = tmp_path / "files"
    d.mkdir()
    t = Gated(procs, tmp_path, "deleted", "files", d)
    img = tmp_path / "image"
    dump(t.pid, img)
    reap_killed(t.p)

    def vm(m):
        m["process"]["vm_flags"] = [[1, 0, "gd"]]

    def cwd(m):
        m["process"]["cwd_deleted"] = {"mode": "x"}

    def dfile(m):
        for r in m["tree"]["shm"]:
            if "deleted_file" in r:
                r["deleted_file"] = {"path": "relative/name", "mode": 0o644}

    for edit, word in ((vm, "vm_flags"), (cwd, "cwd_deleted"), (dfile, "relative/name")):
        bad = tmp_path / ("bad-" + word.replace("/", "-"))
        rewrite_image(img, bad, edit)
        rc, out, err = run_ckpt("restore", bad)
        assert rc != 0 and len(err.strip().splitlines()) == 1 and word in err, err
        assert not alive(t.pid)
    pid, _, err = restore_ok(procs, img)
    assert t.ask() == "ok files"
