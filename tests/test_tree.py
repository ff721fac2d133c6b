"""Process trees: a process dumped with all its descendants, in one freeze, and restored with
the same PIDs, parents, sessions, process groups, zombies, pipes, shared memory and shared
open files (issue 8)."""
import collections
import os
import re
import signal
import struct
import subprocess
import sys
import time

from restore_support import (reap_orphans, SRC, WAIT, alive, dump, image_meta, procs, read_lines, reap_killed, reference,  # noqa: F401
                             restore_ok, rs_built, run_ckpt, subreaper, wait_file_line, wait_gone)
from ckpt.kernel import procfs

# family MIB STEPS EVERY GATE LOG ZOMBIE_AT
STEPS, EVERY, GATE, ZOMBIE_AT = 40000, 500, 30000, 35000


def _links(pid):
    i = procfs.links(pid)
    return (i["ppid"], i["pgid"], i["sid"], i["state"] == "Z")


def _same_frames(child, parent, ranges, anon_only=False):
    """Pages of `ranges` that child and parent map to the very same page frame (copy-on-write
    sharing of anonymous pages, or one page cache page of a private file mapping neither wrote:
    /proc/PID/pagemap, present, same PFN)."""
    n = 0
    with open("/proc/%d/pagemap" % child, "rb", buffering=0) as a, \
            open("/proc/%d/pagemap" % parent, "rb", buffering=0) as b:
        for s, e in ranges:
            cnt = (e - s) // 4096
            x = struct.unpack("<%dQ" % cnt, os.pread(a.fileno(), cnt * 8, s // 4096 * 8))
            y = struct.unpack("<%dQ" % cnt, os.pread(b.fileno(), cnt * 8, s // 4096 * 8))
            for u, v in zip(x, y):
                pfn = u & ((1 << 55) - 1)
                if u >> 63 and v >> 63 and pfn and pfn == v & ((1 << 55) - 1) and not (anon_only and (u >> 61) & 1):
                    n += 1
    return n


def _start_family(procs, tmp_path, log, *, gate=GATE, steps=STEPS, zombie_at=ZOMBIE_AT):
    out = tmp_path / "family.out"
    p, _ = procs.start("family", 16, steps, EVERY, gate, log, zombie_at, stdout=out)
    line = wait_file_line(out, lambda s: s.startswith("family "), proc=p)
    kids = [int(x) for x in line.split()[1:]]
    wait_file_line(out, lambda s: s == "step 2000 hash" or s.startswith("step 2000 "), proc=p)
    return p, out, kids


def _check_log(path, steps):
    """Every writer's lines whole and in sequence: the log's one open file (one offset) was
    shared by the four processes before and after the restore."""
    seq = collections.defaultdict(list)
    for line in read_lines(path):
        m = re.fullmatch(r"(child [123]|parent) step (\d+)", line)
        assert m, "a damaged line in the shared log: %r" % line
        seq[m.group(1)].append(int(m.group(2)))
    want = list(range(EVERY, steps + 1, EVERY))
    for who in ("parent", "child 1", "child 2", "child 3"):
        assert seq[who] == want, "%s logged %s ... (expected every %d steps up to %d)" % (who, seq[who][:5], EVERY, steps)


def test_family_dumped_whole_and_restored(procs, tmp_path):
    """A parent and three children writing hard to pipes and shared memory: one dump with
    --verify takes all four (and a zombie child), restore brings back the same PIDs, parent
    links, session and group, and the computation ends exactly as an uninterrupted run."""
    log = tmp_path / "family.log"
    p, out, kids = _start_family(procs, tmp_path, log)
    tree = [p.pid] + kids
    zombie = [i["pid"] for i in procfs.descendants(p.pid) if i["state"] == "Z"]
    assert len(zombie) == 1, procfs.descendants(p.pid)
    before = {pid: _links(pid) for pid in tree + zombie}
    assert before[kids[0]][2] == kids[0] and before[kids[1]][1] == kids[1] == before[kids[2]][1]
    for pid in tree + zombie:
        procs.adopt(pid)
    res = dump(p.pid, tmp_path / "tree.img")
    assert res["processes"] == tree and res["zombies"] == zombie, res
    assert res["pages_verified"] > 4 * 1024, res
    reap_killed(p)
    reap_orphans(kids + zombie)
    restore_ok(procs, tmp_path / "tree.img")
    # at the gate: everything in place, the zombie not yet reaped
    wait_file_line(out, lambda s: s == "step %d hash" % (GATE - EVERY) or s.startswith("step %d " % (GATE - EVERY)))
    after = {pid: _links(pid) for pid in tree + zombie}
    assert after == before
    # what the children shared with their parent (copy-on-write) at the dump, they share again:
    # the same physical pages, not copies
    image_tree = image_meta(tmp_path / "tree.img")["tree"]
    for proc in image_tree["processes"]:
        cow = [tuple(r) for r in proc.get("cow", [])]
        assert sum(e - s for s, e in cow) // 4096 > 100, proc["pid"]
        # anonymous or page cache pages: a page of a private file mapping equal to its file is
        # not written at restore (it stays the file's page, as it was at the dump: these ranges
        # are mostly such pages; restore used to write them as anonymous copies, which the dump
        # recorded only because it sees absent pages as written)
        assert _same_frames(proc["pid"], p.pid, cow) > 50, proc["pid"]
        # the 4 MiB the parent wrote before forking and all only read since: anonymous pages
        # still shared after the dump (whose reads do not pin them) and after the restore
        assert _same_frames(proc["pid"], p.pid, cow, anon_only=True) >= 1000, proc["pid"]
    os.kill(p.pid, signal.SIGUSR2)
    wait_file_line(out, lambda s: s.startswith("done "))
    got = read_lines(out)
    assert not [s for s in got if s.startswith(("BAD", "ERROR", "CRASH"))], got
    ref_lines, rc = reference("family", 16, STEPS, EVERY, -1, tmp_path / "reference.log", ZOMBIE_AT).lines()
    assert rc == 0
    assert got[2:] == ref_lines[2:], "the restored tree's output differs from an uninterrupted run"
    assert "reaped zombie status 7" in got
    _check_log(log, STEPS)
    for pid in tree:
        wait_gone(pid)


def test_leave_running_tree_dumps_consistently(procs, tmp_path):
    """Repeated live dumps of the tree with --verify while every process writes, each leaving
    the tree running untouched."""
    log = tmp_path / "family.log"
    p, out, kids = _start_family(procs, tmp_path, log, gate=-1, steps=10 ** 9, zombie_at=0)
    for pid in kids:
        procs.adopt(pid)
    for k in range(3):
        res = dump(p.pid, tmp_path / ("live%d.img" % k), "--leave-running")
        assert res["processes"] == [p.pid] + kids, res
        tree = image_meta(tmp_path / ("live%d.img" % k))["tree"]
        assert [q["pid"] for q in tree["processes"]] == kids
        assert len(tree["shm"]) == 1 and tree["shm"][0]["pids"] == [p.pid] + kids, tree["shm"]
    n = len(read_lines(out))
    wait_file_line(out, lambda s: s.startswith("step ") and len(read_lines(out)) > n + 2, proc=p)
    assert all(alive(pid) for pid in [p.pid] + kids)
    assert not [s for s in read_lines(out) if s.startswith(("BAD", "ERROR", "CRASH"))]


def test_single_refuses_to_cut_the_tree(procs, tmp_path):
    """--single on a process with children is refused, naming them; the tree runs on."""
    log = tmp_path / "family.log"
    p, out, kids = _start_family(procs, tmp_path, log, gate=-1, steps=10 ** 9, zombie_at=0)
    for pid in kids:
        procs.adopt(pid)
    rc, _, err = run_ckpt("dump", p.pid, "-o", tmp_path / "one.img", "--single")
    assert rc != 0 and "--single" in err and "children" in err and str(kids[0]) in err, err
    assert not (tmp_path / "one.img").exists()
    # a child alone: it shares its pipes and shared memory with its parent
    rc, _, err = run_ckpt("dump", kids[1], "-o", tmp_path / "kid.img", "--single", "--leave-running")
    assert rc != 0 and "shares" in err and str(p.pid) in err, err
    assert all(alive(pid) for pid in [p.pid] + kids)
    n = len(read_lines(out))
    wait_file_line(out, lambda s: s.startswith("step ") and len(read_lines(out)) > n + 1, proc=p)


def test_restore_refuses_a_taken_pid(procs, tmp_path):
    """A PID of the tree in use at restore: a clear error before anything is created."""
    log = tmp_path / "family.log"
    p, out, kids = _start_family(procs, tmp_path, log, gate=-1, steps=10 ** 9, zombie_at=0)
    for pid in kids:
        procs.adopt(pid)
    dump(p.pid, tmp_path / "tree.img", "--leave-running")
    rc, _, err = run_ckpt("restore", tmp_path / "tree.img")
    assert rc != 0 and "PID %d is in use" % p.pid in err, err
    assert all(alive(pid) for pid in [p.pid] + kids)


def test_fork_heavy_target(procs, tmp_path):
    """Children created and reaped constantly during the dump: live dumps succeed with --verify
    whatever child is alive at the freeze, and a dump that kills restores a program that goes
    on forking and checking its children's statuses."""
    out = tmp_path / "forker.out"
    p, _ = procs.start("forker", 8, 500, 10 ** 9, -1, stdout=out)
    wait_file_line(out, lambda s: s.startswith("forks 1000 "), proc=p)
    for k in range(3):
        dump(p.pid, tmp_path / ("live%d.img" % k), "--leave-running")
    res = dump(p.pid, tmp_path / "forker.img")
    gone = [q for q in res["processes"] + res["zombies"] if q != p.pid]
    for q in gone:
        procs.adopt(q)
    reap_killed(p)
    reap_orphans(gone)
    n = len(read_lines(out))
    restore_ok(procs, tmp_path / "forker.img")
    wait_file_line(out, lambda s: s.startswith("forks ") and len(read_lines(out)) > n + 3)
    got = read_lines(out)
    assert not [s for s in got if s.startswith(("BAD", "ERROR", "CRASH"))], got[-5:]
    counts = [int(s.split()[1]) for s in got if s.startswith("forks ")]
    assert counts == list(range(500, 500 * len(counts) + 1, 500)), counts[-5:]


def test_shell_pipeline_dumped_with_its_shell(procs, tmp_path):
    """`sh -c 'produce | consume'`: the shell and both ends of the pipeline; the pipe between
    them (their standard streams, and what it held at the dump) joins them again after the
    restore, instead of each end leading out to /dev/null."""
    log = tmp_path / "pipeline.log"
    prog = "%s %s" % (sys.executable, SRC / "pipeline.py")
    out = open(tmp_path / "sh.out", "w")
    p = subprocess.Popen(["sh", "-c", "%s produce | %s consume %s" % (prog, prog, log)], stdout=out,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    out.close()
    procs.targets.append(p)
    wait_file_line(log, lambda s: s == "got 2000", proc=p)
    kids = [i["pid"] for i in procfs.descendants(p.pid)]
    assert len(kids) == 2, kids
    for pid in kids:
        procs.adopt(pid)
    res = dump(p.pid, tmp_path / "pipeline.img")
    assert res["processes"] == [p.pid] + kids, res
    fds = {q["pid"]: {e["fd"]: e for e in q["fds"]} for q in image_meta(tmp_path / "pipeline.img")["tree"]["processes"]}
    assert fds[kids[0]][1]["kind"] == "pipe" and not fds[kids[0]][1]["inherit"], fds[kids[0]][1]
    assert fds[kids[1]][0]["kind"] == "pipe" and not fds[kids[1]][0]["inherit"], fds[kids[1]][0]
    reap_killed(p)
    reap_orphans(kids)
    n = len(read_lines(log))
    restore_ok(procs, tmp_path / "pipeline.img")
    wait_file_line(log, lambda s: s.startswith("got ") and len(read_lines(log)) > n + 5)
    assert not [s for s in read_lines(log) if s.startswith("BAD")], read_lines(log)[-5:]


def test_shared_fd_table_stays_shared(procs, tmp_path):
    """A child made with CLONE_FILES shares its parent's fd table: after the restore, an fd the
    child opens is the parent's too, and one the parent closes is the child's no more."""
    out = tmp_path / "sharedfds.out"
    p, _ = procs.start("sharedfds", 100, stdout=out)
    wait_file_line(out, lambda s: s == "round 300 ok", proc=p)
    kids = [i["pid"] for i in procfs.descendants(p.pid)]
    for pid in kids:
        procs.adopt(pid)
    dump(p.pid, tmp_path / "sharedfds.img")
    assert image_meta(tmp_path / "sharedfds.img")["tree"]["processes"][0]["process"]["fd_table_of"] == p.pid
    reap_killed(p)
    reap_orphans(kids)
    n = len(read_lines(out))
    restore_ok(procs, tmp_path / "sharedfds.img")
    wait_file_line(out, lambda s: s.startswith("round ") and len(read_lines(out)) > n + 3)
    assert not [s for s in read_lines(out) if s.startswith(("BAD", "ERROR", "CRASH"))], read_lines(out)[-5:]


def test_interrupted_tree_dump_leaves_every_process_as_it_was(procs, tmp_path):
    """ckpt interrupted (SIGINT) once every process of the tree is armed: the dump fails with the
    reason, leaves no image, and every process runs on untraced, unstopped, with no mapping
    still registered for write-protect, and keeps computing right."""
    from conftest import proc_status, uffd_wp_vmas
    log = tmp_path / "family.log"
    out = tmp_path / "family.out"
    p, _ = procs.start("family", 512, 10 ** 9, EVERY, -1, log, 0, stdout=out)
    kids = [int(x) for x in wait_file_line(out, lambda s: s.startswith("family "), proc=p).split()[1:]]
    for pid in kids:
        procs.adopt(pid)
    outdir = tmp_path / "images"
    outdir.mkdir()
    d = procs.popen_ckpt("dump", p.pid, "-o", outdir / "image", "--leave-running", "--verify")
    deadline = time.monotonic() + WAIT
    while not uffd_wp_vmas(kids[-1]):
        assert d.poll() is None, "ckpt ended before arming the last child: %s" % (d.communicate(),)
        assert time.monotonic() < deadline, "the last child was never armed"
        time.sleep(0.002)
    d.send_signal(signal.SIGINT)
    _, err = d.communicate(timeout=WAIT)
    assert d.returncode != 0 and "interrupted by signal %d" % signal.SIGINT in err, err
    assert os.listdir(outdir) == []
    for pid in [p.pid] + kids:
        assert not uffd_wp_vmas(pid), "process %d still has write-protected mappings" % pid
        st = proc_status(pid)
        assert st["TracerPid"] == "0" and not st["State"].startswith(("t", "T")), (pid, st["State"])
    n = len(read_lines(out))
    wait_file_line(out, lambda s: s.startswith("step ") and len(read_lines(out)) > n + 2, proc=p)
    assert not [s for s in read_lines(out) if s.startswith(("BAD", "ERROR", "CRASH"))], read_lines(out)[-5:]
