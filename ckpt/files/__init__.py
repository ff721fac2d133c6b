"""The fd table: one module per kind of fd, each with its dump half and its restore half
(see base.FdKind). Adding a kind means one module and one line in KINDS.

Dump: `check` describes every fd before the dump starts and refuses, naming the fd and its
kind, what restore could not rebuild; `capture` runs in the frozen phase, reuses those
descriptions for fds that did not change, and reads what changes by itself (queued bytes,
counters, sequence numbers).

Restore creates every object at a high fd number first, then dup2()s each onto its number and
sets its flags and position, so objects never clobber each other's numbers; then each kind
finishes what needs every fd in place (epoll sets, sockets going live).

Standard streams (0, 1, 2) that were a terminal, a pipe or a socket leading out of the process
are attached to ckpt's own, the way `criu --shell-job` treats a shell job.
"""
import ctypes
import functools
import os
import struct

from ckpt.errors import RestoreError, TargetError, TargetGone
from ckpt.files.base import (AT_FDCWD, FdStat, F_SETFD, F_SETFL, O_ACCMODE, O_CLOEXEC, FdKind, FreezeContext,  # noqa: F401
                             OpenFd, Table, _run_all)
from ckpt.files.pipe import Pipe
from ckpt.files.unix import UnixSocket
from ckpt.files import inet, tcp
from ckpt.files import epoll, eventfd, signalfd, timerfd
from ckpt.files.regular import CharDevice, Directory, RegularFile
from ckpt.files.unsupported import AnonInode, Memfd, OtherSocket
from ckpt.kernel import procfs, sysno
from ckpt.kernel.native import ffi, lib

# first match wins: specific kinds before the catch-alls
KINDS = [
    Pipe,
    Memfd,
    UnixSocket,
    inet.InetSocket, tcp.TcpConnection,
    OtherSocket,
    eventfd.EventFd, timerfd.TimerFd, signalfd.SignalFd, epoll.Epoll,
    AnonInode,
    RegularFile,
    Directory,
    CharDevice,
]
BY_NAME = {k.name: k for k in KINDS}


def kind_of(f):
    for k in KINDS:
        if k.match(f):
            return k
    return FdKind


def _stdio_inherited(fd, kind, entry):
    return fd <= 2 and (kind.inherit_stdio or entry.get("tty"))


SYS_kcmp, KCMP_FILE = 312, 0
_libc = ctypes.CDLL(None, use_errno=True)


def _file_order(pid, fd1, fd2):
    """kcmp(KCMP_FILE) of two fds of pid: 0 when they are one open file description (dup, fork,
    SCM_RIGHTS), else -1 or 1 by a fixed order of the kernel's files. None when the kernel
    cannot tell (no kcmp)."""
    r = _libc.syscall(SYS_kcmp, pid, pid, KCMP_FILE, fd1, fd2)
    return None if r < 0 else (0, -1, 1)[r]


def _mark_shared(pid, table, keys):
    """entry["shares"] = the lowest fd whose open file description the entry's fd is too.
    Restore then makes it a duplicate of that fd instead of making the object again, so that
    they keep sharing offset and status flags (e.g. stdout and stderr of `cmd >log 2>&1`).
    Fds of one inode (all anonymous-inode fds share one) are sorted by kcmp's order, so that
    one open file's fds end up side by side: n log n kcmp calls, not n squared."""
    groups = {}
    for e in table:
        key = keys.get(e["fd"])
        if key is not None and not e.get("inherit"):
            groups.setdefault(key, []).append(e)
    for group in groups.values():
        if len(group) < 2 or _file_order(pid, group[0]["fd"], group[1]["fd"]) is None:
            continue
        group.sort(key=functools.cmp_to_key(lambda a, b: _file_order(pid, a["fd"], b["fd"]) or 0))
        # the lowest fd of each run of one open file is the one the others share
        run = [group[0]]
        for e in group[1:] + [None]:
            if e is not None and _file_order(pid, run[-1]["fd"], e["fd"]) == 0:
                run.append(e)
                continue
            low = min(x["fd"] for x in run)
            for x in run:
                if x["fd"] != low:
                    x["shares"] = low
            run = [e]


def _open_fds(pid, ctx):
    """OpenFd for every fd of pid (fds closed meanwhile skipped): one native call reads the
    link, fstat, flags and position of all of them."""
    numbers = procfs.fds(pid)
    if not numbers:
        return []
    out = ffi.new("struct ck_fdstat[]", len(numbers))
    n = lib.ck_fd_scan(pid, ffi.new("int32_t[]", numbers), len(numbers), out)
    if n < 0:
        raise TargetGone("process %d: its fd table cannot be read (%s)" % (pid, os.strerror(-n)))
    opened = []
    for o in out:
        if o.err:
            continue    # closed meanwhile
        if o.link_len >= ffi.sizeof(o.link) - 1:
            try:
                link = os.readlink(procfs.proc(pid, "fd", str(o.fd)))
            except OSError:
                continue
        else:
            link = os.fsdecode(ffi.string(o.link))
        st = FdStat(o.mode, o.dev, o.ino, o.rdev, o.size, o.mtime_ns) if o.has_stat else None
        opened.append(OpenFd(ctx, o.fd, link, st, o.flags, o.pos))
    return opened


def _key(f):
    return (f.fd, f.link, (f.st.st_dev, f.st.st_ino) if f.st is not None else None)


def _entry(f, described):
    kind = kind_of(f)
    cached = described.get(_key(f)) if described else None
    if cached is not None and cached["kind"] == kind.name:
        entry = dict(cached)
    else:
        entry = {"fd": f.fd, "kind": kind.name}
        entry.update(kind.describe(f))
    entry["flags"] = f.flags
    entry["pos"] = f.pos
    entry["inherit"] = bool(_stdio_inherited(f.fd, kind, entry))
    if not entry["inherit"]:
        why = kind.refuse(f, entry)
        if why:
            raise TargetError("process %d: fd %d is a %s (%s): %s" % (f.pid, f.fd, kind.name, f.link, why))
    return kind, entry


def check(pid):
    """Before the dump, while the target runs: describe every fd, refusing (TargetError, naming
    the fd and its kind) what restore could not rebuild. Returns the descriptions, for
    `capture` to reuse."""
    ctx = FreezeContext(pid)
    try:
        return {_key(f): _entry(f, None)[1] for f in _open_fds(pid, ctx)}
    finally:
        ctx.close()


def capture(pid, ctx, described=None):
    """In the frozen phase: the fd table, with what changes by itself read now."""
    table, keys, opened = [], {}, []
    for f in _open_fds(pid, ctx):
        kind, entry = _entry(f, described)
        if f.st is not None:
            keys[f.fd] = (f.st.st_dev, f.st.st_ino)
        table.append(entry)
        opened.append((kind, f, entry))
    _mark_shared(pid, table, keys)
    for kind, f, entry in opened:
        if not entry["inherit"] and "shares" not in entry:
            kind.capture(f, entry, ctx)
    return table


# what a kind's restore step raises on an image entry with a missing or mistyped field
_DATA_ERRORS = (LookupError, TypeError, ValueError, AttributeError, OverflowError, struct.error)


def _kind_call(e, fn, *args):
    """fn(*args), a kind's restore step on entry e: malformed image data becomes one
    RestoreError naming the fd and its kind instead of a traceback."""
    try:
        return fn(*args)
    except _DATA_ERRORS as x:
        raise RestoreError("fd %s (%s): malformed image entry (%s: %s)"
                           % (e.get("fd"), e.get("kind"), type(x).__name__, str(x)[:200])) from None


def restore_fds(remote, table_entries, options=None, paths=None):
    """Rebuild the fd table of the restored process (a copy of ckpt: it holds ckpt's fds).
    paths: the plan's PathOpener, holding every file the entries name, opened and checked."""
    remote.call(sysno.close_range, 3, 0xFFFFFFFF, 0, what="close_range")
    remote.forget_fds()
    shell_job = bool(options and options.shell_job)
    keep = {e["fd"] for e in table_entries if e.get("inherit") and shell_job}
    for std in (0, 1, 2):
        if std not in keep:
            remote.call(sysno.close, std, ok_errors=(9,))
    base = max([e["fd"] for e in table_entries] + [2]) + 1
    table = Table(remote, base, options)
    table.entries = table_entries
    table.paths = paths
    placed = []
    for e in table_entries:
        if e["fd"] in keep:
            continue
        if e.get("shares") in table.placed:
            placed.append((e, table.placed[e["shares"]]))    # one open file: dup2 of the same object
            continue
        if e.get("inherit"):
            fd = table.take_path(e)     # a standard stream leading out: see _prepare_outside
        else:
            fd = _kind_call(e, BY_NAME.get(e["kind"], FdKind).create, remote, e, table)
        if fd < base:
            fd = table.park(fd)
        table.placed[e["fd"]] = fd
        placed.append((e, fd))
    for e, fd in placed:
        n = e["fd"]
        remote.call(sysno.dup2, fd, n, what="dup2 onto fd %d" % n)
        remote.call(sysno.fcntl, n, F_SETFL, e["flags"] & ~(O_ACCMODE | O_CLOEXEC), what="fcntl(F_SETFL) of fd %d" % n)
        remote.call(sysno.fcntl, n, F_SETFD, 1 if e["flags"] & O_CLOEXEC else 0, what="fcntl(F_SETFD) of fd %d" % n)
        if e["kind"] == "file" and e["pos"] and not e.get("inherit"):
            remote.call(sysno.lseek, n, e["pos"], 0, what="lseek of fd %d" % n)
    for fd in set(table.parked):
        remote.call(sysno.close, fd, ok_errors=(9,))
    remote.forget_fds()
    finishing = sorted((BY_NAME.get(e["kind"], FdKind).finish_order, i, e) for i, (e, _) in enumerate(placed)
                       if "shares" not in e and not e.get("inherit"))
    for _, _, e in finishing:
        _kind_call(e, BY_NAME[e["kind"]].finish, remote, e, table)


DEV_NULL = {"path": "/dev/null", "rdev": os.makedev(1, 3)}


def _prepare_outside(e, paths, options):
    """A standard stream that led out of the process (a terminal, or a pipe or socket whose
    other end is elsewhere). With --shell-job it becomes ckpt's own stream, as in CRIU. Without:
    a terminal is reopened by its path, as the process, if it is still the same device (else
    refused: ckpt never hands its own terminal over unasked); a pipe or socket, whose other
    end is gone with the dump, becomes /dev/null, with a warning."""
    if options is not None and options.shell_job:
        return
    n = e["fd"]
    if e.get("tty"):
        try:
            paths.open(("fd", n), e["path"], e["flags"], {"rdev": e["rdev"]}, "fd %d: terminal" % n, kind="chardev")
        except RestoreError as err:
            raise RestoreError("%s; restore with --shell-job to give the process ckpt's own terminal instead"
                               % err) from None
        return
    paths.open(("fd", n), DEV_NULL["path"], e["flags"], DEV_NULL, "fd %d: /dev/null" % n, kind="chardev")
    if options is not None:
        options.warn("fd %d (%s, leading out of the process) comes back on /dev/null; "
                     "--shell-job gives the process ckpt's own streams" % (n, e["kind"]))


def precheck(table_entries, paths=None, options=None):
    """At restore, before anything is created: each kind checks that its objects can be made,
    and opens (as the process) and checks the paths they name."""
    for e in table_entries:
        if "shares" in e:
            continue
        if e.get("inherit"):
            if paths is not None:
                _prepare_outside(e, paths, options)
            continue
        kind = BY_NAME.get(e["kind"], FdKind)
        _kind_call(e, kind.precheck, e)
        if paths is not None:
            _kind_call(e, kind.prepare, e, paths, options)


def restored(metas, ok):
    """After the whole restore: each kind's last step (e.g. lifting the network lock)."""
    _run_all([lambda k=k: k.restored(metas, ok) for k in KINDS])


def refuse_untrackable(pid, maps):
    """Kernel I/O that writes memory behind the tracker's back, and state that restore cannot
    rebuild faithfully: refuse clearly and up front (DESIGN section 3)."""
    for v in maps:
        if v.path.startswith(("/[aio]", "[aio]")) or "io_uring" in v.path:
            raise TargetError("process %d has asynchronous I/O mapped at %#x (%s): in-flight DMA cannot be "
                              "tracked; not supported yet" % (pid, v.start, v.path))
    for fd in procfs.fds(pid):
        try:
            link = os.readlink(procfs.proc(pid, "fd", str(fd)))
        except OSError:
            continue
        if link == "anon_inode:[io_uring]":
            raise TargetError("process %d has an io_uring (fd %d): its fixed buffers and in-flight I/O bypass "
                              "write tracking; not supported yet" % (pid, fd))
    st = procfs.status(pid)
    if st.get("Seccomp", "0") != "0":
        raise TargetError("process %d runs under a seccomp filter, which restore cannot rebuild; not supported yet"
                          % pid)
