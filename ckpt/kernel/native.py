"""The cffi-built C core, and the one helper that turns its -errno returns into OSError."""
import errno
import os

from ckpt._native import ffi, lib  # noqa: F401  (re-exported)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _tune_malloc():
    """ckpt handles buffers of megabytes (page batches, lz4 frames). glibc serves those with a
    fresh mmap each time, and faulting in fresh memory dominated: decompression ran at 0.7 GB/s
    instead of 11-16 GB/s. Keep such buffers on the heap, where they are reused."""
    import ctypes
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 64 << 20)    # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


_tune_malloc()


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
