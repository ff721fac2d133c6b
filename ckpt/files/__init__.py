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
from ckpt.files.inotify import Inotify
from ckpt.files.deleted import DeletedFile
from ckpt.files.regular import CharDevice, Directory, RegularFile
from ckpt.files.memfd import Memfd
from ckpt.files import owner as fd_owner
from ckpt.files import locks as fd_locks
from ckpt.files.unsupported import AnonInode, OtherSocket
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
    Inotify,
    AnonInode,
    DeletedFile,
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


def _stdio_inherited(f, kind, entry):
    """A standard stream leading out of the process (attached to ckpt's own, or /dev/null, at
    restore). Not a pipe both of whose ends the dumped tree holds (a shell pipeline `a | b`
    dumped with its shell): that one is restored as the pipe it is."""
    if f.fd > 2 or not (kind.inherit_stdio or entry.get("tty")) or entry.get("fifo_path"):
        return False    # (a FIFO with a path is opened again by it: ckpt/files/pipe.py)
    return not (kind is Pipe and len(f.ctx.tree) > 1 and _tree_pipe_ends(f.ctx).get(f.link) == {"r", "w"})


def _tree_pipe_ends(ctx):
    """{pipe link: the ends ("r", "w") the processes of the dumped tree hold}, once per context:
    an fd's /proc link is its pipe, and the link's own mode says which end (read or write)."""
    ends = ctx.memo.get("tree_pipes")
    if ends is None:
        ends = ctx.memo["tree_pipes"] = {}
        for pid in ctx.tree:
            try:
                numbers = procfs.fds(pid)
            except TargetGone:
                continue
            for fd in numbers:
                path = procfs.proc(pid, "fd", str(fd))
                try:
                    link = os.readlink(path)
                    if link.startswith("pipe:"):
                        mode = os.lstat(path).st_mode
                        ends.setdefault(link, set()).update(("r",) * bool(mode & 0o400) + ("w",) * bool(mode & 0o200))
                except OSError:
                    continue
    return ends


SYS_kcmp, KCMP_FILE = 312, 0
_libc = ctypes.CDLL(None, use_errno=True)


def _file_order(a, b):
    """kcmp(KCMP_FILE) of two fds, each (pid, fd): 0 when they are one open file description
    (dup, fork, SCM_RIGHTS), else -1 or 1 by a fixed order of the kernel's files. None when
    the kernel cannot tell (no kcmp)."""
    r = _libc.syscall(SYS_kcmp, a[0], b[0], KCMP_FILE, a[1], b[1])
    return None if r < 0 else (0, -1, 1)[r]


KCMP_FILES = 2


def same_fd_table(pid1, pid2):
    """Whether two processes share one fd table (clone with CLONE_FILES), by kcmp(KCMP_FILES)."""
    return _libc.syscall(SYS_kcmp, pid1, pid2, KCMP_FILES, 0, 0) == 0


def _mark_shared(groups, rank):
    """Fds that are one open file description (of one process, or inherited across fork by
    several processes of a tree) are restored as one object, so that they keep sharing offset
    and status flags (stdout and stderr of `cmd >log 2>&1`; a listening socket a server's
    workers inherited). The first of them in restore order (rank: pid -> position; then the
    lowest fd) is made; the others get entry["shares"] = its fd (same process) or
    entry["shares_with"] = {"pid", "fd"} (another process, restored before). groups: inode ->
    [(pid, entry)]. Each group is sorted by kcmp's order, so that one open file's fds end up
    side by side: n log n kcmp calls, not n squared."""
    for group in groups.values():
        if len(group) < 2:
            continue
        ident = [(pid, e["fd"]) for pid, e in group]
        if _file_order(ident[0], ident[1]) is None:
            continue
        group.sort(key=functools.cmp_to_key(lambda a, b: _file_order((a[0], a[1]["fd"]), (b[0], b[1]["fd"])) or 0))
        run = [group[0]]
        for item in group[1:] + [None]:
            if item is not None and _file_order((run[-1][0], run[-1][1]["fd"]), (item[0], item[1]["fd"])) == 0:
                run.append(item)
                continue
            owner_pid, owner = min(run, key=lambda x: (rank[x[0]], x[1]["fd"]))
            for pid, e in run:
                if e is owner:
                    continue
                if pid == owner_pid:
                    e["shares"] = owner["fd"]
                else:
                    e["shares_with"] = {"pid": owner_pid, "fd": owner["fd"]}
            run = [item]


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
        f = OpenFd(ctx, o.fd, link, st, o.flags, o.pos)
        f.has_lock = bool(o.has_lock)
        opened.append(f)
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
    entry["inherit"] = bool(_stdio_inherited(f, kind, entry))
    if not entry["inherit"]:
        why = kind.refuse(f, entry) or fd_owner.capture(f, entry) or fd_locks.capture(f, entry)
        if why:
            raise TargetError("process %d: fd %d is a %s (%s): %s" % (f.pid, f.fd, kind.name, f.link, why))
    return kind, entry


def check(pid, tree=None):
    """Before the dump, while the target runs: describe every fd, refusing (TargetError, naming
    the fd and its kind) what restore could not rebuild. Returns the descriptions, for
    `capture` to reuse. tree: the PIDs of the dumped tree (FreezeContext.tree)."""
    ctx = FreezeContext(pid, tree=tree)
    try:
        return {_key(f): _entry(f, None)[1] for f in _open_fds(pid, ctx)}
    finally:
        ctx.close()


def capture(pid, ctx, described=None):
    """In the frozen phase: the fd table, with what changes by itself read now."""
    return capture_tree([(pid, ctx, described)])[pid]


def capture_tree(procs):
    """capture for every process of a frozen tree at once, procs: [(pid, ctx, described)] in
    restore order (parents first): fds shared across processes are found too. Returns
    {pid: fd table}."""
    tables, groups, opened = {}, {}, []
    rank = {pid: i for i, (pid, _, _) in enumerate(procs)}
    for pid, ctx, described in procs:
        table = tables[pid] = []
        for f in _open_fds(pid, ctx):
            kind, entry = _entry(f, described)
            if f.st is not None and not entry["inherit"]:
                groups.setdefault((f.st.st_dev, f.st.st_ino), []).append((pid, entry))
            table.append(entry)
            opened.append((kind, f, entry))
    _mark_shared(groups, rank)
    for kind, f, entry in opened:
        if not entry["inherit"] and "shares" not in entry and "shares_with" not in entry:
            kind.capture(f, entry, f.ctx)
    return tables


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


def restore_fds(remote, table_entries, options=None, paths=None, tree=None):
    """Rebuild the fd table of the restored process (a copy of ckpt: it holds ckpt's fds).
    paths: the plan's PathOpener, holding every file the entries name, opened and checked.
    tree: the TreeObjects shared with the other processes of a restored tree (None: one
    process)."""
    remote.call(sysno.close_range, 3, 0xFFFFFFFF, 0, what="close_range")
    remote.forget_fds()
    shell_job = bool(options and options.shell_job)
    keep = {e["fd"] for e in table_entries if e.get("inherit") and shell_job}
    for std in (0, 1, 2):
        if std not in keep:
            remote.call(sysno.close, std, ok_errors=(9,))
    _place(remote, table_entries, keep, options, paths, tree)


def rollback_fds(remote, table_entries, live, options=None, paths=None, tree=None):
    """The fd table of a running process put back as the image has it (`ckpt restore --into`):
    an fd of the image whose open file the process still holds under its number (the same
    object: same inode, or device) is kept, with the image's flags and offset; the others are
    made again; every fd opened since is closed. live: {fd: os.stat_result} of the process's
    fds now. Returns (kept, made, closed) fd numbers."""
    kept = {e["fd"] for e in table_entries if e["fd"] in live and same_object(e, live[e["fd"]])}
    closed = sorted(fd for fd in live if fd not in kept)
    remote.many([(sysno.close, (fd,)) for fd in closed], what="closing an fd opened since", ok_errors=(9,))
    table = _place(remote, table_entries, kept, options, paths, tree)
    calls = []
    for e in table_entries:
        if e["fd"] in kept and "shares" not in e:
            calls += _fd_state_calls(e["fd"], e)
    remote.many(calls, what=lambda nr, a: "setting the flags or offset of fd %d" % a[0])
    for e in table_entries:
        if e["fd"] in kept and "shares" not in e:
            fd_owner.restore(remote, e["fd"], e, table.tree)
    for e in table_entries:
        if e["fd"] in kept:
            _kind_call(e, BY_NAME.get(e["kind"], FdKind).rollback, remote, e, table)
    return sorted(kept), sorted(e["fd"] for e in table_entries if e["fd"] not in kept), closed


def same_object(entry, st):
    """Whether a live fd (its os.stat result) is the open file's object of an image entry:
    the same inode (on the same device where the entry names one), or for a device without
    an inode in the record, the same device number."""
    if isinstance(entry.get("inode"), int) and entry["inode"]:
        dev = entry.get("dev")
        return st.st_ino == entry["inode"] and (not isinstance(dev, int) or dev == st.st_dev)
    if entry.get("kind") == "chardev" and isinstance(entry.get("rdev"), int):
        return st.st_rdev == entry["rdev"]
    return False


def _place(remote, table_entries, keep, options, paths, tree):
    """Every entry not in keep made at a high number, then dup2()'ed onto its own, flags,
    owner and offset set; locks; then the kinds finish (epoll sets, sockets going live)."""
    base = max([e["fd"] for e in table_entries] + [2]) + 1
    table = Table(remote, base, options, tree)
    table.entries = table_entries
    table.paths = paths
    for n in keep:
        table.placed[n] = n
    placed = []
    for e in table_entries:
        if e["fd"] in keep:
            continue
        if e.get("shares") in table.placed:
            placed.append((e, table.placed[e["shares"]]))    # one open file: dup2 of the same object
            continue
        if e.get("shares_with"):
            # one open file with an fd of a process restored before (inherited across fork)
            owner = e["shares_with"]
            fd = table.adopt(table.tree.take_from(owner["pid"], owner["fd"]),
                             "fd %d of process %d" % (owner["fd"], owner["pid"]))
        elif e.get("inherit"):
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
        _set_fd_state(remote, n, e, table)
    for fd in set(table.parked):
        remote.call(sysno.close, fd, ok_errors=(9,))
    remote.forget_fds()
    fd_locks.restore(remote, [e for e, _ in placed])    # last: closing a parked fd drops POSIX locks
    finishing = sorted((BY_NAME.get(e["kind"], FdKind).finish_order, i, e) for i, (e, _) in enumerate(placed)
                       if "shares" not in e and "shares_with" not in e and not e.get("inherit"))
    for _, _, e in finishing:
        _kind_call(e, BY_NAME[e["kind"]].finish, remote, e, table)
    return table


def _set_fd_state(remote, n, e, table):
    """Status flags, close-on-exec, owner and offset of fd n as the entry has them."""
    calls = _fd_state_calls(n, e)
    remote.many(calls[:2], what=lambda nr, a: "fcntl(%s) of fd %d" % ("F_SETFL" if a[1] == F_SETFL else "F_SETFD", n))
    fd_owner.restore(remote, n, e, table.tree)
    if calls[2:]:
        remote.many(calls[2:], what="lseek of fd %d" % n)


def _fd_state_calls(n, e):
    """The injected calls that give fd n the status flags, close-on-exec and offset of entry e."""
    calls = [(sysno.fcntl, (n, F_SETFL, e["flags"] & ~(O_ACCMODE | O_CLOEXEC))),
             (sysno.fcntl, (n, F_SETFD, 1 if e["flags"] & O_CLOEXEC else 0))]
    if e["kind"] in ("file", "memfd") and e["pos"] and not e.get("inherit"):
        calls.append((sysno.lseek, (n, e["pos"], 0)))
    return calls


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
    fd_locks.precheck(table_entries)
    for e in table_entries:
        if "shares" in e or "shares_with" in e:
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
