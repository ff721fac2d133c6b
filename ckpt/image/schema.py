"""What the core metadata records must look like: the fields restore, `ckpt info` and
`ckpt verify` read from an image, with their types and ranges.

An image's checksums say only that the file is the one written; a file written by anyone
else (or a bug) can hold any JSON. The reader checks every record named in RECORDS once, when
it parses the metadata, so that the code which uses the fields may index and format them
without a traceback: a wrong record is refused with one line naming the record and the field,
e.g. `record "mappings", field [3].end: expected an integer in 0..2^64-1, found "x"`.

Only the fields that are read are described; others are left alone (and a kind of fd checks
its own fields: see ckpt/files). A record that is absent is not an error here (restore says
which records it needs).
"""
import base64
import binascii
import re

from ckpt.errors import ImageError

U64 = (0, (1 << 64) - 1)
U32 = (0, (1 << 32) - 1)
PID = (1, 1 << 22)               # PID_MAX_LIMIT
FD = (0, (1 << 31) - 1)
PATH_MAX = 8192                  # a path with its " (deleted)" and the like, generously
MAX_DEPTH = 64                   # no metadata of ckpt's nests deeper than a few levels
MAX_ITEMS = 1 << 24              # entries of one list (mappings, fds, threads ...)


class Malformed(Exception):
    def __init__(self, where, what):
        super().__init__(where, what)
        self.where, self.what = where, what


def _shown(v):
    """A found value, short and printable, for the error line."""
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    s = repr(v) if not isinstance(v, str) else '"%s"' % v
    s = "".join(c if c.isprintable() else "\\x%02x" % ord(c) if ord(c) < 256 else "\\u%04x" % (ord(c) & 0xFFFF)
                for c in s)
    return s if len(s) <= 40 else s[:37] + "..."


# -------------------------------------------------------------------- value specs
# A spec is a callable check(value, where) that raises Malformed.

def Int(lo, hi, what=None):
    def check(v, where):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise Malformed(where, "expected %s, found %s" % (what or "an integer in %s..%s" % (_bound(lo), _bound(hi)),
                                                                _shown(v)))
    return check


def _bound(n):
    """2^64-1 and -2^63 rather than their twenty digits."""
    if n >= 1 << 20 and (n + 1) & n == 0:
        return "2^%d-1" % n.bit_length()
    if n <= -(1 << 20) and (-n) & (-n - 1) == 0:
        return "-2^%d" % ((-n).bit_length() - 1)
    return str(n)


def Str(pattern=None, what=None, maxlen=1 << 16):
    rx = re.compile(pattern) if pattern else None

    def check(v, where):
        if not isinstance(v, str) or len(v) > maxlen or (rx is not None and not rx.fullmatch(v)):
            raise Malformed(where, "expected %s, found %s" % (what or "a string", _shown(v)))
    return check


def Number(v, where):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Malformed(where, "expected a number, found %s" % _shown(v))


def Bool(v, where):
    if not (isinstance(v, bool) or (type(v) is int and v in (0, 1))):
        raise Malformed(where, "expected true or false, found %s" % _shown(v))


def B64(v, where):
    if not isinstance(v, str):
        raise Malformed(where, "expected base64 text, found %s" % _shown(v))
    try:
        base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise Malformed(where, "expected base64 text, found %s" % _shown(v)) from None


HEX64 = Str(r"[0-9a-fA-F]{1,16}", "a hexadecimal mask of at most 64 bits")


def Opt(spec):
    """The value may also be null."""
    def check(v, where):
        if v is not None:
            spec(v, where)
    return check


def List(item, min_len=0, max_len=MAX_ITEMS):
    def check(v, where):
        if not isinstance(v, list):
            raise Malformed(where, "expected a list, found %s" % _shown(v))
        if not min_len <= len(v) <= max_len:
            raise Malformed(where, "expected a list of %s items, found %d"
                            % ("%d" % min_len if min_len == max_len else "%d..%d" % (min_len, max_len), len(v)))
        for i, x in enumerate(v):
            item(x, "%s[%d]" % (where, i))
    return check


def Dict(required=None, optional=None):
    """An object with these fields (name -> spec); other fields are left alone."""
    required, optional = required or {}, optional or {}

    def check(v, where):
        if not isinstance(v, dict):
            raise Malformed(where, "expected an object, found %s" % _shown(v))
        for k, spec in required.items():
            if k not in v:
                raise Malformed(_join(where, k), "missing")
            spec(v[k], _join(where, k))
        for k, spec in optional.items():
            if k in v:
                spec(v[k], _join(where, k))
    return check


def Map(key_pattern, value, what="a key"):
    """An object used as a map: every key matches key_pattern, every value is `value`."""
    rx = re.compile(key_pattern)

    def check(v, where):
        if not isinstance(v, dict):
            raise Malformed(where, "expected an object, found %s" % _shown(v))
        for k, x in v.items():
            if not rx.fullmatch(k):
                raise Malformed(_join(where, k), "expected %s, found %s" % (what, _shown(k)))
            value(x, _join(where, k))
    return check


def _join(where, key):
    key = key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else _shown(key)
    return "%s.%s" % (where, key) if where else key


# -------------------------------------------------------------------- the records
ID = Int(*U32)
IDS4 = List(ID, 4, 4)                           # real, effective, saved, filesystem
I64 = Int(-(1 << 63), (1 << 64) - 1)            # a register or limit as the kernel reports it
FILE_ID = Dict({"dev": Int(*U64), "inode": Int(*U64), "size": Int(0, (1 << 63) - 1),
                "mtime_ns": Int(-(1 << 63), (1 << 63) - 1)}, {"path": Str()})
TIMEVAL = List(Int(-(1 << 63), (1 << 63) - 1), 2, 2)
MM_FIELDS = ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
             "arg_start", "arg_end", "env_start", "env_end")

PROCESS = Dict({
    "pid": Int(*PID, what="a PID (1..2^22)"),
    "comm": Str(maxlen=256),
    "ppid": Int(0, PID[1]), "pgid": Int(0, PID[1]), "sid": Int(0, PID[1]),
    "cmdline": List(Str(maxlen=1 << 21)),
    "exe": Str(maxlen=PATH_MAX),
    "cwd": Str(maxlen=PATH_MAX),
    "umask": Int(0, 0o777, "a umask (0..0777)"),
    "mm": Dict({k: Int(*U64) for k in MM_FIELDS}),
    "auxv": B64,
    "rlimits": Map(r"RLIMIT_[A-Z]+", List(I64, 2, 2), "an RLIMIT_ name"),
    "creds": Dict({"uid": IDS4, "gid": IDS4, "groups": List(ID, 0, 65536),
                   "cap_inh": HEX64, "cap_prm": HEX64, "cap_eff": HEX64, "cap_bnd": HEX64},
                  {"cap_amb": Opt(HEX64), "no_new_privs": Bool, "seccomp": Int(0, 2), "securebits": Int(*U32)}),
    "sigactions": Map(r"[1-9][0-9]?", Dict({k: Int(*U64) for k in ("handler", "flags", "restorer", "mask")}),
                      "a signal number"),
    "itimers": Map(r"real|virtual|prof", Dict({"interval": TIMEVAL, "value": TIMEVAL}), "real, virtual or prof"),
}, {
    "root": Str(maxlen=PATH_MAX),
    "personality": Int(*U32),
    "shared_signals": List(B64),
    "exe_file": Opt(FILE_ID),
    "threads_count": Int(0, PID[1]),
    "dumpable": Opt(Int(0, 2)),
    "cgroups": List(Dict({"id": Int(*U32), "controllers": Str(), "path": Str(maxlen=PATH_MAX)})),
    "pdeathsig": Int(0, 64, "a signal number (0..64)"),
    "exit_signal": Int(0, 64, "a signal number (0..64)"),
    "fd_table_of": Int(*PID, what="a PID (1..2^22)"),
    "subreaper": Bool,
})

THREAD = Dict({
    "tid": Int(*PID, what="a thread ID (1..2^22)"),
    "regs": lambda v, where: _regs()(v, where),
    "xstate": B64,
    "sigmask": Int(*U64),
}, {
    "rseq": Opt(Dict({"ptr": Int(*U64), "size": Int(*U32), "sig": Int(*U32)})),
    "signals": List(B64),
    "stop_signal": Opt(Int(0, 64, "a signal number (0..64)")),
    "comm": Opt(Str(maxlen=256)),
    "robust_list": Opt(Dict({"head": Int(*U64), "len": Int(*U64)})),
    "tid_address": Opt(Int(*U64)),
    "altstack": Opt(Dict({"sp": Int(*U64), "flags": Int(-(1 << 31), (1 << 31) - 1), "size": Int(*U64)})),
})

MAPPING_KINDS = ("anon", "file-private", "file-shared", "shmem", "special")
MAPPING = Dict({
    "start": Int(*U64), "end": Int(*U64),
    "perms": Str(r"[r-][w-][x-][ps]", "permissions like r-xp"),
    "offset": Int(*U64),
    "kind": Str("|".join(MAPPING_KINDS), "one of " + ", ".join(MAPPING_KINDS)),
    "path": Str(maxlen=PATH_MAX),
    "dev": Str(maxlen=32), "inode": Int(*U64),
}, {
    "file": Opt(FILE_ID),
})

FD_ENTRY = Dict({
    "fd": Int(*FD, what="an fd number (0..2^31-1)"),
    "kind": Str(maxlen=64),
    "flags": Int(*U32),
}, {
    "pos": Int(-(1 << 63), (1 << 63) - 1),
    "inherit": Bool,
    "shares": Int(*FD, what="an fd number (0..2^31-1)"),
    "shares_with": Dict({"pid": Int(*PID, what="a PID (1..2^22)"), "fd": Int(*FD, what="an fd number (0..2^31-1)")}),
    "path": Str(maxlen=PATH_MAX),
    "tty": Bool,
})

IMAGE_ID = Str(r"[0-9a-f]{32}", "an image id (32 hexadecimal digits)")
DUMP = Dict(optional={"mode": Str(maxlen=64), "rounds": List(Dict({"pages": Int(0, 1 << 52)})),
                      "pid": Int(*PID), "processes": List(Int(*PID)),
                      # every image has an id; an incremental one names its parent (ckpt/image/reader.py)
                      "image_id": IMAGE_ID,
                      "parent": Opt(Dict({"image_id": IMAGE_ID, "path": Str(maxlen=PATH_MAX)}))})
NETLOCK = Opt(Dict(optional={"table": Str(maxlen=256)}))


_REGS = []


def _regs():
    """The registers ptrace sets (imported only when a threads record is checked)."""
    if not _REGS:
        from ckpt.kernel.ptrace import REGS_FIELDS
        _REGS.append(Dict({name: I64 for name in REGS_FIELDS}))
    return _REGS[0]


THREADS = List(THREAD, 1, PID[1])
MAPPINGS = List(MAPPING)
FDS = List(FD_ENTRY, 0, 1 << 20)
A_PID = Int(*PID, what="a PID (1..2^22)")
TREE = Dict({
    "root": A_PID,
    "processes": List(Dict({"pid": A_PID, "process": PROCESS, "threads": THREADS, "mappings": MAPPINGS,
                            "fds": FDS})),
    "zombies": List(Dict({"pid": A_PID, "ppid": A_PID, "pgid": Int(0, PID[1]), "sid": Int(0, PID[1]),
                          "exit_code": Int(0, 0xFFFF, "a wait status (0..0xffff)")}, {"comm": Str(maxlen=256)})),
    "shm": List(Dict({"space": Int(*U64), "dev": Str(maxlen=32), "inode": Int(*U64), "size": Int(0, 1 << 47)},
                     {"path": Str(maxlen=PATH_MAX), "pids": List(A_PID), "name": Str(maxlen=256),
                      "seals": Int(0, 0xFFFF)})),
})

RECORDS = {
    "process": PROCESS,
    "threads": THREADS,
    "mappings": MAPPINGS,
    "fds": FDS,
    "tree": TREE,
    "dump": DUMP,
    "netlock": NETLOCK,
    "netlocks": List(NETLOCK),
}


def _semantics(name, data):
    """What the types alone do not say."""
    if name == "tree":
        seen = {data["root"]}
        for i, p in enumerate(data["processes"]):
            if p["pid"] in seen or p["process"]["pid"] != p["pid"]:
                raise Malformed("processes[%d].pid" % i, "process %d appears twice or disagrees with its "
                                "process record" % p["pid"])
            seen.add(p["pid"])
            for part in ("threads", "mappings", "fds"):
                try:
                    _semantics(part, p[part])
                except Malformed as e:
                    raise Malformed("processes[%d].%s%s" % (i, part, e.where), e.what) from None
            if p["pid"] not in {t["tid"] for t in p["threads"]}:
                raise Malformed("processes[%d].threads" % i, "no thread %d, the process's main thread" % p["pid"])
        for i, z in enumerate(data["zombies"]):
            if z["pid"] in seen:
                raise Malformed("zombies[%d].pid" % i, "process %d appears twice" % z["pid"])
            seen.add(z["pid"])
    elif name == "mappings":
        prev = None
        for i in sorted(range(len(data)), key=lambda i: data[i]["start"]):
            m = data[i]
            if m["start"] % 4096 or m["end"] % 4096:
                raise Malformed("[%d]" % i, "start %#x and end %#x must be page-aligned" % (m["start"], m["end"]))
            if m["end"] <= m["start"]:
                raise Malformed("[%d].end" % i, "%#x is not above start %#x" % (m["end"], m["start"]))
            if prev is not None and m["start"] < prev[1]["end"]:
                raise Malformed("[%d]" % i, "%#x-%#x overlaps mapping [%d] %#x-%#x"
                                % (m["start"], m["end"], prev[0], prev[1]["start"], prev[1]["end"]))
            prev = (i, m)
    elif name == "threads":
        seen = set()
        for i, t in enumerate(data):
            if t["tid"] in seen:
                raise Malformed("[%d].tid" % i, "thread %d appears twice" % t["tid"])
            seen.add(t["tid"])
    elif name == "fds":
        seen = set()
        for i, e in enumerate(data):
            if e["fd"] in seen:
                raise Malformed("[%d].fd" % i, "fd %d appears twice" % e["fd"])
            seen.add(e["fd"])


def too_deep(doc, limit=MAX_DEPTH):
    """None if a parsed JSON document nests at most `limit` levels, else the path (a list of
    keys) to where it goes deeper; checked without recursion."""
    stack = [(doc, 1, ())]
    while stack:
        v, d, where = stack.pop()
        if isinstance(v, dict):
            items = v.items()
        elif isinstance(v, list):
            items = enumerate(v)
        else:
            continue
        if d > limit:
            return list(where)
        stack.extend((x, d + 1, where + (k,)) for k, x in items if isinstance(x, (dict, list)))
    return None


def field_name(keys):
    """["fds", 3, "path"] -> fds[3].path"""
    out = ""
    for k in keys:
        out = "%s[%d]" % (out, k) if isinstance(k, int) else _join(out, k)
    return out


def check_record(path, name, data):
    """Raise ImageError naming the record and the field when a core record is malformed."""
    spec = RECORDS.get(name)
    if spec is None:
        return
    try:
        spec(data, "")
        _semantics(name, data)
    except Malformed as e:
        raise ImageError('%s: malformed image: record "%s", field %s: %s'
                         % (path, name, e.where or "(the record itself)", e.what)) from None


def check_together(path, metas):
    """What one record says of another: the process's own thread is among the threads."""
    proc, threads = metas.get("process"), metas.get("threads")
    if proc is not None and threads is not None and proc["pid"] not in {t["tid"] for t in threads}:
        raise ImageError('%s: malformed image: record "threads" has no thread %d, the process\'s main thread'
                         % (path, proc["pid"]))


def check_header(path, header):
    """The header's fields that are used to read the rest."""
    try:
        Dict({"page_size": Int(4096, 1 << 30, "a page size (4096..2^30)")},
             {"format": Int(0, 1 << 31), "arch": Str(maxlen=64), "kernel": Str(maxlen=256),
              "created": Number, "tool": Str(maxlen=256)})(header, "")
        if header["page_size"] & (header["page_size"] - 1):
            raise Malformed("page_size", "%d is not a power of two" % header["page_size"])
    except Malformed as e:
        raise ImageError("%s: malformed image: header, field %s: %s" % (path, e.where or "(itself)", e.what)) from None
