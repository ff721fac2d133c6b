"""The ckpt image format, version 1.

One file, written front to back (so it can stream), little-endian:

  header   MAGIC (8) | version u32 | json length u32 | json | crc32 of all before u32
           json: arch, page_size, kernel release, created, tool version
  records  each: a 32-byte record header, `pad` zero bytes, then the payload
           type u8 | comp u8 | pad u16 | npages u32 | addr u64 | payload length u64 |
           payload crc32 u32 | crc32 of the 28 bytes before u32
  trailer  a record of type TRAILER whose payload is the index: one entry per record
           before it: offset u64 | addr u64 | npages u32 | type u8 | comp u8 | pad u16
  footer   END_MAGIC (8) | trailer offset u64 | chain crc32 u32 | reserved u32

Page records (PAGES, ZERO) hold runs of pages at an address; SCATTER records hold many
scattered runs at once (the written pages of a round), their run table first and uncompressed,
then the pages. A later record for a page supersedes an earlier one, which is exactly what the
dump's rounds produce. A process tree's image holds one address space per process: a SPACE
record (addr = the process's PID, no payload) says whose pages the page records after it hold,
until the next one; an image without SPACE records holds its one process's pages. With comp NONE,
payloads are page-aligned in the file so that they can be mapped.

The chain checksum covers the whole file: it is the crc32 over the header bytes followed
by every record header (each of which holds its payload's crc32), trailer included.
"""
import struct

MAGIC = b"\x89CKPT\r\n\x1a"
END_MAGIC = b"CKPTEND\x00"
VERSION = 1

HEADER_FIXED = struct.Struct("<8sII")
REC = struct.Struct("<BBHIQQI")   # without its own crc
REC_CRC = struct.Struct("<I")
REC_SIZE = REC.size + REC_CRC.size  # 32
INDEX_ENTRY = struct.Struct("<QQIBBH")
FOOTER = struct.Struct("<8sQII")

# record types
META = 1      # JSON document, payload: json (comp may be LZ4)
PAGES = 2     # page contents for [addr, addr + npages * page_size)
ZERO = 3      # pages known to be all zero, no payload
ROUND = 4     # JSON marker at the end of a round of the dump
SCATTER = 5   # scattered page runs in one record: run table (never compressed), then their pages
SPACE = 6     # the page records after it are the address space of process `addr` (a tree's image)
TRAILER = 0xFF

TYPE_NAMES = {META: "meta", PAGES: "pages", ZERO: "zero", ROUND: "round", SCATTER: "scatter", SPACE: "space",
              TRAILER: "trailer"}
PAGE_TYPES = (PAGES, ZERO, SCATTER)

# SCATTER payload: count u32 | reserved u32 | count x (addr u64, length u64) | page data
SCATTER_HEAD = struct.Struct("<II")
SCATTER_RUN = struct.Struct("<QQ")

# compression
NONE = 0
LZ4 = 1
COMP_NAMES = {"none": NONE, "lz4": LZ4}

assert REC_SIZE == 32

# what a reader accepts: ckpt writes page records of at most 8 MiB of pages (ckpt.dump.copy.CHUNK)
MAX_RECORD_BYTES = 64 << 20
# metadata and round records, once decompressed (ckpt writes them uncompressed)
MAX_META_BYTES = 64 << 20
