"""What every kind of fd shares.

Dump side: an `OpenFd` is one fd of the target as ckpt sees it (its /proc link, stat, fdinfo,
and on demand a duplicate of it in ckpt itself, taken with pidfd_getfd: the same open file, so
getsockopt, peeks and ioctls on it act on the target's object). A `FreezeContext` holds those
duplicates for one dump and the actions to run when the dump ends: after success (the target
killed or resumed) or after failure (everything a kind changed on the target's objects put back).

Restore side: a `Table` holds the objects created so far in the restored process, parked above
every fd number the image uses. An object can be made in the restored process by injected
syscalls, or made in ckpt itself with the full Python API and handed over (`Table.adopt`:
the restored process takes it with pidfd_getfd from ckpt).

A kind is one class (see FdKind) in one module of this package, listed once in KINDS
(ckpt/files/__init__.py).
"""
import os
import socket

from ckpt.errors import RestoreError, TargetError
from ckpt.kernel import procfs, sysno
from ckpt.kernel.native import lib

O_ACCMODE = 3
O_WRONLY, O_RDWR = 1, 2
O_CREAT, O_EXCL, O_NOCTTY, O_TRUNC = 0o100, 0o200, 0o400, 0o1000
O_CLOEXEC = 0o2000000
O_DIRECTORY = 0o200000
O_NONBLOCK = 0o4000
F_DUPFD, F_SETFD, F_SETFL = 0, 2, 4
AT_FDCWD = -100


class FdKind:
    """One kind of fd: how to recognise it, its dump half and its restore half.

    match(f)                    -> bool: f (an OpenFd) is of this kind
    describe(f)                 -> dict: what does not change unless the process asks (may run
                                   while the target runs; repeated in the freeze for fds that are new)
    refuse(f, entry)            -> None, or why this fd cannot be dumped (checked up front)
    capture(f, entry, ctx)      fills in what changes by itself (queues, counters, sequence
                                   numbers); runs in the frozen phase, may register undo actions
    precheck(entry)             at restore, before anything is created: raise RestoreError naming
                                   what is in the way (a port or path taken, a file gone)
    prepare(entry, paths, options) at restore, before anything is created: open and check the
                                   paths the entry names (paths: ckpt/restore/paths.PathOpener,
                                   which opens with the process's rights); create() takes them
    create(remote, entry, table)-> the fd number of the new object in the restored process
    finish(remote, entry, table) after every fd is in place (epoll sets, sockets going live)
    restored(metas, ok)         once, after the whole restore succeeded (ok) or failed
    """
    name = "?"
    restorable = False
    inherit_stdio = False   # as fd 0-2, may be replaced by ckpt's own stream
    finish_order = 0        # finish() runs by increasing order

    @staticmethod
    def match(f):
        return False

    @classmethod
    def describe(cls, f):
        return {"path": f.link}

    @classmethod
    def refuse(cls, f, entry):
        if not cls.restorable:
            return "this kind of fd is not supported yet"
        return None

    @classmethod
    def capture(cls, f, entry, ctx):
        pass

    @classmethod
    def precheck(cls, entry):
        pass

    @classmethod
    def prepare(cls, entry, paths, options):
        pass

    @classmethod
    def create(cls, remote, entry, table):
        raise RestoreError("fd %d: kind %s cannot be restored" % (entry["fd"], entry["kind"]))

    @classmethod
    def finish(cls, remote, entry, table):
        pass

    @classmethod
    def rollback(cls, remote, entry, table):
        """`ckpt restore --into`: the process kept this fd's object (the same one as the
        image's); put back what the object holds that may have changed since (an epoll set's
        items). Flags and offset are set already."""
        pass

    @classmethod
    def restored(cls, metas, ok):
        pass


class FdStat:
    """What fstat says of an fd (the fields ckpt uses)."""
    __slots__ = ("st_mode", "st_dev", "st_ino", "st_rdev", "st_size", "st_mtime_ns")

    def __init__(self, mode, dev, ino, rdev, size, mtime_ns):
        self.st_mode, self.st_dev, self.st_ino = mode, dev, ino
        self.st_rdev, self.st_size, self.st_mtime_ns = rdev, size, mtime_ns


class OpenFd:
    """One fd of the target, as the dump sees it: its /proc link, fstat (None if the kernel
    would not tell), status flags (with O_CLOEXEC) and position; its fdinfo on demand."""

    def __init__(self, ctx, fd, link, st, flags, pos):
        self.ctx = ctx
        self.pid = ctx.pid
        self.fd = fd
        self.link = link
        self.st = st
        self.flags = flags
        self.pos = pos
        self.has_lock = True    # whether fdinfo lists a lock on its file (ck_fd_scan tells)
        self._info = None

    @property
    def info(self):
        """/proc/PID/fdinfo/FD as a dict (read when first asked)."""
        if self._info is None:
            self._info = procfs.fdinfo(self.pid, self.fd)
        return self._info

    @property
    def inode(self):
        return self.st.st_ino if self.st is not None else None

    def dup(self):
        """This fd duplicated into ckpt (owned by the context: do not close it)."""
        return self.ctx.grab(self.fd)

    def sock(self):
        """The socket behind this fd, as a Python socket in ckpt (owned by the context)."""
        return self.ctx.sock(self.fd)

    def error(self, what):
        return TargetError("process %d: fd %d (%s): %s" % (self.pid, self.fd, self.link, what))


class FreezeContext:
    """Per dump: duplicates of the target's fds, and what to do when the dump ends."""

    def __init__(self, pid, leave_running=False, tree=None):
        self.pid = pid
        self.leave_running = leave_running
        # the PIDs of the processes dumped together (a tree, parents first; this one alone
        # with --single): an fd whose other end one of them holds is not leading out
        self.tree = tree if tree is not None else [pid]
        self.meta = {}          # image records kinds add: name -> JSON value
        self.memo = {}          # per-dump scratch for kinds that work on groups of fds
        self._pidfd = None
        self._dups = {}
        self._socks = {}
        self._resume = []       # before the target runs again
        self._undo = []         # on failure
        self.closed = False

    def grab(self, fd):
        if fd not in self._dups:
            if self._pidfd is None:
                r = lib.ck_pidfd_open(self.pid)
                if r < 0:
                    raise TargetError("process %d: pidfd_open: %s" % (self.pid, os.strerror(-r)))
                self._pidfd = r
            r = lib.ck_pidfd_getfd(self._pidfd, fd)
            if r < 0:
                raise TargetError("process %d: fd %d cannot be taken (pidfd_getfd): %s"
                                  % (self.pid, fd, os.strerror(-r)))
            self._dups[fd] = r
        return self._dups[fd]

    def sock(self, fd):
        if fd not in self._socks:
            self._socks[fd] = socket.socket(fileno=os.dup(self.grab(fd)))
        return self._socks[fd]

    def on_resume(self, fn):
        """fn() puts back what a kind changed on the target's objects in the freeze (e.g. TCP
        repair mode); it runs before the target's threads run again, whether the dump left it
        running or failed. Not run when the target is killed."""
        self._resume.append(fn)

    def on_failure(self, fn):
        """fn() undoes what a kind set up outside the target (e.g. a network lock), if the dump
        fails."""
        self._undo.append(fn)

    def resuming(self):
        """The target is about to run again: put back its objects (last registered first)."""
        todo, self._resume = self._resume, []
        _run_all(reversed(todo))

    def failed(self):
        """The dump failed: put back the target's objects and undo what was set up outside."""
        try:
            self.resuming()
        finally:
            todo, self._undo = self._undo, []
            try:
                _run_all(reversed(todo))
            finally:
                self.close()

    def close(self):
        if self.closed:
            return
        self.closed = True
        for s in self._socks.values():
            s.close()
        for fd in self._dups.values():
            os.close(fd)
        if self._pidfd is not None:
            os.close(self._pidfd)
        self._socks, self._dups, self._pidfd = {}, {}, None


def _run_all(fns):
    """Call every fn; raise the first failure once all have run."""
    errors = []
    for fn in fns:
        try:
            fn()
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


class TreeObjects:
    """What the fd tables of a restored tree share: objects several of its processes hold (the
    two ends of a pipe between a parent and its child, a socket pair), made in the first
    process that needs them; ckpt keeps its own duplicate of each fd so that the processes
    restored later take the very same object. Also how ckpt reaches the fds of processes
    already restored (their pidfds). One per restore; closed at its end."""

    def __init__(self, several=False, tables=None):
        self.several = several  # more than one process: objects are kept for the others
        self.tables = tables or {}      # pid -> its image fd table, every process of the tree
        self.objects = {}       # key -> tuple of ckpt-local fds
        self.pidfds = {}

    def take_from(self, pid, fd):
        """A ckpt-local duplicate of fd `fd` of restored process pid (the caller closes it)."""
        if pid not in self.pidfds:
            r = lib.ck_pidfd_open(pid)
            if r < 0:
                raise RestoreError("process %d: pidfd_open: %s" % (pid, os.strerror(-r)))
            self.pidfds[pid] = r
        from ckpt.restore.creds import CAP_SYS_PTRACE, raised
        with raised(CAP_SYS_PTRACE):    # ckpt acts as the process meanwhile (restore_fds)
            r = lib.ck_pidfd_getfd(self.pidfds[pid], fd)
        if r < 0:
            raise RestoreError("process %d: its fd %d cannot be taken (pidfd_getfd): %s" % (pid, fd, os.strerror(-r)))
        return r

    def close(self):
        for fds in self.objects.values():
            for fd in fds:
                os.close(fd)
        for fd in self.pidfds.values():
            os.close(fd)
        self.objects, self.pidfds = {}, {}


class Table:
    """Objects created so far in the restored process, parked above every target number."""

    def __init__(self, remote, base, options=None, tree=None):
        self.remote = remote
        self.tree = tree if tree is not None else TreeObjects()   # shared with the tree's other processes
        self.options = options      # the RestoreOptions (e.g. tcp_close)
        self.base = base
        self.objects = {}       # kinds' shared objects (a pipe's two ends, a socket pair ...)
        self.entries = []       # every entry of the image's fd table (for kinds that make groups)
        self.parked = []
        self.placed = {}        # target fd number -> parked fd of its object, once created
        self.paths = None       # the plan's PathOpener: files opened and checked up front

    def park(self, fd):
        high = self.remote.call(sysno.fcntl, fd, F_DUPFD, self.base, what="fcntl(F_DUPFD)")
        self.remote.call(sysno.close, fd)
        self.parked.append(high)
        return high

    def adopt(self, local_fd, what="an fd"):
        """Hand an object made or opened in ckpt (local_fd, closed here) to the restored
        process: it takes it with pidfd_getfd. Returns its (parked) fd number there."""
        try:
            fd = self.remote.take(local_fd, what)
            r = self.remote
            if r.ckpt_pidfd < self.base and r.ckpt_pidfd not in self.parked:
                r.ckpt_pidfd = self.park(r.ckpt_pidfd)   # out of the way of the image's fd numbers
        finally:
            os.close(local_fd)
        return self.park(fd) if fd < self.base else fd

    def take_path(self, entry, what=None):
        """The file, directory or device the plan opened and checked for this entry (see
        ckpt/restore/paths.py), handed to the restored process."""
        return self.adopt(self.paths.take(("fd", entry["fd"])), what or "fd %d (%s)" % (entry["fd"], entry.get("path")))

    def shared(self, key):
        """The object another process of the tree made under `key` (see share), taken by this
        one: a tuple of its (parked) fds here; None when none was made yet."""
        local = self.tree.objects.get(key)
        if local is None:
            return None
        return tuple(self.adopt(os.dup(fd), "%s from another process of the tree" % (key,)) for fd in local)

    def share(self, key, fds):
        """Offer the object just made in this process (its fds here) to the processes of the
        tree restored after it (see shared)."""
        if self.tree.several and key not in self.tree.objects:
            self.tree.objects[key] = tuple(self.tree.take_from(self.remote.pid, fd) for fd in fds)
        return fds
