"""File locks: flock locks, POSIX record locks (fcntl F_SETLK) and OFD locks (F_OFD_SETLK).

Dump: the fd scan (ck_fd_scan) says which fds' files have locks at all; for such an fd,
/proc/PID/fdinfo/FD lists ("lock:" lines) the locks set through that open file
and owned by it (flock, OFD) or by the process (POSIX). A lease (F_SETLEASE) is refused.

Restore: after every fd of the process is in place (and the parked duplicates are closed: the
process closing any fd of a file drops its POSIX locks on it), each lock is set again by the
restored process itself (injected flock / fcntl, never waiting): a POSIX lock belongs to the
process that sets it, flock and OFD locks to the open file (set once, through the fd that owns
the open file; fds sharing it share the lock). Before anything is created, /proc/locks is read:
a lock another process now holds that conflicts with one to restore refuses the restore, naming
that process; one taken in between makes the restore fail at that point, naming the fd.
"""
import os
import struct

from ckpt.errors import RestoreError
from ckpt.kernel import procfs, sysno

F_SETLK, F_OFD_SETLK = 6, 37
F_RDLCK, F_WRLCK = 0, 1
LOCK_SH, LOCK_EX, LOCK_NB = 1, 2, 4
SYS_flock = 73
KINDS = {"POSIX": "posix", "FLOCK": "flock", "OFDLCK": "ofd"}
WORDS = {"posix": "POSIX record lock", "flock": "flock lock", "ofd": "OFD lock"}


def _parse(line):
    """One line of /proc/locks (or an fdinfo "lock:" line without its key): dict, or None."""
    f = line.split()
    if len(f) < 8 or f[1] == "->":
        return None
    try:
        maj, mi, ino = f[5].split(":")
        start = int(f[6])
        end = None if f[7] == "EOF" else int(f[7])
        return {"type": f[1], "write": f[3] == "WRITE", "pid": int(f[4]),
                "file": (int(maj, 16), int(mi, 16), int(ino)), "start": start,
                "len": 0 if end is None else end - start + 1, "rw": f[3]}
    except ValueError:
        return None


def system_locks():
    """Every lock /proc/locks lists."""
    try:
        with open("/proc/locks") as f:
            return [x for x in map(_parse, f.read().splitlines()) if x is not None]
    except OSError:
        return []


def capture(f, entry):
    """entry["locks"]: the locks of this fd's open file (see the module docstring); None, or
    why they cannot be restored."""
    entry.pop("locks", None)
    # the fd scan saw no "lock:" line in its fdinfo: nothing to read (and /proc/locks, whose read
    # takes the kernel's global file-lock semaphore for writing, costs milliseconds: never in
    # the freeze for a file without locks)
    if f.st is None or not f.has_lock:
        return None
    try:
        with open(procfs.proc(f.pid, "fdinfo", str(f.fd))) as fi:
            lines = [x.split(":", 1)[1] for x in fi.read().splitlines() if x.startswith("lock:")]
    except OSError:
        return None
    out = []
    for line in lines:
        x = _parse(line)
        if x is None:
            continue
        if x["type"] not in KINDS:
            return "it holds a %s (%s) on its file: not supported" % (x["type"].lower(), line.strip())
        out.append({"type": KINDS[x["type"]], "write": x["write"], "start": x["start"], "len": x["len"]})
    if out:
        entry["locks"] = out
    return None


def _overlap(a, b):
    a_end = a["start"] + a["len"] if a["len"] else None
    b_end = b["start"] + b["len"] if b["len"] else None
    return (a_end is None or b["start"] < a_end) and (b_end is None or a["start"] < b_end)


def _ident(e):
    """(major, minor, inode) of the file an entry is restored from, when that is the file of the
    dump (reopened by its path); None for objects made anew (their locks cannot be taken)."""
    dev = e.get("dev")
    if e.get("kind") in ("file", "dir") or (e.get("kind") == "pipe" and e.get("fifo_path")):
        if isinstance(dev, int) and isinstance(e.get("inode"), int):
            return os.major(dev), os.minor(dev), e["inode"]
    return None


def precheck(entries):
    """Before anything is created: a lock another process holds now that conflicts with one to
    restore."""
    held = None
    for e in entries:
        if not e.get("locks"):
            continue
        key = _ident(e)
        if key is None:
            continue
        if held is None:
            held = system_locks()
        for want in e["locks"]:
            for x in held:
                if x["file"] != key or not (want["write"] or x["write"]):
                    continue
                family = "flock" if x["type"] == "FLOCK" else "record"
                if family != ("flock" if want["type"] == "flock" else "record"):
                    continue
                if family == "record" and not _overlap(want, x):
                    continue
                who = ("process %d (%s)" % (x["pid"], procfs.comm(x["pid"]) or "?")) if x["pid"] > 0 \
                    else "an open file of another process (OFD lock)"
                raise RestoreError("fd %d (%s): its %s %s is taken: %s holds a conflicting %s %s lock on the file"
                                   % (e["fd"], e.get("path"), "write" if want["write"] else "read",
                                      WORDS[want["type"]], who, x["rw"].lower(), x["type"]))


def restore(remote, entries):
    """Every lock, set by the restored process (after all its fds are in place)."""
    for e in entries:
        for lk in e.get("locks") or ():
            if lk["type"] != "posix" and ("shares" in e or "shares_with" in e):
                continue    # the open file's own lock: set once, through its first fd
            n = e["fd"]
            what = "%s %s" % ("write" if lk["write"] else "read", WORDS[lk["type"]])
            if lk["type"] == "flock":
                got = remote.call(SYS_flock, n, (LOCK_EX if lk["write"] else LOCK_SH) | LOCK_NB,
                                  what="flock of fd %d" % n, ok_errors=(11,))
            else:
                remote.reset()
                arg = remote.put(struct.pack("<hh4xqqi4x", F_WRLCK if lk["write"] else F_RDLCK, 0, lk["start"],
                                             lk["len"], 0))
                cmd, name = (F_SETLK, "F_SETLK") if lk["type"] == "posix" else (F_OFD_SETLK, "F_OFD_SETLK")
                got = remote.call(sysno.fcntl, n, cmd, arg, what="fcntl(%s) of fd %d" % (name, n), ok_errors=(11, 13))
            if got < 0:
                raise RestoreError("fd %d (%s): its %s (bytes %d-%s) was taken by another process since the dump"
                                   % (n, e.get("path"), what, lk["start"],
                                      lk["start"] + lk["len"] - 1 if lk["len"] else "EOF"))
