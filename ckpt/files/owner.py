"""Who gets the signals of an fd with O_ASYNC (F_SETOWN_EX) and which signal (F_SETSIG): one
value per open file, read on ckpt's duplicate of it at the dump, set again by the restored
process after its fds are in place (restore_fds).

The owner must exist when the fds of the restored process are made: the process itself, a
process of the tree restored before it (its ancestors, and whatever comes earlier in the
image's order) or one of its children (forked before its fds are made). Other owners (a thread
other than the main one, a process group, a process outside the tree or restored later) are
refused at the dump, naming them."""
import fcntl
import os
import struct

from ckpt.errors import RestoreError
from ckpt.kernel import procfs, sysno

O_ASYNC = 0o20000
F_SETSIG, F_GETSIG, F_SETOWN_EX, F_GETOWN_EX = 10, 11, 15, 16
F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP = 0, 1, 2
TYPES = {F_OWNER_TID: "thread", F_OWNER_PID: "process", F_OWNER_PGRP: "process group"}


def capture(f, entry):
    """entry["owner"] = [type, pid] and entry["sig"] for an fd with O_ASYNC; None, or why it
    cannot be restored."""
    entry.pop("owner", None)
    entry.pop("sig", None)
    if not f.flags & O_ASYNC:
        return None
    fd = f.dup()
    kind, pid = struct.unpack("<ii", fcntl.fcntl(fd, F_GETOWN_EX, bytes(8)))
    sig = fcntl.fcntl(fd, F_GETSIG)
    if sig:
        entry["sig"] = sig
    if not pid:
        return None
    entry["owner"] = [kind, pid]
    if kind == F_OWNER_PID and pid == f.pid or kind == F_OWNER_TID and pid == f.pid:
        return None
    tree = list(f.ctx.tree)
    if kind == F_OWNER_PID and pid in tree:
        if f.pid not in tree or tree.index(pid) < tree.index(f.pid):
            return None
        info = procfs.links(pid)
        if info is not None and info["ppid"] == f.pid:
            return None
    return ("its O_ASYNC signals go to %s %d, which restore cannot have made when the fd is restored "
            "(the process itself, a process restored before it or one of its children); not supported yet"
            % (TYPES.get(kind, "owner"), pid))


def restore(remote, n, e, tree):
    """The owner and signal of fd n (after its flags). The owner must be a process of the
    restored tree (tree: base.TreeObjects), or this process's main thread: restore sets it
    while the process still has root's credentials, with which the kernel would let its
    signals go to any process."""
    if e.get("owner"):
        kind, pid = e["owner"]
        if not (kind == F_OWNER_PID and (pid == remote.pid or pid in tree.tables)
                or kind == F_OWNER_TID and pid == remote.pid):
            raise RestoreError("fd %d: the owner of its O_ASYNC signals, %s %r, is not a process of the image"
                               % (n, TYPES.get(kind, "?"), pid))
        remote.reset()
        got = remote.call(sysno.fcntl, n, F_SETOWN_EX, remote.put(struct.pack("<ii", kind, pid)),
                          what="fcntl(F_SETOWN_EX) of fd %d" % n, ok_errors=(3,))
        if got < 0:
            raise RestoreError("fd %d: the owner of its O_ASYNC signals, %s %d, does not exist (%s)"
                               % (n, TYPES.get(kind, "?"), pid, os.strerror(-got)))
    if e.get("sig"):
        remote.call(sysno.fcntl, n, F_SETSIG, e["sig"], what="fcntl(F_SETSIG) of fd %d" % n)
