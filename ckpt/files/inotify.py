"""inotify: every watch, with its path, mask and watch descriptor.

Dump: /proc/PID/fdinfo/FD lists each watch: "inotify wd:WD ino:INO sdev:DEV mask:MASK ...
fhandle-bytes:N fhandle-type:T f_handle:HEX" (numbers in hex). The watched inode's path is
found from its file handle (open_by_handle_at on a mount of its filesystem, then the path the
kernel gives that open file) and checked to lead to that very inode; a watched inode no path
leads to (deleted, or a file the kernel cannot name from its handle) is refused, naming it.
Events queued unread at the freeze cannot be read without taking them from the process: they
are lost, and the restore says how many bytes of them.

Restore: made in ckpt, with the process's rights (restore_fds acts as it): each watched path is
opened by the plan as the process (O_PATH, no symbolic link followed) and checked to be the same
inode, and the watch is added through that open file, with the same mask (IN_ONESHOT and
IN_EXCL_UNLINK included). Watch descriptors are handed out in increasing order, never reused: to
reach the same numbers, placeholder watches (on a memfd of ckpt's) are added and removed in
between, and the events their removal queues (IN_IGNORED) read away before the process gets the
fd. A process whose descriptors are too far apart for that (more than MAX_SKIP placeholders) is
refused at the dump.
"""
import ctypes
import fcntl
import os
import struct
import termios

from ckpt.errors import RestoreError, TargetError
from ckpt.files.base import FdKind
from ckpt.kernel import procfs

O_PATH = 0o10000000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
IN_OPEN, IN_IGNORED, IN_Q_OVERFLOW = 0x20, 0x8000, 0x4000
MAX_SKIP = 1 << 16      # placeholder watches restore may add to reach the same descriptors

_libc = ctypes.CDLL(None, use_errno=True)
_libc.open_by_handle_at.restype = ctypes.c_int
_libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)


def parse(pid, fd):
    """The watches of an inotify fd: [{wd, ino, sdev, mask, htype, handle}]; None when its
    fdinfo cannot be read."""
    try:
        with open(procfs.proc(pid, "fdinfo", str(fd))) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = []
    for line in lines:
        if not line.startswith("inotify "):
            continue
        fields = dict(x.split(":", 1) for x in line.split()[1:] if ":" in x)
        try:
            w = {"wd": int(fields["wd"], 16), "ino": int(fields["ino"], 16), "sdev": int(fields["sdev"], 16),
                 "mask": int(fields["mask"], 16)}
        except (KeyError, ValueError):
            return None
        if "f_handle" in fields:
            w["htype"] = int(fields.get("fhandle-type", "0"), 16)
            w["handle"] = fields["f_handle"]
        out.append(w)
    return sorted(out, key=lambda w: w["wd"])


def _user_dev(sdev):
    """The kernel's internal device number (major << 20 | minor) as stat gives it."""
    return os.makedev(sdev >> 20, sdev & 0xFFFFF)


def _mounts_of(dev):
    """Mount points of ckpt's mount namespace whose filesystem is dev (mounts of its root
    first: a handle resolves to a full path from there)."""
    out = []
    want = "%d:%d" % (os.major(dev), os.minor(dev))
    try:
        with open("/proc/self/mountinfo", errors="surrogateescape") as f:
            for line in f:
                a = line.split(" - ", 1)[0].split()
                if len(a) >= 5 and a[2] == want:
                    out.append((a[3] != "/", procfs.unescape_mountinfo(a[4])))
    except OSError:
        return []
    return [m for _, m in sorted(out)]


def find_path(w):
    """The path of a watched inode (None when none leads to it), from its file handle."""
    if "handle" not in w:
        return None
    dev = _user_dev(w["sdev"])
    raw = bytes.fromhex(w["handle"])
    handle = ctypes.create_string_buffer(struct.pack("<Ii", len(raw), w["htype"]) + raw, 8 + len(raw))
    for mnt in _mounts_of(dev):
        try:
            mfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)   # not O_PATH: EBADF
        except OSError:
            continue
        try:
            fd = _libc.open_by_handle_at(mfd, handle, O_PATH | os.O_CLOEXEC)
        finally:
            os.close(mfd)
        if fd < 0:
            continue
        try:
            path = os.readlink("/proc/self/fd/%d" % fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if (st.st_dev, st.st_ino) != (dev, w["ino"]) or not path.startswith("/"):
            continue
        try:
            now = os.stat(path, follow_symlinks=False)
        except OSError:
            continue
        if (now.st_dev, now.st_ino) == (dev, w["ino"]):
            return path
    return None


def _describe_watches(pid, fd, known=()):
    """[{wd, path, dev, inode, mask}]; paths of watches already known are not looked up again.
    Raises TargetError naming a watch no path leads to."""
    ws = parse(pid, fd)
    if ws is None:
        raise TargetError("process %d: fd %d (inotify): its watches cannot be read from its fdinfo" % (pid, fd))
    known = {(k["wd"], k["dev"], k["inode"]): k["path"] for k in known}
    out, missing = [], []
    for w in ws:
        dev = _user_dev(w["sdev"])
        path = known.get((w["wd"], dev, w["ino"])) or find_path(w)
        if path is None:
            missing.append(w)
        out.append({"wd": w["wd"], "path": path, "dev": dev, "inode": w["ino"], "mask": w["mask"]})
    if missing:
        found = _search(pid, missing, [w["path"] for w in out if w["path"]])
        for w in out:
            w["path"] = w["path"] or found.get((w["dev"], w["inode"]))
    for w in out:
        path, dev = w["path"], w["dev"]
        if path is None:
            raise TargetError("process %d: fd %d (inotify): watch %d is on inode %d of device %d:%d, which no path "
                              "leads to (deleted, or not named by its file handle); not supported"
                              % (pid, fd, w["wd"], w["inode"], os.major(dev), os.minor(dev)))
    return out


def _search(pid, missing, watched):
    """{(dev, inode): path} for watched inodes the kernel did not name from their handles (a
    file whose dentry was evicted): looked for in the directories the process is known to use
    (its other watches, its working directory, the directories of its open files)."""
    dirs = list(watched)
    try:
        dirs.append(os.readlink(procfs.proc(pid, "cwd")))
    except OSError:
        pass
    try:
        for n in os.listdir(procfs.proc(pid, "fd")):
            try:
                link = os.readlink(procfs.proc(pid, "fd", n))
            except OSError:
                continue
            if link.startswith("/"):
                dirs += [link, os.path.dirname(link)]
    except OSError:
        pass
    want = {(_user_dev(w["sdev"]), w["ino"]) for w in missing}
    found = {}
    for d in dict.fromkeys(dirs):
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if e.inode() not in {i for _, i in want}:
                    continue
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in want and key not in found:
                found[key] = e.path
        if len(found) == len(want):
            break
    return found


def _skips(watches):
    """Placeholder watches restore adds to reach the same descriptors."""
    return sum(b["wd"] - a["wd"] - 1 for a, b in zip([{"wd": 0}] + watches, watches))


def _queued(fd):
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def _drain(ifd):
    """Read every queued event away: [(wd, mask)]."""
    out = []
    while True:
        try:
            buf = os.read(ifd, 65536)
        except BlockingIOError:
            return out
        at = 0
        while at + 16 <= len(buf):
            wd, mask, _, n = struct.unpack_from("<iIII", buf, at)
            out.append((wd, mask))
            at += 16 + n


class Inotify(FdKind):
    name = "inotify"
    restorable = True

    @staticmethod
    def match(f):
        return f.link == "anon_inode:inotify"

    @classmethod
    def describe(cls, f):
        return {"path": f.link, "watches": _describe_watches(f.pid, f.fd)}

    @classmethod
    def refuse(cls, f, entry):
        skip = _skips(entry["watches"])
        if skip > MAX_SKIP:
            return ("its watch descriptors go up to %d for %d watches: restore would need %d placeholder watches to "
                    "give the same numbers (at most %d); not supported"
                    % (entry["watches"][-1]["wd"], len(entry["watches"]), skip, MAX_SKIP))
        return None

    @classmethod
    def capture(cls, f, entry, ctx):
        # the watches as they are at the freeze (the description may be older)
        entry["watches"] = _describe_watches(f.pid, f.fd, entry["watches"])
        why = cls.refuse(f, entry)
        if why:
            raise f.error(why)
        entry["pending"] = _queued(f.dup())

    # -- restore -------------------------------------------------------------------------
    @classmethod
    def precheck(cls, entry):
        ws = entry["watches"]
        wds = [w["wd"] for w in ws]
        if any(not isinstance(w["wd"], int) or not isinstance(w["mask"], int) or not isinstance(w["path"], str)
               for w in ws) or sorted(set(wds)) != wds or (wds and wds[0] < 1):
            raise RestoreError("fd %d (inotify): malformed watch list" % entry["fd"])
        if _skips(ws) > MAX_SKIP:
            raise RestoreError("fd %d (inotify): its watch descriptors are too far apart (%d placeholder watches, "
                               "at most %d)" % (entry["fd"], _skips(ws), MAX_SKIP))

    @classmethod
    def prepare(cls, entry, paths, options):
        n = entry["fd"]
        for w in entry["watches"]:
            paths.open(("inotify", n, w["wd"]), w["path"], O_PATH, {"dev": w["dev"], "inode": w["inode"]},
                       "fd %d: inotify watch %d on" % (n, w["wd"]), kind="any")
        if entry.get("pending") and options is not None:
            options.warn("fd %d (inotify): the %d bytes of events it had queued unread at the dump are lost"
                         % (n, entry["pending"]))

    @classmethod
    def create(cls, remote, entry, table):
        n = entry["fd"]
        ifd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if ifd < 0:
            raise RestoreError("fd %d (inotify): inotify_init1: %s" % (n, os.strerror(ctypes.get_errno())))
        try:
            cls._watch(ifd, entry, table)
        except BaseException:
            os.close(ifd)
            raise
        return table.adopt(ifd, what="inotify fd %d" % n)

    @classmethod
    def _watch(cls, ifd, entry, table):
        n = entry["fd"]
        dummy = os.memfd_create("ckpt-inotify-placeholder", os.MFD_CLOEXEC)
        real = {w["wd"] for w in entry["watches"]}
        lost = []

        def add(path, mask, what):
            wd = _libc.inotify_add_watch(ifd, os.fsencode(path), mask)
            if wd < 0:
                raise RestoreError("fd %d (inotify): adding %s: %s" % (n, what, os.strerror(ctypes.get_errno())))
            return wd

        try:
            nxt = 1     # the next descriptor the kernel gives: one past the last it gave
            for w in entry["watches"]:
                while nxt < w["wd"]:
                    k = add("/proc/self/fd/%d" % dummy, IN_OPEN, "a placeholder watch")
                    if _libc.inotify_rm_watch(ifd, k) < 0:
                        raise RestoreError("fd %d (inotify): removing a placeholder watch: %s"
                                           % (n, os.strerror(ctypes.get_errno())))
                    nxt = k + 1
                    if k % 4096 == 0:   # never let IN_IGNORED events overflow the queue
                        lost += [e for e in _drain(ifd) if e[0] in real]
                opath = table.paths.take(("inotify", n, w["wd"]))
                try:
                    k = add("/proc/self/fd/%d" % opath, w["mask"], "its watch %d on %s" % (w["wd"], w["path"]))
                finally:
                    os.close(opath)
                if k != w["wd"]:
                    raise RestoreError("fd %d (inotify): the watch on %s got descriptor %d, not %d as at the dump"
                                       % (n, w["path"], k, w["wd"]))
                nxt = k + 1
            lost += [e for e in _drain(ifd) if e[0] in real or e[1] & IN_Q_OVERFLOW]
        finally:
            os.close(dummy)
        if lost and table.options is not None:
            table.options.warn("fd %d (inotify): %d events of its watches arrived while it was restored and are lost"
                               % (n, len(lost)))


__all__ = ["Inotify", "find_path", "parse"]
