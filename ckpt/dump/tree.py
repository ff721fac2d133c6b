"""The process tree a dump takes: the target and its descendants.

Which processes belong (every descendant, zombies included), what restore can rebuild of
their links (sessions and process groups: restore creates each process from its parent, so
a process's session is its own or its parent's, and its group one of the tree's or the one
the target itself is in), what a dump of the target alone (--single) would cut, and the
shared memory of the tree, copied once per object whichever processes map it.
"""
import errno
import os

from ckpt.dump.copy import emit_pages, merge_ranges, shmem_runs
from ckpt.errors import TargetError
from ckpt.kernel import procfs
from ckpt.kernel.native import PAGE_SIZE, ffi, lib
from ckpt.state import deleted

# address spaces of shared memory objects in the image (SPACE records): this bit, then the index
SHM_SPACE = 1 << 62


def descendants(pid, single=False, stopped=False):
    """Every descendant of pid, zombies too, parents first (procfs.links of each). ckpt itself
    must not be among them (it cannot freeze or kill itself), except for --single, where it is
    left out (a shell dumping itself). stopped: the tree is frozen, its children lists are
    exact (much cheaper than reading every process's stat)."""
    below = procfs.descendants_of_stopped(pid) if stopped else procfs.descendants(pid)
    if single:
        return [i for i in below if i["pid"] != os.getpid()]
    if any(i["pid"] == os.getpid() for i in below):
        raise TargetError("ckpt itself runs as a descendant of process %d: run it from outside the process "
                          "tree it dumps, or dump with --single" % pid)
    return below


def _name(info):
    return "%d (%s)" % (info["pid"], info.get("comm") or "?")


def check_links(root, infos):
    """Refuse, up front, sessions and process groups restore could not rebuild. infos: links
    of every process of the tree (the target's first), zombies included."""
    by_pid = {i["pid"]: i for i in infos if i}
    top = by_pid[root]
    for i in infos:
        if not i or i["pid"] == root:
            continue
        parent = by_pid.get(i["ppid"])
        if parent is None:
            continue        # exited meanwhile: looked at again in the freeze
        if i["sid"] not in (i["pid"], parent["sid"]):
            raise TargetError("process %s is in session %d, neither its own nor its parent's (%d): restore "
                              "cannot rebuild that; not supported" % (_name(i), i["sid"], parent["sid"]))
        g = i["pgid"]
        if g == i["pid"]:
            continue
        leader = by_pid.get(g)
        if leader is not None and leader["sid"] == i["sid"]:
            continue
        if g == top["pgid"] and g not in by_pid and i["sid"] == top["sid"]:
            continue        # the group the target is in, outside the tree: ckpt's at restore, as the target's
        raise TargetError("process %s is in process group %d, whose leader is not in the dumped tree: restore "
                          "cannot rebuild that group; not supported" % (_name(i), g))


def _outside_holders(inside, links, shm):
    """Processes outside `inside` (pids) holding an fd whose /proc link is in `links`, or mapping
    shared memory (dev, inode) in `shm`: {what: pid}."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in inside or int(name) == os.getpid():
            continue
        pid = int(name)
        if links:
            try:
                for fd in os.listdir("/proc/%d/fd" % pid):
                    try:
                        link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
                    except OSError:
                        continue
                    if link in links:
                        found.setdefault(link, pid)
            except OSError:
                pass
        if shm:
            try:
                for v in procfs.read_maps(pid):
                    if v.kind == "shmem" and (v.dev, v.inode) in shm:
                        found.setdefault("shared memory %s" % (v.path or "[anon]"), pid)
            except Exception:
                pass
    return found


def _shm_keys(maps):
    return {(v.dev, v.inode) for v in maps if v.kind == "shmem"}


def refuse_cut(pid, below):
    """--single: the process alone, refused when that cuts it from a child, from a pipe or
    socket another process holds (its standard streams aside: they lead out, see files), or
    from memory it shares with another process."""
    if below:
        raise TargetError("process %d has %s %s: dumped alone (--single) it would lose %s; dump the whole tree "
                          "(without --single)" % (pid, "children" if len(below) > 1 else "a child",
                                                  ", ".join(_name(i) for i in below[:8]),
                                                  "them" if len(below) > 1 else "it"))
    links = set()
    for fd in procfs.fds(pid):
        if fd <= 2:
            continue
        try:
            link = os.readlink(procfs.proc(pid, "fd", str(fd)))
        except OSError:
            continue
        if link.startswith(("pipe:", "socket:")):
            links.add(link)
    found = _outside_holders({pid}, links, _shm_keys(procfs.read_maps(pid)))
    if found:
        what, other = sorted(found.items())[0]
        raise TargetError("process %d shares %s with process %d (%s): dumped alone (--single) it would be cut "
                          "from it; not dumped" % (pid, what, other, procfs.comm(other) or "?"))


def refuse_outside_sharing(root, pids):
    """Shared memory of the tree that a process outside it maps too: that process's writes
    could not be an instant of the tree's. Refused, naming both."""
    keys = set()
    for p in pids:
        keys |= _shm_keys(procfs.read_maps(p))
    if not keys:
        return
    found = _outside_holders(set(pids), set(), keys)
    if found:
        what, other = sorted(found.items())[0]
        raise TargetError("the tree of process %d shares %s with process %d (%s), which is outside it: its "
                          "writes could not be frozen with the tree; not dumped" % (root, what, other,
                                                                                 procfs.comm(other) or "?"))


class SharedMemory:
    """Shared memory objects (shared anonymous memory, memfd, SysV segments, deleted files)
    the tree's processes map: each copied once in the freeze, into an address space of its
    own in the image (SHM_SPACE | index, addresses = offsets in the object), through whichever
    mappings cover it. Restore makes each object once and maps it in every process."""

    def __init__(self, writer):
        self.writer = writer
        self.objects = {}       # (dev, inode) -> {"space", "size", "path", "maps": [(pid, vma)]}

    def _object(self, dev, inode, path):
        return self.objects.setdefault((dev, inode), {"space": SHM_SPACE | len(self.objects), "size": 0,
                                                      "path": path, "maps": [], "fds": [], "seals": 0})

    def add(self, pid, maps):
        for v in maps:
            whole = deleted.whole_file(v)   # a deleted file: all of it, from the file (ckpt/state/deleted.py)
            if v.kind != "shmem" and not whole:
                continue
            obj = self._object(v.dev, v.inode, v.path)
            if whole:
                deleted.note(obj, pid, v)
            else:
                obj["size"] = max(obj["size"], v.offset + v.size)
            obj["maps"].append((pid, v))

    def add_fds(self, pid, table):
        """Memory files the process holds by fd (memfd entries: ckpt/files/memfd.py)."""
        for e in table:
            if e["kind"] in ("memfd", "deleted") and "shares" not in e and "shares_with" not in e:
                obj = self._object(e["dev"], e["inode"], e["path"])
                obj["size"] = max(obj["size"], e["size"])
                obj["seals"] = e.get("seals", 0)
                if e["kind"] == "deleted":     # a deleted file held open (ckpt/files/deleted.py): made again deleted
                    obj.setdefault("mode", e["mode"])
                obj["fds"].append((pid, e["fd"]))

    def space_of(self, dev, inode):
        return self.objects[(dev, inode)]["space"]

    def copy(self, copiers):
        """Copy every object's data once; returns the pages copied."""
        pages = 0
        for obj in self.objects.values():
            if obj["fds"]:
                deleted.close(obj)
                pages += self._copy_file(obj, *obj["fds"][0])
                continue
            if "file" in obj:
                pages += deleted.copy(self.writer, obj, emit_pages, data_ranges, COPY_CHUNK)
                continue
            covered = []
            for pid, v in obj["maps"]:
                data = shmem_runs(pid, v)
                runs = [(v.start, v.size)] if data is None else data
                shift = v.offset - v.start
                todo = []
                for a, n in runs:
                    todo += _subtract((a + shift, a + shift + n), covered)
                covered = merge_ranges([tuple(c) for c in covered] + todo)
                if todo:
                    pages += copiers[pid].copy([(s - shift, e - s) for s, e in todo], scatter=False,
                                               space=obj["space"], shift=shift)
        return pages

    def _copy_file(self, obj, pid, fd):
        """An object a process holds an fd of: all its data, read through the fd (its size may
        exceed what any mapping shows)."""
        f = os.open("/proc/%d/fd/%d" % (pid, fd), os.O_RDONLY | os.O_CLOEXEC)
        try:
            pages = 0
            size = obj["size"]
            self.writer.set_space(obj["space"])
            for lo, hi in data_ranges(f, size):
                for off in range(lo, hi, COPY_CHUNK):
                    n = min(COPY_CHUNK, hi - off)
                    data = os.pread(f, n, off)
                    data += bytes(-len(data) % PAGE_SIZE)
                    emit_pages(self.writer, off, memoryview(data))
                    pages += len(data) // PAGE_SIZE
            return pages
        finally:
            os.close(f)

    def record(self):
        out = []
        for (dev, ino), o in self.objects.items():
            rec = {"space": o["space"], "dev": dev, "inode": ino, "size": o["size"], "path": o["path"],
                   "pids": sorted({p for p, _ in o["maps"]} | {p for p, _ in o["fds"]})}
            if o["path"].startswith("/memfd:"):
                rec["name"] = o["path"][len("/memfd:"):].rsplit(" (deleted)", 1)[0]
                rec["seals"] = o["seals"]
            deleted.record(rec, o)
            out.append(rec)
        return out


COPY_CHUNK = 8 << 20


def data_ranges(fd, size):
    """The page-aligned [lo, hi) ranges of a shared memory file up to size that hold data
    (SEEK_DATA/SEEK_HOLE); all of it when the file system does not tell."""
    out, pos = [], 0
    try:
        while pos < size:
            lo = os.lseek(fd, pos, os.SEEK_DATA)
            if lo >= size:
                break
            hi = min(size, os.lseek(fd, lo, os.SEEK_HOLE))
            lo -= lo % PAGE_SIZE
            out.append((lo, hi))
            pos = hi
    except OSError as e:
        if e.errno == errno.ENXIO:      # no data past pos
            return out
        return [(0, size)]
    return out


def _subtract(rng, covered):
    """[lo, hi) minus the sorted [start, end] ranges in covered: a list of (lo, hi)."""
    lo, hi = rng
    out = []
    for s, e in covered:
        if e <= lo or s >= hi:
            continue
        if s > lo:
            out.append((lo, s))
        lo = max(lo, e)
        if lo >= hi:
            break
    if lo < hi:
        out.append((lo, hi))
    return [(s, e) for s, e in out if e > s]


MAX_COW_PIECES = 64     # per mapping: restore maps the pieces around shared ranges one by one


def _compatible(a, b):
    """Two private mappings (child's, parent's) whose overlap can be the parent's pages for the
    child: same kind and protection, and for files the same file at the same offsets."""
    if a.kind != b.kind or a.perms != b.perms or a.deleted or b.deleted:
        return False
    if a.kind == "file-private":
        return (a.dev, a.inode) == (b.dev, b.inode) and a.offset - a.start == b.offset - b.start
    return True


def cow_ranges(child, child_maps, parent, parent_maps):
    """The pages a child still shares with its parent since a fork (copy-on-write, written by
    neither since): sorted (start, end) ranges where the child's and the parent's private
    mappings overlap compatibly (their boundaries may differ: one merged with a neighbour).
    Restore forks the child from its rebuilt parent and keeps exactly these ranges, so they
    come back shared, neither copied nor written twice. Found by page frame number
    (ck_cow_shared: root only; [] otherwise). A mapping whose shared ranges come in more than
    MAX_COW_PIECES pieces is left out (restore maps around each piece)."""
    priv = ("anon", "file-private")
    theirs = sorted((v for v in parent_maps if v.kind in priv), key=lambda v: v.start)
    out = []
    fa = os.open("/proc/%d/pagemap" % child, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fb = os.open("/proc/%d/pagemap" % parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for v in child_maps:
                if v.kind not in priv:
                    continue
                found = []
                for p in theirs:
                    if p.end <= v.start or p.start >= v.end or not _compatible(v, p):
                        continue
                    lo, hi = max(v.start, p.start), min(v.end, p.end)
                    cap = (hi - lo) // PAGE_SIZE // 2 + 1
                    buf = ffi.new("uint64_t[]", 2 * cap)
                    n = lib.ck_cow_shared(fa, fb, lo, hi, buf, cap)
                    if n < 0:
                        return []
                    flat = ffi.unpack(buf, 2 * n)
                    found += list(zip(flat[0::2], flat[1::2]))
                if len(found) <= MAX_COW_PIECES:
                    out += found
        finally:
            os.close(fb)
    finally:
        os.close(fa)
    return sorted(out)


def subtract_runs(runs, ranges):
    """(addr, length) runs minus sorted (start, end) ranges."""
    if not ranges:
        return runs
    out = []
    merged = merge_ranges(ranges)
    for a, n in runs:
        out += [(s, e - s) for s, e in _subtract((a, a + n), merged)]
    return out


def record(root, members, zombies, tables, shm, cow=None):
    """The image's "tree" record: every process but the target (whose records are the image's
    top-level ones), parents first, zombies with the status they leave, shared memory."""
    procs = []
    for pid, m in members.items():
        if pid == root:
            continue
        process_state, thread_state, maps = m.records
        entry = {"pid": pid, "process": process_state, "threads": thread_state,
                 "mappings": [v.to_json() for v in maps], "fds": tables[pid]}
        if cow and cow.get(pid):
            entry["cow"] = [list(r) for r in merge_ranges(cow[pid])]
        procs.append(entry)
    return {"root": root, "processes": procs,
            "zombies": [{k: z[k] for k in ("pid", "ppid", "pgid", "sid", "exit_code", "comm")} for z in zombies],
            "shm": shm.record()}


__all__ = ["descendants", "check_links", "refuse_cut", "refuse_outside_sharing", "SharedMemory", "record",
           "SHM_SPACE", "PAGE_SIZE"]
