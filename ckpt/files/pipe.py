"""Anonymous pipes and FIFOs, with the bytes buffered in them at the freeze and their capacity."""
import base64
import errno
import fcntl
import os
import stat
import struct
import termios

from ckpt.errors import RestoreError, TargetError
from ckpt.files.base import O_ACCMODE, O_NONBLOCK, O_WRONLY, FdKind
from ckpt.kernel import procfs, sysno
from ckpt.kernel.native import ffi, lib

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
PIPE_PEEK_MAX = 1 << 20


def peek(pid, fd):
    """The pipe's buffered bytes, without taking them out (tee into a private pipe), and its
    capacity (F_GETPIPE_SZ; None if unknown)."""
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


class Pipe(FdKind):
    name = "pipe"
    restorable = True
    inherit_stdio = True

    @staticmethod
    def match(f):
        return f.link.startswith("pipe:") or (f.st is not None and stat.S_ISFIFO(f.st.st_mode))

    @classmethod
    def describe(cls, f):
        return {"path": f.link, "inode": f.inode, "fifo": not f.link.startswith("pipe:")}

    @classmethod
    def capture(cls, f, entry, ctx):
        if entry.get("inherit"):
            return
        # one peek per pipe, shared by all its ends
        seen = ctx.memo.setdefault("pipes", {})
        if entry["inode"] not in seen:
            seen[entry["inode"]] = peek(f.pid, f.fd)
        data, size = seen[entry["inode"]]
        entry["data"] = base64.b64encode(data).decode()
        entry["pipe_size"] = size

    @classmethod
    def create(cls, remote, entry, table):
        key = ("pipe", entry["inode"])
        if key not in table.objects:
            # made once per tree: the other end may be in another process (parent and child)
            table.objects[key] = table.shared(key)
        if table.objects[key] is None:
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
            table.objects[key] = table.share(key, (table.park(r), table.park(w)))
        r, w = table.objects[key]
        return w if entry["flags"] & O_ACCMODE == O_WRONLY else r
