"""Anonymous pipes and FIFOs, with the bytes buffered in them at the freeze, their capacity and
their packet boundaries (a pipe in packet mode, O_DIRECT).

Every open file comes back as an open file of its own, so that each keeps its own status flags
(restore_fds sets them per fd; fds of one open file share them): the first open file of each
end of an anonymous pipe is an end pipe2() makes, and another open file of the same end (a
process's open("/proc/self/fd/N"), which, unlike pipe2, sets O_LARGEFILE) is opened again that
way, by the restored process itself.

FIFOs opened by path are opened again by that path, as the process: the plan opens the path
(O_PATH, no symbolic link followed, with the process's rights) and checks it is the same FIFO;
each fd is then opened through it with the process's rights, so that a reader and a writer (or
a process outside the tree) meet again. The bytes buffered at the freeze go back through a
keeper ckpt holds open (a reader) until every process of the tree is restored, written
through an open file of the process's own rights. A FIFO whose path
was gone at the dump (unlinked) can be opened by no one else: it comes back as an anonymous
pipe with its bytes, with a warning. A FIFO that a process outside the dumped tree also holds
keeps its bytes in the kernel (they are that process's too, it may read or write them after
the dump): they are neither saved nor put back.
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
from ckpt.files.base import AT_FDCWD, O_ACCMODE, O_CLOEXEC, O_NONBLOCK, O_RDWR, O_WRONLY, FdKind
from ckpt.kernel import procfs, sysno

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
F_SETFL = 4
O_DIRECT = 0o40000          # a pipe in packet mode (set on its write end)
O_LARGEFILE = 0o100000      # every open() sets it on x86_64; pipe2 never does
O_PATH = 0o10000000
SPLICE_F_NONBLOCK = 2
DEFAULT_PIPE_SIZE = 16 << 12

_libc = ctypes.CDLL(None, use_errno=True)
_libc.tee.restype = ctypes.c_ssize_t
_libc.tee.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)


def peek(pid, fd):
    """The pipe's buffered bytes, without taking them out (tee into a private pipe), its
    capacity (F_GETPIPE_SZ; None if unknown), and the lengths of the reads a reader would get
    (several when the pipe holds packets: a read never goes past the end of a packet; None
    when one read would take everything)."""
    try:
        src = os.open(procfs.proc(pid, "fd", str(fd)), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b"", None, None
    try:
        try:
            size = fcntl.fcntl(src, F_GETPIPE_SZ)
        except OSError:
            size = None
        queued = struct.unpack("i", fcntl.ioctl(src, termios.FIONREAD, b"\0\0\0\0"))[0]
        if not queued:
            return b"", size, None
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, max(size or 0, queued))
            except OSError:
                pass    # above the unprivileged maximum: the count below says if it mattered
            n = _libc.tee(src, w, queued, SPLICE_F_NONBLOCK)
            err = ctypes.get_errno() if n < 0 else 0
            buf = bytearray(max(n, 0))
            view, got, chunks = memoryview(buf), 0, []
            while got < n:
                k = os.readv(r, [view[got:]])
                if k <= 0:
                    break
                chunks.append(k)
                got += k
        finally:
            os.close(r)
            os.close(w)
        if got < queued:
            # never a silently shortened pipe: its bytes are part of the process's state
            raise TargetError("process %d: fd %d: could copy only %d of the %d bytes buffered in its pipe%s"
                              % (pid, fd, got, queued, (" (%s)" % os.strerror(err)) if err else ""))
        return bytes(buf), size, (chunks if len(chunks) > 1 else None)
    finally:
        os.close(src)


def _outside_holders(ctx):
    """{/proc link: PIDs} of the fds of every process outside the dumped tree (and outside
    ckpt) whose link is a path; once per dump context, only when a FIFO asks."""
    links = ctx.memo.get("outside_links")
    if links is None:
        links = ctx.memo["outside_links"] = {}
        skip = set(ctx.tree) | {os.getpid()}
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in skip:
                continue
            try:
                numbers = os.listdir("/proc/%s/fd" % name)
            except OSError:
                continue
            for n in numbers:
                try:
                    link = os.readlink("/proc/%s/fd/%s" % (name, n))
                except OSError:
                    continue
                if link.startswith("/"):
                    links.setdefault(link, set()).add(int(name))
    return links


def _same_fifo(path, st):
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISFIFO(now.st_mode) and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _all_entries(table):
    """Every fd entry of the restored tree (this process's alone for one process)."""
    if table.tree.tables:
        return [e for entries in table.tree.tables.values() for e in entries]
    return table.entries


def _packet_mode(entry, table, key):
    """Whether the pipe was in packet mode: a write end of it had O_DIRECT, or its bytes came
    out as several packets."""
    if entry.get("chunks"):
        return True
    return any(e.get("kind") == "pipe" and key(e) == key(entry) and e["flags"] & O_ACCMODE != 0
               and e["flags"] & O_DIRECT for e in _all_entries(table))


def _chunks(entry, data):
    """The data as the writes that put it back: one per packet in packet mode."""
    sizes = entry.get("chunks")
    if not sizes or sum(sizes) != len(data):
        return [data] if data else []
    out, at = [], 0
    for n in sizes:
        out.append(data[at:at + n])
        at += n
    return out


class Pipe(FdKind):
    name = "pipe"
    restorable = True
    inherit_stdio = True

    @staticmethod
    def match(f):
        return f.link.startswith("pipe:") or (f.st is not None and stat.S_ISFIFO(f.st.st_mode))

    @classmethod
    def describe(cls, f):
        d = {"path": f.link, "inode": f.inode, "fifo": not f.link.startswith("pipe:")}
        if d["fifo"] and f.st is not None:
            d["dev"] = f.st.st_dev
            # reopened by its path at restore, if the path still leads to this FIFO
            d["fifo_path"] = f.link if f.link.startswith("/") and _same_fifo(f.link, f.st) else None
            if d["fifo_path"]:
                holders = _outside_holders(f.ctx).get(f.link, set())
                d["outside"] = sorted(holders)[:8]
        return d

    @classmethod
    def refuse(cls, f, entry):
        if entry.get("fifo") and f.st is None:
            return "a FIFO that cannot be looked at (fstat)"
        return None

    @classmethod
    def capture(cls, f, entry, ctx):
        if entry.get("inherit"):
            return
        if entry.get("fifo_path") and not _same_fifo(entry["fifo_path"], f.st):
            entry["fifo_path"] = None   # unlinked since the description: an anonymous pipe at restore
        if entry.get("outside"):
            entry["data"], entry["pipe_size"] = "", None    # the FIFO's bytes stay with it
            return
        # one peek per pipe, shared by all its ends
        seen = ctx.memo.setdefault("pipes", {})
        if entry["inode"] not in seen:
            seen[entry["inode"]] = peek(f.pid, f.fd)
        data, size, chunks = seen[entry["inode"]]
        entry["data"] = base64.b64encode(data).decode()
        entry["pipe_size"] = size
        if chunks:
            entry["chunks"] = chunks

    # -- restore -------------------------------------------------------------------------
    @classmethod
    def prepare(cls, entry, paths, options):
        if not entry.get("fifo"):
            return
        n = entry["fd"]
        if not entry.get("fifo_path"):
            if options is not None:
                options.warn("fd %d: the FIFO %s was deleted before the dump: it comes back as an anonymous pipe "
                             "(with its bytes; no other process could open it by its path anyway)"
                             % (n, entry["path"]))
            return
        path = entry["fifo_path"]
        fd = paths.open(("fd", n), path, O_PATH, {"dev": entry["dev"], "inode": entry["inode"]},
                        "fd %d: FIFO" % n, kind="fifo")
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise RestoreError("fd %d: FIFO %s is no longer a FIFO" % (n, path))
        # the keeper, a reader, holds the FIFO open while its bytes are put back and the processes
        # of the tree open it (so that no open for writing fails for want of a reader). Opened with
        # ckpt's rights (the process may be a writer only), never read, never handed to a process
        paths.held[("fifo-keeper", n)] = os.open("/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    @classmethod
    def create(cls, remote, entry, table):
        if entry.get("fifo") and entry.get("fifo_path"):
            return cls._fifo(entry, table)
        key = ("pipe", entry["inode"])
        if key not in table.objects:
            # made once per tree: the other end may be in another process (parent and child)
            table.objects[key] = table.shared(key)
        if table.objects[key] is None:
            table.objects[key] = table.share(key, cls._make(remote, entry, table))
        r, w = table.objects[key]
        mode = entry["flags"] & O_ACCMODE
        end = w if mode == O_WRONLY else r
        claim = ("pipe end", entry["inode"], mode == O_WRONLY)
        if mode != O_RDWR and not entry["flags"] & O_LARGEFILE and claim not in table.tree.objects:
            table.tree.objects[claim] = ()      # the end pipe2 made: taken once in the tree
            return end
        # another open file of this end: opened again as the process did it
        remote.reset()
        path = remote.put_str("/proc/self/fd/%d" % end)
        return remote.call(sysno.openat, AT_FDCWD, path, mode | O_NONBLOCK | O_CLOEXEC, 0,
                           what="opening pipe %s again for fd %d" % (entry["path"], entry["fd"]))

    @classmethod
    def _make(cls, remote, entry, table):
        """The pipe, in the restored process, with its capacity and bytes: (r, w) parked."""
        remote.reset()
        fds_addr = remote.alloc(8)
        data = base64.b64decode(entry.get("data") or b"")
        packets = _packet_mode(entry, table, lambda e: (e.get("fifo"), e.get("inode")))
        # non-blocking while it is refilled, so that a refill that does not fit fails instead of
        # blocking the restore forever; restore_fds sets each fd's own flags
        remote.call(sysno.pipe2, fds_addr, O_NONBLOCK | (O_DIRECT if packets else 0), what="pipe2")
        r, w = struct.unpack("<ii", remote.read(fds_addr, 8))
        size = entry.get("pipe_size")
        if size or len(data) > DEFAULT_PIPE_SIZE:
            # the capacity it had (F_SETPIPE_SZ), at least enough for what it held
            remote.call(sysno.fcntl, w, F_SETPIPE_SZ, max(size or 0, len(data)),
                        what="fcntl(F_SETPIPE_SZ, %d) of pipe %s" % (max(size or 0, len(data)), entry["path"]))
        for chunk in (_chunks(entry, data) if packets else [data] if data else []):
            remote.reset()
            addr, done = remote.put(chunk), 0
            while done < len(chunk):
                n = remote.call(sysno.write, w, addr + done, len(chunk) - done, what="refilling a pipe",
                                ok_errors=(errno.EAGAIN,))
                if n <= 0:
                    raise RestoreError("pipe %s: only part of its %d buffered bytes could be put back"
                                       % (entry["path"], len(data)))
                done += n
        return table.park(r), table.park(w)

    @classmethod
    def _fifo(cls, entry, table):
        n = entry["fd"]
        key = ("fifo", entry["dev"], entry["inode"])
        if key not in table.tree.objects:
            keeper = table.paths.take(("fifo-keeper", n))
            table.tree.objects[key] = (keeper,)     # closed once the whole tree is restored
            cls._refill_fifo(keeper, entry, table)
        opath = table.paths.take(("fd", n))
        try:
            # as the process (restore_fds acts with its rights): its own permission on the FIFO
            local = os.open("/proc/self/fd/%d" % opath, (entry["flags"] & O_ACCMODE) | os.O_NONBLOCK | O_CLOEXEC)
        except OSError as e:
            raise RestoreError("fd %d: the FIFO %s cannot be opened again as the process: %s"
                               % (n, entry["fifo_path"], e.strerror)) from None
        finally:
            os.close(opath)
        return table.adopt(local, "fd %d (FIFO %s)" % (n, entry["fifo_path"]))

    @staticmethod
    def _refill_fifo(keeper, entry, table):
        if entry.get("outside"):
            return      # its bytes stayed in the kernel with the processes outside that hold it
        data = base64.b64decode(entry.get("data") or b"")
        queued = struct.unpack("i", fcntl.ioctl(keeper, termios.FIONREAD, b"\0\0\0\0"))[0]
        if queued:
            if data and table.options is not None:
                table.options.warn("fd %d: the FIFO %s holds %d bytes written since the dump by another process: "
                                   "they are kept, the %d bytes it held at the dump are not put back"
                                   % (entry["fd"], entry["fifo_path"], queued, len(data)))
            return
        size = entry.get("pipe_size")
        if size and size != DEFAULT_PIPE_SIZE or len(data) > DEFAULT_PIPE_SIZE:
            try:
                fcntl.fcntl(keeper, F_SETPIPE_SZ, max(size or 0, len(data)))
            except OSError as e:
                raise RestoreError("fd %d: FIFO %s: its capacity (%d) cannot be set: %s"
                                   % (entry["fd"], entry["fifo_path"], max(size or 0, len(data)), e.strerror)) from None
        if not data:
            return
        packets = _packet_mode(entry, table, lambda e: (e.get("fifo"), e.get("dev"), e.get("inode")))
        try:
            # written as the process (restore_fds acts with its rights): only into a FIFO it may write to
            w = os.open("/proc/self/fd/%d" % keeper, os.O_WRONLY | os.O_NONBLOCK | O_CLOEXEC)
        except OSError as e:
            raise RestoreError("fd %d: the %d bytes the FIFO %s held at the dump cannot be put back: the process may "
                               "not open it for writing (%s)"
                               % (entry["fd"], len(data), entry["fifo_path"], e.strerror)) from None
        try:
            if packets:     # packet mode (F_SETFL may set O_DIRECT on a FIFO; open may not)
                fcntl.fcntl(w, F_SETFL, os.O_NONBLOCK | O_DIRECT)
            for chunk in (_chunks(entry, data) if packets else [data]):
                done = 0
                while done < len(chunk):
                    done += os.write(w, chunk[done:])
        except OSError as e:
            raise RestoreError("fd %d: FIFO %s: its %d buffered bytes cannot be put back: %s"
                               % (entry["fd"], entry["fifo_path"], len(data), e.strerror)) from None
        finally:
            os.close(w)
