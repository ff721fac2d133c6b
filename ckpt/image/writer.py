"""Writes an image front to back under a temporary name beside the final one (created new,
0600, never through a symlink: ckpt.outfile), renamed only when complete."""
import json
import platform
import time
import zlib

import lz4.frame

from ckpt.image import format as fmt
from ckpt.kernel.native import PAGE_SIZE
from ckpt.outfile import OutFile

# lz4 is kept for a run only when it saves at least this fraction
_LZ4_MIN_SAVING = 0.10


class ImageWriter:
    def __init__(self, path, compress="lz4", tool_version="0"):
        if compress not in fmt.COMP_NAMES:
            raise ValueError("unknown compression %r (lz4 or none)" % compress)
        self.comp = fmt.COMP_NAMES[compress]
        self.out = OutFile(path, 0o600)
        self.path = self.out.path
        self.tmp_path = self.out.tmp_path
        self.f = open(self.out.fd, "wb", buffering=1 << 20, closefd=False)
        self.committed = False
        self.offset = 0
        self.chain = 0
        self.index = []
        self.spaces = {}         # pid -> (start, end) of every page its PAGES, ZERO and SCATTER records hold
        self.space = None        # whose address space the page records written now belong to
        self.page_ranges = self.spaces.setdefault(None, [])
        self.bytes_raw = 0       # page bytes handed in
        self.bytes_payload = 0   # page bytes written after compression
        self.closed = False
        header = {
            "arch": platform.machine(), "page_size": PAGE_SIZE, "kernel": platform.release(),
            "created": time.time(), "tool": "ckpt " + tool_version, "format": fmt.VERSION,
        }
        hj = json.dumps(header).encode()
        head = fmt.HEADER_FIXED.pack(fmt.MAGIC, fmt.VERSION, len(hj)) + hj
        head += fmt.REC_CRC.pack(zlib.crc32(head))
        self._write(head)
        self.chain = zlib.crc32(head)

    def _write(self, data):
        self.f.write(data)
        self.offset += len(data)

    def _record(self, rtype, payload=b"", addr=0, npages=0, comp=fmt.NONE, align=False):
        pad = 0
        if align:
            pad = (-(self.offset + fmt.REC_SIZE)) % PAGE_SIZE
        start = self.offset
        pcrc = zlib.crc32(payload) if payload else 0
        rec = fmt.REC.pack(rtype, comp, pad, npages, addr, len(payload), pcrc)
        rec += fmt.REC_CRC.pack(zlib.crc32(rec))
        self._write(rec)
        if pad:
            self._write(bytes(pad))
        if payload:
            self._write(payload)
        self.chain = zlib.crc32(rec, self.chain)
        self.index.append((start, addr, npages, rtype, comp))
        return start

    def set_space(self, pid):
        """The page records written from now on hold process pid's pages (one image, a tree of
        processes): a SPACE record when it changes. A single process's image needs none."""
        if pid == self.space:
            return
        self._record(fmt.SPACE, b"", pid, 0)
        self.space = pid
        self.page_ranges = self.spaces.setdefault(pid, [])

    def add_meta(self, name, data):
        payload = json.dumps({"name": name, "data": data}, separators=(",", ":")).encode()
        self._record(fmt.META, payload)

    def add_round(self, info):
        self._record(fmt.ROUND, json.dumps(info).encode())

    def add_zero(self, addr, npages):
        self.page_ranges.append((addr, addr + npages * PAGE_SIZE))
        self._record(fmt.ZERO, b"", addr, npages)

    def add_pages(self, addr, data):
        """data: bytes-like holding whole pages starting at addr."""
        npages = len(data) // PAGE_SIZE
        self.page_ranges.append((addr, addr + npages * PAGE_SIZE))
        self.bytes_raw += len(data)
        if self.comp == fmt.LZ4:
            packed = lz4.frame.compress(data, compression_level=0, store_size=True,
                                        content_checksum=False, block_linked=False)
            if len(packed) <= len(data) * (1 - _LZ4_MIN_SAVING):
                self.bytes_payload += len(packed)
                self._record(fmt.PAGES, packed, addr, npages, fmt.LZ4)
                return
        self.bytes_payload += len(data)
        self._record(fmt.PAGES, data, addr, npages, fmt.NONE, align=True)

    def add_scatter(self, runs, data):
        """Scattered (addr, length) runs whose pages lie back to back in data: one record."""
        table = fmt.SCATTER_HEAD.pack(len(runs), 0) + b"".join(fmt.SCATTER_RUN.pack(a, n) for a, n in runs)
        self.page_ranges.extend((a, a + n) for a, n in runs)
        self.bytes_raw += len(data)
        comp, body = fmt.NONE, data
        if self.comp == fmt.LZ4:
            packed = lz4.frame.compress(data, compression_level=0, store_size=True,
                                        content_checksum=False, block_linked=False)
            if len(packed) <= len(data) * (1 - _LZ4_MIN_SAVING):
                comp, body = fmt.LZ4, packed
        self.bytes_payload += len(body)
        self._record(fmt.SCATTER, b"".join((table, body)), runs[0][0], len(data) // PAGE_SIZE, comp)

    def finish(self):
        """Write the trailer and footer and flush; the image is complete but not yet in place."""
        entries = b"".join(fmt.INDEX_ENTRY.pack(off, addr, n, t, c, 0) for off, addr, n, t, c in self.index)
        trailer_off = self._record(fmt.TRAILER, entries)
        self._write(fmt.FOOTER.pack(fmt.END_MAGIC, trailer_off, self.chain, 0))
        self.f.flush()
        return self.offset

    def reader(self):
        """An ImageReader of the finished image, read through the open file (never by a name)."""
        from ckpt.image.reader import ImageReader
        self.f.flush()
        return ImageReader(self.tmp_path, fd=self.out.fd)

    def commit(self):
        """Make the finished image durable (fsync) and move it into place under its final name
        (rename of the temporary's own name, then fsync of the directory)."""
        self.f.close()
        self.closed = True
        self.out.commit()
        self.committed = True

    def abort(self):
        """Drop the partial image: nothing is left behind."""
        if self.committed:
            return
        if not self.closed:
            try:
                self.f.close()
            except OSError:
                pass
            self.closed = True
        self.out.abort()
