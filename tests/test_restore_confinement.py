"""What confines a process, across dump (--verify), kill and restore: namespaces (refused at
dump, the target untouched), personality, securebits, ambient capabilities, no_new_privs, the
dumpable flag, cgroup membership and the stop state.

The target (tests/targets/restore/confine.c) sets its attributes up itself and reports what it
sees ("attrs ..."), once at the start and again on SIGUSR2: the restored process must report
the very same line. Per-thread credentials and cgroups are also read from /proc of the
restored PID.
"""
import os
import signal
import subprocess
import time

import pytest

from restore_support import (NOBODY, WAIT, alive, dump, exe, image_meta, procs, read_lines, reap_killed,  # noqa: F401
                             restore_ok, rs_built, run_ckpt, status, subreaper, tids, wait_file_line,
                             wait_gone)
from conftest import AS_NOBODY, nobody_dir  # noqa: F401



def _attrs(line):
    return line.startswith("attrs ")


def _report(pid, out, count):
    """SIGUSR2: the target prints one more "attrs" line; wait for the count-th one."""
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + WAIT
    while True:
        lines = [x for x in read_lines(out) if _attrs(x) or x.startswith(("ERROR", "CRASH"))]
        bad = [x for x in lines if not _attrs(x)]
        assert not bad, bad
        if len(lines) >= count:
            return lines[count - 1]
        assert time.monotonic() < deadline, "no report %d from %d: %r" % (count, pid, read_lines(out)[-3:])
        time.sleep(0.01)


def _give_to_nobody(out):
    """The output files of a target that makes itself nobody: restore opens them as nobody."""
    for path in (out, str(out) + ".err"):
        os.chown(path, NOBODY, NOBODY)


CRED_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")


def _creds(pid):
    return {tid: {k: status(pid, tid)[k] for k in CRED_FIELDS} for tid in tids(pid)}


# ------------------------------------------------------------------ 1. namespaces: refused up front
@pytest.mark.parametrize("flags,words", [
    (["-Ur"], "user namespace"),
    (["-n"], "network namespace"),
    (["-i"], "IPC namespace"),
    (["-n", "-u"], "network and UTS namespaces"),
], ids=["user", "network", "ipc", "network+uts"])
def test_target_in_its_own_namespaces_is_refused_untouched(procs, tmp_path, flags, words):
    with open(tmp_path / "out", "wb") as f:
        p = subprocess.Popen(["unshare"] + flags + [str(exe("confine"))], stdin=subprocess.DEVNULL, stdout=f,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    procs.targets.append(p)
    first = wait_file_line(tmp_path / "out", _attrs, proc=p)
    ready = read_lines(tmp_path / "out")[0]
    assert ready == "ready %d" % p.pid, ready     # unshare execs the target in the same process
    before = status(p.pid)
    img = tmp_path / "image"
    rc, _, err = run_ckpt("dump", p.pid, "-o", img, "--verify")
    assert rc != 0
    want = ("process %d is in its own %s (started by unshare or a container): namespaces are not supported yet"
            % (p.pid, words))
    assert want in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == ["out"]      # no image, no temporary file
    # untouched: never traced (it was not even seized), same state, still answering
    after = status(p.pid)
    assert after["TracerPid"] == "0" and after["State"] == before["State"]
    assert _report(p.pid, tmp_path / "out", 2) == first


# ------------------------------------------------------------------ 2. personality, securebits, ambient caps, nnp
def test_personality_securebits_ambient_caps_and_nnp_come_back(procs, nobody_dir):
    """A root-started target makes itself uid 65534 with CAP_KILL and CAP_NET_BIND_SERVICE, the
    latter ambient (kept through setresuid by SECBIT_NO_SETUID_FIXUP), locked securebits,
    no_new_privs, UNAME26 personality; all of it comes back in both threads, and a program it
    runs after the restore still gets the ambient capability."""
    out = nobody_dir / "out"
    p, _ = procs.start("confine", "pers", "caps", "nnp", stdout=out)
    first = wait_file_line(out, _attrs, proc=p)
    _give_to_nobody(out)
    assert first.startswith("attrs pers=0x60000/0x60000 uname=2.6.") and \
        first.endswith(" sb=0x47/0x47 nnp=1/1 dumpable=1 child=0000000000000400"), first
    before = _creds(p.pid)
    assert len(before) == 2
    for c in before.values():
        assert c["Uid"].split() == [str(NOBODY)] * 4 and c["CapAmb"] == "0000000000000400", c
        assert c["CapPrm"] == c["CapEff"] == "0000000000000420" and c["NoNewPrivs"] == "1", c
    img = nobody_dir / "image"
    dump(p.pid, img)
    reap_killed(p)
    meta = image_meta(img)["process"]
    assert meta["creds"]["securebits"] == 0x47 and meta["personality"] == 0x60000 and meta["dumpable"] == 1
    pid, _, err = restore_ok(procs, img)
    assert not err.strip(), err
    assert _creds(pid) == before
    assert _report(pid, out, 2) == first


# ------------------------------------------------------------------ 3. dumpable: the owner reads its /proc files
def _read_as_nobody(path):
    return subprocess.run(AS_NOBODY + ["cat", path], capture_output=True, timeout=WAIT)


@pytest.mark.parametrize("args,dumpable", [((), 1), (("nnp",), 1), (("nodump",), 0)],
                         ids=["plain", "no_new_privs", "not-dumpable"])
def test_dumpable_flag_comes_back(procs, nobody_dir, args, dumpable):
    """A process of nobody's stays readable by nobody (setresuid at restore made it non-dumpable,
    /proc/PID/* root's); one that made itself non-dumpable stays so."""
    out = nobody_dir / "out"
    p, _ = procs.start("confine", *args, stdout=out, user="nobody")
    first = wait_file_line(out, _attrs, proc=p)
    assert " dumpable=%d " % dumpable in first and " nnp=%s " % ("1/1" if "nnp" in args else "0/0") in first, first
    environ = "/proc/%d/environ" % p.pid
    seen = _read_as_nobody(environ)
    assert (seen.returncode == 0) == bool(dumpable), seen
    before = _creds(p.pid)
    img = nobody_dir / "image"
    dump(p.pid, img)
    reap_killed(p)
    pid, _, _ = restore_ok(procs, img)
    again = _read_as_nobody(environ)
    if dumpable:
        assert again.returncode == 0 and again.stdout == seen.stdout, again.stderr
        assert os.stat("/proc/%d/maps" % pid).st_uid == NOBODY
    else:
        assert again.returncode != 0 and os.stat("/proc/%d/maps" % pid).st_uid == 0
    assert _creds(pid) == before
    assert _report(pid, out, 2) == first


# ------------------------------------------------------------------ 4. cgroups
def _cgroup_mounts():
    """{"memory": mount point of the v1 memory hierarchy, "v2": of the v2 hierarchy}, for those
    mounted here (whole, from their root), read from mountinfo."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            if a[3] != "/" or len(b) < 3:
                continue
            if b[0] == "cgroup" and "memory" in b[2].split(","):
                found.setdefault("memory", a[4])
            elif b[0] == "cgroup2":
                found.setdefault("v2", a[4])
    return found


class Cgroups:
    """Cgroups a test makes (in the v1 memory and the v2 hierarchies, those mounted here),
    removed at teardown once the processes in them are gone."""

    def __init__(self):
        self.mounts = _cgroup_mounts()
        self.made = []

    def make(self, hierarchy, name):
        path = os.path.join(self.mounts[hierarchy], name)
        os.mkdir(path)
        self.made.append(path)
        return path

    def remove(self, path):
        deadline = time.monotonic() + WAIT
        while os.path.isdir(path):
            try:
                os.rmdir(path)
            except OSError:       # EBUSY while a killed process is still leaving it
                assert time.monotonic() < deadline, "cannot remove %s" % path
                time.sleep(0.02)

    def teardown(self):
        for path in reversed(self.made):
            self.remove(path)


@pytest.fixture
def cgroups(procs):
    c = Cgroups()
    if not c.mounts:
        pytest.skip("no cgroup v1 memory hierarchy nor cgroup v2 is mounted here")
    yield c
    procs.teardown()        # the processes first: a cgroup is removed only once empty
    c.teardown()


def _need_v1_memory(cgroups):
    if "memory" not in cgroups.mounts:
        pytest.skip("needs the cgroup v1 memory hierarchy")


def _enter(cg, pid):
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def _cgroup_lines(pid, tid=None):
    """The v1 memory and v2 lines of /proc/PID/cgroup (or of one thread)."""
    path = "/proc/%d/task/%d/cgroup" % (pid, tid) if tid else "/proc/%d/cgroup" % pid
    with open(path) as f:
        return sorted(line for line in f.read().splitlines() if ":memory:" in line or line.startswith("0::"))


def test_cgroup_membership_comes_back(procs, tmp_path, cgroups):
    """A target in a v1 memory cgroup and a v2 cgroup of its own (those of the two hierarchies
    mounted here) comes back in them, every thread of it."""
    out = tmp_path / "out"
    p, _ = procs.start("confine", stdout=out)
    first = wait_file_line(out, _attrs, proc=p)
    name = "ckpt-test-%d" % p.pid
    made = {h: cgroups.make(h, name) for h in sorted(cgroups.mounts)}
    for cg in made.values():
        _enter(cg, p.pid)
    want = sorted(x.rsplit(":", 1)[0] + ":/" + name for x in _cgroup_lines(p.pid))
    assert _cgroup_lines(p.pid) == want and len(want) == len(made)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    assert all(os.path.isdir(cg) for cg in made.values())
    pid, _, err = restore_ok(procs, img)
    assert not err.strip(), err
    assert _cgroup_lines(pid) == want
    for tid in tids(pid):
        assert _cgroup_lines(pid, tid) == want, tid
    for cg in made.values():
        with open(os.path.join(cg, "cgroup.procs")) as f:
            assert f.read().split() == [str(pid)]
    if "memory" in made:
        with open(os.path.join(made["memory"], "tasks")) as f:
            assert sorted(int(x) for x in f.read().split()) == tids(pid)
    assert _report(pid, out, 2) == first


def _restore_refused(procs, img):
    """A restore that must be refused by its plan, before anything is created: it cannot take
    long (a bound, not a timing assertion: a refusal that comes only after the threads exist
    used to leave ckpt waiting for them forever)."""
    procs.adopt(image_meta(img)["process"]["pid"])
    try:
        rc, _, err = run_ckpt("restore", img, timeout=WAIT)
    except subprocess.TimeoutExpired:
        raise AssertionError("ckpt restore of %s neither refused nor finished within %d s" % (img, WAIT)) from None
    assert rc != 0, "restore of %s was not refused" % img
    return err


def test_cgroup_gone_is_refused(procs, tmp_path, cgroups):
    _need_v1_memory(cgroups)
    out = tmp_path / "out"
    p, _ = procs.start("confine", stdout=out)
    wait_file_line(out, _attrs, proc=p)
    name = "ckpt-test-%d" % p.pid
    mem = cgroups.make("memory", name)
    _enter(mem, p.pid)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    cgroups.remove(mem)
    err = _restore_refused(procs, img)
    assert "process %d was in memory cgroup /%s at the dump, which no longer exists" % (p.pid, name) in err, err
    assert not alive(p.pid)


def test_cgroup_only_where_its_owner_may_put_it(procs, nobody_dir, cgroups):
    """A process of nobody's that root put into a memory cgroup: an image of root's own (trusted)
    brings it back there; the same image owned by nobody (restored with nobody's rights) is
    refused for a cgroup of root's, and restored into a cgroup delegated to nobody."""
    _need_v1_memory(cgroups)
    out = nobody_dir / "out"
    p, _ = procs.start("confine", stdout=out, user="nobody")
    first = wait_file_line(out, _attrs, proc=p)
    name = "ckpt-test-%d" % p.pid
    mem = cgroups.make("memory", name)
    _enter(mem, p.pid)
    img = nobody_dir / "image"
    dump(p.pid, img)
    reap_killed(p)
    at_dump = os.path.getsize(out)    # each restored process writes its report from there on
    line = "memory:/%s" % name
    # root's image: trusted whole, back where root had put it
    pid, _, _ = restore_ok(procs, img)
    assert any(x.endswith(line) for x in _cgroup_lines(pid))
    assert _report(pid, out, 2) == first
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    # nobody's image: nobody may not write to root's cgroup
    os.chown(img, NOBODY, NOBODY)
    err = _restore_refused(procs, img)
    assert ("process %d was in memory cgroup /%s at the dump, but its owner may not put a process there"
            % (pid, name)) in err, err
    assert not alive(pid)
    # ... but may, once the cgroup is delegated to nobody
    for x in ("", "cgroup.procs", "tasks"):
        os.chown(os.path.join(mem, x), NOBODY, NOBODY)
    os.truncate(out, at_dump)
    pid, _, err = restore_ok(procs, img)
    assert any(x.endswith(line) for x in _cgroup_lines(pid))
    assert _report(pid, out, 2) == first


# ------------------------------------------------------------------ 5. the stop state
def _ticks(out):
    return [x for x in read_lines(out) if x.startswith("tick ")]


def _states(pid):
    out = {}
    for tid in tids(pid):
        with open("/proc/%d/task/%d/stat" % (pid, tid)) as f:
            out[tid] = f.read().rsplit(")", 1)[1].split()[0]
    return out


def _wait_states(pid, want):
    deadline = time.monotonic() + WAIT
    while True:
        st = _states(pid)
        if set(st.values()) <= want:
            return st
        assert time.monotonic() < deadline, "process %d: thread states %s, expected %s" % (pid, st, want)
        time.sleep(0.01)


def _does_not_advance(pid, out):
    """Stopped (every thread in state T), and no tick printed over a while."""
    _wait_states(pid, {"T"})
    n = len(_ticks(out))
    time.sleep(0.5)      # a running target prints a tick every 20 ms
    assert len(_ticks(out)) == n
    assert set(_states(pid).values()) == {"T"}
    return n


def _advances(pid, out, n):
    os.kill(pid, signal.SIGCONT)
    wait_file_line(out, lambda x: x.startswith("tick %d " % (n + 3)))
    ticks = _ticks(out)
    assert [int(x.split()[1]) for x in ticks] == list(range(1, len(ticks) + 1)), ticks[-5:]
    assert set(_wait_states(pid, {"S", "R"}).values()) <= {"S", "R"}


def test_stopped_target_comes_back_stopped(procs, tmp_path):
    out = tmp_path / "out"
    p, _ = procs.start("confine", "tick", stdout=out)
    wait_file_line(out, lambda x: x.startswith("tick 3 "), proc=p)
    os.kill(p.pid, signal.SIGSTOP)
    n = _does_not_advance(p.pid, out)
    img = tmp_path / "image"
    res = dump(p.pid, img)
    assert res["threads"] == 2
    reap_killed(p)
    assert len(_ticks(out)) == n
    assert [t["group_stop"] for t in image_meta(img)["threads"]] == [signal.SIGSTOP] * 2
    pid, _, _ = restore_ok(procs, img)
    assert _does_not_advance(pid, out) == n
    _advances(pid, out, n)


def test_stopped_target_stays_stopped_with_leave_running(procs, tmp_path):
    out = tmp_path / "out"
    p, _ = procs.start("confine", "tick", stdout=out)
    wait_file_line(out, lambda x: x.startswith("tick 3 "), proc=p)
    os.kill(p.pid, signal.SIGSTOP)
    n = _does_not_advance(p.pid, out)
    dump(p.pid, tmp_path / "image", "--leave-running")
    assert _does_not_advance(p.pid, out) == n
    assert status(p.pid)["TracerPid"] == "0"
    _advances(p.pid, out, n)


def test_running_target_comes_back_running(procs, tmp_path):
    """The other way round: a running target is not stopped by the restore."""
    out = tmp_path / "out"
    p, _ = procs.start("confine", "tick", stdout=out)
    wait_file_line(out, lambda x: x.startswith("tick 3 "), proc=p)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    assert [t["group_stop"] for t in image_meta(img)["threads"]] == [0, 0]
    n = len(_ticks(out))
    pid, _, _ = restore_ok(procs, img)
    wait_file_line(out, lambda x: x.startswith("tick %d " % (n + 3)))
    assert set(_states(pid).values()) <= {"S", "R"}
