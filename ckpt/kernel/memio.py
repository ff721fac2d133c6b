"""Bulk reads and writes of another process's memory: process_vm_readv/writev in batches of
iovecs, with /proc/PID/mem for what those refuse (PROT_NONE, read-only pages)."""
import os

from ckpt.kernel.native import PAGE_SIZE, check, ffi, lib, runs_array


class MemIO:
    def __init__(self, pid, write=False):
        self.pid = pid
        self.mem_fd = os.open("/proc/%d/mem" % pid, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)

    def close(self):
        if self.mem_fd >= 0:
            os.close(self.mem_fd)
            self.mem_fd = -1

    def read_runs(self, runs, buf, unpinned=False):
        """Read (addr, length) runs into buf back to back. Returns per-run errno (0 = read).

        A run that fails (a page beyond the end of a mapped file, a mapping gone) reports its
        errno; the caller decides what that page is. unpinned: through /proc/PID/mem alone, which
        leaves copy-on-write sharing as it is (process_vm_readv pins the pages, and a pinned page
        shared with another process is unshared: the process gets its own copy); for big runs
        of pages that may be shared, where one read per run costs nothing.
        """
        status = ffi.new("int32_t[]", max(1, len(runs)))
        if unpinned:
            r = lib.ck_read_runs_unpinned(self.mem_fd, runs_array(runs), len(runs), ffi.from_buffer(buf), status)
        else:
            r = lib.ck_read_runs(self.pid, self.mem_fd, runs_array(runs), len(runs), ffi.from_buffer(buf), status)
        check(r, "reading memory of %d" % self.pid)
        return list(ffi.unpack(status, len(runs)))

    def write_runs(self, runs, buf, prepared=None):
        """Write buf's bytes to (addr, length) runs back to back. Returns per-run errno.
        prepared: runs_array(runs), made beforehand (it costs microseconds a run)."""
        status = ffi.new("int32_t[]", max(1, len(runs)))
        arr = prepared if prepared is not None else runs_array(runs)
        check(lib.ck_write_runs(self.pid, self.mem_fd, arr, len(runs),
                                ffi.from_buffer(buf), status), "writing memory of %d" % self.pid)
        return list(ffi.unpack(status, len(runs)))


def zero_pages(buf, npages):
    """Per page of buf: 1 if all zero."""
    flags = ffi.new("uint8_t[]", max(1, npages))
    lib.ck_zero_pages(ffi.from_buffer(buf), npages, PAGE_SIZE, flags)
    return bytes(ffi.buffer(flags, npages))


def first_diff_page(a, b, npages):
    return lib.ck_first_diff_page(ffi.from_buffer(a), ffi.from_buffer(b), npages, PAGE_SIZE)
