"""PAGEMAP_SCAN on /proc/PID/pagemap: one native call scans many ranges.

Hot scans (every round and the final one) use the kernel's fast path: category_mask =
return_mask = PAGE_IS_WRITTEN. PAGE_IS_FILE in a mask makes a scan 15-25x slower, so it is
kept to round 0, which runs while the target runs.
"""
import os

from ckpt.kernel.native import PAGE_SIZE, ffi, lib, u64_array

WPALLOWED = lib.PAGE_IS_WPALLOWED
WRITTEN = lib.PAGE_IS_WRITTEN
FILE = lib.PAGE_IS_FILE
PRESENT = lib.PAGE_IS_PRESENT
SWAPPED = lib.PAGE_IS_SWAPPED
WP_MATCHING = lib.PM_SCAN_WP_MATCHING
CHECK_WPASYNC = lib.PM_SCAN_CHECK_WPASYNC

_VEC_CAP = 1 << 16


class ScanError(OSError):
    """A scan failed on one range (EPERM with CHECK_WPASYNC: a mapping there is not registered)."""

    def __init__(self, err, range_index, addr, partial=()):
        super().__init__(err, "PAGEMAP_SCAN: %s at %#x" % (os.strerror(err), addr))
        self.range_index = range_index
        self.addr = addr
        # regions found in the ranges before the failing one: with WP_MATCHING they are
        # re-armed already, so the caller must not drop them
        self.partial = list(partial)


class Pagemap:
    def __init__(self, pid):
        self.pid = pid
        self.fd = os.open("/proc/%d/pagemap" % pid, os.O_RDONLY | os.O_CLOEXEC)
        self._vec = ffi.new("uint64_t[]", 3 * _VEC_CAP)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def scan(self, ranges, flags=0, mask=0, anyof=0, inverted=0, ret_mask=0, vec=True):
        """Scan (start, end) ranges; return the matching regions as (start, end, categories).

        With vec=False nothing is returned (used as the bulk protect with WP_MATCHING).
        On failure, ScanError.partial holds what the ranges before the failing one gave.
        """
        if not ranges:
            return []
        flat = u64_array(x for r in ranges for x in r)
        nxt_r = ffi.new("int *", 0)
        nxt_a = ffi.new("uint64_t *", 0)
        out = []
        buf = self._vec if vec else ffi.NULL
        cap = _VEC_CAP if vec else 0
        while nxt_r[0] < len(ranges):
            n = lib.ck_scan(self.fd, flat, len(ranges), flags, inverted, mask, anyof, ret_mask,
                            buf, cap, nxt_r, nxt_a)
            if n < 0:
                raise ScanError(-n, nxt_r[0], nxt_a[0], out)
            if vec:
                v = ffi.unpack(self._vec, 3 * n)
                out.extend(zip(v[0::3], v[1::3], v[2::3]))
        return out


def regions_to_runs(regions):
    """(start, end, cat) regions to (addr, length) runs."""
    return [(s, e - s) for s, e, _ in regions]


def count_pages(runs):
    return sum(length for _, length in runs) // PAGE_SIZE
