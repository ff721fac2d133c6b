"""Reads and checks an image. Every refusal says what is wrong with the file."""
import heapq
from collections import OrderedDict
import json
import os
import platform
import re
import stat
import zlib

import lz4.frame

from ckpt.errors import ImageError
from ckpt.image import format as fmt
from ckpt.image import schema


_META_NAME = re.compile(rb'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_.-]{1,64})"')


class Record:
    __slots__ = ("seq", "offset", "addr", "npages", "rtype", "comp", "pad", "length", "pcrc")

    @property
    def payload_offset(self):
        return self.offset + fmt.REC_SIZE + self.pad

    @property
    def type_name(self):
        return fmt.TYPE_NAMES.get(self.rtype, "type%d" % self.rtype)


class ImageReader:
    """An image, read from `path`, or with fd= from an open file (a duplicate of fd is used:
    the image being written, checked before it gets its name); path then only names it."""

    def __init__(self, path, fd=None):
        self.path = path
        if fd is not None:
            fd = os.dup(fd)
        else:
            try:    # O_NONBLOCK: a FIFO given for an image must not block the open
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                raise ImageError("%s: no such file" % path) from None
            except IsADirectoryError:
                raise ImageError("%s: is a directory, not an image" % path) from None
            except OSError as e:
                raise ImageError("%s: cannot be read: %s" % (path, e.strerror)) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ImageError("%s: is a directory, not an image" % path if stat.S_ISDIR(st.st_mode)
                             else "%s: not a ckpt image (not a regular file)" % path)
        self.f = os.fdopen(fd, "rb", buffering=0)
        self.fd = fd
        try:
            self.size = st.st_size
            self._read_header()
            self._read_footer()
        except BaseException:
            self.f.close()
            raise
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
        data = os.pread(self.fd, n, off) if n else b""
        while 0 < len(data) < n:        # pread may return less than asked only at the end
            more = os.pread(self.fd, n - len(data), off + len(data))
            if not more:
                break
            data += more
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
        self.header = self._json(head[fmt.HEADER_FIXED.size:], "header")
        schema.check_header(self.path, self.header)
        self.header_bytes = head + fmt.REC_CRC.pack(crc)
        self.records_start = end + 4
        self.page_size = self.header["page_size"]

    def _json(self, raw, what, inside=None):
        """A JSON document of the image; malformed (not JSON, nested too deep) is one ImageError.
        inside: the key of the document whose content the error's field names start from."""
        try:
            doc = json.loads(raw)
        except RecursionError:
            raise ImageError("%s: malformed image: %s: JSON nested too deeply" % (self.path, what)) from None
        except ValueError as e:     # also bad UTF-8 and numbers of thousands of digits
            raise ImageError("%s: malformed image: %s is not valid JSON (%s)"
                             % (self.path, what, str(e).splitlines()[0][:100])) from None
        deep = schema.too_deep(doc)
        if deep is not None:
            if inside is not None and deep[:1] == [inside]:
                deep = deep[1:]
            raise ImageError("%s: malformed image: %s, field %s: nested more than %d levels deep"
                             % (self.path, what, schema.field_name(deep[:8]) + ("..." if len(deep) > 8 else ""),
                                schema.MAX_DEPTH))
        return doc

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

    def data_size(self, rec):
        """How many bytes a record's content must have once decompressed (for SCATTER: its
        page data), as its header declares; for META and ROUND records: a ceiling."""
        if rec.rtype in (fmt.PAGES, fmt.SCATTER):
            return rec.npages * self.page_size
        return fmt.MAX_META_BYTES

    def _check_size(self, rec):
        if rec.rtype in (fmt.PAGES, fmt.SCATTER) and rec.npages * self.page_size > fmt.MAX_RECORD_BYTES:
            raise ImageError("%s: corrupt %s record at offset %d (declares %d pages, more than any record of "
                             "ckpt holds)" % (self.path, rec.type_name, rec.offset, rec.npages))

    def _data_part(self, rec, data):
        if rec.rtype == fmt.SCATTER:
            return data[self._scatter_table_len(data, rec):]
        return data

    def _check_frame_header(self, rec, data):
        """The lz4 frame's own header, without decompressing: the size it claims (the writer
        always stores it) must be the one the record declares."""
        where = "%s: corrupt %s record at offset %d" % (self.path, rec.type_name, rec.offset)
        try:
            info = lz4.frame.get_frame_info(bytes(data[:32]))
        except (RuntimeError, ValueError) as e:
            raise ImageError("%s (not an lz4 frame: %s)" % (where, e)) from None
        size = info.get("content_size") or 0
        want = self.data_size(rec)
        if rec.rtype in (fmt.PAGES, fmt.SCATTER) and not size:
            raise ImageError("%s (its lz4 frame does not state its size)" % where)
        if (rec.rtype in (fmt.PAGES, fmt.SCATTER) and size != want) or size > want:
            raise ImageError("%s (its lz4 frame claims %d bytes, the record declares %d)" % (where, size, want))

    def _decompress(self, rec, data):
        """An lz4 frame decompressed in bounded memory: never more than the record declares
        (+1 byte, to see that there is more)."""
        where = "%s: corrupt %s record at offset %d" % (self.path, rec.type_name, rec.offset)
        self._check_frame_header(rec, data)
        want = self.data_size(rec)
        d = lz4.frame.LZ4FrameDecompressor()
        try:
            out = d.decompress(data, max_length=want + 1)
        except RuntimeError as e:
            raise ImageError("%s (%s)" % (where, e)) from None
        if len(out) > want:
            raise ImageError("%s (its lz4 frame decompresses to more than the %d bytes the record declares)"
                             % (where, want))
        if not d.eof or d.unused_data:
            raise ImageError("%s (%s)" % (where, "the lz4 frame is cut short" if not d.eof
                                          else "bytes after the end of its lz4 frame"))
        return out

    def payload(self, rec, check=True):
        """The record's content, decompressed (for SCATTER: its page data, without the run
        table). check=False skips the crc (already verified). A page record's content is
        exactly the size its header declares; anything else is refused."""
        self._check_size(rec)
        data = self._data_part(rec, self._payload_raw(rec, check))
        if rec.comp == fmt.LZ4:
            data = self._decompress(rec, data)
        elif rec.comp != fmt.NONE:
            raise ImageError("%s: unknown compression %d in record at offset %d" % (self.path, rec.comp, rec.offset))
        if rec.rtype in (fmt.PAGES, fmt.SCATTER) and len(data) != self.data_size(rec):
            raise ImageError("%s: corrupt %s record at offset %d (%d bytes of pages, its header declares %d)"
                             % (self.path, rec.type_name, rec.offset, len(data), self.data_size(rec)))
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

    def scatter_runs(self, seq, rec=None):
        """The (addr, length) runs of a SCATTER record, read from its uncompressed table."""
        rec = rec or self.record(seq)
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
        """{name: data} of META records; later records of a name supersede earlier ones. The
        core records are checked (schema.RECORDS): a malformed one is refused by name and field."""
        if self._metas is None:
            metas = {}
            for off, _, _, rtype, _ in self.records:
                if rtype == fmt.META:
                    raw = self.payload(self._record_at(off))
                    # the writer puts the name first: it names the record even when the rest is bad
                    named = _META_NAME.match(raw[:200])
                    label = ('record "%s" (at offset %d)' % (named.group(1).decode(), off) if named
                             else "metadata record at offset %d" % off)
                    doc = self._json(raw, label, inside="data")
                    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str) or "data" not in doc:
                        raise ImageError("%s: malformed image: metadata record at offset %d is not "
                                         '{"name": ..., "data": ...}' % (self.path, off))
                    metas[doc["name"]] = doc["data"]
            for name, data in metas.items():
                schema.check_record(self.path, name, data)
            schema.check_together(self.path, metas)
            self._metas = metas
        return self._metas

    def meta(self, name, default=None):
        return self.metas().get(name, default)

    def rounds(self):
        out = []
        for off, _, _, rtype, _ in self.records:
            if rtype == fmt.ROUND:
                out.append(self._json(self.payload(self._record_at(off)), "round record at offset %d" % off))
        return out

    def spaces(self):
        """The PIDs whose address spaces the image holds (SPACE records, a tree's image), in
        order; [] for an image of one process."""
        return list(dict.fromkeys(addr for _, addr, _, rtype, _ in self.records if rtype == fmt.SPACE))

    def extents(self, space=None):
        """Sorted, disjoint (start, end, record seq, data offset of start) with the latest record
        winning per page; the content of an extent is payload_of(seq)[offset:offset + end - start].
        space: whose address space, by PID (a tree's image); in an image of one process every
        page record is its process's, whatever is asked."""
        if self._extents is None:
            self._extents = {}
        if not any(r[3] == fmt.SPACE for r in self.records):
            space = None
        elif space is None:     # the dumped process's own (a tree's image holds its descendants' too)
            space = (self.meta("process") or {}).get("pid")
        if space in self._extents:
            return self._extents[space]
        ps = self.page_size
        intervals = []
        current = None
        for seq, (off, addr, npages, rtype, _) in enumerate(self.records):
            if rtype == fmt.SPACE:
                current = addr
                continue
            if current != space:
                continue
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
        self._extents[space] = out
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

    def page_bytes(self, space=None):
        """Pages the image holds (after superseding) and how many of them are zero records."""
        total = zero = 0
        for s, e, seq, _ in self.extents(space):
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
        """Check every checksum and the structure, and that every page record holds the
        number of pages it declares. With decompress, every compressed payload is decoded
        too (in bounded memory); without, only its lz4 frame header is checked against the
        declared size. Returns a summary dict; raises ImageError."""
        chain = zlib.crc32(self.header_bytes)
        off = self.records_start
        seen = 0
        end = self.size - fmt.FOOTER.size
        while off < end:
            rec = self._record_at(off, seen)
            if rec.rtype != fmt.TRAILER:
                if seen >= len(self.records):
                    raise ImageError("%s: corrupt index: record %d at offset %d is not in the index"
                                     % (self.path, seen, off))
                if self.records[seen] != (off, rec.addr, rec.npages, rec.rtype, rec.comp):
                    raise ImageError("%s: corrupt index: entry %d does not match the record at offset %d"
                                     % (self.path, seen, off))
            self._check_record(rec, decompress)
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

    def _check_record(self, rec, decompress):
        where = "%s: corrupt %s record at offset %d" % (self.path, rec.type_name, rec.offset)
        if rec.rtype not in fmt.TYPE_NAMES:
            raise ImageError("%s (unknown record type)" % where)
        self._check_size(rec)
        if rec.rtype in (fmt.ZERO, fmt.SPACE) and rec.length:
            raise ImageError("%s (a %s record with a payload)" % (where, rec.type_name))
        if rec.rtype == fmt.SCATTER:
            total = sum(n for _, n in self.scatter_runs(rec.seq, rec))
            if total != rec.npages * self.page_size:
                raise ImageError("%s (its runs hold %d bytes, its header declares %d pages)"
                                 % (where, total, rec.npages))
        if decompress or rec.comp != fmt.LZ4:
            self.payload(rec)
            return
        data = self._data_part(rec, self._payload_raw(rec))
        self._check_frame_header(rec, data)

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


# -- incremental images: a chain of images ------------------------------------------------
SHM_SPACE = 1 << 62          # spaces of shared memory objects (ckpt/dump/tree.py): never overlaid
_LAYER_SHIFT = 40            # a chain's extents name their record as layer << 40 | seq
MAX_CHAIN = 4096


def image_id(reader):
    """The image's id (its "dump" record), or None for an image made before ids existed."""
    return (reader.meta("dump") or {}).get("image_id")


def parent_of(reader):
    """{"image_id", "path"} of an incremental image's parent, or None."""
    return (reader.meta("dump") or {}).get("parent")


def _overlay(upper, lower):
    """Two sorted lists of disjoint extents merged, `upper` winning where they overlap."""
    out = []
    j = 0
    for s, e, seq, off in lower:
        pos = s
        while j < len(upper) and upper[j][1] <= pos:
            j += 1
        k = j
        while pos < e:
            if k < len(upper) and upper[k][0] <= pos:
                pos = min(max(pos, upper[k][1]), e)
                k += 1
                continue
            nxt = min(upper[k][0], e) if k < len(upper) else e
            out.append((pos, nxt, seq, off + (pos - s)))
            pos = nxt
    out += upper
    out.sort()
    return out


class ChainReader:
    """An incremental image read with its parents (`layers`: the image first, then its parent,
    its parent's parent, ...): its metadata is the image's own (complete in every image); the
    pages of a process are the parent's with the image's over them (shared memory objects are
    copied whole into every image: the image's own). Everything else is the image's own."""

    def __init__(self, layers):
        self.layers = list(layers)
        self.top = self.layers[0]
        self._chain_extents = {}

    def __getattr__(self, name):
        return getattr(self.__dict__["top"] if "top" in self.__dict__ else None, name)

    def close(self):
        for r in self.layers:
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_compatible(self):
        for r in self.layers:
            r.check_compatible()

    def verify(self, decompress=True):
        """Every image of the chain checked (ImageReader.verify); the image's summary, with
        "chain": how many images."""
        res = None
        for r in self.layers:
            got = r.verify(decompress)
            res = res or got
        return dict(res, chain=len(self.layers))

    def extents(self, space=None):
        if space is not None and space >= SHM_SPACE:
            return self.top.extents(space)
        if space is None:
            space = (self.top.meta("process") or {}).get("pid")
        if space in self._chain_extents:
            return self._chain_extents[space]
        out = []
        for i in range(len(self.layers) - 1, -1, -1):
            r = self.layers[i]
            own = [(s, e, (i << _LAYER_SHIFT) | seq, off) for s, e, seq, off in r.extents(space)]
            out = _overlay(own, out) if out else own
        self._chain_extents[space] = out
        return out

    def _split(self, seq):
        return self.layers[seq >> _LAYER_SHIFT], seq & ((1 << _LAYER_SHIFT) - 1)

    def is_zero(self, seq):
        r, s = self._split(seq)
        return r.is_zero(s)

    def payload_of(self, seq, check=True):
        r, s = self._split(seq)
        return r.payload_of(s, check)

    def extent_bytes(self, extent, lo, hi, check=True):
        s, e, seq, off = extent
        r, rs = self._split(seq)
        return r.extent_bytes((s, e, rs, off), lo, hi, check)

    page_bytes = ImageReader.page_bytes       # both work on extents(), is_zero() and extent_bytes()
    iter_content = ImageReader.iter_content


def open_parents(top, path=None):
    """The parents of image `top` (an ImageReader), opened and checked: each found where the
    image names it, with the id the image names, of the same process, no cycle, and no less
    trustworthy than the image (same owner; writable by others only if the image is too).
    Returns the list of their readers (nearest first); refuses with a clear ImageError."""
    path = path or top.path
    st = os.fstat(top.fd)
    layers = []
    seen = {image_id(top)}
    pid = (top.meta("process") or {}).get("pid")
    cur, cur_path = top, path
    try:
        while True:
            parent = parent_of(cur)
            if parent is None:
                return layers
            ppath, want = parent["path"], parent["image_id"]
            if want in seen:
                raise ImageError("%s: its chain of parent images has a cycle (%s names %s, already in the chain)"
                                 % (path, cur_path, ppath))
            if len(layers) >= MAX_CHAIN:
                raise ImageError("%s: its chain of parent images is longer than %d" % (path, MAX_CHAIN))
            if not os.path.lexists(ppath):
                raise ImageError("%s: its parent image %s is missing (an incremental image is read with every "
                                 "image of its chain)" % (path, ppath))
            try:
                r = ImageReader(ppath)
            except ImageError as e:
                raise ImageError("%s: its parent image %s cannot be read: %s" % (path, ppath, e)) from None
            layers.append(r)
            got = image_id(r)
            if got != want:
                raise ImageError("%s: its parent image %s is another image (id %s; %s was made from %s)"
                                 % (path, ppath, got, cur_path, want))
            if (r.meta("process") or {}).get("pid") != pid:
                raise ImageError("%s: its parent image %s is of another process (%s, not %s)"
                                 % (path, ppath, (r.meta("process") or {}).get("pid"), pid))
            pst = os.fstat(r.fd)
            if pst.st_uid != st.st_uid or (pst.st_mode & 0o022 and not st.st_mode & 0o022):
                raise ImageError("%s: its parent image %s may have been changed by others (owner uid %d, mode %o; "
                                 "the image: owner uid %d, mode %o)"
                                 % (path, ppath, pst.st_uid, pst.st_mode & 0o7777, st.st_uid, st.st_mode & 0o7777))
            seen.add(got)
            cur, cur_path = r, ppath
    except BaseException:
        for r in layers:
            r.close()
        raise


def open_chain(path, top=None):
    """An image with its parents, if it has any (ChainReader); else the ImageReader itself.
    top: the image already open (its path then only names it)."""
    top = top if top is not None else ImageReader(path)
    try:
        parents = open_parents(top, path)
    except BaseException:
        top.close()
        raise
    return ChainReader([top] + parents) if parents else top
