"""/proc parsing: mappings, threads, status, stat, limits, fds. Pure Python, no side effects."""
import os
import re
from dataclasses import dataclass, field

from ckpt.errors import TargetGone

SPECIAL_MAPPINGS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")


def proc(pid, *parts):
    return os.path.join("/proc", str(pid), *parts)


def _read(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone("process %s is gone (%s)" % (path.split("/")[2], path)) from None


@dataclass
class Mapping:
    """One line of /proc/PID/maps, with what ckpt derives from it."""
    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str = ""
    file_id: dict = field(default=None)

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
    def deleted(self):
        return self.path.endswith(" (deleted)")

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
            "file": self.file_id,
        }


_MAPS_RE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$")


def read_maps(pid, with_identity=False):
    text = _read(proc(pid, "maps"))
    maps = []
    for line in text.splitlines():
        m = _MAPS_RE.match(line)
        if not m:
            continue
        vma = Mapping(int(m.group(1), 16), int(m.group(2), 16), m.group(3), int(m.group(4), 16),
                      m.group(5), int(m.group(6)), m.group(7))
        if with_identity and vma.kind in ("file-private", "file-shared"):
            vma.file_id = file_identity(pid, vma)
        maps.append(vma)
    return maps


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


def tasks(pid):
    try:
        return sorted(int(t) for t in os.listdir(proc(pid, "task")))
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone("process %d is gone" % pid) from None


def status(pid, tid=None):
    path = proc(pid, "task", str(tid), "status") if tid else proc(pid, "status")
    out = {}
    for line in _read(path).splitlines():
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


def mm_fields(pid):
    f = stat_fields(pid)
    names = {26: "start_code", 27: "end_code", 28: "start_stack", 45: "start_data", 46: "end_data",
             47: "start_brk", 48: "arg_start", 49: "arg_end", 50: "env_start", 51: "env_end"}
    return {name: int(f[i]) for i, name in names.items()}


def proc_state(pid):
    """The one-letter state (R, S, D, T, t, Z, X) of a process."""
    return stat_fields(pid)[3]


def comm(tid):
    """A thread's name, or None when it is gone."""
    try:
        with open(proc(tid, "comm")) as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


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
    for line in _read(proc(pid, "fdinfo", str(fd))).splitlines():
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
