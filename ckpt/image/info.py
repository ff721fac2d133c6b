"""`ckpt info`: an image described for people and tools."""
import bisect

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
