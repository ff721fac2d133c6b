"""Unix sockets between the processes of a tree (ckpt/files/unix.py with a tree, issue 8): a
socketpair of each type whose ends went to a parent and its child, with messages queued both
ways at the dump; nginx-like channels (the master holds both ends, each worker a copy of one);
a listener in the parent whose connections a child accepted, one still waiting in its queue.
Each tree is dumped live (--leave-running), then with --verify and killed, and restored; its
processes check every message themselves (tests/targets/restore/treeunix.c): sequence, size
and content, the ones queued at the dump arriving once and in order. A socket whose other end
a process of the tree holds as a standard stream is refused at dump, naming both processes and
fds, the tree left running."""
import os
import signal
import time

from restore_support import (reap_orphans, WAIT, alive, dump, image_meta, procs, read_lines, reap_killed, restore_ok,  # noqa: F401
                             rs_built, run_ckpt, subreaper, wait_file_line, wait_gone)
from ckpt.kernel import procfs

ROUNDS = 400


def _gated(out, names):
    return lambda s: all(("%s at gate" % n) in read_lines(out) for n in names)


def _start(procs, tmp_path, mode, names):
    """The target in MODE, every process of it at its gate (messages queued both ways)."""
    d = tmp_path / "s"
    d.mkdir()
    out = tmp_path / ("%s.out" % mode)
    p, _ = procs.start("treeunix", mode, d, ROUNDS, stdout=out)
    # killed at teardown parent first: its children, orphaned, are then ours to reap
    procs.adopt(p.pid)
    wait_file_line(out, _gated(out, names), proc=p)
    kids = [i["pid"] for i in procfs.descendants(p.pid)]
    assert len(kids) == len(names) - 1, procfs.descendants(p.pid)
    for pid in kids:
        procs.adopt(pid)
    return p, out, kids


def _tables(img):
    """pid -> fd table of every process of the image."""
    meta = image_meta(img)
    tables = {meta["process"]["pid"]: meta["fds"]}
    for q in meta["tree"]["processes"]:
        tables[q["pid"]] = q["fds"]
    return tables


def _unix(table):
    return {e["fd"]: e for e in table if e["kind"] == "unix"}


def _dump_kill_restore(procs, tmp_path, p, out, kids, names, check_image=None):
    # a live dump first: the queues are read without taking anything out of them
    res = dump(p.pid, tmp_path / "live.img", "--leave-running")
    assert res["processes"] == [p.pid] + kids, res
    img = tmp_path / "tree.img"
    res = dump(p.pid, img)
    assert res["processes"] == [p.pid] + kids, res
    if check_image is not None:
        check_image(_tables(img))
    reap_killed(p)
    reap_orphans(kids)
    before = read_lines(out)
    restore_ok(procs, img)
    for pid in [p.pid] + kids:
        assert alive(pid), "process %d was not restored" % pid
        os.kill(pid, signal.SIGUSR2)
    wait_file_line(out, lambda s: s == "parent done")
    got = read_lines(out)
    assert got[:len(before)] == before
    after = got[len(before):]
    assert not [s for s in got if s.startswith(("BAD", "ERROR", "CRASH"))], got
    for n in names[1:]:
        assert "%s ok" % n in after, after
        assert "parent: %s ended with 0" % n in after, after
    assert "parent ok" in after, after
    for pid in [p.pid] + kids:
        wait_gone(pid)
    return after


def test_socketpairs_split_between_parent_and_child(procs, tmp_path):
    """socketpair() of each type, fork(), the parent keeps one end and the child the other:
    each pair is made once at restore, with what was queued both ways, and handed to the
    other process; a stream pair both sides shut down for writing after their last bytes
    gives those bytes, then the end of file, on each side. Besides, a datagram socket of the
    child bound to a name and connected to the parent's named (unconnected) one: the
    datagrams queued in the parent's still come from the child's name."""
    names = ["parent", "child"]
    p, out, kids = _start(procs, tmp_path, "pairs", names)

    def check_image(tables):
        parent, child = _unix(tables[p.pid]), _unix(tables[kids[0]])
        assert len(parent) == len(child) == 5, (parent, child)
        by_inode = {e["inode"]: e for e in child.values()}
        types = set()
        for e in parent.values():
            if e["name"]:
                continue
            assert "shares_with" not in e and e["peer"]["held"] in by_inode, e
            peer = by_inode[e["peer"]["held"]]
            assert peer["peer"]["held"] == e["inode"] and peer["type"] == e["type"]
            assert e["queue"] and peer["queue"], "nothing queued in %s / %s" % (e, peer)
            types.add(e["type"])
        assert types == {1, 2, 5}
        (srv,) = [e for e in parent.values() if e["name"]]
        (cli,) = [e for e in child.values() if e["name"]]
        assert cli["peer"] == {"held": srv["inode"]} and "peer" not in srv, (srv, cli)
        assert srv["queue"] and {sender for _, sender in srv["queue"]} == {cli["name"]}, srv["queue"]
    _dump_kill_restore(procs, tmp_path, p, out, kids, names, check_image)


def test_nginx_like_channels(procs, tmp_path):
    """The master holds both ends of one stream socketpair per worker and talks on end 0;
    each worker holds a copy of end 1 (the same open file as the master's) and talks on it."""
    names = ["master", "worker1", "worker2"]
    p, out, kids = _start(procs, tmp_path, "hub", names)

    def check_image(tables):
        master = _unix(tables[p.pid])
        assert len(master) == 4
        for k in kids:
            worker = _unix(tables[k])
            assert len(worker) == 1, worker
            (e,) = worker.values()
            assert e["shares_with"]["pid"] == p.pid and e["shares_with"]["fd"] in master, e
    after = _dump_kill_restore(procs, tmp_path, p, out, kids, names, check_image)
    assert "master at gate" not in after


def test_listener_in_parent_connections_in_children(procs, tmp_path):
    """The parent listens; child A connects, child C (which inherited the listener) accepts;
    the parent connects too and C accepts that one; A's second connection waits in the
    listener's accept queue at the dump. All come back connected as they were, with their
    queues, and C accepts the waiting one after the restore."""
    names = ["parent", "client", "acceptor"]
    p, out, kids = _start(procs, tmp_path, "listen", names)

    def check_image(tables):
        parent = _unix(tables[p.pid])
        lst = [e for e in parent.values() if e["state"] == "listening"]
        assert len(lst) == 1 and len(lst[0]["pending"]) == 1, parent
        client = [t for pid, t in tables.items() if pid != p.pid and any(
            e.get("inode") == lst[0]["pending"][0] for e in t)]
        assert len(client) == 1
        accepted = [e for t in tables.values() for e in t if e.get("via") == lst[0]["inode"]]
        assert len(accepted) == 2, accepted
    _dump_kill_restore(procs, tmp_path, p, out, kids, names, check_image)


def test_socket_to_a_childs_standard_stream_refused(procs, tmp_path):
    """The child's standard output is a socket whose other end the parent reads: restore would
    attach the child's stdout to ckpt's own, cutting the parent's socket; refused at dump,
    naming both processes and fds, and the tree goes on untouched."""
    names = ["parent", "child"]
    p, out, kids = _start(procs, tmp_path, "stdio", names)
    fd = [int(n) for n in os.listdir("/proc/%d/fd" % p.pid)
          if os.readlink("/proc/%d/fd/%s" % (p.pid, n)).startswith("socket:")]
    assert len(fd) == 1
    rc, _, err = run_ckpt("dump", p.pid, "-o", tmp_path / "x.img")
    assert rc != 0, err
    assert "process %d: fd %d" % (p.pid, fd[0]) in err, err
    assert "fd 1 (standard output) of process %d" % kids[0] in err, err
    assert not (tmp_path / "x.img").exists()
    assert alive(p.pid) and alive(kids[0])
    n = len([s for s in read_lines(out) if s.startswith("parent read ")])
    wait_file_line(out, lambda s: len([x for x in read_lines(out) if x.startswith("parent read ")]) > n + 2, proc=p)
