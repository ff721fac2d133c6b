"""epoll: every registered fd with its event mask (EPOLLET, EPOLLONESHOT, EPOLLEXCLUSIVE and
EPOLLWAKEUP bits included; a oneshot item that fired shows only those bits, and comes back
disabled the same way) and its 64-bit data.

The kernel keys an epoll item by (file, fd number at the time of EPOLL_CTL_ADD). Dump: fdinfo
lists `tfd: N events: HEX data: HEX ...` per item; an item whose fd number no longer refers to
the file it was added with (the fd was closed, or closed and reused, while the file lives on
elsewhere) could not be keyed the same at restore, so it is refused, checked with
kcmp(KCMP_EPOLL_TFD) (by device and inode where kcmp cannot tell; anonymous-inode files all
share one inode, so for those the fallback cannot tell and trusts the number).

Restore: the set is created like any fd; its items are added by epoll_ctl(EPOLL_CTL_ADD)
injected into the restored process once every fd is at its number and every other kind has
finished (finish_order), sets nested in others filled before the sets that hold them. What
is not kept: which ready events were already reported and not yet renewed -- an edge-triggered
item ready at the freeze is reported once more after restore (a spurious wake-up, which
edge-triggered users handle anyway).
"""
import ctypes
import os
import re
import struct

from ckpt.errors import RestoreError
from ckpt.files.base import O_CLOEXEC, FdKind
from ckpt.kernel import procfs, sysno

SYS_kcmp, KCMP_EPOLL_TFD = 312, 7
EPOLL_CTL_ADD = 1
EPOLL_CTL_DEL = 2
EPOLLET, EPOLLONESHOT, EPOLLWAKEUP, EPOLLEXCLUSIVE = 1 << 31, 1 << 30, 1 << 29, 1 << 28
EP_PRIVATE_BITS = EPOLLET | EPOLLONESHOT | EPOLLWAKEUP | EPOLLEXCLUSIVE
POLL_ALL = 0x1 | 0x2 | 0x4 | 0x40 | 0x80 | 0x100 | 0x200 | 0x2000    # IN PRI OUT RDNORM RDBAND WRNORM WRBAND RDHUP
EBADF, ENOENT = 9, 2
BATCH = 4096
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_ITEM = re.compile(r"^tfd:\s*(\d+)\s+events:\s*([0-9a-fA-F]+)\s+data:\s*([0-9a-fA-F]+)"
                   r"(?:.*\bino:([0-9a-fA-F]+))?(?:.*\bsdev:([0-9a-fA-F]+))?")


class _Slot(ctypes.Structure):
    _fields_ = [("efd", ctypes.c_uint32), ("tfd", ctypes.c_uint32), ("toff", ctypes.c_uint32)]


def read_items(pid, fd):
    """The items of epoll fd `fd` of pid, in fdinfo order: [dict(tfd, events, data, ino, sdev)]."""
    out = []
    for line in procfs._read(procfs.proc(pid, "fdinfo", str(fd))).splitlines():
        m = _ITEM.match(line.strip())
        if m:
            out.append({"tfd": int(m.group(1)), "events": int(m.group(2), 16), "data": int(m.group(3), 16),
                        "ino": int(m.group(4), 16) if m.group(4) else None,
                        "sdev": int(m.group(5), 16) if m.group(5) else None})
    return out


def _same_by_inode(pid, item):
    """Fallback without kcmp: True/False by device and inode, None when that cannot tell."""
    link = "/proc/%d/fd/%d" % (pid, item["tfd"])
    try:
        st = os.stat(link)
        anon = os.readlink(link).startswith("anon_inode:")
    except FileNotFoundError:
        return False
    except OSError:
        return None
    if item["ino"] is None or anon:
        return None
    kdev = item["sdev"]
    return st.st_ino == item["ino"] and (kdev is None or (os.major(st.st_dev), os.minor(st.st_dev))
                                         == (kdev >> 20, kdev & 0xFFFFF))


def check_items(pid, efd, items):
    """(why the items cannot be rebuilt or None, the items still there).
    The n-th item of one fd number is the n-th in fdinfo order (both are the kernel's tree order)."""
    seen = {}
    keep = []
    for item in items:
        tfd = item["tfd"]
        toff = seen.get(tfd, 0)
        seen[tfd] = toff + 1
        slot = _Slot(efd, tfd, toff)
        r = _libc.syscall(ctypes.c_long(SYS_kcmp), ctypes.c_long(pid), ctypes.c_long(pid),
                          ctypes.c_long(KCMP_EPOLL_TFD), ctypes.c_long(tfd), ctypes.byref(slot))
        err = ctypes.get_errno() if r < 0 else 0
        if r == 0:
            keep.append(item)
            continue
        if r < 0 and err == ENOENT:
            continue        # removed from the set meanwhile (it was not frozen yet)
        if r < 0 and err == EBADF:
            return ("fd %d is registered in it (events %#x, data %#x) but was closed after being added, "
                    "its file kept open elsewhere: the item cannot be keyed the same at restore"
                    % (tfd, item["events"], item["data"])), None
        if r > 0:
            return ("fd %d is registered in it (events %#x, data %#x) but fd %d is now another file "
                    "(closed and reused after being added): the item cannot be keyed the same at restore"
                    % (tfd, item["events"], item["data"], tfd)), None
        same = _same_by_inode(pid, item)
        if same is False:
            return ("fd %d is registered in it (events %#x, data %#x) but no longer refers to the file "
                    "it was added with" % (tfd, item["events"], item["data"])), None
        keep.append(item)
    return None, keep


def _checked(f):
    return check_items(f.pid, f.fd, read_items(f.pid, f.fd))


def _disabled(events):
    """A oneshot item that fired: the kernel keeps only its flag bits until EPOLL_CTL_MOD."""
    return events & EPOLLONESHOT and not events & ~EP_PRIVATE_BITS


class Epoll(FdKind):
    name = "epoll"
    restorable = True
    finish_order = 1000     # after every other kind (sockets going live ...)

    @staticmethod
    def match(f):
        return f.link == "anon_inode:[eventpoll]"

    @classmethod
    def refuse(cls, f, entry):
        why, f.epoll_items = _checked(f)
        return why

    @classmethod
    def capture(cls, f, entry, ctx):
        items = getattr(f, "epoll_items", None)    # checked by refuse() on this same OpenFd
        if items is None:
            why, items = _checked(f)
            if why:
                raise f.error(why)
        entry["items"] = [{"tfd": i["tfd"], "events": i["events"], "data": i["data"]} for i in items]

    @classmethod
    def precheck(cls, entry):
        items = entry.get("items")
        ok = isinstance(items, list) and all(
            isinstance(i, dict) and isinstance(i.get("tfd"), int) and isinstance(i.get("events"), int)
            and isinstance(i.get("data"), int) and 0 <= i["tfd"] < (1 << 31) and 0 <= i["events"] < (1 << 32)
            and 0 <= i["data"] < (1 << 64) for i in items)
        if not ok:
            raise RestoreError("fd %d (epoll): its items are missing or invalid in the image" % entry["fd"])

    @classmethod
    def create(cls, remote, entry, table):
        fd = remote.call(sysno.epoll_create1, O_CLOEXEC, what="epoll_create1 for fd %d" % entry["fd"])
        table.objects.setdefault("epoll", {})[entry["fd"]] = entry
        return fd

    @classmethod
    def rollback(cls, remote, entry, table):
        """The set the process kept: every item it holds now removed, the image's added."""
        n = entry["fd"]
        try:
            with open(procfs.proc(remote.pid, "fdinfo", str(n))) as f:
                info = f.read()
        except OSError as e:
            raise RestoreError("fd %d (epoll): cannot read its items: %s" % (n, e.strerror)) from None
        now = [int(x) for x in re.findall(r"^tfd:\s*(\d+)", info, re.M)]
        remote.many([(sysno.epoll_ctl, (n, EPOLL_CTL_DEL, t, 0)) for t in now],
                    what="fd %d (epoll): removing an item added since" % n, ok_errors=(2, 9))
        table.objects.setdefault("epoll", {})[n] = entry
        cls.finish(remote, entry, table)

    @classmethod
    def finish(cls, remote, entry, table):
        sets = table.objects.get("epoll", {})
        done = table.objects.setdefault("epoll-done", set())
        cls._fill(remote, entry, sets, done, ())

    @classmethod
    def _fill(cls, remote, entry, sets, done, outer):
        n = entry["fd"]
        if n in done:
            return
        if n in outer:
            raise RestoreError("fd %d (epoll): the image nests epoll sets in a loop (%s)"
                               % (n, " -> ".join(str(x) for x in outer + (n,))))
        for item in entry["items"]:
            inner = sets.get(item["tfd"])     # an epoll set made by this restore
            if inner is not None:
                cls._fill(remote, inner, sets, done, outer + (n,))
        items = entry["items"]
        events = {it["tfd"]: it["events"] for it in items}

        def what(nr, args):
            return "fd %d (epoll): epoll_ctl(ADD) of fd %d (events %#x)" % (n, args[2], events[args[2]])
        disabled = [it for it in items if _disabled(it["events"])]
        if disabled:
            cls._disable(remote, n, disabled, what)
        rest = [it for it in items if not _disabled(it["events"])]
        for i in range(0, len(rest), BATCH):
            remote.reset()
            calls = [(sysno.epoll_ctl, (n, EPOLL_CTL_ADD, it["tfd"], remote.put(struct.pack("<IQ", it["events"], it["data"]))))
                     for it in rest[i:i + BATCH]]
            remote.many(calls, what=what)
        done.add(n)

    @classmethod
    def _disable(cls, remote, n, disabled, what):
        """Oneshot items that fired (disabled) come back disabled: EPOLL_CTL_ADD always arms
        EPOLLERR|EPOLLHUP, so each is added, alone in its set, armed for what its file is ready
        for right now, and reported once by an epoll_wait in the restored process, which
        leaves it as the kernel left the original. A file ready for nothing now cannot be made
        to fire: its item stays armed for EPOLLERR|EPOLLHUP only."""
        for i in range(0, len(disabled), BATCH):
            chunk = disabled[i:i + BATCH]
            remote.reset()
            fds = remote.put(b"".join(struct.pack("<ihh", it["tfd"], POLL_ALL, 0) for it in chunk))
            ts = remote.put(bytes(16))
            remote.call(sysno.ppoll, fds, len(chunk), ts, 0, 0, what="fd %d (epoll): ppoll of its disabled items" % n)
            revents = [struct.unpack_from("<h", remote.read(fds + 8 * k + 6, 2))[0] & 0xFFFF for k in range(len(chunk))]
            calls = [(sysno.epoll_ctl, (n, EPOLL_CTL_ADD, it["tfd"],
                                        remote.put(struct.pack("<IQ", it["events"] | (r & POLL_ALL), it["data"]))))
                     for it, r in zip(chunk, revents)]
            remote.many(calls, what=what)
            ready = sum(1 for r in revents if r)
            if ready:
                buf = remote.alloc(12 * len(chunk))
                got = remote.call(sysno.epoll_wait, n, buf, len(chunk), 0,
                                  what="fd %d (epoll): epoll_wait disabling its fired oneshot items" % n)
                if got < ready:     # one stopped being ready in between: it would stay armed
                    raise RestoreError("fd %d (epoll): only %d of its %d fired oneshot items could be disabled "
                                       "again" % (n, got, ready))
