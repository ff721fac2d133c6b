"""The copier: reads runs of target pages in large batches and hands them to the image as page
records (all-zero pages become ZERO records with no payload)."""
import errno

from ckpt.errors import TargetGone
from ckpt.kernel import pagemap
from ckpt.kernel.memio import MemIO, zero_pages
from ckpt.kernel.native import PAGE_SIZE

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


def content_runs(pm, vmas):
    """The runs of a full copy of these mappings: the pages whose content is not already known
    from elsewhere (absent anonymous pages read as zero, unmodified private file pages are the
    file's own, shared file mappings are the file's)."""
    anon, cow, whole = [], [], []
    for v in vmas:
        k = v.kind
        if k == "anon":
            anon.append((v.start, v.end))
        elif k == "file-private" and not v.deleted:
            cow.append((v.start, v.end))
        elif k == "shmem" or (k == "file-private" and v.deleted):
            whole.append((v.start, v.size))
    runs = []
    if anon:
        runs += [(s, e - s) for s, e, _ in pm.scan(anon, anyof=pagemap.PRESENT | pagemap.SWAPPED,
                                                   ret_mask=pagemap.PRESENT)]
    if cow:
        runs += [(s, e - s) for s, e, _ in pm.scan(cow, inverted=pagemap.FILE, mask=pagemap.FILE,
                                                   anyof=pagemap.PRESENT | pagemap.SWAPPED,
                                                   ret_mask=pagemap.PRESENT)]
    return runs + whole


class Copier:
    def __init__(self, pid, writer):
        self.pid = pid
        self.writer = writer
        self.mem = MemIO(pid)
        self.buf = bytearray(CHUNK)
        self.view = memoryview(self.buf)
        self.unreadable_pages = 0

    def close(self):
        self.mem.close()

    def copy(self, runs, sink=None, check=None):
        """Copy the runs; pages go to the image, or to `sink` (a list) to be written later by
        write_sink(). Returns the number of pages copied. `check` is called between batches."""
        pages = 0
        for batch in split_runs(runs):
            if check:
                check()
            try:
                status = self.mem.read_runs(batch, self.buf)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    raise TargetGone("process %d exited during the dump" % self.pid) from None
                raise
            total = sum(length for _, length in batch)
            if sink is not None:
                # frozen: one copy of the batch now, split into records after the release
                sink.append((batch, status, bytes(self.view[:total])))
                for (addr, length), err in zip(batch, status):
                    if err:
                        pages += self._copy_pagewise(addr, length, sink)
                    else:
                        pages += length // PAGE_SIZE
                continue
            off = 0
            for (addr, length), err in zip(batch, status):
                if err:
                    pages += self._copy_pagewise(addr, length, sink)
                else:
                    emit_pages(self.writer, addr, self.view[off:off + length])
                    pages += length // PAGE_SIZE
                off += length
        return pages

    def _copy_pagewise(self, addr, length, sink):
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
            else:
                emit_pages(self.writer, a, memoryview(page))
            n += 1
        return n

    def write_sink(self, sink):
        for batch, status, data in sink:
            view = memoryview(data)
            off = 0
            for (addr, length), err in zip(batch, status):
                if not err:
                    emit_pages(self.writer, addr, view[off:off + length])
                off += length


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
