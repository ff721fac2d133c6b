"""The load algorithm: plan, build, patch, start.

  plan   read and check the whole image before anything is created: every checksum, the
         architecture and kernel, the mapped files unchanged, the PIDs free
  build  a fresh process with the original PID (clone3 set_tid), stopped under ptrace; its
         address space replaced by injected syscalls: unmap everything, move vdso/vvar to the
         dumped addresses, map every mapping with its file, flags and protection
  patch  write only the pages that differ from their source: file pages the process never
         modified come from the mapped file, untouched anonymous pages stay unpopulated
  start  mm fields, handlers, timers, fds, the other threads (clone3 CLONE_THREAD set_tid),
         per-thread state and registers, credentials last; then all threads released together
"""
import base64
import errno
import fcntl
import os
import struct
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ckpt.errors import CkptError, ImageError, RestoreError
from ckpt.image.reader import open_chain
from ckpt.kernel import procfs, sysno
from ckpt.kernel.native import PAGE_SIZE, lib
from ckpt.kernel.ptrace import _call
from ckpt.kernel.ptrace import find_syscall_insn
from ckpt.restore.creds import acting_as, cap_bits, CAP_NET_ADMIN
from ckpt.restore.paths import O_PATH, PathOpener
from ckpt.restore.remote import SCRATCH_SIZE
from ckpt import files
from ckpt.state import deleted, parts, process, threads, vmflags

PROT = {"r": 1, "w": 2, "x": 4}
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_GROWSDOWN, MAP_NORESERVE, MAP_FIXED_NOREPLACE = 0x100, 0x4000, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
F_ADD_SEALS = 1033
O_RDONLY, O_RDWR = 0, 2
PR_SET_PDEATHSIG = 1
PTRACE_SETOPTIONS = 0x4200
PTRACE_O_TRACECLONE = 8
TASK_TOP = 0x7FFFFFFFF000
MMAP_MIN = 0x10000
WRITE_CHUNK = 8 << 20


@dataclass
class RestoreOptions:
    pidfile: Optional[str] = None
    foreground: bool = False
    tcp_close: bool = False     # established TCP connections come back closed (the peer sees a reset)
    shell_job: bool = False     # standard streams and terminals that led out: ckpt's own (as CRIU's --shell-job)
    allow_file_change: bool = False     # open files may differ in size/mtime from the dump (mapped files never)
    warn: Callable = print


def _prot(perms):
    return sum(PROT[c] for c in perms[:3] if c in PROT)


class ProcPlan:
    """One process of the image (the target, or a descendant in a tree's image): its records
    and the paths it is rebuilt from, opened as it."""

    def __init__(self, proc, threads, maps, fds, cow=None):
        self.proc, self.threads, self.maps, self.fds = proc, threads, maps, fds
        self.pid = proc["pid"]
        self.paths = None
        self.cow = [tuple(r) for r in cow or []]    # pages it shares with its parent (copy-on-write)
        self.vmflags = None     # vmflags.Table, once the record is checked
        self.map_keys = {}      # start of a mapped file's mapping -> its key in paths (file, access mode)
        self.exe_object = None  # (dev, inode) of its deleted executable, made again (Plan.shared_memory)


class Plan:
    """Everything restore needs, read and checked before anything is created."""

    def __init__(self, path, opts=None, rollback=False):
        """rollback: for `ckpt restore --into` (ckpt/restore/into.py), whose process holds the PIDs."""
        self.opts = opts if opts is not None else RestoreOptions()
        self.reader = open_chain(path)      # an incremental image with its parents under it
        self.members = []
        self.shm = {}           # (dev, inode) -> ckpt-local memfd holding a shared memory object
        try:
            self.reader.check_compatible()
            self.reader.verify(decompress=False)
            m = self.reader.metas()
            missing = [k for k in ("process", "threads", "mappings", "fds") if k not in m]
            if missing:
                raise ImageError("%s: incomplete image: no %s record" % (path, ", ".join(missing)))
            self.metas = m
            tree = m.get("tree") or {}
            self.members = [ProcPlan(m["process"], m["threads"], m["mappings"], m["fds"])]
            self.members += [ProcPlan(p["process"], p["threads"], p["mappings"], p["fds"], p.get("cow"))
                             for p in tree.get("processes", [])]
            self.zombies = tree.get("zombies", [])
            self.shm_records = tree.get("shm")
            root = self.members[0]
            self.proc, self.threads, self.maps, self.fds = root.proc, root.threads, root.maps, root.fds
            self.pid = root.pid
            self._check_links()
            for pp in self.members:
                trusted = image_trust(path, self.reader.f.fileno(), pp.proc, pp.fds, self.opts)
                if pp is root:
                    self.trusted = trusted
                process.check_cgroups(pp.proc, self.trusted)
                parts.check(pp.proc, pp.threads)
                pp.paths = PathOpener(pp.proc["creds"], check_content=not self.opts.allow_file_change)
                self._open_files(pp)
                checked = _not_held(pp.pid, pp.fds) if rollback else pp.fds
                pp.prechecked = {e["fd"] for e in checked}
                files.precheck(checked, pp.paths, self.opts)
            self.paths = root.paths
            if not rollback:
                self._check_pids()
        except BaseException:
            self.close()
            if getattr(self, "metas", None) is not None:
                try:    # what the dump left held for the restore (the network lock) is let go
                    files.restored(self.metas, ok=False)
                except Exception:
                    pass
            raise

    def _check_links(self):
        """Every process of a tree is created by its parent, which must come before it."""
        seen = {self.pid}
        for pp in self.members[1:]:
            if pp.proc["ppid"] not in seen:
                raise ImageError("%s: malformed image: process %d comes before its parent %d"
                                 % (self.reader.path, pp.pid, pp.proc["ppid"]))
            seen.add(pp.pid)
        for z in self.zombies:
            if z["ppid"] not in seen:
                raise ImageError("%s: malformed image: zombie %d has no parent in the image" % (self.reader.path, z["pid"]))

    def _open_files(self, pp):
        """Every path the process is rebuilt from, opened now (as the process, no symbolic link
        followed) and checked to be the file that was there at the dump: mapped files once per
        access mode, the executable, the working and root directories. The fd table's files
        are opened by their kinds (prepare)."""
        p = pp.proc
        pp.vmflags = vmflags.Table(p)
        for m in pp.maps:
            if m["kind"] not in ("file-private", "file-shared") or _deleted(m):
                continue
            fid = m.get("file") or {}
            mode = _map_mode(m, pp.vmflags.of(m))
            key = ("map", m["path"], mode)
            try:
                pp.paths.open(key, m["path"], mode, fid, "mapped file", content=True)
            except RestoreError as e:
                if mode != O_RDWR or "w" in m["perms"]:
                    raise
                # opened read-write at the dump for a mapping not writable now: the process may
                # no longer open it so; the mapping comes back, only not able to become writable
                key = ("map", m["path"], O_RDONLY)
                pp.paths.open(key, m["path"], O_RDONLY, fid, "mapped file", content=True)
                self.opts.warn("ckpt: warning: process %d: the shared mapping %#x-%#x of %s comes back from the file "
                               "opened read-only (%s): it can no longer be made writable"
                               % (pp.pid, m["start"], m["end"], m["path"], e))
            pp.map_keys[m["start"]] = key
        if p.get("exe_file"):
            # a deleted executable is one of its deleted mapped files, made again (deleted.py)
            pp.exe_object = deleted.exe_object(p, pp.maps)
            if pp.exe_object is None:
                pp.paths.open("exe", p["exe"], O_RDONLY, p["exe_file"], "executable", content=True)
        if p.get("cwd_deleted"):
            # a deleted working directory: a new one, deleted too (ckpt/state/deleted.py)
            pp.paths.held["cwd"] = deleted.ghost_dir(p)
        else:
            pp.paths.open("cwd", p["cwd"], O_PATH, p.get("cwd_file") or {}, "working directory", kind="dir")
        if p.get("root", "/") != "/":
            pp.paths.open("root", p["root"], O_PATH, p.get("root_file") or {}, "root directory", kind="dir")

    def _check_pids(self):
        ids = [(pp.pid, t["tid"]) for pp in self.members for t in pp.threads] + [(z["pid"], z["pid"]) for z in self.zombies]
        for pid, tid in ids:
            _wait_reaped(tid)
            if os.path.exists("/proc/%d" % tid):
                owner = "%s, PID %d" % (procfs.comm(tid) or "?", tid)
                raise RestoreError("PID %d is in use (by %s); the process must get its original PID%s back"
                                   % (tid, owner, "" if tid == pid else " and thread IDs"))

    def shared_memory(self):
        """The tree's shared memory objects made now, in ckpt, with their pages (memfds the
        processes take when they map them); none in an image that keeps them per process."""
        if self.shm_records is None:
            return
        creds = {pp.pid: pp.proc["creds"] for pp in self.members}
        for rec in self.shm_records:
            if rec.get("deleted_file"):
                # a deleted file, made again deleted (ckpt/state/deleted.py), as a process that maps it
                pids = [p for p in rec.get("pids") or [] if p in creds] or [self.pid]
                fd = deleted.make_file(rec, creds[pids[0]])
            else:
                # a memfd keeps its name (as /proc shows it: "memfd:NAME") and its seals
                fd = os.memfd_create(rec.get("name", "ckpt-shmem"), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            self.shm[(rec["dev"], rec["inode"])] = fd
            size = rec["size"]
            os.ftruncate(fd, size)
            for x in self.reader.extents(rec["space"]):
                if x[0] >= size or x[1] > size + PAGE_SIZE:
                    raise ImageError("%s: shared memory %s: pages past its size" % (self.reader.path, rec["path"]))
                data = self.reader.extent_bytes(x, x[0], min(x[1], size), check=False)
                if data is not None:
                    off = 0
                    while off < len(data):
                        off += os.pwrite(fd, data[off:], x[0] + off)
            if rec.get("seals"):
                fcntl.fcntl(fd, F_ADD_SEALS, rec["seals"])
            if rec.get("deleted_file"):
                # kept read-only: a file open for writing cannot become an executable again
                # (PR_SET_MM exe_fd: EACCES), and its mappings take the access they had (_map_layout)
                self.shm[(rec["dev"], rec["inode"])] = _reopen(fd, os.O_RDONLY)
                os.close(fd)

    def close(self):
        for pp in self.members:
            if pp.paths is not None:
                pp.paths.close()
        for fd in self.shm.values():
            os.close(fd)
        self.shm = {}
        self.reader.close()


def _map_mode(m, flags=None):
    """How a mapped file is opened: read-write for a shared mapping that is writable, or was
    made from a file opened read-write (VmFlags mw: it may be made writable again)."""
    if m["kind"] != "file-shared":
        return O_RDONLY
    return O_RDWR if ("w" in m["perms"] or (flags is not None and "mw" in flags)) else O_RDONLY


CAP_SETS = ("cap_eff", "cap_prm", "cap_inh", "cap_amb")


def image_trust(path, fd, proc, fds, opts):
    """Who may restore what (README, "What restore trusts"). Run as root, restore trusts an
    image as a whole only when the image file is root's and nobody else may write it: then
    it was made by root (a dump writes 0600) and is restored as dumped. Any other image may
    have been edited by its owner, so it is restored only as its owner could run it: every
    uid and gid the owner's, groups among the owner's, no capability, no root directory of
    its own (chroot), no TCP repair. Returns True when trusted."""
    if os.geteuid() != 0:
        return True     # restore cannot give more than ckpt has
    st = os.fstat(fd)
    if st.st_uid == 0 and not st.st_mode & 0o022:
        return True
    creds = proc["creds"]
    owner = st.st_uid
    why = None
    try:
        import pwd
        pw = pwd.getpwuid(owner)
        own_gids = {st.st_gid, pw.pw_gid}
        own_groups = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except KeyError:
        own_gids, own_groups = {st.st_gid}, {st.st_gid}
    if st.st_uid == 0:
        why = "it is writable by %s" % ("group and others" if st.st_mode & 0o022 == 0o022 else
                                        "its group" if st.st_mode & 0o020 else "others")
    elif any(u != owner for u in creds["uid"]):
        why = "it asks for uids %s, its owner is uid %d" % ("/".join(map(str, creds["uid"])), owner)
    elif any(g not in own_gids for g in creds["gid"]):
        why = "it asks for gids %s, not its owner's" % "/".join(map(str, creds["gid"]))
    elif set(creds.get("groups") or []) - own_groups:
        why = "it asks for groups %s, not its owner's" % sorted(set(creds["groups"]) - own_groups)
    elif any(cap_bits(creds, k) for k in CAP_SETS):
        why = "it asks for capabilities (%s)" % ", ".join("%s %s" % (k, creds[k]) for k in CAP_SETS
                                                         if cap_bits(creds, k))
    elif proc.get("root", "/") != "/":
        why = "it asks for a root directory of its own (%s)" % proc["root"]
    elif not opts.tcp_close and any(e.get("kind") == "tcp" for e in fds):
        why = "it asks for established TCP connections, which need TCP repair (use --tcp-close)"
    if why:
        raise RestoreError("%s: refused: the image file is not root's own private file (owner uid %d, mode %o) "
                           "and %s; as root, restore trusts such an image only with its owner's own credentials"
                           % (path, owner, st.st_mode & 0o7777, why))
    return False


def _wait_reaped(pid, timeout=3.0):
    """A killed process lingers as a zombie until its parent reaps it: give the parent a moment."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if procfs.proc_state(pid) not in ("Z", "X"):
                return
        except CkptError:
            return
        time.sleep(0.01)


# ------------------------------------------------------------------------------- build
def _free_gap(busy, size, floor=0x100000000):
    """An address range of `size` bytes free of every (start, end) in busy."""
    cand = floor
    for s, e in sorted(busy):
        if e <= cand:
            continue
        if s >= cand + size:
            return cand
        cand = (e + 0xFFFFF) & ~0xFFFFF
    if cand + size <= TASK_TOP:
        return cand
    raise RestoreError("no free address range of %d bytes for the restorer" % size)


def _not_held(pid, entries):
    """Rollback: the fd entries that running process pid does not hold now as the same objects.
    The others are kept as they are (files.rollback_fds), not made again: nothing to check (a
    server's listening socket or connection it holds would be "in use" or "already exists")."""
    out = []
    for e in entries:
        try:
            st = os.stat("/proc/%d/fd/%d" % (pid, e["fd"]))
        except OSError:
            st = None
        if st is None or not files.same_object(e, st):
            out.append(e)
    return out


def pid_taken(pid):
    """Why clone3 could not have PID pid: a process has it, or (no such process) a process
    group or session of that number still has members."""
    if os.path.exists("/proc/%d" % pid):
        return "PID %d is in use (by %s); the process must get its original PID back" % (pid, procfs.comm(pid) or "?")
    return ("PID %d is still in use as a process group or session ID (a process of the dumped process's group "
            "or session is still there); the process must get its original PID back" % pid)


def _spawn(pid):
    r = lib.ck_spawn_stopped(pid)
    if r < 0:
        if -r == errno.EEXIST:
            raise RestoreError(pid_taken(pid))
        if -r == errno.EPERM:
            raise RestoreError("not allowed to choose PID %d (clone3 set_tid needs root)" % pid)
        raise RestoreError("clone3 for PID %d: %s" % (pid, os.strerror(-r)))
    _, st = os.waitpid(r, 0x40000000 | os.WUNTRACED)
    if not os.WIFSTOPPED(st):
        raise RestoreError("the new process %d did not stop as expected" % r)
    return r


class Builder:
    """Rebuilds one process of the image in a fresh process (`remote`: made by _spawn, or forked
    by its parent in a tree) that is a stopped copy of ckpt."""

    def __init__(self, plan, pp, opts, remote, tree, parent=None):
        self.plan = plan
        self.pp = pp
        self.parent = parent    # the parent's ProcPlan when the process was forked from it rebuilt
        self.kept = []          # (start, end) inherited from the parent as they are (copy-on-write)
        self.reprotect = []     # (start, size, prot): mapped writable, mprotect'ed once written
        self.opts = opts
        self.pid = pp.pid
        self.remote = remote
        self.tree = tree        # files.TreeObjects shared by the tree's processes
        self.timings = {}
        self.pages_written = 0
        self.bytes_written = 0

    def _lap(self, name, t):
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0) + round((now - t) * 1000, 3)
        return now

    def build_memory(self):
        """The address space and its pages. A process forked from its rebuilt parent keeps the
        mappings it shares pages with (copy-on-write), and the rest is replaced."""
        t = time.perf_counter()
        if self.parent is not None:
            self._reshape()
        else:
            self._clear_address_space()
        t = self._lap("unmap", t)
        self._map_layout()
        t = self._lap("map", t)
        self._patch_pages()
        self._lap("write_pages", t)

    def build_state(self):
        """Everything else but the release: process state, fds, threads, credentials."""
        t = time.perf_counter()
        # madvise, mlock, mseal as recorded: now that the memory is written and the children
        # (which must not inherit DONTFORK or WIPEONFORK effects they did not have) are forked
        if self.pp.vmflags is not None:
            vmflags.after_mapping(self.remote, self.pp.maps, self.pp.vmflags, self.opts.warn)
        t = self._lap("map_flags", t)
        self._process_state()
        t = self._lap("process_state", t)
        self._threads()
        self._lap("threads", t)

    # -- address space -----------------------------------------------------------------
    def _clear_address_space(self):
        r = self.remote
        cur = procfs.read_maps(self.pid)
        r.insn = find_syscall_insn(self.pid, cur)
        # should ckpt die while building (SIGKILL, crash), the half-built process dies with it
        # (PR_SET_PDEATHSIG, set by ck_spawn_stopped in the child itself; cleared at release)
        # the child inherited ckpt's rseq registration: drop it before its area goes away
        conf = r.main.get_rseq()
        if conf:
            r.call(sysno.rseq, conf["ptr"], conf["size"], threads.RSEQ_FLAG_UNREGISTER, conf["sig"],
                   what="unregistering the inherited rseq")
        specials = sorted((v.start, v.end) for v in cur if v.special and v.path != "[vsyscall]")
        holes, lo = [], MMAP_MIN
        for s, e in specials:
            if s > lo:
                holes.append((lo, s))
            lo = e
        holes.append((lo, TASK_TOP))
        r.many([(sysno.munmap, (s, e - s)) for s, e in holes], what="munmap of the restorer's own memory")
        # scratch area where nothing of the image (of any of its processes: children forked from
        # this one inherit it) or the specials lies
        busy = [(m["start"], m["end"]) for pp in self.plan.members for m in pp.maps] + specials
        scratch = _free_gap(busy, SCRATCH_SIZE)
        got = r.call(sysno.mmap, scratch, SCRATCH_SIZE, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0,
                     what="mmap of the scratch area")
        r.set_scratch(got)
        self.busy = busy + [(got, got + SCRATCH_SIZE)]
        self._move_specials(cur)

    def _reshape(self):
        """A process forked from its rebuilt parent: the parent's layout, pages and scratch area.
        The ranges whose pages it shares with the parent (copy-on-write) are kept as they are;
        everything else is unmapped (and mapped again by _map_layout around them)."""
        r = self.remote
        cur = procfs.read_maps(self.pid)
        r.insn = find_syscall_insn(self.pid, cur)
        conf = r.main.get_rseq()
        if conf:
            r.call(sysno.rseq, conf["ptr"], conf["size"], threads.RSEQ_FLAG_UNREGISTER, conf["sig"],
                   what="unregistering the inherited rseq")
        # exactly the pages it shares with its parent (the dump found them, within private
        # mappings both have compatibly); everything around them is mapped again
        self.kept = [tuple(x) for x in self.pp.cow]
        stay = sorted([(v.start, v.end) for v in cur if v.special and v.path != "[vsyscall]"]
                      + [(r.scratch, r.scratch + SCRATCH_SIZE)] + self.kept)
        holes, lo = [], MMAP_MIN
        for s_, e_ in stay:
            if s_ > lo:
                holes.append((lo, s_))
            lo = max(lo, e_)
        holes.append((lo, TASK_TOP))
        r.many([(sysno.munmap, (a, b - a)) for a, b in holes], what="munmap of the parent's memory")
        self.busy = stay
        want = {m["path"]: m["start"] for m in self.pp.maps if m["kind"] == "special"}
        if any(v.special and v.path in want and v.start != want[v.path] for v in cur):
            self._move_specials(cur)

    def _move_specials(self, cur):
        r = self.remote
        now = {v.path: v for v in cur if v.special and v.path != "[vsyscall]"}
        want = {m["path"]: m for m in self.pp.maps if m["kind"] == "special" and m["path"] != "[vsyscall]"}
        if set(now) != set(want) or any(now[k].size != want[k]["end"] - want[k]["start"] for k in now):
            raise RestoreError("the image's vdso/vvar layout (%s) does not match this kernel's (%s): "
                               "restore needs the kernel the dump was made on"
                               % (sorted(want), sorted(now)))
        vdso_off = r.insn - now["[vdso]"].start
        span = max(v.end for v in now.values()) - min(v.start for v in now.values())
        park = _free_gap(self.busy + [(v.start, v.end) for v in now.values()], span + 0x100000)
        parked = {}
        base = min(v.start for v in now.values())
        for name, v in now.items():
            dst = park + (v.start - base)
            r.call(sysno.mremap, v.start, v.size, v.size, MREMAP_MAYMOVE | MREMAP_FIXED, dst, what="moving %s" % name)
            parked[name] = dst
            if name == "[vdso]":
                r.insn = dst + vdso_off
        for name, m in want.items():
            size = m["end"] - m["start"]
            r.call(sysno.mremap, parked[name], size, size, MREMAP_MAYMOVE | MREMAP_FIXED, m["start"],
                   what="moving %s to %#x" % (name, m["start"]))
            if name == "[vdso]":
                r.insn = m["start"] + vdso_off

    def _map_layout(self):
        """Every mapping at its address, with its protection, its file or memory object, its
        offset and the mmap flags its VmFlags call for (MAP_GROWSDOWN, MAP_NORESERVE)."""
        r = self.remote
        opened = {}       # key -> fd in the child: ("map", path, mode) for files, (dev, inode, mode) for objects
        calls = []
        table = self.pp.vmflags if self.pp.vmflags is not None else vmflags.Table({})
        local = self._objects()
        try:
            for m in self.pp.maps:
                k = m["kind"]
                if k == "special":
                    continue
                # around the ranges inherited from the parent (copy-on-write), in pieces
                pieces = _outside((m["start"], m["end"]), self.kept) if self.kept else [(m["start"], m["end"])]
                for lo, hi in pieces:
                    calls += self._map_piece(m, lo, hi, table, local, opened)
        finally:
            for key, fd in local.items():
                if key not in self.plan.shm:
                    os.close(fd)
        results = r.many(calls, what=lambda nr, a: "mmap at %#x" % a[0])
        for (nr, a), got in zip(calls, results):
            if got != a[0]:
                raise RestoreError("mmap at %#x landed at %#x" % (a[0], got))
        self.opened_fds = list(opened.values())
        if r.ckpt_pidfd is not None:
            self.opened_fds.append(r.ckpt_pidfd)

    def _map_piece(self, m, start, end, table, local, opened):
        """The mmap call for [start, end) of mapping m (all of it, or a piece around ranges
        inherited from the parent)."""
        r = self.remote
        calls = []
        k = m["kind"]
        size = end - start
        off = m["offset"] + (start - m["start"])
        prot = _prot(m["perms"])
        flags = table.of(m)
        extra = MAP_NORESERVE if flags and "nr" in flags else 0
        if k != "shmem" and m["perms"][3] == "p" and (
                ("gd" in flags) if flags is not None else m["path"] == "[stack]"):
            extra |= MAP_GROWSDOWN
        key = (m["dev"], m["inode"])
        if m["perms"][3] == "p" and "w" not in m["perms"] and flags and "ac" in flags:
            # written once, then made read-only (or PROT_NONE): the memory stays charged
            # to the process (VmFlags ac), as a mapping made writable, then mprotect'ed,
            # is; mprotect'ed to its protection once its pages are written (_patch_pages)
            self.reprotect.append((start, size, prot))
            prot |= PROT["w"]
        if k == "shmem" or (k == "file-private" and _deleted(m) and key in local):
            # a memory object (shared memory, a deleted file): made once, in ckpt, and
            # mapped from an fd of the access the process had: read-only for a private
            # mapping and for a shared one made from a read-only fd (no VmFlags mw)
            mode = os.O_RDONLY if k != "shmem" or (flags is not None and "mw" not in flags) else os.O_RDWR
            okey = key + (mode,)
            if okey not in opened:
                fd = local[key]
                same = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == mode
                if not same:
                    fd = _reopen(fd, mode)
                try:
                    opened[okey] = r.take(fd, what="the memory object of %s" % m["path"])
                finally:
                    if not same:
                        os.close(fd)
            share = MAP_SHARED if k == "shmem" else MAP_PRIVATE
            calls.append((sysno.mmap, (start, size, prot, share | MAP_FIXED_NOREPLACE | extra,
                                       opened[okey], off)))
        elif k == "anon" or (k == "file-private" and _deleted(m)):
            # (a deleted file's private mapping in an image that holds no copy of the file:
            # anonymous, its every page from the image)
            calls.append((sysno.mmap, (start, size, prot,
                                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | extra, -1, 0)))
        else:
            fkey = self.pp.map_keys.get(m["start"]) or ("map", m["path"], _map_mode(m, flags))
            if fkey not in opened:
                opened[fkey] = r.take(self.pp.paths.get(fkey), what="the mapped file %s" % m["path"])
            share = MAP_SHARED if k == "file-shared" else MAP_PRIVATE
            calls.append((sysno.mmap, (start, size, prot, share | MAP_FIXED_NOREPLACE | extra,
                                       opened[fkey], off)))
        return calls

    def _objects(self):
        """(dev, inode) -> ckpt's fd of every memory object the process maps: the tree's (made
        once with their pages: Plan.shared_memory), and, in an image that keeps shared memory
        per process, one made here from the process's own pages. Shared memory is never written
        through a mapping: a read-only or PROT_NONE shared mapping cannot be written from
        outside (/proc/PID/mem refuses: EIO)."""
        out = {}
        own = {}
        for m in self.pp.maps:
            key = (m["dev"], m["inode"])
            if key in self.plan.shm:
                out[key] = self.plan.shm[key]
            elif m["kind"] == "shmem":
                own.setdefault(key, []).append(m)
        try:
            for key, ms in own.items():
                fd = out[key] = os.memfd_create("ckpt-shmem", os.MFD_CLOEXEC)
                os.ftruncate(fd, max(m["offset"] + m["end"] - m["start"] for m in ms))
                reader = self.plan.reader
                extents = reader.extents(self.pid)
                for m in ms:
                    for x in extents:
                        lo, hi = max(x[0], m["start"]), min(x[1], m["end"])
                        if lo >= hi:
                            continue
                        data = reader.extent_bytes(x, lo, hi, check=False)
                        if data is not None:
                            _pwrite_all(fd, data, m["offset"] + lo - m["start"])
        except BaseException:
            for key, fd in out.items():
                if key not in self.plan.shm:
                    os.close(fd)
            raise
        return out

    def _patch_pages(self):
        """Write the pages whose content differs from their source, in large batches."""
        r = self.remote
        reader = self.plan.reader
        spans = []
        for m in self.pp.maps:
            if m["kind"] in ("special", "file-shared", "shmem"):
                continue    # the file holds the pages, or the memory object (see _objects)
            # the source of pages the image holds no data for: zero for anonymous memory (and
            # a deleted file's mapping whose file the image does not hold), else the file
            zero_src = m["kind"] == "anon" or (_deleted(m) and (m["dev"], m["inode"]) not in self.plan.shm)
            src = None if zero_src else self._source_fd(m)
            # the ranges inherited from the parent (copy-on-write) are its pages already
            for a, b in (_outside((m["start"], m["end"]), self.kept) if self.kept else [(m["start"], m["end"])]):
                spans.append((a, b, zero_src, src, m["offset"] + a - m["start"]))
        spans.sort(key=lambda x: x[0])
        runs, buf, size = [], bytearray(), 0

        def flush():
            nonlocal runs, buf, size
            if runs:
                st = r.mem.write_runs(runs, buf)
                bad = [(a, n, e) for (a, n), e in zip(runs, st) if e]
                if bad:
                    a, n, e = bad[0]
                    raise RestoreError("writing %d bytes at %#x: %s" % (n, a, os.strerror(e)))
                self.pages_written += size // PAGE_SIZE
                self.bytes_written += size
            runs, buf, size = [], bytearray(), 0

        extents = reader.extents(self.pid)
        j = 0
        for s, e, zero_src, src, off in spans:
            while j < len(extents) and extents[j][1] <= s:
                j += 1
            k = j
            while k < len(extents) and extents[k][0] < e:
                x = extents[k]
                lo, hi = max(x[0], s), min(x[1], e)
                k += 1
                if lo >= hi:
                    continue
                data = reader.extent_bytes(x, lo, hi, check=False)
                if data is None:
                    if zero_src:
                        continue   # fresh anonymous memory is zero already: nothing to write
                    data = bytes(hi - lo)
                pieces = [(lo, data)] if src is None else _differing(data, src, off + lo - s, lo)
                for a, piece in pieces:
                    runs.append((a, len(piece)))
                    buf += piece
                    size += len(piece)
                if size >= WRITE_CHUNK:
                    flush()
        flush()
        if self.reprotect:
            r.many([(sysno.mprotect, x) for x in self.reprotect], what=lambda nr, a: "mprotect of %#x" % a[0])

    def _source_fd(self, m):
        """ckpt's fd of the file a private file mapping shows where it has no page of its own
        (the mapped file, or a deleted file's object), or None."""
        if m["kind"] != "file-private":
            return None
        if _deleted(m):
            return self.plan.shm.get((m["dev"], m["inode"]))
        key = self.pp.map_keys.get(m["start"], ("map", m["path"], O_RDONLY))
        return self.pp.paths.held.get(key)

    # -- process ------------------------------------------------------------------------
    def _process_state(self):
        r = self.remote
        p = self.pp.proc
        paths = self.pp.paths
        exe_fd = -1
        if "exe" in paths.held and not _same_file("/proc/%d/exe" % self.pid, paths.get("exe")):
            # the kernel refuses to change the exe link while the old exe is mapped: when the
            # restorer's own exe is the image's (python3 restoring python3) it is right already
            exe_fd = r.take(paths.get("exe"), what="the executable %s" % p["exe"])
        elif self.pp.exe_object in self.plan.shm:
            exe_fd = r.take(self.plan.shm[self.pp.exe_object], what="the deleted executable %s" % p["exe"])
        process.restore_mm(r, p, exe_fd)
        # from here on the process opens nothing with root's rights: its file ids and groups are
        # its own (bound unix socket names, connections to them); the rest follows last
        self._process_file_ids()
        cwd = r.take(paths.get("cwd"), what="the working directory %s" % p["cwd"])
        if "root" in paths.held:
            root = r.take(paths.get("root"), what="the root directory %s" % p["root"])
            r.call(sysno.fchdir, root, what="fchdir to the root directory %s" % p["root"])
            r.reset()
            r.call(sysno.chroot, r.put_str("."), what="chroot to %s" % p["root"])
            r.call(sysno.close, root)
        r.call(sysno.fchdir, cwd, what="fchdir to %s" % p["cwd"])
        r.many([(sysno.close, (fd,)) for fd in self.opened_fds + [cwd] + ([exe_fd] if exe_fd >= 0 else [])],
               what="close")
        process.restore_process(r, p)
        # fds before rlimits: objects are parked above every fd number of the image, which a low
        # RLIMIT_NOFILE of the process would refuse. Objects ckpt makes itself (sockets, timers)
        # are made with the process's rights too (CAP_NET_ADMIN on top, for TCP repair)
        extra = (CAP_NET_ADMIN,) if self.plan.trusted else ()
        if p.get("fd_table_of") is None:    # else its parent's table, which is its own (CLONE_FILES)
            with acting_as(p["creds"], extra_caps=extra):
                files.restore_fds(r, self.pp.fds, self.opts, paths, self.tree)
        process.restore_rlimits(self.pid, p, self.opts.warn)

    def _process_file_ids(self):
        """The restored process's groups and file uid/gid become the dumped ones (the file
        capabilities of root go with a non-zero fsuid), ahead of its full credentials."""
        r = self.remote
        creds = self.pp.proc["creds"]
        groups = creds["groups"]
        r.reset()
        r.many([(sysno.setgroups, (len(groups), r.put(struct.pack("<%dI" % len(groups), *groups)) if groups else 0)),
                (sysno.setfsgid, (creds["gid"][3],)), (sysno.setfsuid, (creds["uid"][3],))],
               what=lambda nr, a: "setting the file ids (%d)" % nr)

    def _threads(self):
        r = self.remote
        main = [t for t in self.pp.threads if t["tid"] == self.pid]
        if not main:
            raise RestoreError("image has no state for the main thread %d" % self.pid)
        others = [t for t in self.pp.threads if t["tid"] != self.pid]
        if others:
            _call(PTRACE_SETOPTIONS, self.pid, 0, PTRACE_O_TRACECLONE)
        for t in others:
            threads.create_thread(r, t["tid"])
        parts.restore(r, self.pp.proc, self.pp.threads, "process")
        for t in self.pp.threads:
            threads.restore_thread_state(r, t)
        parts.restore(r, self.pp.proc, self.pp.threads, "threads")
        for t in self.pp.threads:
            threads.requeue_signals(r, t, self.pid)
        r.reset()
        calls = []
        for raw in self.pp.proc.get("shared_signals", []):
            info = base64.b64decode(raw)
            calls.append((sysno.rt_sigqueueinfo, (self.pid, struct.unpack_from("<i", info)[0], r.put(info))))
        r.many(calls, what="queueing a process-wide pending signal")
        # last: credentials drop to what was dumped, the scratch area goes, registers are set
        creds = self.pp.proc["creds"]
        for t in self.pp.threads:
            process.restore_credentials(r, t["tid"], creds)
        process.restore_after_credentials(r, self.pp.proc, self.opts.warn, self.plan.trusted)
        parts.restore(r, self.pp.proc, self.pp.threads, "last")
        r.call(sysno.munmap, r.scratch, SCRATCH_SIZE, what="munmap of the scratch area")
        r.scratch = None
        for t in self.pp.threads:
            threads.restore_thread_regs(r, t)
        for t in self.pp.threads:
            problems = process.check_no_more_privilege(self.pid, t["tid"], creds)
            if problems:
                raise RestoreError("thread %d would have more privilege than dumped: %s" % (t["tid"], "; ".join(problems)))

    def prepare_release(self, root):
        """The parent-death signal becomes the dumped one (the SIGKILL that tied the process to
        ckpt while it was built goes); the target's own stays unset: its parent is ckpt now,
        which exits. A stopped process is stopped again."""
        sig = 0 if root else self.pp.proc.get("pdeathsig", 0)
        self.remote.call(sysno.prctl, PR_SET_PDEATHSIG, sig, 0, 0, 0, what="prctl(PR_SET_PDEATHSIG, %d)" % sig)
        process.restore_stop_state(self.pid, self.pp.threads)

    def release(self):
        for t in self.remote.threads.values():
            t.detach()


def _differing(data, fd, off, addr):
    """The pages of data (the image's, for address addr) that differ from file fd's at offset
    off, as [(address, bytes)] runs. A page of a private file mapping equal to its file's is not
    written: the process then shows the file's page (as one it never wrote), not a copy of it,
    and sees later writes to the file as the dumped process did (the dump may record pages of
    such a mapping that it only read: they are absent until then, and a live dump sees absent
    pages as written)."""
    n = len(data)
    want = os.pread(fd, n, off)
    if len(want) < n:
        want += bytes(n - len(want))      # past the end of the file: zero, as the mapping shows it
    if want == data:
        return []
    view, fview = memoryview(data), memoryview(want)
    out, start = [], None
    for p in range(0, n, PAGE_SIZE):
        differs = view[p:p + PAGE_SIZE] != fview[p:p + PAGE_SIZE]
        if differs and start is None:
            start = p
        elif not differs and start is not None:
            out.append((addr + start, bytes(view[start:p])))
            start = None
    if start is not None:
        out.append((addr + start, bytes(view[start:])))
    return out


def _reopen(fd, mode):
    """The file of ckpt's fd opened again with another access mode (through /proc/self/fd: the
    same inode, a deleted file or a memfd too)."""
    return os.open("/proc/self/fd/%d" % fd, mode | os.O_CLOEXEC)


def _pwrite_all(fd, data, off):
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], off + done)


def _outside(rng, ranges):
    """[lo, hi) minus sorted, disjoint (start, end) ranges."""
    lo, hi = rng
    out = []
    for s, e in ranges:
        if e <= lo or s >= hi:
            continue
        if s > lo:
            out.append((lo, s))
        lo = max(lo, e)
    if lo < hi:
        out.append((lo, hi))
    return out


def _same_file(a, fd):
    try:
        sa, sb = os.stat(a), os.fstat(fd)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _deleted(m):
    """Whether a mapped file was deleted at the dump: the flag the dump records (decided from the
    mapped file itself); the " (deleted)" suffix of the name only for images made before it
    (a file may really be named so)."""
    if "deleted" in m:
        return bool(m["deleted"])
    return m["path"].endswith(" (deleted)")


def restore(path, opts):
    from ckpt.restore.tree import TreeRestore
    plan = Plan(path, opts)
    try:
        try:
            res = TreeRestore(plan, opts).run()
        except BaseException:
            try:
                files.restored(plan.metas, ok=False)
            except Exception as e:      # the restore's own error is the one to report
                opts.warn("ckpt: warning: after the failed restore: %s" % e)
            raise
        files.restored(plan.metas, ok=True)
    finally:
        plan.close()
    if opts.pidfile:    # a new file renamed into place: never through a symlink, never half-written
        from ckpt.outfile import write_file
        write_file(opts.pidfile, b"%d\n" % res["pid"], mode=0o644, what="PID file")
    return res


__all__ = ["restore", "RestoreOptions", "CkptError"]
