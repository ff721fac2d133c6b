"""The fd table. Each kind of fd is one class with its dump half and its restore half; adding a
kind means one class and one line in KINDS.

Restore creates every object at a high fd number first, then dup2()s each onto its number and
sets its flags and position, so objects never clobber each other's numbers.

Standard streams (0, 1, 2) that were a terminal, a pipe or a socket leading out of the process
are attached to ckpt's own, the way `criu --shell-job` treats a shell job.
"""
import base64
import ctypes
import errno
import fcntl
import os
import stat
import struct
import termios

from ckpt.errors import RestoreError, TargetError
from ckpt.kernel import procfs, sysno
from ckpt.kernel.native import ffi, lib

O_ACCMODE = 3
O_WRONLY, O_RDWR = 1, 2
O_CREAT, O_EXCL, O_NOCTTY, O_TRUNC = 0o100, 0o200, 0o400, 0o1000
O_CLOEXEC = 0o2000000
O_DIRECTORY = 0o200000
F_DUPFD, F_SETFD, F_SETFL = 0, 2, 4
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
O_NONBLOCK = 0o4000
AT_FDCWD = -100
PIPE_PEEK_MAX = 1 << 20
_OPEN_MASK = ~(O_CREAT | O_EXCL | O_NOCTTY | O_TRUNC | O_CLOEXEC)


class FdKind:
    name = "?"
    restorable = False
    inherit_stdio = False   # as fd 0-2, may be replaced by ckpt's own stream

    @staticmethod
    def match(link, st):
        return False

    @classmethod
    def dump(cls, pid, fd, link, st, info):
        return {"path": link}

    @classmethod
    def create(cls, remote, entry, table):
        """Create the object in the restored process; return a fd number there."""
        raise RestoreError("fd %d: kind %s cannot be restored" % (entry["fd"], entry["kind"]))


def _open(remote, path, flags):
    remote.reset()
    return remote.call(sysno.openat, AT_FDCWD, remote.put_str(path), flags & _OPEN_MASK, 0,
                       what="opening %s" % path)


class RegularFile(FdKind):
    name = "file"
    restorable = True

    @staticmethod
    def match(link, st):
        return st is not None and stat.S_ISREG(st.st_mode) and not link.startswith("/memfd:")

    @classmethod
    def dump(cls, pid, fd, link, st, info):
        if link.endswith(" (deleted)"):
            raise TargetError("process %d: fd %d refers to a deleted file (%s): not supported yet" % (pid, fd, link))
        return {"path": link, "dev": st.st_dev, "inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    @classmethod
    def create(cls, remote, entry, table):
        if not os.path.exists(entry["path"]):
            raise RestoreError("fd %d: file %s no longer exists" % (entry["fd"], entry["path"]))
        return _open(remote, entry["path"], entry["flags"])


class Directory(FdKind):
    name = "dir"
    restorable = True

    @staticmethod
    def match(link, st):
        return st is not None and stat.S_ISDIR(st.st_mode)

    @classmethod
    def create(cls, remote, entry, table):
        return _open(remote, entry["path"], entry["flags"] | O_DIRECTORY)


class CharDevice(FdKind):
    name = "chardev"
    restorable = True

    @staticmethod
    def match(link, st):
        return st is not None and stat.S_ISCHR(st.st_mode)

    @classmethod
    def dump(cls, pid, fd, link, st, info):
        return {"path": link, "rdev": st.st_rdev, "tty": os.major(st.st_rdev) in (4, 5, 136)}

    @classmethod
    def create(cls, remote, entry, table):
        if entry.get("tty"):
            # a terminal other than the standard streams: ckpt's terminal, if it has one
            for std in (0, 1, 2):
                if os.isatty(std):
                    return _open(remote, os.ttyname(std), entry["flags"] | O_NOCTTY)
            return _open(remote, "/dev/null", entry["flags"])
        return _open(remote, entry["path"], entry["flags"])


class Pipe(FdKind):
    """Anonymous pipes and FIFOs, with the bytes buffered in them at the freeze."""
    name = "pipe"
    restorable = True
    inherit_stdio = True

    @staticmethod
    def match(link, st):
        return link.startswith("pipe:") or (st is not None and stat.S_ISFIFO(st.st_mode))

    @classmethod
    def dump(cls, pid, fd, link, st, info):
        return {"path": link, "inode": st.st_ino if st else None, "fifo": not link.startswith("pipe:")}

    @staticmethod
    def peek(pid, fd):
        """The pipe's buffered bytes, without taking them out (tee into a private pipe), and
        its capacity (F_GETPIPE_SZ; None if unknown)."""
        try:
            src = os.open(procfs.proc(pid, "fd", str(fd)), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return b"", None
        try:
            try:
                size = fcntl.fcntl(src, F_GETPIPE_SZ)
            except OSError:
                size = None
            queued = struct.unpack("i", fcntl.ioctl(src, termios.FIONREAD, b"\0\0\0\0"))[0]
            cap = max(PIPE_PEEK_MAX, size or 0, queued)
            buf = ffi.new("uint8_t[]", cap)
            n = lib.ck_pipe_peek(src, buf, cap)
            if n < 0 or n < queued:
                # never a silently shortened pipe: its bytes are part of the process's state
                raise TargetError("process %d: fd %d: could copy only %s of the %d bytes buffered in its pipe%s"
                                  % (pid, fd, max(n, 0), queued, (" (%s)" % os.strerror(-n)) if n < 0 else ""))
            return (bytes(ffi.buffer(buf, n)) if n > 0 else b""), size
        finally:
            os.close(src)

    @classmethod
    def create(cls, remote, entry, table):
        key = ("pipe", entry["inode"])
        if key not in table.objects:
            remote.reset()
            fds_addr = remote.alloc(8)
            # non-blocking while it is refilled, so that a refill that does not fit fails
            # instead of blocking the restore forever; restore_fds sets each fd's own flags
            remote.call(sysno.pipe2, fds_addr, O_NONBLOCK, what="pipe2")
            r, w = struct.unpack("<ii", remote.read(fds_addr, 8))
            data = base64.b64decode(entry.get("data") or b"")
            size = entry.get("pipe_size")
            if size or len(data) > (16 << 12):
                # the capacity it had (F_SETPIPE_SZ), at least enough for what it held
                remote.call(sysno.fcntl, w, F_SETPIPE_SZ, max(size or 0, len(data)),
                            what="fcntl(F_SETPIPE_SZ, %d) of pipe %s" % (max(size or 0, len(data)), entry["path"]))
            if data:
                remote.reset()
                addr, done = remote.put(data), 0
                while done < len(data):
                    n = remote.call(sysno.write, w, addr + done, len(data) - done, what="refilling a pipe",
                                    ok_errors=(errno.EAGAIN,))
                    if n <= 0:
                        raise RestoreError("pipe %s: only %d of %d buffered bytes could be put back"
                                           % (entry["path"], done, len(data)))
                    done += n
            table.objects[key] = (table.park(r), table.park(w))
        r, w = table.objects[key]
        return w if entry["flags"] & O_ACCMODE == O_WRONLY else r


class Memfd(FdKind):
    name = "memfd"

    @staticmethod
    def match(link, st):
        return link.startswith("/memfd:")


class Socket(FdKind):
    name = "socket"
    inherit_stdio = True

    @staticmethod
    def match(link, st):
        return link.startswith("socket:")


class AnonInode(FdKind):
    """eventfd, epoll, timerfd, signalfd, inotify, io_uring, userfaultfd, pidfd, ..."""
    name = "anon_inode"

    @staticmethod
    def match(link, st):
        return link.startswith("anon_inode:")

    @classmethod
    def dump(cls, pid, fd, link, st, info):
        return {"path": link, "what": link[len("anon_inode:"):].strip("[]")}


KINDS = [Pipe, Memfd, Socket, AnonInode, RegularFile, Directory, CharDevice]
BY_NAME = {k.name: k for k in KINDS}


def kind_of(link, st):
    for k in KINDS:
        if k.match(link, st):
            return k
    return FdKind


def _stdio_inherited(fd, kind, entry):
    return fd <= 2 and (kind.inherit_stdio or entry.get("tty"))


SYS_kcmp, KCMP_FILE = 312, 0
_libc = ctypes.CDLL(None, use_errno=True)


def _same_open_file(pid, fd1, fd2):
    """Whether two fds of pid are one open file description (dup, fork, SCM_RIGHTS): kcmp.
    None when the kernel cannot tell (no kcmp)."""
    r = _libc.syscall(SYS_kcmp, pid, pid, KCMP_FILE, fd1, fd2)
    return None if r < 0 else r == 0


def _mark_shared(pid, table, keys):
    """entry["shares"] = the lowest fd whose open file description the entry's fd is too.
    Restore then makes it a duplicate of that fd instead of opening the file again, so that
    they keep sharing offset and status flags (e.g. stdout and stderr of `cmd >log 2>&1`)."""
    firsts = {}
    for e in table:
        key = keys.get(e["fd"])
        if key is None or e["kind"] not in ("file", "dir", "chardev"):
            continue
        for first in firsts.setdefault(key, []):
            if _same_open_file(pid, first, e["fd"]):
                e["shares"] = first
                break
        else:
            firsts[key].append(e["fd"])


def dump_fds(pid, peek=True):
    """The fd table; refuses (TargetError, naming fd and kind) what restore could not rebuild.
    With peek=False it only checks (used up front, before the dump starts)."""
    table = []
    keys = {}
    for fd in procfs.fds(pid):
        try:
            link = os.readlink(procfs.proc(pid, "fd", str(fd)))
            info = procfs.fdinfo(pid, fd)
        except (FileNotFoundError, TargetError):
            continue  # closed meanwhile
        try:
            st = os.stat(procfs.proc(pid, "fd", str(fd)))
        except OSError:
            st = None
        kind = kind_of(link, st)
        if st is not None:
            keys[fd] = (st.st_dev, st.st_ino)
        entry = {"fd": fd, "kind": kind.name, "flags": int(info.get("flags", "0"), 8),
                 "pos": int(info.get("pos", "0"))}
        entry.update(kind.dump(pid, fd, link, st, info))
        entry["inherit"] = bool(_stdio_inherited(fd, kind, entry))
        if not kind.restorable and not entry["inherit"]:
            raise TargetError("process %d: fd %d is a %s (%s): this kind of fd is not supported yet"
                              % (pid, fd, kind.name, link))
        table.append(entry)
    if not peek:
        return table
    _mark_shared(pid, table, keys)
    # the bytes buffered in each pipe
    ends = {}
    for e in table:
        if e["kind"] == "pipe" and not e["inherit"]:
            ends.setdefault(e["inode"], []).append(e)
    for inode, group in ends.items():
        data, size = Pipe.peek(pid, group[0]["fd"])
        for e in group:
            e["data"] = base64.b64encode(data).decode()
            e["pipe_size"] = size
    return table


class _Table:
    """Objects created so far in the restored process, parked above every target number."""

    def __init__(self, remote, base):
        self.remote = remote
        self.base = base
        self.objects = {}
        self.parked = []

    def park(self, fd):
        high = self.remote.call(sysno.fcntl, fd, F_DUPFD, self.base, what="fcntl(F_DUPFD)")
        self.remote.call(sysno.close, fd)
        self.parked.append(high)
        return high


def restore_fds(remote, table_entries):
    """Rebuild the fd table of the restored process (a copy of ckpt: it holds ckpt's fds)."""
    remote.call(sysno.close_range, 3, 0xFFFFFFFF, 0, what="close_range")
    keep = {e["fd"] for e in table_entries if e.get("inherit")}
    for std in (0, 1, 2):
        if std not in keep:
            remote.call(sysno.close, std, ok_errors=(9,))
    base = max([e["fd"] for e in table_entries] + [2]) + 1
    table = _Table(remote, base)
    placed = []
    created = {}      # target fd number -> the object made for it (parked)
    for e in table_entries:
        if e.get("inherit"):
            continue
        if e.get("shares") in created:
            placed.append((e, created[e["shares"]]))    # one open file: dup2 of the same object
            continue
        kind = BY_NAME.get(e["kind"], FdKind)
        fd = kind.create(remote, e, table)
        if fd < base:
            fd = table.park(fd)
        created[e["fd"]] = fd
        placed.append((e, fd))
    for e, fd in placed:
        n = e["fd"]
        remote.call(sysno.dup2, fd, n, what="dup2 onto fd %d" % n)
        remote.call(sysno.fcntl, n, F_SETFL, e["flags"] & ~(O_ACCMODE | O_CLOEXEC), what="fcntl(F_SETFL) of fd %d" % n)
        remote.call(sysno.fcntl, n, F_SETFD, 1 if e["flags"] & O_CLOEXEC else 0, what="fcntl(F_SETFD) of fd %d" % n)
        if e["kind"] == "file" and e["pos"]:
            remote.call(sysno.lseek, n, e["pos"], 0, what="lseek of fd %d" % n)
    for fd in set(table.parked):
        remote.call(sysno.close, fd, ok_errors=(9,))


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
