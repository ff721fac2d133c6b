"""The cffi-built C core, and the one helper that turns its -errno returns into OSError."""
import errno
import os

from ckpt._native import ffi, lib  # noqa: F401  (re-exported)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def check(ret, what):
    """Raise OSError for a negative (-errno) return of a native call, else return it."""
    if ret < 0:
        err = -ret
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return ret


def u64_array(values):
    """A C uint64_t[] holding the given flat sequence of integers."""
    return ffi.new("uint64_t[]", list(values) or [0])


def runs_array(runs):
    """(addr, length) pairs as the flat uint64_t[] the batch calls take."""
    flat = []
    for addr, length in runs:
        flat.append(addr)
        flat.append(length)
    return u64_array(flat)


ESRCH = errno.ESRCH
EPERM = errno.EPERM
