"""Acting with the restored process's rights instead of root's.

Restore runs as root, but every path it opens and every object it makes on behalf of an image
must be opened or made with the rights the dumped process had, never more (issue 7, README
"What restore trusts"). Linux credentials are per thread: the raw setresuid/setresgid/
setgroups/setfsuid/capset system calls (not the libc wrappers, which change every thread of
the process) switch only the calling thread. `acting_as(creds)` switches ckpt's calling
thread to the process's groups, effective and file ids and effective capabilities, and back
to root's afterwards. The saved uid stays 0 meanwhile, so going back needs no privilege the
thread lost.
"""
import contextlib
import ctypes
import os
import struct
import threading

from ckpt.errors import RestoreError

SYS_setgroups, SYS_setresuid, SYS_setresgid = 116, 117, 119
SYS_setfsuid, SYS_setfsgid, SYS_capget, SYS_capset = 122, 123, 125, 126
CAP_VERSION_3 = 0x20080522
CAP_SETUID, CAP_SETGID, CAP_NET_ADMIN, CAP_NET_RAW = 7, 6, 12, 13
CAP_SYS_ADMIN = 21
PR_SET_DUMPABLE = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_lock = threading.RLock()


def _sys(nr, *args, what):
    r = _libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    if r < 0:
        e = ctypes.get_errno()
        raise RestoreError("%s: %s" % (what, os.strerror(e)))
    return r


def _capget():
    hdr = ctypes.create_string_buffer(struct.pack("<Ii", CAP_VERSION_3, 0), 8)
    data = ctypes.create_string_buffer(24)
    _sys(SYS_capget, ctypes.addressof(hdr), ctypes.addressof(data), what="capget")
    e0, p0, i0, e1, p1, i1 = struct.unpack("<6I", data.raw)
    return e0 | e1 << 32, p0 | p1 << 32, i0 | i1 << 32


def _capset(eff, prm, inh):
    hdr = ctypes.create_string_buffer(struct.pack("<Ii", CAP_VERSION_3, 0), 8)
    data = ctypes.create_string_buffer(struct.pack("<6I", eff & 0xFFFFFFFF, prm & 0xFFFFFFFF, inh & 0xFFFFFFFF,
                                                   eff >> 32, prm >> 32, inh >> 32), 24)
    _sys(SYS_capset, ctypes.addressof(hdr), ctypes.addressof(data), what="capset")


def _setgroups(groups):
    arr = (ctypes.c_uint * max(1, len(groups)))(*groups)
    _sys(SYS_setgroups, len(groups), ctypes.addressof(arr), what="setgroups")


def _setfs(nr, value):
    """setfsuid/setfsgid return the previous id, never an error: ask again to know."""
    _libc.syscall(nr, ctypes.c_long(value))
    now = _libc.syscall(nr, ctypes.c_long(-1))
    if now != value:
        raise RestoreError("%s(%d) refused (still %d)" % ("setfsuid" if nr == SYS_setfsuid else "setfsgid", value, now))


def cap_bits(creds, name):
    v = creds.get(name)
    return int(v, 16) if isinstance(v, str) and v else 0


@contextlib.contextmanager
def acting_as(creds, extra_caps=()):
    """Run the body with the file and effective credentials of `creds` (an image's "creds"
    record: uid/gid lists [real, effective, saved, fs], groups, cap_eff ...) in this thread.
    extra_caps: capability numbers kept on top of the process's own (e.g. CAP_NET_ADMIN for
    TCP repair, which the process itself never needs again once its socket is rebuilt).
    When ckpt is not root, nothing is switched: it cannot grant more than it has anyway."""
    if os.geteuid() != 0:
        yield
        return
    with _lock:
        eff0, prm0, inh0 = _capget()
        groups0 = os.getgroups()
        uid, gid = creds["uid"], creds["gid"]
        want = (cap_bits(creds, "cap_eff") | sum(1 << c for c in extra_caps)) & prm0
        switched = False
        try:
            _setgroups(list(creds.get("groups") or []))
            switched = True
            _sys(SYS_setresgid, -1, gid[1], -1, what="setresgid")
            _setfs(SYS_setfsgid, gid[3])
            # the effective uid leaving 0 clears the effective capabilities; CAP_SETUID is
            # taken back (it stays permitted: the saved uid is still 0) only to set the fsuid
            _sys(SYS_setresuid, -1, uid[1], -1, what="setresuid")
            _capset(1 << CAP_SETUID, prm0, inh0)
            _setfs(SYS_setfsuid, uid[3])
            _capset(want, prm0, inh0)
        except BaseException:
            _back(eff0, prm0, inh0, groups0)
            raise
        try:
            yield
        finally:
            if switched:
                _back(eff0, prm0, inh0, groups0)


CAP_SYS_PTRACE = 19


@contextlib.contextmanager
def raised(cap):
    """Within acting_as: one of ckpt's own capabilities raised for the body only (e.g.
    CAP_SYS_PTRACE to take an fd of a restored process with pidfd_getfd, which the kernel
    checks against the caller's effective capabilities)."""
    if os.geteuid() == 0 and os.getuid() == 0:
        yield       # not acting as anyone
        return
    eff, prm, inh = _capget()
    if not prm & (1 << cap) or eff & (1 << cap):
        yield
        return
    _capset(eff | (1 << cap), prm, inh)
    try:
        yield
    finally:
        _capset(eff, prm, inh)


def _back(eff0, prm0, inh0, groups0):
    _capset(prm0, prm0, inh0)
    _sys(SYS_setresuid, -1, 0, -1, what="setresuid back to root")
    _setfs(SYS_setfsuid, 0)
    _sys(SYS_setresgid, -1, 0, -1, what="setresgid back to root")
    _setfs(SYS_setfsgid, 0)
    _setgroups(groups0)
    _capset(eff0, prm0, inh0)
    # a change of effective or file ids made ckpt non-dumpable; it was dumpable before
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)


__all__ = ["acting_as", "raised", "cap_bits", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE"]
