"""Reads and checks an image. Every refusal says what is wrong with the file."""
import heapq
from collections import OrderedDict
import json
import os
import platform
import zlib

import lz4.frame

from ckpt.errors import ImageError
from ckpt.image import format as fmt


class Record:
    __slots__ = ("seq", "offset", "addr", "npages", "rtype", "comp", "pad", "length", "pcrc")

    @property
    def payload_offset(self):
        return self.offset + fmt.REC_SIZE + self.pad

    @property
    def type_name(self):
        return fmt.TYPE_NAMES.get(self.rtype, "type%d" % self.rtype)


class ImageReader:
    def __init__(self, path):
        self.path = path
        try:
            self.f = open(path, "rb")
        except FileNotFoundError:
            raise ImageError("%s: no such file" % path) from None
        except IsADirectoryError:
            raise ImageError("%s: is a directory, not an image" % path) from None
        self.size = os.fstat(self.f.fileno()).st_size
        self._read_header()
        self._read_footer()
        self._metas = None
        self._extents = None

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- structure ---------------------------------------------------------------
    def _pread(self, off, n):
        self.f.seek(off)
        data = self.f.read(n)
        if len(data) != n:
            raise ImageError("%s: truncated: wanted %d bytes at offset %d, file is %d bytes"
                             % (self.path, n, off, self.size))
        return data

    def _read_header(self):
        if self.size < fmt.HEADER_FIXED.size:
            raise ImageError("%s: not a ckpt image (file is only %d bytes)" % (self.path, self.size))
        magic, version, hlen = fmt.HEADER_FIXED.unpack(self._pread(0, fmt.HEADER_FIXED.size))
        if magic != fmt.MAGIC:
            raise ImageError("%s: not a ckpt image (bad magic)" % self.path)
        if version != fmt.VERSION:
            raise ImageError("%s: image format version %d is not supported (this ckpt reads version %d)"
                             % (self.path, version, fmt.VERSION))
        if hlen > 1 << 20:
            raise ImageError("%s: corrupt header (length %d)" % (self.path, hlen))
        end = fmt.HEADER_FIXED.size + hlen
        head = self._pread(0, end)
        (crc,) = fmt.REC_CRC.unpack(self._pread(end, 4))
        if zlib.crc32(head) != crc:
            raise ImageError("%s: corrupt header (checksum mismatch)" % self.path)
        try:
            self.header = json.loads(head[fmt.HEADER_FIXED.size:])
        except ValueError:
            raise ImageError("%s: corrupt header (not JSON)" % self.path) from None
        self.header_bytes = head + fmt.REC_CRC.pack(crc)
        self.records_start = end + 4
        self.page_size = self.header.get("page_size", 4096)

    def _read_footer(self):
        if self.size < self.records_start + fmt.FOOTER.size:
            raise ImageError("%s: truncated: no trailer (the dump did not finish or the file was cut)" % self.path)
        magic, trailer_off, chain, self.footer_reserved = fmt.FOOTER.unpack(
            self._pread(self.size - fmt.FOOTER.size, fmt.FOOTER.size))
        if magic != fmt.END_MAGIC:
            raise ImageError("%s: truncated: no trailer (the dump did not finish or the file was cut)" % self.path)
        if not self.records_start <= trailer_off < self.size - fmt.FOOTER.size:
            raise ImageError("%s: corrupt trailer offset %d" % (self.path, trailer_off))
        self.chain = chain
        trailer = self._record_at(trailer_off)
        if trailer.rtype != fmt.TRAILER:
            raise ImageError("%s: corrupt: no trailer record at offset %d" % (self.path, trailer_off))
        payload = self._payload_raw(trailer)
        n = len(payload) // fmt.INDEX_ENTRY.size
        self.records = []
        for i in range(n):
            off, addr, npages, rtype, comp, _ = fmt.INDEX_ENTRY.unpack_from(payload, i * fmt.INDEX_ENTRY.size)
            self.records.append((off, addr, npages, rtype, comp))
        self.trailer = trailer

    def _record_at(self, off, seq=-1):
        raw = self._pread(off, fmt.REC_SIZE)
        (hcrc,) = fmt.REC_CRC.unpack(raw[fmt.REC.size:])
        if zlib.crc32(raw[:fmt.REC.size]) != hcrc:
            raise ImageError("%s: corrupt record header at offset %d (checksum mismatch)" % (self.path, off))
        r = Record()
        r.rtype, r.comp, r.pad, r.npages, r.addr, r.length, r.pcrc = fmt.REC.unpack(raw[:fmt.REC.size])
        r.offset, r.seq = off, seq
        if r.payload_offset + r.length > self.size:
            raise ImageError("%s: truncated: record at offset %d runs past the end of the file" % (self.path, off))
        return r

    def _payload_raw(self, rec, check=True):
        data = self._pread(rec.payload_offset, rec.length)
        if check and rec.length and zlib.crc32(data) != rec.pcrc:
            raise ImageError("%s: corrupt %s record at offset %d (payload checksum mismatch)"
                             % (self.path, rec.type_name, rec.offset))
        return data

    def payload(self, rec, check=True):
        """The record's content, decompressed (for SCATTER: its page data, without the run
        table). check=False skips the crc (already verified)."""
        data = self._payload_raw(rec, check)
        if rec.rtype == fmt.SCATTER:
            data = data[self._scatter_table_len(data, rec):]
        if rec.comp == fmt.LZ4:
            try:
                data = lz4.frame.decompress(data)
            except RuntimeError as e:
                raise ImageError("%s: corrupt compressed record at offset %d (%s)" % (self.path, rec.offset, e)) from None
        elif rec.comp != fmt.NONE:
            raise ImageError("%s: unknown compression %d in record at offset %d" % (self.path, rec.comp, rec.offset))
        return data

    def payload_of(self, seq, check=True):
        """Decompressed payload of record seq, through an LRU cache of about 64 MiB: the extents
        of early rounds interleave with small later records, so a big record is needed again
        and again while sweeping the address space."""
        cache = self.__dict__.setdefault("_cache", OrderedDict())
        data = cache.get(seq)
        if data is not None:
            cache.move_to_end(seq)
            return data
        data = self.payload(self.record(seq), check)
        cache[seq] = data
        self._cache_bytes = getattr(self, "_cache_bytes", 0) + len(data)
        while self._cache_bytes > (64 << 20) and len(cache) > 1:
            _, old = cache.popitem(last=False)
            self._cache_bytes -= len(old)
        return data

    def _scatter_table_len(self, head, rec):
        if len(head) < fmt.SCATTER_HEAD.size:
            raise ImageError("%s: corrupt scatter record at offset %d" % (self.path, rec.offset))
        n, _ = fmt.SCATTER_HEAD.unpack_from(head)
        size = fmt.SCATTER_HEAD.size + n * fmt.SCATTER_RUN.size
        if size > rec.length:
            raise ImageError("%s: corrupt scatter record at offset %d (%d runs)" % (self.path, rec.offset, n))
        return size

    def scatter_runs(self, seq):
        """The (addr, length) runs of a SCATTER record, read from its uncompressed table."""
        rec = self.record(seq)
        head = self._pread(rec.payload_offset, fmt.SCATTER_HEAD.size)
        size = self._scatter_table_len(head, rec)
        table = self._pread(rec.payload_offset, size)
        return [fmt.SCATTER_RUN.unpack_from(table, fmt.SCATTER_HEAD.size + i * fmt.SCATTER_RUN.size)
                for i in range((size - fmt.SCATTER_HEAD.size) // fmt.SCATTER_RUN.size)]

    def iter_records(self):
        for seq, (off, *_rest) in enumerate(self.records):
            yield self._record_at(off, seq)

    # -- content -------------------------------------------------------------------
    def metas(self):
        """{name: data} of META records; later records of a name supersede earlier ones."""
        if self._metas is None:
            self._metas = {}
            for off, _, _, rtype, _ in self.records:
                if rtype == fmt.META:
                    doc = json.loads(self.payload(self._record_at(off)))
                    self._metas[doc["name"]] = doc["data"]
        return self._metas

    def meta(self, name, default=None):
        return self.metas().get(name, default)

    def rounds(self):
        out = []
        for off, _, _, rtype, _ in self.records:
            if rtype == fmt.ROUND:
                out.append(json.loads(self.payload(self._record_at(off))))
        return out

    def extents(self):
        """Sorted, disjoint (start, end, record seq, data offset of start) with the latest record
        winning per page; the content of an extent is payload_of(seq)[offset:offset + end - start]."""
        if self._extents is not None:
            return self._extents
        ps = self.page_size
        intervals = []
        for seq, (off, addr, npages, rtype, _) in enumerate(self.records):
            if rtype in (fmt.PAGES, fmt.ZERO) and npages:
                intervals.append((addr, addr + npages * ps, seq, 0))
            elif rtype == fmt.SCATTER:
                pos = 0
                for a, n in self.scatter_runs(seq):
                    intervals.append((a, a + n, seq, pos))
                    pos += n
        points = sorted({p for s, e, _, _ in intervals for p in (s, e)})
        intervals.sort()
        heap, out, j = [], [], 0
        for a, b in zip(points, points[1:]):
            while j < len(intervals) and intervals[j][0] <= a:
                s, e, seq, doff = intervals[j]
                heapq.heappush(heap, (-seq, e, s, doff))
                j += 1
            while heap and heap[0][1] <= a:
                heapq.heappop(heap)
            if not heap:
                continue
            negseq, _, s, doff = heap[0]
            seq, off = -negseq, doff + (a - s)
            last = out[-1] if out else None
            if last and last[1] == a and last[2] == seq and last[3] + (a - last[0]) == off:
                out[-1] = (last[0], b, seq, last[3])
            else:
                out.append((a, b, seq, off))
        self._extents = out
        return out

    def record(self, seq):
        return self._record_at(self.records[seq][0], seq)

    def is_zero(self, seq):
        return self.records[seq][3] == fmt.ZERO

    def extent_bytes(self, extent, lo, hi, check=True):
        """Content of [lo, hi) within an extent: bytes-like, or None for a ZERO record."""
        s, e, seq, off = extent
        if self.is_zero(seq):
            return None
        data = self.payload_of(seq, check)
        start = off + (lo - s)
        if start + (hi - lo) > len(data):
            raise ImageError("%s: record %d holds %d bytes, less than its runs say" % (self.path, seq, len(data)))
        return memoryview(data)[start:start + (hi - lo)]

    def page_bytes(self):
        """Pages the image holds (after superseding) and how many of them are zero records."""
        total = zero = 0
        for s, e, seq, _ in self.extents():
            n = (e - s) // self.page_size
            total += n
            if self.is_zero(seq):
                zero += n
        return total, zero

    def iter_content(self):
        """Yield (addr, bytes) for every extent, assembled: later records supersede earlier ones."""
        for x in self.extents():
            data = self.extent_bytes(x, x[0], x[1])
            yield x[0], bytes(x[1] - x[0]) if data is None else bytes(data)

    # -- checking --------------------------------------------------------------------
    def verify(self, decompress=True):
        """Check every checksum and the structure (and, with decompress, that every compressed
        payload decodes). Returns a summary dict; raises ImageError."""
        chain = zlib.crc32(self.header_bytes)
        off = self.records_start
        seen = 0
        end = self.size - fmt.FOOTER.size
        while off < end:
            rec = self._record_at(off, seen)
            if seen < len(self.records) and self.records[seen][0] != off:
                raise ImageError("%s: corrupt index: record %d is at offset %d, index says %d"
                                 % (self.path, seen, off, self.records[seen][0]))
            self.payload(rec)
            # no checksum covers the padding before a page-aligned payload: it must be zero
            if rec.pad and any(self._pread(off + fmt.REC_SIZE, rec.pad)):
                raise ImageError("%s: corrupt record at offset %d (non-zero padding)" % (self.path, off))
            chain = zlib.crc32(self._pread(off, fmt.REC_SIZE), chain)
            off = rec.payload_offset + rec.length
            if rec.rtype == fmt.TRAILER:
                break
            seen += 1
        if off != end:
            raise ImageError("%s: corrupt: %d stray bytes before the footer" % (self.path, end - off))
        if seen != len(self.records):
            raise ImageError("%s: corrupt index: %d records in the file, %d in the index"
                             % (self.path, seen, len(self.records)))
        if chain != self.chain:
            raise ImageError("%s: corrupt: whole-file checksum mismatch" % self.path)
        if self.footer_reserved != 0:
            raise ImageError("%s: corrupt footer (reserved field %#x is not zero)" % (self.path, self.footer_reserved))
        return {"records": seen, "bytes": self.size}

    def check_compatible(self):
        """Refuse an image made on another architecture, page size or kernel."""
        h = self.header
        if h.get("arch") != platform.machine():
            raise ImageError("%s: made on %s, this machine is %s" % (self.path, h.get("arch"), platform.machine()))
        if h.get("page_size") != os.sysconf("SC_PAGE_SIZE"):
            raise ImageError("%s: page size %s differs from this machine's" % (self.path, h.get("page_size")))
        if h.get("kernel") != platform.release():
            raise ImageError("%s: made on kernel %s, this is %s (the vdso must match)"
                             % (self.path, h.get("kernel"), platform.release()))
