"""Dumps of targets that make the dump itself hard, each on a real process: a thread that never
stops (blocked in vfork, or frozen by the cgroup freezer), ckpt's own signals while it waits
for one, sparse shared memory, names that are not text (comm, arguments, mapped and open files
named with newlines, bytes that are not UTF-8, a real file named "x (deleted)"), and targets
that the default dump (which kills) must not touch: PID 1, ckpt's own ancestors, ckpt itself.

A refusal is one line on stderr naming the process and the reason, nothing is left in the
output directory, and the target runs on exactly as before.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import one_line_error, proc_status, proc_tids, run_ckpt, target_clean, wait_armed
from restore_support import dump, image_meta, reap_killed, restore_attached  # noqa: F401
from restore_support import procs, rs_built, subreaper  # noqa: F401  (fixtures)

WAIT = 120
BIG_MB = 1024      # round 0 of the target streams for a good while after the arm


def _outdir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def _wait_for(pred, what, timeout=WAIT, proc=None):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError("ckpt ended (%s) before %s: %s" % (proc.returncode, what, proc.communicate()))
        assert time.monotonic() < deadline, "never: %s" % what
        time.sleep(0.005)


def _state(pid, tid):
    try:
        with open("/proc/%d/task/%d/stat" % (pid, tid)) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


# ------------------------------------------------------------------ vfork
def _vfork(t):
    """Make the vforker target's worker vfork; return (the blocked thread, the child)."""
    os.kill(t.pid, signal.SIGUSR2)
    line = t.readline()
    assert line.startswith("vfork-child "), line
    child = int(line.split()[1])
    blocked = _wait_for(lambda: [tid for tid in proc_tids(t.pid) if _state(t.pid, tid) == "D"],
                        "a thread of %d blocked in vfork" % t.pid)
    return blocked[0], child


def _child_waits(child):
    st = proc_status(child)
    assert st["State"].startswith("S"), "the vfork child %d: %s" % (child, st["State"])


def _end(t, child):
    """Kill the target's group (the vfork child with it) and reap the child if it came to us
    (this process may be a child subreaper)."""
    t.kill()
    try:
        os.waitpid(child, 0)
    except ChildProcessError:
        pass


def test_target_blocked_in_vfork_is_refused_before_it_is_touched(spawn, tmp_path):
    """A thread blocked in vfork() never stops for ptrace, and its child runs on the process's
    memory. Refused up front, with the default kill as with --leave-running."""
    t = spawn("vforker", 16)
    tid, child = _vfork(t)
    out = _outdir(tmp_path)
    for extra in ([], ["--leave-running"]):
        rc, so, se = run_ckpt("dump", t.pid, "-o", out / "image", *extra, timeout=WAIT)
        assert rc != 0, so
        line = one_line_error(se)
        assert "process %d is blocked in vfork for child %d" % (t.pid, child) in line, line
        assert "thread %d" % tid in line, line
        target_clean(t, out, [])
    assert _state(t.pid, tid) == "D"     # still waiting for its child, as before
    _child_waits(child)
    t.assert_ok()
    _end(t, child)


def test_thread_entering_vfork_during_the_dump_fails_it_cleanly(spawn, start_ckpt, tmp_path):
    """The vfork comes while round 0 streams: the freeze finds a thread that does not stop, looks
    at it, and gives up at once naming the child, leaving the target as it was."""
    t = spawn("vforker", BIG_MB)
    before = t.assert_ok()
    out = _outdir(tmp_path)
    p = start_ckpt("dump", t.pid, "-o", out / "image", "--leave-running", "--verify")
    assert wait_armed(t, ckpt_proc=p), "ckpt ended before arming: %s" % (p.communicate(),)
    tid, child = _vfork(t)
    so, se = p.communicate(timeout=300)
    assert p.returncode != 0, "the dump of a process with a thread in vfork succeeded: %s" % so
    line = one_line_error(se)
    assert ("thread %d of process %d did not stop" % (tid, t.pid)) in line, line
    assert "blocked in vfork for child %d" % child in line, line
    target_clean(t, out, [])
    assert _state(t.pid, tid) == "D"
    _child_waits(child)
    t.assert_progress(before)
    _end(t, child)


# ------------------------------------------------------------------ threads that never stop
def _freezer_root():
    """Where the cgroup v1 freezer hierarchy is mounted, or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields = post.split()
            if fields and fields[0] == "cgroup" and "freezer" in fields[-1].split(","):
                return pre.split()[4]
    return None


@pytest.fixture
def freezer():
    """freeze(pid) puts a process into a cgroup v1 freezer group of its own and freezes it: its
    threads sleep uninterruptibly, and PTRACE_INTERRUPT never stops them. thaw() thaws it.
    At teardown the group is thawed, emptied and removed."""
    root = _freezer_root()
    if root is None:
        pytest.skip("no cgroup v1 freezer hierarchy mounted here")
    group = os.path.join(root, "ckpt-test-%d" % os.getpid())
    os.mkdir(group)

    def write(name, value, where=group):
        with open(os.path.join(where, name), "w") as f:
            f.write(value)

    def state():
        with open(os.path.join(group, "freezer.state")) as f:
            return f.read().strip()

    def freeze(pid):
        write("cgroup.procs", str(pid))
        write("freezer.state", "FROZEN")
        _wait_for(lambda: state() == "FROZEN", "the freezer group frozen")

    def thaw():
        write("freezer.state", "THAWED")
        _wait_for(lambda: state() == "THAWED", "the freezer group thawed")

    freeze.thaw = thaw
    freeze.group = group
    yield freeze
    thaw()
    with open(os.path.join(group, "cgroup.procs")) as f:
        for pid in f.read().split():
            try:
                write("cgroup.procs", pid, root)
            except OSError:
                pass
    os.rmdir(group)


def test_thread_that_never_stops_fails_the_dump_after_the_timeout(spawn, freezer, tmp_path, monkeypatch):
    t = spawn("writer", 16, 2, 1000)
    before = t.assert_ok()
    freezer(t.pid)
    monkeypatch.setenv("CKPT_STOP_TIMEOUT", "2")
    out = _outdir(tmp_path)
    rc, so, se = run_ckpt("dump", t.pid, "-o", out / "image", "--leave-running", timeout=WAIT)
    assert rc != 0, so
    line = one_line_error(se)
    assert "of process %d did not stop within 2 s" % t.pid in line, line
    assert "frozen by the cgroup freezer" in line, line
    assert os.listdir(out) == []
    for tid in proc_tids(t.pid):
        assert proc_status(t.pid, tid)["TracerPid"] == "0"
    freezer.thaw()
    target_clean(t, out, [])
    t.assert_progress(before)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_ckpt_answers_its_signals_while_it_waits_for_a_thread(spawn, start_ckpt, freezer, tmp_path, monkeypatch, sig):
    """ckpt waits (here as long as 600 s) for a thread that does not stop; SIGTERM or SIGINT
    ends the dump at once, the target left as it was."""
    t = spawn("writer", 16, 2, 1000)
    before = t.assert_ok()
    freezer(t.pid)
    monkeypatch.setenv("CKPT_STOP_TIMEOUT", "600")
    out = _outdir(tmp_path)
    p = start_ckpt("dump", t.pid, "-o", out / "image", "--leave-running")
    _wait_for(lambda: any(proc_status(t.pid, tid)["TracerPid"] == str(p.pid) for tid in proc_tids(t.pid)),
              "ckpt waiting for a thread of %d" % t.pid, proc=p)
    p.send_signal(sig)
    so, se = p.communicate(timeout=60)
    assert p.returncode != 0, so
    line = one_line_error(se)
    assert "interrupted by signal %d" % sig in line and str(t.pid) in line, line
    assert os.listdir(out) == []
    freezer.thaw()
    target_clean(t, out, [])
    t.assert_progress(before)


# ------------------------------------------------------------------ sparse shared memory
def _resident_line(p, reader):
    os.kill(p.pid if hasattr(p, "pid") else p, signal.SIGUSR2)
    return reader.readline()


def test_sparse_shared_memory_is_copied_by_its_data_only(procs, tmp_path):
    """128 MiB each of MAP_SHARED|MAP_ANONYMOUS|MAP_NORESERVE memory, a memfd and a SysV
    segment, with 175 pages (700 kB) of each written: the dump copies those pages and reads
    none of the rest (which would allocate it all), a live dump leaves the target's memory as
    resident as it was, and the restored process has the same pages, and no more."""
    p, reader = procs.start("sparseshm", 128, 175, stdout=subprocess.PIPE)
    want = "ok 175 pages, 700+700+700 kB resident"
    assert _resident_line(p, reader) == want
    res = dump(p.pid, tmp_path / "live", "--leave-running")
    print("sparse shared memory, live dump: freeze %.3f ms, %s" % (res["freeze_ms"], res.get("freeze_breakdown_ms")))
    assert _resident_line(p, reader) == want      # nothing allocated by the dump
    rc, so, se = run_ckpt("info", tmp_path / "live", "--json")
    assert rc == 0, se
    shm = [m for m in json.loads(so)["mappings"] if m["kind"] == "shmem"]
    assert [(m["end"] - m["start"], m["pages_in_image"]) for m in shm] == [(128 << 20, 175)] * 3, shm
    dump(p.pid, tmp_path / "image")
    reap_killed(p)
    pid, out = restore_attached(procs, tmp_path / "image")
    assert _resident_line(pid, out) == want


# ------------------------------------------------------------------ names
NAMES = {"nl": b"a\nb", "lit": b"a\\012b", "xdel": b"x (deleted)", "bin": b"bin-\xff\xfe",
         "gone": b"gone", "gone2": b"gone2"}
COMM = b"n\xff\xfe-ckpt"


def _maps_line(pid, addr):
    """(end, inode) of the mapping of pid that starts at addr, read as bytes."""
    with open("/proc/%d/maps" % pid, "rb") as f:
        for line in f.read().split(b"\n"):
            f = line.split(None, 5)
            if f and int(f[0].split(b"-")[0], 16) == addr:
                return int(f[0].split(b"-")[1], 16), int(f[4])
    raise AssertionError("no mapping of %d at %#x" % (pid, addr))


def _mapped_file(pid, addr):
    end, _ = _maps_line(pid, addr)
    st = os.stat("/proc/%d/map_files/%x-%x" % (pid, addr, end))
    return st.st_dev, st.st_ino


def test_names_that_are_not_text(procs, tmp_path):
    """A process named with bytes that are not UTF-8, mapping files whose names hold a newline,
    the four characters \\012, such bytes, or end in " (deleted)" without being deleted, and
    files really deleted: dumped, killed, restored; every mapping comes back from the right
    file (the deleted ones as deleted files with their content), and the name and arguments stay."""
    d = tmp_path / "files"
    d.mkdir()
    arg = os.fsdecode(b"arg-\xff")
    p, reader = procs.start("names", d, arg, stdout=subprocess.PIPE)
    line = reader.readline()
    assert line.startswith("maps "), line
    addrs = {k: int(v, 16) for k, v in (x.split("=") for x in line.split()[1:])}
    assert _resident_line(p, reader) == "ok names"
    with open("/proc/%d/comm" % p.pid, "rb") as f:
        assert f.read() == COMM + b"\n"
    with open("/proc/%d/cmdline" % p.pid, "rb") as f:
        cmdline = f.read()
    files = {k: os.stat(os.path.join(os.fsencode(str(d)), NAMES[k])) for k in ("nl", "lit", "xdel", "bin")}
    for k, st in files.items():
        assert _mapped_file(p.pid, addrs[k]) == (st.st_dev, st.st_ino), k
    img = tmp_path / "image"
    dump(p.pid, img)
    maps = {m["start"]: m for m in image_meta(img)["mappings"]}
    assert [maps[addrs[k]]["deleted"] for k in NAMES] == [False, False, False, False, True, True], \
        [(k, maps[addrs[k]]["path"], maps[addrs[k]]["deleted"]) for k in NAMES]
    assert os.fsencode(maps[addrs["nl"]]["path"]) == os.path.join(os.fsencode(str(d)), b"a\nb")
    reap_killed(p)
    pid, out = restore_attached(procs, img)
    assert _resident_line(pid, out) == "ok names"
    with open("/proc/%d/comm" % pid, "rb") as f:
        assert f.read() == COMM + b"\n"
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        assert f.read() == cmdline
    for k, st in files.items():
        assert _mapped_file(pid, addrs[k]) == (st.st_dev, st.st_ino), "mapping %s not from its file" % k
    for k in ("gone", "gone2"):     # a deleted file again, with its content (ckpt/state/deleted.py)
        end, _ = _maps_line(pid, addrs[k])
        assert os.stat("/proc/%d/map_files/%x-%x" % (pid, addrs[k], end)).st_nlink == 0, \
            "deleted file %s not restored as a deleted file" % k
    assert os.readlink(b"/proc/%d/fd/5" % pid) == os.path.join(os.fsencode(str(d)), NAMES["bin"])


# ------------------------------------------------------------------ who the default dump must not kill
def _sh(script, *args):
    """Run `sh -c SCRIPT` (with "$PY" the interpreter running ckpt) from /; returns (rc, out, err)."""
    env = dict(os.environ, PY=sys.executable)
    res = subprocess.run(["sh", "-c", script, "sh"] + [str(a) for a in args], capture_output=True, text=True,
                         timeout=WAIT, cwd="/", env=env, stdin=subprocess.DEVNULL)
    return res.returncode, res.stdout, res.stderr


def test_refuses_to_kill_its_own_parent_or_ancestors(tmp_path):
    out = _outdir(tmp_path)
    img = out / "image"
    # the shell that runs ckpt: refused, and the shell lives on to say so
    rc, so, se = _sh('"$PY" -m ckpt dump $$ -o "$1"; echo "rc=$? pid=$$"', img)
    assert so.startswith("rc=1 pid="), (so, se)
    shell = int(so.split("pid=")[1])
    line = one_line_error(se)
    assert "process %d (sh) is ckpt's own parent" % shell in line and "use --leave-running" in line, line
    # two levels up
    rc, so, se = _sh('sh -c \'"$PY" -m ckpt dump "$0" -o "$1"; echo "inner rc=$?"\' $$ "$1"; echo "outer pid=$$"', img)
    assert "inner rc=1" in so and "outer pid=" in so, (so, se)
    outer = int(so.split("outer pid=")[1])
    line = one_line_error(se)
    assert "process %d (sh) is an ancestor of ckpt (2 levels up)" % outer in line, line
    assert os.listdir(out) == []
    # with --leave-running its own parent is dumped, and goes on: alone (--single; ckpt, its
    # child, is left out), since ckpt cannot be part of the tree it dumps
    rc, so, se = _sh('"$PY" -m ckpt dump $$ -o "$1" --leave-running --verify --json; echo "rc=$?"', img)
    assert "rc=1" in so and "ckpt itself runs as a descendant of process" in se, (so, se)
    rc, so, se = _sh('"$PY" -m ckpt dump $$ -o "$1" --single --leave-running --verify --json; echo "rc=$?"', img)
    assert so.rstrip().endswith("rc=0"), (so, se)
    assert json.loads(so.splitlines()[0])["verified"] is True
    assert os.listdir(out) == ["image"]


def test_refuses_to_dump_itself(tmp_path):
    out = _outdir(tmp_path)
    rc, so, se = _sh('exec "$PY" -m ckpt dump $$ -o "$1" --leave-running', out / "image")
    assert rc != 0
    assert "is ckpt itself" in one_line_error(se)
    assert os.listdir(out) == []


def test_refuses_to_kill_pid_1(tmp_path):
    """PID 1 of a PID namespace of our own (a sleep), with ckpt entering the namespace from
    outside (so PID 1 is not its ancestor): refused unless --leave-running."""
    out = _outdir(tmp_path)
    ns = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "sleep", "1000"],
                          stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        def init():
            try:
                with open("/proc/%d/task/%d/children" % (ns.pid, ns.pid)) as f:
                    kids = f.read().split()
            except OSError:
                return None
            return int(kids[0]) if kids else None
        sleeper = _wait_for(init, "the namespace's init")
        res = subprocess.run(["nsenter", "-t", str(sleeper), "-p", "-m", sys.executable, "-m", "ckpt", "dump", "1",
                              "-o", str(out / "image")], capture_output=True, text=True, timeout=WAIT, cwd="/",
                             stdin=subprocess.DEVNULL)
        assert res.returncode != 0, res.stdout
        line = one_line_error(res.stderr)
        assert "process 1 (sleep) is the init process" in line and "use --leave-running" in line, line
        assert os.listdir(out) == []
        assert proc_status(sleeper)["State"].startswith("S")      # alive, untouched
        assert proc_status(sleeper)["TracerPid"] == "0"
    finally:
        os.killpg(ns.pid, signal.SIGKILL)
        ns.wait(timeout=WAIT)
        try:
            os.waitpid(sleeper, 0)      # ours if this process is a child subreaper
        except (ChildProcessError, NameError):
            pass


def test_thread_group_without_its_leader_is_refused_naming_it(spawn, tmp_path):
    """A process whose main thread has exited while another runs: refused up front with what
    it is, and it runs on untouched."""
    t = spawn("leaderless")
    out = _outdir(tmp_path)
    rc, so, se = run_ckpt("dump", t.pid, "-o", out / "image", "--leave-running")
    assert rc != 0
    line = one_line_error(se)
    assert "main thread has exited" in line and "1 other thread still runs" in line, line
    assert os.listdir(out) == []
    assert t.alive()
