"""`ckpt info`: an image described for people and tools."""
import bisect
import unicodedata

from ckpt.image import format as fmt
from ckpt.image.reader import ImageReader


def describe(path):
    with ImageReader(path) as r:
        metas = r.metas()
        extents = r.extents()
        starts = [x[0] for x in extents]
        maps = []
        for m in metas.get("mappings", []):
            n = 0
            i = max(0, bisect.bisect_right(starts, m["start"]) - 1)
            while i < len(extents) and extents[i][0] < m["end"]:
                s, e = extents[i][:2]
                n += max(0, min(e, m["end"]) - max(s, m["start"])) // r.page_size
                i += 1
            maps.append(dict(m, pages_in_image=n))
        total, zero = r.page_bytes()
        payload = 0
        for rec in r.iter_records():
            if rec.rtype in (fmt.PAGES, fmt.SCATTER):
                payload += rec.length
        return {
            "bytes": r.size, "format": r.header.get("format"), "arch": r.header.get("arch"),
            "kernel": r.header.get("kernel"), "page_size": r.page_size, "created": r.header.get("created"),
            "process": metas.get("process", {}),
            "threads": [t["tid"] for t in metas.get("threads", [])],
            "mappings": maps, "fds": metas.get("fds", []), "dump": metas.get("dump", {}),
            "pages": total, "zero_pages": zero, "payload_bytes": payload, "records": len(r.records),
        }


def printable(s):
    """A string from an image made safe for a terminal: control and format characters (ESC,
    newline, bidi overrides ...), lone surrogates and backslashes escaped, as in Python's
    repr; everything else as it is."""
    if not isinstance(s, str):
        s = str(s)
    out = []
    for c in s:
        o = ord(c)
        if c == "\\":
            out.append("\\\\")
        elif unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append("\\x%02x" % o if o < 0x100 else "\\u%04x" % o if o < 0x10000 else "\\U%08x" % o)
        else:
            out.append(c)
    return "".join(out)
