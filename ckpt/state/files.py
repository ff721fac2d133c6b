"""The fd table. Each kind of fd is one class with its dump half (and, where supported, its
restore half); adding a kind means one class in its module and one line in KINDS."""
import os
import stat

from ckpt.kernel import procfs


class FdKind:
    name = "?"
    restorable = False

    @staticmethod
    def match(link, st):
        return False

    @classmethod
    def dump(cls, pid, fd, link, st, info):
        return {"path": link}


class RegularFile(FdKind):
    name = "file"
    restorable = True

    @staticmethod
    def match(link, st):
        return st is not None and stat.S_ISREG(st.st_mode) and not link.startswith("/memfd:")

    @classmethod
    def dump(cls, pid, fd, link, st, info):
        return {"path": link, "deleted": link.endswith(" (deleted)"), "dev": st.st_dev, "inode": st.st_ino,
                "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class Directory(FdKind):
    name = "dir"
    restorable = True

    @staticmethod
    def match(link, st):
        return st is not None and stat.S_ISDIR(st.st_mode)


class CharDevice(FdKind):
    name = "chardev"
    restorable = True

    @staticmethod
    def match(link, st):
        return st is not None and stat.S_ISCHR(st.st_mode)

    @classmethod
    def dump(cls, pid, fd, link, st, info):
        return {"path": link, "rdev": st.st_rdev, "tty": os.major(st.st_rdev) in (4, 5, 136)}


class Pipe(FdKind):
    name = "pipe"
    restorable = True

    @staticmethod
    def match(link, st):
        return link.startswith("pipe:") or (st is not None and stat.S_ISFIFO(st.st_mode))

    @classmethod
    def dump(cls, pid, fd, link, st, info):
        return {"path": link, "inode": st.st_ino if st else None, "fifo": not link.startswith("pipe:")}


class Memfd(FdKind):
    name = "memfd"

    @staticmethod
    def match(link, st):
        return link.startswith("/memfd:")


class Socket(FdKind):
    name = "socket"

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


def kind_of(link, st):
    for k in KINDS:
        if k.match(link, st):
            return k
    return FdKind


def dump_fds(pid):
    table = []
    for fd in procfs.fds(pid):
        try:
            link = os.readlink(procfs.proc(pid, "fd", str(fd)))
            info = procfs.fdinfo(pid, fd)
        except FileNotFoundError:
            continue  # closed meanwhile
        try:
            st = os.stat(procfs.proc(pid, "fd", str(fd)))
        except OSError:
            st = None
        kind = kind_of(link, st)
        entry = {"fd": fd, "kind": kind.name, "flags": int(info.get("flags", "0"), 8),
                 "pos": int(info.get("pos", "0")), "restorable": kind.restorable}
        entry.update(kind.dump(pid, fd, link, st, info))
        table.append(entry)
    return table


def refuse_untrackable(pid, maps):
    """Kernel I/O that writes memory behind the tracker's back: refuse clearly (DESIGN 3)."""
    from ckpt.errors import TargetError
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
