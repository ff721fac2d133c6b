"""signalfd: the set of signals it reads.

A signalfd holds nothing but its mask: what it reads are the pending signals of the process
that reads it, which restore puts back with the rest of the process state. Dump: fdinfo
`sigmask` (hex, bit N-1 for signal N). Restore: signalfd4(-1, mask) in ckpt, handed over.
"""
import ctypes
import os

from ckpt.errors import RestoreError
from ckpt.files.base import O_CLOEXEC, FdKind

SYS_signalfd4 = 289
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _mask(info):
    try:
        return int(info["sigmask"], 16)
    except (KeyError, ValueError):
        return None


class SignalFd(FdKind):
    name = "signalfd"
    restorable = True

    @staticmethod
    def match(f):
        return f.link == "anon_inode:[signalfd]"

    @classmethod
    def refuse(cls, f, entry):
        if _mask(f.info) is None:
            return "its signal mask is not shown in /proc/%d/fdinfo/%d" % (f.pid, f.fd)
        return None

    @classmethod
    def capture(cls, f, entry, ctx):
        entry["sigmask"] = _mask(f.info)

    @classmethod
    def precheck(cls, entry):
        m = entry.get("sigmask")
        if not isinstance(m, int) or not 0 <= m < (1 << 64):
            raise RestoreError("fd %d (signalfd): signal mask %r is not a 64-bit set" % (entry["fd"], m))

    @classmethod
    def create(cls, remote, entry, table):
        mask = ctypes.c_uint64(entry["sigmask"])
        fd = _libc.syscall(ctypes.c_long(SYS_signalfd4), ctypes.c_long(-1), ctypes.byref(mask), ctypes.c_long(8),
                           ctypes.c_long(O_CLOEXEC))
        if fd < 0:
            raise RestoreError("fd %d (signalfd): signalfd4(mask %#x): %s"
                               % (entry["fd"], entry["sigmask"], os.strerror(ctypes.get_errno())))
        return table.adopt(fd, what="signalfd %d" % entry["fd"])
