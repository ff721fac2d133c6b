"""Verification while frozen: read all memory again and compare it with the image.

For every page the process can see, the image (assembled: later records supersede earlier
ones) or the page's source (zero for anonymous memory, the file for unmodified private file
pages) must hold exactly what the page holds now.
"""
import bisect
import os

from ckpt.dump.copy import merge_ranges, shmem_runs
from ckpt.errors import VerifyError
from ckpt.kernel import pagemap, procfs
from ckpt.kernel.memio import MemIO, first_diff_page
from ckpt.kernel.native import PAGE_SIZE

CHUNK = 8 << 20


class _Expected:
    """What restore would put at an address: image pages, else the mapping's source."""

    def __init__(self, pid, reader, space=None):
        self.pid = pid
        self.reader = reader
        self.extents = reader.extents(pid if space is None else space)
        self.shift = 0
        self.starts = [x[0] for x in self.extents]

    def image_runs(self, start, end):
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        out = []
        while i < len(self.extents) and self.extents[i][0] < end:
            s, e = self.extents[i][:2]
            if e > start:
                out.append((max(s, start), min(e, end)))
            i += 1
        return out

    def fill(self, vma, start, end, out, file_fd):
        """Fill out[0:end-start] with the expected content."""
        n = end - start
        # source first
        if vma.kind == "file-private" and file_fd is not None:
            data = os.pread(file_fd, n, vma.offset + (start - vma.start))
            out[:len(data)] = data
            out[len(data):n] = bytes(n - len(data))
        else:
            out[:n] = bytes(n)
        # then the image over it (shared memory: its object's pages, by offset)
        d = self.shift
        for s, e in self.image_runs(start + d, end + d):
            for a, chunk in self._image_bytes(s, e):
                out[a - d - start:a - d - start + len(chunk)] = chunk

    def _image_bytes(self, start, end):
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        while i < len(self.extents) and self.extents[i][0] < end:
            x = self.extents[i]
            lo, hi = max(x[0], start), min(x[1], end)
            if lo < hi:
                data = self.reader.extent_bytes(x, lo, hi)
                yield lo, bytes(hi - lo) if data is None else data
            i += 1


class _Inherited(_Expected):
    """A child's expected content where it shares pages with its parent (copy-on-write, see
    ckpt/dump/tree.cow_ranges): the parent's, as restore gives them to it."""

    def __init__(self, pid, reader, parent, ranges):
        super().__init__(pid, reader)
        self.parent = _Expected(parent, reader)
        self.ranges = merge_ranges(ranges)
        self.rstarts = [r[0] for r in self.ranges]

    def fill(self, vma, start, end, out, file_fd):
        super().fill(vma, start, end, out, file_fd)
        i = max(0, bisect.bisect_right(self.rstarts, start) - 1)
        while i < len(self.ranges) and self.ranges[i][0] < end:
            lo, hi = max(self.ranges[i][0], start), min(self.ranges[i][1], end)
            if lo < hi:
                part = bytearray(hi - lo)
                self.parent.fill(vma, lo, hi, part, file_fd)
                out[lo - start:hi - start] = part
            i += 1

    def image_runs(self, start, end):
        return [tuple(r) for r in merge_ranges(super().image_runs(start, end) + self.parent.image_runs(start, end))]


def verify_frozen(pid, maps, reader, shm=None, inherit=None):
    """Compare every page of the frozen process with the image. Returns pages compared.
    shm: {(dev, inode): space} of the shared memory objects the image holds apart (a tree's
    image: tree.SharedMemory). inherit: (parent PID, ranges) where the process's pages are its
    parent's (copy-on-write)."""
    own = _Inherited(pid, reader, *inherit) if inherit else _Expected(pid, reader)
    shared = {}
    pm = pagemap.Pagemap(pid)
    mem = MemIO(pid)
    actual = bytearray(CHUNK)
    expected = bytearray(CHUNK)
    compared = 0
    try:
        for vma in maps:
            if vma.kind in ("special", "file-shared"):
                continue
            exp = own
            if vma.kind == "shmem" and shm and (vma.dev, vma.inode) in shm:
                space = shm[(vma.dev, vma.inode)]
                if space not in shared:
                    shared[space] = _Expected(pid, reader, space)
                exp = shared[space]
                exp.shift = vma.offset - vma.start
            if vma.kind in ("anon", "file-private"):
                present = [(s, e) for s, e, _ in pm.scan([(vma.start, vma.end)],
                                                         anyof=pagemap.PRESENT | pagemap.SWAPPED,
                                                         ret_mask=pagemap.PRESENT)]
                runs = merge_ranges(present + exp.image_runs(vma.start, vma.end))
            else:
                # shared memory: the pages holding data and what the image holds; the holes
                # read as zero, as restore leaves them, and reading them would allocate them
                data = shmem_runs(pid, vma) if vma.kind == "shmem" else None
                if data is None:
                    runs = [[vma.start, vma.end]]
                else:
                    d = exp.shift
                    held = [(s - d, e - d) for s, e in exp.image_runs(vma.start + d, vma.end + d)]
                    runs = merge_ranges([(a, a + n) for a, n in data] + held)
            file_fd = None
            if vma.kind == "file-private":
                try:
                    file_fd = os.open(procfs.proc(pid, "map_files", "%x-%x" % (vma.start, vma.end)), os.O_RDONLY)
                except OSError:
                    file_fd = os.open(vma.path, os.O_RDONLY)
            try:
                for s, e in runs:
                    for a in range(s, e, CHUNK):
                        b = min(e, a + CHUNK)
                        n = b - a
                        if mem.read_runs([(a, n)], actual, unpinned=True)[0]:
                            # part of the run is not accessible (past the end of a file): page by page
                            for p in range(a, b, PAGE_SIZE):
                                pa = bytearray(PAGE_SIZE)
                                if mem.read_runs([(p, PAGE_SIZE)], pa, unpinned=True)[0]:
                                    continue
                                pe = bytearray(PAGE_SIZE)
                                exp.fill(vma, p, p + PAGE_SIZE, pe, file_fd)
                                if pa != pe:
                                    _fail(pid, vma, p)
                                compared += 1
                            continue
                        exp.fill(vma, a, b, expected, file_fd)
                        i = first_diff_page(memoryview(actual)[:n], memoryview(expected)[:n], n // PAGE_SIZE)
                        if i >= 0:
                            _fail(pid, vma, a + i * PAGE_SIZE)
                        compared += n // PAGE_SIZE
            finally:
                if file_fd is not None:
                    os.close(file_fd)
    finally:
        pm.close()
        mem.close()
    return compared


def _fail(pid, vma, addr):
    raise VerifyError("verification failed: page %#x of process %d (%s mapping %#x-%#x %s) differs from the image"
                      % (addr, pid, vma.kind, vma.start, vma.end, vma.path or "[anon]"))
