"""The network lock: nftables rules that hold a dumped process's TCP connections.

From the freeze until the restored sockets are live, no packet of a locked connection may
reach either end: a segment arriving at the frozen socket after its queues were read would be
acknowledged and then lost, and one arriving once the killed process's socket is gone would be
answered with a reset. Each lock is one nftables table, `inet ckpt_lock_PID`, with two base
chains (input and output, ahead of every other filter) dropping both directions of every
connection's 4-tuple (sets of concatenated address . port . address . port keys, one per
address family), and inbound SYNs to the process's listening sockets (a client connecting
during the freeze retries later instead of landing in an accept queue that dies with the
process).

The lock is installed in the frozen phase, so it goes through libnftables (ctypes, one
netlink transaction per call; the context is made once, before the freeze) and falls back to
the `nft` binary when the library is missing.
"""
import ctypes
import ipaddress
import re
import shutil
import subprocess
import threading

from ckpt.errors import CkptError

PREFIX = "ckpt_lock_"
FAMILY = "inet"
PRIORITY = -400         # before conntrack (-200) and every ordinary filter (0)


class LockError(CkptError):
    """The network lock cannot be installed or lifted."""


def table_name(pid):
    return "%s%d" % (PREFIX, pid)


# ------------------------------------------------------------------------------ nft runner
class _Lib:
    """libnftables through ctypes: one context, output and errors kept in buffers."""

    def __init__(self):
        lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_int
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_char_p
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)
        if not self.ctx:
            raise OSError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)

    def run(self, script):
        rc = self.lib.nft_run_cmd_from_buffer(self.ctx, script.encode())
        out = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode(errors="replace")
        err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode(errors="replace")
        return rc, out, err


class _Binary:
    def __init__(self):
        self.path = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft")
                                                 if shutil.os.path.exists(p)), None)
        if self.path is None:
            raise OSError("no nft binary")

    def run(self, script):
        r = subprocess.run([self.path, "-f", "-"], input=script, capture_output=True, text=True)
        return r.returncode, r.stdout, r.stderr


_runner = None
_runner_lock = threading.Lock()


def _nft():
    global _runner
    with _runner_lock:
        if _runner is None:
            try:
                _runner = _Lib()
            except (OSError, AttributeError):
                try:
                    _runner = _Binary()
                except OSError:
                    raise LockError("the network lock needs nftables (libnftables.so.1 or the nft binary); "
                                    "install the nftables package") from None
        return _runner


def prepare():
    """Load libnftables and make its context now (before the freeze, where it costs nothing)."""
    _nft()


def backend():
    return "libnftables" if isinstance(_nft(), _Lib) else "nft"


def run(script, what):
    rc, out, err = _nft().run(script)
    if rc != 0:
        raise LockError("%s: nft failed: %s" % (what, " ".join(err.split()) or "exit %d" % rc))
    return out


# ------------------------------------------------------------------------------ the lock
def _v4(addr):
    """The IPv4 address an IPv4-mapped IPv6 address stands for (its packets are IPv4)."""
    a = ipaddress.ip_address(addr.split("%", 1)[0])
    if a.version == 6 and a.ipv4_mapped is not None:
        return str(a.ipv4_mapped), 4
    return str(a), a.version


def lock_script(pid, conns, listeners=()):
    """conns: (local_addr, local_port, peer_addr, peer_port); listeners: (addr, port)."""
    name = table_name(pid)
    keys = {4: set(), 6: set()}
    for la, lp, ra, rp in conns:
        la, v = _v4(la)
        ra, _ = _v4(ra)
        keys[v].add("%s . %d . %s . %d" % (la, lp, ra, rp))
        keys[v].add("%s . %d . %s . %d" % (ra, rp, la, lp))
    syn = {4: set(), 6: set()}
    for a, p in listeners:
        a, v = _v4(a)
        if a in ("0.0.0.0", "::"):
            syn[v].add("%d" % p)
            if v == 6 and a == "::":
                syn[4].add("%d" % p)
        else:
            syn[v].add("%s . %d" % (a, p))
    lines = ["add table %s %s" % (FAMILY, name), "delete table %s %s" % (FAMILY, name),
             "table %s %s {" % (FAMILY, name)]
    for v, ip, typ in ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr")):
        if keys[v]:
            lines.append("  set conns%d { type %s . inet_service . %s . inet_service; elements = { %s } }"
                         % (v, typ, typ, ", ".join(sorted(keys[v]))))
    lines.append("  chain input { type filter hook input priority %d; policy accept;" % PRIORITY)
    for v, ip in ((4, "ip"), (6, "ip6")):
        if keys[v]:
            lines.append("    %s saddr . tcp sport . %s daddr . tcp dport @conns%d drop" % (ip, ip, v))
        for s in sorted(syn[v]):
            if " . " in s:
                a, p = s.split(" . ")
                lines.append("    %s daddr %s tcp dport %s tcp flags & (syn | ack) == syn drop" % (ip, a, p))
            else:
                lines.append("    meta nfproto %s tcp dport %s tcp flags & (syn | ack) == syn drop"
                             % ("ipv4" if v == 4 else "ipv6", s))
    lines.append("  }")
    lines.append("  chain output { type filter hook output priority %d; policy accept;" % PRIORITY)
    for v, ip in ((4, "ip"), (6, "ip6")):
        if keys[v]:
            lines.append("    %s saddr . tcp sport . %s daddr . tcp dport @conns%d drop" % (ip, ip, v))
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def lock(pid, conns, listeners=()):
    """Install (or replace) the lock of process pid. Returns its record for the image."""
    name = table_name(pid)
    run(lock_script(pid, conns, listeners), "locking the TCP connections of process %d (table %s %s)"
        % (pid, FAMILY, name))
    return {"family": FAMILY, "table": name, "pid": pid,
            "conns": [list(c) for c in conns], "listeners": [list(x) for x in listeners]}


def _tables():
    out = run("list tables %s\n" % FAMILY, "listing nftables tables")
    return re.findall(r"^table\s+%s\s+(%s\d+)\s*$" % (FAMILY, PREFIX), out, re.M)


def lift(name):
    """Delete one lock table; True if it was there."""
    if not re.fullmatch(r"%s\d+" % PREFIX, name):
        raise LockError("%r is not a ckpt network lock" % name)
    rc, _, err = _nft().run("delete table %s %s\n" % (FAMILY, name))
    if rc == 0:
        return True
    if name not in _tables():
        return False
    raise LockError("lifting the network lock %s %s: nft failed: %s" % (FAMILY, name, " ".join(err.split())))


def lift_record(record):
    """Lift the lock an image recorded (ctx.meta["netlock"]), if it is still there."""
    if record and record.get("table"):
        return lift(record["table"])
    return False


def lift_locks(pid=None):
    """Lift the lock of process pid (every ckpt lock without pid). Returns the names lifted."""
    names = _tables() if pid is None else [table_name(pid)]
    return ["%s %s" % (FAMILY, n) for n in names if lift(n)]


def held(pid=None):
    """Names of the lock tables present (of pid only, given one)."""
    names = _tables()
    return [n for n in names if pid is None or n == table_name(pid)]
