"""The copier: reads runs of target pages in large batches and hands them to the image as page
records (all-zero pages become ZERO records with no payload)."""
import bisect
import errno
import os

from ckpt.errors import TargetGone
from ckpt.kernel import pagemap
from ckpt.kernel.memio import MemIO, zero_pages
from ckpt.kernel.native import PAGE_SIZE, ffi, lib

CHUNK = 8 << 20


def split_runs(runs, limit=CHUNK):
    """Group (addr, length) runs into batches of at most `limit` bytes, splitting long runs."""
    batch, size = [], 0
    for addr, length in runs:
        while length:
            take = min(length, limit - size)
            batch.append((addr, take))
            size += take
            addr += take
            length -= take
            if size == limit:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


_RANGES_CAP = 1 << 14


def shmem_runs(pid, v):
    """The (addr, length) runs of a shared memory mapping that hold data: the data ranges of
    its shmem file within the mapping (lseek SEEK_DATA / SEEK_HOLE on the file, opened through
    /proc/PID/map_files). Its holes read as zero and are left out: reading them through the
    mapping would allocate every page of a sparse region. None when the file cannot be asked
    (ckpt not privileged, or a file system that does not tell): then all of it is copied."""
    try:
        fd = os.open("/proc/%d/map_files/%x-%x" % (pid, v.start, v.end), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        lo, hi = v.offset, v.offset + v.size
        out = ffi.new("uint64_t[]", 2 * _RANGES_CAP)
        nxt = ffi.new("uint64_t *", lo)
        runs = []
        while nxt[0] < hi:
            n = lib.ck_data_ranges(fd, nxt[0], hi, out, _RANGES_CAP, nxt)
            if n < 0:
                return None
            flat = ffi.unpack(out, 2 * n)
            for d, h in zip(flat[0::2], flat[1::2]):
                d -= d % PAGE_SIZE
                h = min(hi, h + (-h) % PAGE_SIZE)
                a = v.start + d - lo
                if runs and runs[-1][0] + runs[-1][1] >= a:
                    runs[-1] = (runs[-1][0], v.start + h - lo - runs[-1][0])
                else:
                    runs.append((a, h - d))
            if n < _RANGES_CAP:
                break
        return runs
    finally:
        os.close(fd)


def content_runs(pm, vmas, pid=None):
    """The runs of a full copy of these mappings: the pages whose content is not already known
    from elsewhere (absent anonymous pages read as zero, unmodified private file pages are the
    file's own, shared file mappings are the file's, holes of shared memory are zero). Shared
    memory is asked for its data ranges when `pid` is given (see shmem_runs)."""
    anon, cow, whole = [], [], []
    for v in vmas:
        k = v.kind
        if k == "anon":
            anon.append((v.start, v.end))
        elif k == "file-private":
            # (a deleted file too: the image holds the file itself, ckpt/state/deleted.py)
            cow.append((v.start, v.end))
        elif k == "shmem":
            data = shmem_runs(pid, v) if (k == "shmem" and pid is not None) else None
            whole += [(v.start, v.size)] if data is None else data
    runs = []
    if anon:
        runs += [(s, e - s) for s, e, _ in pm.scan(anon, anyof=pagemap.PRESENT | pagemap.SWAPPED,
                                                   ret_mask=pagemap.PRESENT)]
    if cow:
        runs += [(s, e - s) for s, e, _ in pm.scan(cow, inverted=pagemap.FILE, mask=pagemap.FILE,
                                                   anyof=pagemap.PRESENT | pagemap.SWAPPED,
                                                   ret_mask=pagemap.PRESENT)]
    return runs + whole


def merge_ranges(ranges):
    """(start, end) ranges merged where they touch or overlap: sorted [start, end] lists."""
    out = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return out


class Copier:
    def __init__(self, pid, writer):
        self.pid = pid
        self.writer = writer
        self.mem = MemIO(pid)
        self.buf = bytearray(CHUNK)
        self.view = memoryview(self.buf)
        self.unreadable_pages = 0
        self.spare = []          # touched buffers for the frozen phase (prepare_sink)
        self._held = []          # merged [start, end) of the pages written so far
        self._held_upto = 0      # how much of the writer's page_ranges _held accounts for

    def held(self):
        """The address ranges the image holds pages for, in any kind of record (PAGES, ZERO,
        SCATTER), merged and sorted."""
        ranges = self.writer.spaces.get(self.pid, [])
        if self._held_upto < len(ranges):
            new = ranges[self._held_upto:]
            self._held_upto = len(ranges)
            self._held = merge_ranges([tuple(r) for r in self._held] + new)
        return self._held

    def seed(self, ranges):
        """Ranges held already before this image's own records: an incremental image's parents
        hold pages there (their absent pages must be recorded too, see stale())."""
        self.held()
        self._held = merge_ranges([tuple(r) for r in self._held] + [tuple(r) for r in ranges])

    def stale(self, vmas, runs):
        """Mappings copied whole as `runs` (their present pages) may lie where the image already
        holds pages of an earlier mapping at the same addresses (unmapped, moved away or
        replaced since). Their absent pages are left out of `runs`, so those records would
        stand for them at restore. Returns (zero, reread): the anonymous parts of that overlap,
        to record as zero pages, and the private file parts, to copy again (their content is
        the file's)."""
        if not vmas:
            return [], []
        held = self.held()
        if not held:
            return [], []
        starts = [h[0] for h in held]
        copied = merge_ranges((a, a + n) for a, n in runs)
        cstarts = [c[0] for c in copied]
        zero, reread = [], []
        for v in vmas:
            if v.kind not in ("anon", "file-private"):
                continue    # copied whole, every page
            out = zero if v.kind == "anon" else reread
            i = max(0, bisect.bisect_right(starts, v.start) - 1)
            while i < len(held) and held[i][0] < v.end:
                lo, hi = max(held[i][0], v.start), min(held[i][1], v.end)
                # [lo, hi) is held by the image: subtract what this copy covers
                j = max(0, bisect.bisect_right(cstarts, lo) - 1)
                pos = lo
                while pos < hi:
                    while j < len(copied) and copied[j][1] <= pos:
                        j += 1
                    if j < len(copied) and copied[j][0] <= pos:
                        pos = min(copied[j][1], hi)
                        continue
                    nxt = min(copied[j][0], hi) if j < len(copied) else hi
                    if nxt > pos:
                        out.append((pos, nxt - pos))
                    pos = nxt
                i += 1
        return zero, reread

    def zero(self, runs):
        """Record runs as zero pages (no payload)."""
        self.writer.set_space(self.pid)
        for addr, length in runs:
            self.writer.add_zero(addr, length // PAGE_SIZE)
        return sum(length for _, length in runs) // PAGE_SIZE

    def close(self):
        self.mem.close()

    def prepare_sink(self, nbytes, limit=256 << 20):
        """Buffers for the frozen phase's copy, allocated and touched while the target still
        runs: faulting in fresh memory costs microseconds per page here, and would otherwise
        land inside the freeze window."""
        want = min(limit, max(nbytes, CHUNK)) // CHUNK + 1
        while len(self.spare) < want:
            b = bytearray(CHUNK)
            for i in range(0, CHUNK, PAGE_SIZE):
                b[i] = 1
            self.spare.append(b)

    def copy(self, runs, sink=None, check=None, scatter=False, space=None, shift=0):
        """Copy the runs. Pages go to the image: as page records with zero runs apart (the bulk
        of round 0), or with scatter=True as one SCATTER record per batch (the written pages of
        later rounds, scattered and many). With a `sink` (a list) they are kept in memory, to be
        written by write_sink() once the target runs again, as far as the buffers made by
        prepare_sink() hold them; the rest is written at once. Returns the number of pages copied;
        `check` is called between batches. space, shift: the pages go to another address space
        of the image (a shared memory object's), at their address + shift (no sink then)."""
        pages = 0
        self.writer.set_space(self.pid if space is None else space)
        if space is not None:
            sink = None
        for batch in split_runs(runs):
            if check:
                check()
            buf = self.buf
            # kept in memory only as far as the buffers prepared beforehand go (prepare_sink):
            # past that the copy streams into the image, never buffering it all
            to_sink = sink if (sink is not None and self.spare) else None
            if to_sink is not None:
                buf = self.spare.pop()
            try:
                # the streamed runs of a full copy through /proc/PID/mem: they may be pages the
                # process shares copy-on-write, which a pinning read would unshare (MemIO)
                status = self.mem.read_runs(batch, buf, unpinned=not scatter)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    raise TargetGone("process %d exited during the dump" % self.pid) from None
                raise
            if to_sink is not None:
                to_sink.append((batch, status, buf))
            view = memoryview(buf)
            off = 0
            ok, parts = [], []
            for (addr, length), err in zip(batch, status):
                if err:
                    pages += self._copy_pagewise(addr, length, to_sink, shift)
                else:
                    if to_sink is None and not scatter:
                        emit_pages(self.writer, addr + shift, view[off:off + length])
                    ok.append((addr + shift, length))
                    parts.append(view[off:off + length])
                    pages += length // PAGE_SIZE
                off += length
            if to_sink is None and scatter and ok:
                self.writer.add_scatter(ok, view[:off] if len(ok) == len(batch) else b"".join(parts))
        return pages

    def _copy_pagewise(self, addr, length, sink, shift=0):
        """A run failed as a whole: copy what can be read page by page (pages past the end of a
        mapped file cannot be accessed by the process either, and are left out)."""
        n = 0
        page = bytearray(PAGE_SIZE)
        for a in range(addr, addr + length, PAGE_SIZE):
            if self.mem.read_runs([(a, PAGE_SIZE)], page)[0]:
                self.unreadable_pages += 1
                continue
            if sink is not None:
                sink.append(([(a, PAGE_SIZE)], [0], bytes(page)))
                page = bytearray(PAGE_SIZE)
            else:
                emit_pages(self.writer, a + shift, memoryview(page))
            n += 1
        return n

    def write_sink(self, sink):
        """Write what the frozen phase copied, one SCATTER record per batch."""
        self.writer.set_space(self.pid)
        for batch, status, data in sink:
            view = memoryview(data)
            off = 0
            ok, parts = [], []
            for (addr, length), err in zip(batch, status):
                if not err:
                    ok.append((addr, length))
                    parts.append(view[off:off + length])
                off += length
            if ok:
                self.writer.add_scatter(ok, view[:off] if len(ok) == len(batch) else b"".join(parts))


def emit_pages(writer, addr, data):
    """Write pages as PAGES records, with runs of zero pages as ZERO records."""
    n = len(data) // PAGE_SIZE
    zeros = zero_pages(data, n)
    i = 0
    while i < n:
        j = i
        z = zeros[i]
        while j < n and zeros[j] == z:
            j += 1
        a = addr + i * PAGE_SIZE
        if z:
            writer.add_zero(a, j - i)
        else:
            writer.add_pages(a, data[i * PAGE_SIZE:j * PAGE_SIZE])
        i = j
