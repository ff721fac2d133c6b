"""What a mapping is beyond its addresses, permissions and file: the VmFlags of
/proc/PID/smaps that a process sets itself and restore must set again.

  at mmap      gd  MAP_GROWSDOWN (a stack grown by hand, not only [stack])
               nr  MAP_NORESERVE
               ac  a private mapping charged as writable (it was, before an mprotect): mapped
                   writable, its pages written, then mprotect'ed to its protection
               mw  a shared file mapping whose file was opened read-write, even where the
                   mapping is not writable now: it may be made writable again (mprotect);
                   without it the file is opened read-only, as the process had it
  madvise      dc DONTFORK, dd DONTDUMP, hg HUGEPAGE, nh NOHUGEPAGE, mg MERGEABLE,
               wf WIPEONFORK, sr SEQUENTIAL, rr RANDOM
  then         lo / lf  mlock (lf: MLOCK_ONFAULT), sl  mseal (last: nothing may change after)

When they are read. smaps costs a walk over every page table of the process (about 20 ms per
GiB resident): far too much for the freeze. So the flags are read once while the process still
runs, when the dump starts (parts.refuse), and matched to the mappings of the freeze at restore,
by address: a mapping of the freeze takes the flags of the mapping that held its start at that
read. What is missed: a madvise (or mlock, mseal) made between the start of the dump and the
freeze, and the flags of a mapping created meanwhile (it gets the defaults: MAP_GROWSDOWN only
for [stack], a shared file opened read-write only if the mapping is writable). A process that
joins the dump later (forked meanwhile) has its flags read in the freeze itself.

The record: process["vm_flags"] = [[start, end, "flags ..."], ...] for every mapping at that
read, with only the flags above (mw only for mappings that may be shared, where it matters).
"""
import bisect
import os

from ckpt.errors import ImageError
from ckpt.kernel import procfs

MADV_RANDOM, MADV_SEQUENTIAL, MADV_DONTFORK, MADV_MERGEABLE = 1, 2, 10, 12
MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_DONTDUMP, MADV_WIPEONFORK = 14, 15, 16, 18
MADVISE = {"dc": MADV_DONTFORK, "dd": MADV_DONTDUMP, "hg": MADV_HUGEPAGE, "nh": MADV_NOHUGEPAGE,
           "mg": MADV_MERGEABLE, "wf": MADV_WIPEONFORK, "sr": MADV_SEQUENTIAL, "rr": MADV_RANDOM}
NAMES = {"dc": "MADV_DONTFORK", "dd": "MADV_DONTDUMP", "hg": "MADV_HUGEPAGE", "nh": "MADV_NOHUGEPAGE",
         "mg": "MADV_MERGEABLE", "wf": "MADV_WIPEONFORK", "sr": "MADV_SEQUENTIAL", "rr": "MADV_RANDOM"}
KEEP = set(MADVISE) | {"gd", "nr", "mw", "ac", "lo", "lf", "sl"}
SYS_mlock2, SYS_mseal = 325, 462
MLOCK_ONFAULT = 1

_ANY_ERROR = range(1, 4096)
_live = {}      # pid -> [(start, end, flags)] read while the process ran (refuse)


def _kept(flags):
    f = [x for x in flags if x in KEEP and (x != "mw" or "ms" in flags)]
    return " ".join(f)


def refuse(pid):
    """Called before the dump touches the process: read its VmFlags now (see the docstring)."""
    _live[pid] = procfs.smaps_flags(pid)
    return None


def dump(ctx):
    table = _live.pop(ctx.pid, None)
    if table is None:       # a process that joined the dump after it started: read now
        table = procfs.smaps_flags(ctx.pid)
    ctx.record["vm_flags"] = [[s, e, _kept(f)] for s, e, f in table if not _special(f)]


def _special(flags):
    return "io" in flags or "pf" in flags       # vvar and device memory: the kernel's own


def check(proc, threads):
    """The record, checked before anything is created."""
    table = proc.get("vm_flags")
    if table is None:
        return
    ok = isinstance(table, list) and all(
        isinstance(x, list) and len(x) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in x[:2])
        and 0 <= x[0] < x[1] < 1 << 64 and isinstance(x[2], str) and len(x[2]) < 256 for x in table)
    if not ok:
        raise ImageError("malformed image: process %s: field vm_flags: expected [[start, end, \"flags\"], ...]"
                         % proc.get("pid"))


class Table:
    """The VmFlags of one process's mappings, as recorded; lookups by the mappings of the image."""

    def __init__(self, proc):
        table = proc.get("vm_flags")
        self.known = table is not None
        rows = sorted((s, e, set(f.split())) for s, e, f in table or [])
        self.rows = rows
        self.starts = [r[0] for r in rows]

    def of(self, m):
        """The flags of image mapping m: a set, or None when they are not known (an image made
        before they were recorded, or a mapping made after they were read)."""
        if not self.known:
            return None
        i = bisect.bisect_right(self.starts, m["start"]) - 1
        if i >= 0 and self.rows[i][1] > m["start"]:
            return self.rows[i][2]
        return None


def after_mapping(remote, maps, table, warn, skip=()):
    """madvise, mlock and mseal of every mapping, as recorded: in the restored process once its
    memory is written (and, for a tree, once its children are forked: DONTFORK and WIPEONFORK
    speak of forks to come). A flag the kernel refuses here is a warning, not a failure."""
    from ckpt.kernel import sysno
    calls, what = [], []
    seal, seal_what = [], []
    for m in maps:
        if m["kind"] == "special" or m["start"] in skip:
            continue
        f = table.of(m)
        if not f:
            continue
        size = m["end"] - m["start"]
        for name in sorted(f & set(MADVISE)):
            calls.append((sysno.madvise, (m["start"], size, MADVISE[name])))
            what.append("%s of %#x-%#x" % (NAMES[name], m["start"], m["end"]))
        if "lo" in f:
            calls.append((SYS_mlock2, (m["start"], size, MLOCK_ONFAULT if "lf" in f else 0)))
            what.append("mlock of %#x-%#x" % (m["start"], m["end"]))
        if "sl" in f:
            seal.append((SYS_mseal, (m["start"], size, 0)))
            seal_what.append("mseal of %#x-%#x" % (m["start"], m["end"]))
    calls += seal
    what += seal_what
    if not calls:
        return
    results = remote.many(calls, ok_errors=_ANY_ERROR)
    for w, r in zip(what, results):
        if r < 0:
            warn("ckpt: warning: process %d: %s failed: %s (the restored mapping lacks it)"
                 % (remote.pid, w, os.strerror(-r)))
