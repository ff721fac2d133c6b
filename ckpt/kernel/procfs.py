"""/proc parsing: mappings, threads, status, stat, limits, fds. Pure Python, no side effects."""
import os
import re
from dataclasses import dataclass, field

from ckpt.errors import TargetGone

SPECIAL_MAPPINGS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")


def proc(pid, *parts):
    return os.path.join("/proc", str(pid), *parts)


def _read(path, mode="r"):
    """A /proc file's content: bytes with mode "rb", else text decoded as file names are
    (os.fsdecode: bytes that are not UTF-8, as in a process's name, become lone surrogates
    that JSON keeps and os.fsencode turns back into the same bytes)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone("process %s is gone (%s)" % (path.split("/")[2], path)) from None
    return data if "b" in mode else os.fsdecode(data)


@dataclass
class Mapping:
    """One line of /proc/PID/maps, with what ckpt derives from it.

    `path` is the mapped file's name exactly (see read_maps; bytes that are not UTF-8 as lone
    surrogates, as os.fsdecode makes them); `deleted` tells whether that name no longer leads
    to the mapped file (unlinked, or memory with no name: memfd, SysV, shared anonymous)."""
    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str = ""
    file_id: dict = field(default=None)
    deleted: bool = False

    @property
    def size(self):
        return self.end - self.start

    @property
    def readable(self):
        return self.perms[0] == "r"

    @property
    def writable(self):
        return self.perms[1] == "w"

    @property
    def shared(self):
        return self.perms[3] == "s"

    @property
    def special(self):
        return self.path in SPECIAL_MAPPINGS

    @property
    def kind(self):
        """What the content of this mapping is, in restore's terms.

        anon         private memory whose absent pages read as zero
        file-private private file mapping: absent or unmodified pages are the file's
        file-shared  shared mapping of a regular file that still exists: the file holds the data
        shmem        shared memory another process or fd may change (shared anon, memfd, SysV, deleted)
        special      vdso / vvar / vsyscall, recreated by the kernel
        """
        if self.special:
            return "special"
        has_file = self.inode != 0 and self.path.startswith("/")
        if self.shared:
            if has_file and not self.deleted and not self.path.startswith(("/memfd:", "/SYSV", "/dev/zero")):
                return "file-shared"
            return "shmem"
        if has_file:
            return "file-private"
        return "anon"

    def key(self):
        return (self.start, self.end)

    def to_json(self):
        return {
            "start": self.start, "end": self.end, "perms": self.perms, "offset": self.offset,
            "dev": self.dev, "inode": self.inode, "path": self.path, "kind": self.kind,
            "file": self.file_id, "deleted": self.deleted,
        }


_MAPS_RE = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+) *(.*)$", re.S)
_DELETED = b" (deleted)"
_NEWLINE = b"\\012"     # how maps shows a newline in a name (and, alas, a real backslash-0-1-2)


def read_maps(pid, with_identity=False):
    """The mappings of a process, from /proc/PID/maps read as bytes.

    The maps text gives a file's name exactly but for two ambiguities, resolved here: a
    newline in the name is shown as the four characters \\012 (which a name may also really
    hold), and " (deleted)" is appended to the name of an unlinked file (which a name may also
    really end with). For such names the mapped file itself is asked, through
    /proc/PID/map_files/START-END: its link gives the exact name, and the file's link count
    (or, if it still has links, whether the name still leads to it) tells whether it is
    deleted. Without access to map_files (ckpt not privileged), the name is checked against
    the maps line's inode instead."""
    data = _read(proc(pid, "maps"), "rb")
    maps = []
    for line in data.split(b"\n"):
        m = _MAPS_RE.match(line)
        if not m:
            continue
        start, end, inode, raw = int(m.group(1), 16), int(m.group(2), 16), int(m.group(6)), m.group(7)
        deleted = False
        if raw.startswith(b"/") and (_NEWLINE in raw or raw.endswith(_DELETED)):
            if inode != 0:
                raw, deleted = _resolve_name(pid, start, end, inode, raw)
            else:
                deleted = raw.endswith(_DELETED)     # SysV shared memory: no file to ask
        vma = Mapping(start, end, m.group(3).decode(), int(m.group(4), 16), m.group(5).decode(), inode,
                      os.fsdecode(raw), deleted=deleted)
        if with_identity and vma.kind in ("file-private", "file-shared"):
            vma.file_id = file_identity(pid, vma)
        maps.append(vma)
    return maps


def _same(st, other):
    return other is not None and (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)


def _stat(path):
    try:
        return os.stat(path)
    except OSError:
        return None


def _resolve_name(pid, start, end, inode, raw):
    """(exact name, deleted) of the file mapped at start-end, whose maps text is `raw`."""
    link = os.fsencode(proc(pid, "map_files", "%x-%x" % (start, end)))
    try:
        st = os.stat(link)
        name = os.readlink(link)
    except OSError:
        st = None
    if st is not None:
        if st.st_nlink == 0:
            return name, True
        if name.endswith(_DELETED) and not _same(st, _stat(name)):
            return name, True      # this name was unlinked (the file lives on under another)
        return name, False
    # not allowed to read map_files: the candidate names, checked against the inode
    cands = [raw.replace(_NEWLINE, b"\n"), raw] if _NEWLINE in raw else [raw]
    for c in cands:
        s = _stat(c)
        if s is not None and s.st_ino == inode:
            return c, False
    return cands[0], raw.endswith(_DELETED)


def file_identity(pid, vma):
    """The identity of the file behind a mapping: enough to tell at restore whether it changed."""
    link = proc(pid, "map_files", "%x-%x" % (vma.start, vma.end))
    try:
        st = os.stat(link)
    except OSError:
        try:
            st = os.stat(vma.path)
        except OSError:
            return None
    return {"path": vma.path, "dev": st.st_dev, "inode": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


_SMAPS_HEAD = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) ", re.M)


def smaps_flags(pid):
    """The VmFlags of every mapping, from /proc/PID/smaps: [(start, end, ["rd", "wr", ...])].
    Costly for a large process (the kernel walks every page table to count what smaps also
    shows: about 20 ms per GiB resident), so read while the process runs, not in a freeze."""
    data = _read(proc(pid, "smaps"), "rb")
    out = []
    heads = list(_SMAPS_HEAD.finditer(data))
    for i, h in enumerate(heads):
        block_end = heads[i + 1].start() if i + 1 < len(heads) else len(data)
        at = data.find(b"\nVmFlags:", h.end(), block_end)
        flags = []
        if at >= 0:
            eol = data.find(b"\n", at + 1)
            flags = data[at + 9:eol if eol >= 0 else len(data)].decode("ascii", "replace").split()
        out.append((int(h.group(1), 16), int(h.group(2), 16), flags))
    return out


def tasks(pid):
    try:
        return sorted(int(t) for t in os.listdir(proc(pid, "task")))
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone("process %d is gone" % pid) from None


def status(pid, tid=None):
    path = proc(pid, "task", str(tid), "status") if tid else proc(pid, "status")
    out = {}
    for line in _read(path).split("\n"):
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def stat_fields(pid):
    """/proc/PID/stat split into fields, index 1-based as in proc(5) (field 1 is the pid)."""
    text = _read(proc(pid, "stat"))
    rparen = text.rindex(")")
    head = text[:rparen + 1]
    rest = text[rparen + 2:].split()
    pid_s, comm = head.split(" ", 1)
    return [None, int(pid_s), comm[1:-1]] + rest


def task_state(pid, tid):
    """The one-letter state of one thread, or None when it is gone."""
    try:
        text = _read(proc(pid, "task", str(tid), "stat"))
    except TargetGone:
        return None
    return text[text.rindex(")") + 2]


def ppid(pid):
    """The parent's PID, or None when the process is gone."""
    try:
        return int(stat_fields(pid)[4])
    except (TargetGone, ValueError, IndexError):
        return None


SYS_clone, SYS_vfork, SYS_clone3 = 56, 58, 435
CLONE_VFORK = 0x4000


def vfork_child(pid, tid):
    """If thread `tid` of `pid` is blocked in vfork() (or clone/clone3 with CLONE_VFORK),
    waiting until its child runs exec or exits, the child's PID (0 when it cannot be told);
    otherwise None. Read from the system call the thread is blocked in."""
    try:
        with open(proc(pid, "task", str(tid), "syscall"), "rb") as f:
            fields = f.read().split()
        nr = int(fields[0])
        arg0 = int(fields[1], 16)
    except (OSError, ValueError, IndexError):
        return None         # gone, running, or not in a system call
    if nr == SYS_clone3:
        try:
            with open(proc(pid, "mem"), "rb", buffering=0) as f:
                f.seek(arg0)
                arg0 = int.from_bytes(f.read(8), "little")      # clone_args.flags
        except (OSError, OverflowError):
            return None
    if not (nr == SYS_vfork or (nr in (SYS_clone, SYS_clone3) and arg0 & CLONE_VFORK)):
        return None
    try:
        with open(proc(pid, "task", str(tid), "children"), "rb") as f:
            kids = [int(k) for k in f.read().split()]
    except (OSError, ValueError):
        kids = []
    for k in reversed(kids):       # the newest child that still runs
        try:
            if proc_state(k) not in ("Z", "X"):
                return k
        except (TargetGone, ValueError, IndexError):
            continue
    return 0


def blocked_reason(pid, tid):
    """Why a thread does not stop: "blocked in vfork for child N", "in uninterruptible sleep
    (...)", or its state; None when it is gone."""
    state = task_state(pid, tid)
    if state in (None, "Z", "X"):
        return None
    if state == "D":
        child = vfork_child(pid, tid)
        if child is not None:
            return "blocked in vfork for child %d" % child if child else "blocked in vfork"
        frozen = freezer_cgroup(pid)
        if frozen:
            return "frozen by the cgroup freezer (%s)" % frozen
        try:
            with open(proc(pid, "task", str(tid), "wchan"), "rb") as f:
                wchan = os.fsdecode(f.read()).strip()
        except OSError:
            wchan = ""
        return "in uninterruptible sleep (state D%s)" % (", in %s" % wchan if wchan and wchan != "0" else "")
    return "in state %s" % state


def freezer_cgroup(pid):
    """The cgroup v1 freezer group holding the process, if that group is FROZEN or FREEZING
    (its threads then never stop for ptrace); else None."""
    try:
        with open(proc(pid, "cgroup"), "rb") as f:
            groups = f.read().split(b"\n")
        with open("/proc/self/mountinfo", "rb") as f:
            mounts = f.read().split(b"\n")
    except OSError:
        return None
    path = next((g.split(b":", 2)[2] for g in groups if g.count(b":") >= 2
                 and b"freezer" in g.split(b":", 2)[1].split(b",")), None)
    if path is None:
        return None
    for m in mounts:
        pre, _, post = m.partition(b" - ")
        f = pre.split(b" ")
        if len(f) < 5 or not post.startswith(b"cgroup ") or b"freezer" not in post.split(b" ")[-1].split(b","):
            continue
        root, mnt = f[3], f[4]
        rel = path[len(root):] if path.startswith(root) else path
        try:
            with open(os.path.join(mnt, rel.lstrip(b"/"), b"freezer.state"), "rb") as st:
                state = st.read().strip()
        except OSError:
            return None
        return os.fsdecode(path) if state in (b"FROZEN", b"FREEZING") else None
    return None


def mm_fields(pid):
    f = stat_fields(pid)
    names = {26: "start_code", 27: "end_code", 28: "start_stack", 45: "start_data", 46: "end_data",
             47: "start_brk", 48: "arg_start", 49: "arg_end", 50: "env_start", 51: "env_end"}
    return {name: int(f[i]) for i, name in names.items()}


def proc_state(pid):
    """The one-letter state (R, S, D, T, t, Z, X) of a process."""
    return stat_fields(pid)[3]


def comm(tid):
    """A thread's name (os.fsdecode'd: see _read), or None when it is gone."""
    try:
        with open(proc(tid, "comm"), "rb") as f:
            data = f.read()
    except OSError:
        return None
    return os.fsdecode(data[:-1] if data.endswith(b"\n") else data)



def auxv(pid):
    return _read(proc(pid, "auxv"), "rb")


def readlink(pid, *parts):
    try:
        return os.readlink(proc(pid, *parts))
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone("process %d is gone" % pid) from None


_LIMIT_NAMES = {
    "Max cpu time": "RLIMIT_CPU", "Max file size": "RLIMIT_FSIZE", "Max data size": "RLIMIT_DATA",
    "Max stack size": "RLIMIT_STACK", "Max core file size": "RLIMIT_CORE",
    "Max resident set": "RLIMIT_RSS", "Max processes": "RLIMIT_NPROC",
    "Max open files": "RLIMIT_NOFILE", "Max locked memory": "RLIMIT_MEMLOCK",
    "Max address space": "RLIMIT_AS", "Max file locks": "RLIMIT_LOCKS",
    "Max pending signals": "RLIMIT_SIGPENDING", "Max msgqueue size": "RLIMIT_MSGQUEUE",
    "Max nice priority": "RLIMIT_NICE", "Max realtime priority": "RLIMIT_RTPRIO",
    "Max realtime timeout": "RLIMIT_RTTIME",
}


def limits(pid):
    """Resource limits from /proc/PID/limits as {RLIMIT_NAME: [soft, hard]} (-1 = unlimited)."""
    out = {}
    for line in _read(proc(pid, "limits")).splitlines()[1:]:
        for label, name in _LIMIT_NAMES.items():
            if line.startswith(label):
                vals = line[len(label):].split()
                out[name] = [-1 if v == "unlimited" else int(v) for v in vals[:2]]
    return out


def fdinfo(pid, fd):
    out = {}
    for line in _read(proc(pid, "fdinfo", str(fd))).split("\n"):
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def fds(pid):
    try:
        return sorted(int(x) for x in os.listdir(proc(pid, "fd")))
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone("process %d is gone" % pid) from None


def exists(pid):
    return os.path.exists(proc(pid, "stat"))


def links(pid):
    """A process's place in the tree: {pid, ppid, pgid, sid, state, exit_code} from its stat
    (exit_code: the wait status a zombie leaves to its parent); None when it is gone."""
    try:
        f = stat_fields(pid)
        return {"pid": pid, "ppid": int(f[4]), "pgid": int(f[5]), "sid": int(f[6]), "state": f[3],
                "exit_code": int(f[52]) if len(f) > 52 else 0, "comm": f[2]}
    except (TargetGone, ValueError, IndexError, OSError):
        return None


def descendants(pid):
    """Every descendant of pid (zombies too), parents before their children, each process's
    children by PID: [links(...)] (see links). Read from every process's stat: the
    children lists of /proc/PID/task/TID/children are not guaranteed (CONFIG_PROC_CHILDREN)."""
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        info = links(int(name))
        if info is not None:
            kids.setdefault(info["ppid"], []).append(info)
    out, queue = [], [pid]
    while queue:
        nxt = []
        for p in queue:
            for info in sorted(kids.get(p, ()), key=lambda i: i["pid"]):
                out.append(info)
                nxt.append(info["pid"])
        queue = nxt
    return out


def children(pid):
    """The children of a process (zombies too), from /proc/PID/task/TID/children of each of its
    threads: exact while the process is stopped (the freeze), cheap (no walk over /proc)."""
    out = set()
    try:
        tids = os.listdir(proc(pid, "task"))
    except OSError:
        return []
    for tid in tids:
        try:
            with open(proc(pid, "task", tid, "children")) as f:
                out.update(int(x) for x in f.read().split())
        except OSError:
            continue
    return sorted(out)


def descendants_of_stopped(pid):
    """descendants(pid) through the children lists (see children): for a tree whose processes
    are all stopped; [links(...)], parents first."""
    out, queue = [], [pid]
    while queue:
        nxt = []
        for p in queue:
            for c in children(p):
                info = links(c)
                if info is not None and info["ppid"] == p:
                    out.append(info)
                    nxt.append(c)
        queue = nxt
    return out


def unescape_mountinfo(field):
    """A path field of /proc/PID/mountinfo, with its \\ooo escapes (space, tab, newline,
    backslash) undone, byte for byte."""
    raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8) & 0xFF]), os.fsencode(field))
    return os.fsdecode(raw)
