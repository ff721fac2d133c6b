"""`ckpt info`: an image described for people and tools."""
import bisect
import unicodedata

from ckpt.image import format as fmt
from ckpt.errors import CkptError
from ckpt.image.reader import ImageReader, open_parents


def describe(path):
    with ImageReader(path) as r:
        metas = r.metas()
        tree = metas.get("tree") or {}
        # shared memory of a tree's image is held by object, at its offsets (ckpt/dump/tree.py)
        shm = {(o["dev"], o["inode"]): o["space"] for o in tree.get("shm", [])}

        def pages_of(m):
            space, shift = None, 0
            if m["kind"] == "shmem" and (m["dev"], m["inode"]) in shm:
                space, shift = shm[(m["dev"], m["inode"])], m["offset"] - m["start"]
            extents = r.extents(space)
            lo, hi = m["start"] + shift, m["end"] + shift
            i = max(0, bisect.bisect_right([x[0] for x in extents], lo) - 1)
            n = 0
            while i < len(extents) and extents[i][0] < hi:
                s, e = extents[i][:2]
                n += max(0, min(e, hi) - max(s, lo)) // r.page_size
                i += 1
            return n

        maps = [dict(m, pages_in_image=pages_of(m)) for m in metas.get("mappings", [])]
        total, zero = r.page_bytes()
        for space in [o["space"] for o in tree.get("shm", [])] + [p["pid"] for p in tree.get("processes", [])]:
            t, z = r.page_bytes(space)
            total, zero = total + t, zero + z
        payload = 0
        for rec in r.iter_records():
            if rec.rtype in (fmt.PAGES, fmt.SCATTER):
                payload += rec.length
        chain = {}
        parent = (metas.get("dump") or {}).get("parent")
        if parent:
            # an incremental image: the pages above are its own; with its chain, the process's
            try:
                layers = open_parents(r, path)
            except CkptError as e:
                chain = {"chain_error": str(e)}
            else:
                from ckpt.image.reader import ChainReader
                c = ChainReader([r] + layers)
                chain = {"chain_pages": c.page_bytes()[0], "chain": [path] + [x.path for x in layers]}
                for x in layers:
                    x.close()
        return dict(chain, **{
            "bytes": r.size, "format": r.header.get("format"), "arch": r.header.get("arch"),
            "kernel": r.header.get("kernel"), "page_size": r.page_size, "created": r.header.get("created"),
            "process": metas.get("process", {}),
            "tree": {"processes": [metas.get("process", {}).get("pid")] + [p["pid"] for p in tree.get("processes", [])],
                     "zombies": [z["pid"] for z in tree.get("zombies", [])]},
            "threads": [t["tid"] for t in metas.get("threads", [])],
            "mappings": maps, "fds": metas.get("fds", []), "dump": metas.get("dump", {}),
            "pages": total, "zero_pages": zero, "payload_bytes": payload, "records": len(r.records),
            "image_id": (metas.get("dump") or {}).get("image_id"), "parent": parent,
        })


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
