"""Established TCP connections, saved and rebuilt with the kernel's TCP repair mode.

Dump (capture, in the freeze): the network lock (ckpt/kernel/netlock.py) is put on every
connection of the process first, unless the target is left running; then, on ckpt's duplicate
of each socket, repair mode is turned on (and turned off again, without a window probe, if the
target resumes: --leave-running or a failed dump) and everything is read: the sequence numbers
of both queues (TCP_QUEUE_SEQ), the unread data (peeked from the receive queue), the data sent
but not acknowledged and the data not sent yet (peeked from the send queue, split with
SIOCOUTQ/SIOCOUTQNSD), the windows (TCP_REPAIR_WINDOW), the MSS, the negotiated options (window
scales, SACK, timestamps) and the timestamp clock (TCP_TIMESTAMP). A socket closed in repair
mode leaves quietly: neither the killed target's nor ckpt's duplicate sends the peer anything.

Restore: a socket is made in ckpt in repair mode and handed to the restored process (create);
once every fd is in place (finish) ckpt, through its own duplicate, binds it to the same
address and port, sets both queue sequences, connects (in repair mode this sends nothing: the
socket is ESTABLISHED at once), sets the options, refills the receive queue and the sent part
of the send queue, sets the windows, leaves repair mode (the kernel sends one window probe) and
sends the unsent part normally. The lock is lifted once the whole restore ends (restored()).

`ckpt restore --tcp-close`: each connection comes back as a TCP socket in the CLOSE state at
the same fd, with a pending ECONNABORTED (the server sees a hangup), and the lock is lifted, so
the peer's next segment is answered with a reset.

States: ESTABLISHED is saved. A connection whose peer has closed its side (CLOSE_WAIT), or
that is half-way through opening or closing (SYN_SENT, SYN_RECV, FIN_WAIT1/2, CLOSING,
LAST_ACK, TIME_WAIT), is refused with an error naming it: up front if it is so when the dump
starts, else at the freeze, which fails the dump with the target resumed untouched. Data the
kernel holds out of order (received after a gap) is not saved: the peer sends it again.
"""
import base64
import ctypes
import errno
import fcntl
import ipaddress
import os
import select
import socket
import struct
import time

from ckpt.errors import RestoreError, TargetError
from ckpt.files import inet
from ckpt.files.base import FdKind
from ckpt.kernel import netlock, procfs

SOL_TCP = 6
TCP_MAXSEG = 2
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
REPAIR_ON, REPAIR_OFF, REPAIR_OFF_NO_WP = 1, 0, -1
NO_QUEUE, RECV_QUEUE, SEND_QUEUE = 0, 1, 2
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
SO_REUSEADDR, SO_PEEK_OFF = 2, 42
WINDOW_FIELDS = ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup")
SEND_TIMEOUT = 10.0

_libc = ctypes.CDLL(None, use_errno=True)


def _ioctl_int(fd, req):
    return struct.unpack("i", fcntl.ioctl(fd, req, b"\0\0\0\0"))[0]


def _u32(v):
    return v & 0xFFFFFFFF


def _peek(s, n, what):
    """n bytes peeked from the queue selected in repair mode: all of them, or an error."""
    out = b""
    if n <= 0:
        return out
    out = s.recv(n, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if len(out) != n:
        raise OSError(errno.EIO, "%s: %d of %d bytes could be read" % (what, len(out), n))
    return out


# ------------------------------------------------------------------------------ the lock
def _process_sockets(ctx):
    """(conns, listeners) of the process: each connection's 4-tuple and each listener's
    address, from every inet TCP socket it has open."""
    conns, listeners, seen = [], [], set()
    for fd in procfs.fds(ctx.pid):
        try:
            link = os.readlink(procfs.proc(ctx.pid, "fd", str(fd)))
        except OSError:
            continue
        if not link.startswith("socket:") or link in seen:
            continue
        seen.add(link)
        try:
            s = ctx.sock(fd)
            if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM \
                    or s.proto not in (0, socket.IPPROTO_TCP):
                continue
            state = inet.tcp_state(s)
            if state == inet.LISTEN:
                listeners.append(tuple(inet.addr(s.getsockname())))
            elif state != inet.CLOSE:
                la, ra = inet.addr(s.getsockname()), inet.addr(s.getpeername())
                conns.append((la[0], la[1], ra[0], ra[1]))
        except (OSError, TargetError):
            continue
    return conns, listeners


def lock_process(ctx):
    """Put the network lock on every TCP connection (and listener) of the process, once per
    dump, before any socket is touched; not when the target will be left running."""
    memo = ctx.memo
    if "netlock" in memo:
        return memo["netlock"]
    memo["netlock"] = None
    if ctx.leave_running:
        return None
    t = time.perf_counter()
    conns, listeners = _process_sockets(ctx)
    if not conns and not listeners:
        return None
    record = netlock.lock(ctx.pid, conns, listeners)
    ctx.on_failure(lambda: netlock.lift_record(record))
    record["ms"] = round((time.perf_counter() - t) * 1000, 3)
    ctx.meta["netlock"] = record
    memo["netlock"] = record
    return record


def _warm_up():
    """libnftables loaded and its context made now, while the target runs, not in the freeze
    (an error is reported by the lock itself, if a lock is needed)."""
    try:
        netlock.prepare()
    except netlock.LockError:
        pass


# ------------------------------------------------------------------------------ dump
def dump_state(s):
    """Everything of an established connection, read in repair mode (the caller turned it on)."""
    info = inet.tcp_info(s, 8)
    opts, ws = info[5], info[6]
    fd = s.fileno()
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
    snd_seq = _u32(s.getsockopt(SOL_TCP, TCP_QUEUE_SEQ))
    outq = _ioctl_int(fd, inet.SIOCOUTQ)
    notsent = _ioctl_int(fd, inet.SIOCOUTQNSD)
    sndq = _peek(s, outq, "send queue")
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, RECV_QUEUE)
    rcv_seq = _u32(s.getsockopt(SOL_TCP, TCP_QUEUE_SEQ))
    inq = _ioctl_int(fd, inet.SIOCINQ)
    rcvq = _peek(s, inq, "receive queue")
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, NO_QUEUE)
    win = struct.unpack("5I", s.getsockopt(SOL_TCP, TCP_REPAIR_WINDOW, 20))
    d = {"snd_seq": snd_seq, "rcv_seq": rcv_seq, "unsent": notsent,
         "sndq": base64.b64encode(sndq).decode(), "rcvq": base64.b64encode(rcvq).decode(),
         "mss": s.getsockopt(SOL_TCP, TCP_MAXSEG),
         "sack": bool(opts & TCPI_OPT_SACK), "tstamp": bool(opts & TCPI_OPT_TIMESTAMPS),
         "wscale": [ws & 0xF, ws >> 4] if opts & TCPI_OPT_WSCALE else None,
         "window": dict(zip(WINDOW_FIELDS, win))}
    d["bufs"] = [s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)]
    if opts & TCPI_OPT_TIMESTAMPS:
        d["ts"] = _u32(s.getsockopt(SOL_TCP, TCP_TIMESTAMP))
    return d


class TcpConnection(FdKind):
    """A TCP socket that is connected (or on its way to or from it)."""
    name = "tcp"
    restorable = True
    finish_order = 10       # after the listeners and everything else is in place

    @staticmethod
    def match(f):
        info = inet.inet_info(f)
        return info is not None and info[1] == "tcp" and info[2] not in (inet.LISTEN, inet.CLOSE)

    @classmethod
    def describe(cls, f):
        family, _, state = inet.inet_info(f)
        s = f.sock()
        _warm_up()
        return {"path": f.link, "inode": f.inode, "family": family, "proto": "tcp",
                "state": inet.TCP_STATES.get(state, str(state)).lower(),
                "local": inet.addr(s.getsockname()), "peer": inet.addr(s.getpeername()),
                "options": inet.read_options(s, family, "tcp", connected=True)}

    @classmethod
    def refuse(cls, f, entry):
        return _state_problem(entry["state"])

    @classmethod
    def capture(cls, f, entry, ctx):
        lock_process(ctx)
        s = f.sock()
        state = inet.tcp_state(s)
        entry["state"] = inet.TCP_STATES.get(state, str(state)).lower()
        why = _state_problem(entry["state"])
        if why:
            raise f.error("TCP connection %s: %s" % (_conn_name(entry), why))
        try:
            reuse = s.getsockopt(socket.SOL_SOCKET, SO_REUSEADDR)
            peek_off = s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
            s.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_ON)
        except OSError as e:
            raise f.error("TCP connection %s: TCP repair mode: %s" % (_conn_name(entry), e.strerror or e))
        ctx.on_resume(lambda: _repair_off(s, reuse, peek_off))
        try:
            if peek_off >= 0:
                s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
            entry["repair"] = dump_state(s)
        except OSError as e:
            raise f.error("TCP connection %s: reading it in repair mode: %s" % (_conn_name(entry), e.strerror or e))

    @classmethod
    def precheck(cls, entry):
        la, lp = entry["local"]
        ra, rp = entry["peer"]
        want = (_norm(la), lp, _norm(ra), rp)
        for st, key in _tcp_table(entry["family"]):
            if key == want:
                raise RestoreError("fd %d: TCP connection %s already exists (state %s): close it first"
                                   % (entry["fd"], _conn_name(entry), st))

    @classmethod
    def create(cls, remote, entry, table):
        s = inet._fresh(entry["family"], "tcp")
        try:
            s.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_ON)
            local = socket.socket(fileno=os.dup(s.fileno()))
        except OSError as e:
            s.close()
            raise RestoreError("fd %d: TCP repair mode: %s" % (entry["fd"], e.strerror)) from None
        table.objects[("tcp-local", entry["fd"])] = local
        return table.adopt(s.detach(), what="the TCP socket of fd %d" % entry["fd"])

    @classmethod
    def finish(cls, remote, entry, table):
        s = table.objects.pop(("tcp-local", entry["fd"]))
        try:
            if table.options is not None and getattr(table.options, "tcp_close", False):
                _closed(s)
            else:
                rebuild(s, entry)
        except OSError as e:
            raise RestoreError("fd %d: TCP connection %s: %s" % (entry["fd"], _conn_name(entry), e.strerror or e)) \
                from None
        finally:
            s.close()

    @classmethod
    def restored(cls, metas, ok):
        # one lock per process of a tree (netlocks); the target's alone in older images
        for record in metas.get("netlocks") or [metas.get("netlock")]:
            netlock.lift_record(record)


def _state_problem(state):
    state = state.upper()
    if state == "ESTABLISHED":
        return None
    if state == "CLOSE_WAIT":
        return ("the peer has closed its side (CLOSE_WAIT) and the process has not closed its own yet; "
                "such a connection cannot be saved yet: dump again once the process has closed it")
    if state in ("SYN_SENT", "SYN_RECV", "NEW_SYN_RECV"):
        return "the connection is still being opened (%s); dump again once it is established" % state
    return "the connection is being closed (%s); dump again once it is gone" % state


def _conn_name(entry):
    def one(a):
        return ("[%s]:%d" if ":" in a[0] else "%s:%d") % (a[0], a[1]) if a else "?"
    return "%s -> %s" % (one(entry.get("local")), one(entry.get("peer")))


def _repair_off(s, reuse, peek_off):
    """The target runs again: its socket leaves repair mode (no window probe: nothing changed)
    with what repair mode reset put back."""
    s.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_OFF_NO_WP)
    if reuse:
        s.setsockopt(socket.SOL_SOCKET, SO_REUSEADDR, reuse)
    if peek_off >= 0:
        s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, peek_off)


# ------------------------------------------------------------------------------ restore
def _send_all(s, data, what, repair):
    """Write data to s (non-blocking: the fd's flags are the process's)."""
    done, deadline = 0, time.monotonic() + SEND_TIMEOUT
    while done < len(data):
        try:
            done += s.send(data[done:], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            continue
        except (BlockingIOError, InterruptedError):
            pass
        left = deadline - time.monotonic()
        if left <= 0 or repair:
            raise OSError(errno.ENOBUFS, "only %d of the %d bytes of its %s could be put back"
                          % (done, len(data), what))
        select.select([], [s], [], min(left, 0.1))


def _room(s, name, force, need, dumped):
    """Make the socket's buffer hold `need` bytes of queue if it cannot yet: the size the dumped
    socket had (which held them), or more. (This fixes the size: the kernel no longer tunes it.)"""
    have = s.getsockopt(socket.SOL_SOCKET, name)
    if need and 2 * need + (1 << 16) > have:
        s.setsockopt(socket.SOL_SOCKET, force, max((dumped or 0) // 2, need + (1 << 15)))


def rebuild(s, entry):
    """Make s (a fresh socket in repair mode) the dumped connection, and bring it live."""
    fam = entry["family"]
    r = entry["repair"]
    opts = dict(entry.get("options", {}))
    sndq = base64.b64decode(r["sndq"])
    rcvq = base64.b64decode(r["rcvq"])
    unsent = r["unsent"]
    sent = sndq[:len(sndq) - unsent]
    if fam == 6 and "IPV6_V6ONLY" in opts:
        s.setsockopt(inet.IPPROTO_IPV6, 26, opts["IPV6_V6ONLY"])
    late = ("SO_REUSEADDR", "IPV6_V6ONLY", "TCP_NODELAY", "TCP_CORK", "SO_PEEK_OFF")
    inet.apply_options(s, opts, skip=late)
    s.bind(inet.sockaddr(fam, entry["local"]))
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
    s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.unpack("i", struct.pack("I", _u32(r["snd_seq"] - len(sndq))))[0])
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, RECV_QUEUE)
    s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, struct.unpack("i", struct.pack("I", _u32(r["rcv_seq"] - len(rcvq))))[0])
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, NO_QUEUE)
    s.connect(inet.sockaddr(fam, entry["peer"]))
    ropts = [(TCPOPT_MSS, r["mss"])]
    if r.get("wscale"):
        ropts.append((TCPOPT_WINDOW, r["wscale"][0] | (r["wscale"][1] << 16)))
    if r.get("sack"):
        ropts.append((TCPOPT_SACK_PERM, 0))
    if r.get("tstamp"):
        ropts.append((TCPOPT_TIMESTAMP, 0))
    s.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("II", c, v) for c, v in ropts))
    if r.get("tstamp") and "ts" in r:
        s.setsockopt(SOL_TCP, TCP_TIMESTAMP, struct.unpack("i", struct.pack("I", r["ts"]))[0])
    bufs = r.get("bufs") or [None, None]
    _room(s, socket.SO_RCVBUF, inet.SO_RCVBUFFORCE, len(rcvq), bufs[0])
    _room(s, socket.SO_SNDBUF, inet.SO_SNDBUFFORCE, len(sndq), bufs[1])
    if rcvq:
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, RECV_QUEUE)
        _send_all(s, rcvq, "receive queue", repair=True)
    if sent:
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
        _send_all(s, sent, "send queue", repair=True)
    s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, NO_QUEUE)
    w = r["window"]
    s.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, struct.pack("5I", *[w[k] for k in WINDOW_FIELDS]))
    inet.apply_options(s, {k: v for k, v in opts.items() if k in ("TCP_NODELAY", "TCP_CORK", "SO_PEEK_OFF")})
    s.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_OFF)
    if opts.get("SO_REUSEADDR"):
        s.setsockopt(socket.SOL_SOCKET, SO_REUSEADDR, 1)
    if unsent:
        _send_all(s, sndq[len(sent):], "unsent data", repair=False)


class _SockaddrUnspec(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_char * 26)]


def _closed(s):
    """s (a fresh socket in repair mode) becomes a connection that was aborted: CLOSE state with
    ECONNABORTED pending (a disconnect in repair mode sets it and sends nothing)."""
    sa = _SockaddrUnspec(socket.AF_UNSPEC)
    if _libc.connect(s.fileno(), ctypes.byref(sa), ctypes.sizeof(sa)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "disconnect: %s" % os.strerror(err))
    s.setsockopt(SOL_TCP, TCP_REPAIR, REPAIR_OFF_NO_WP)


def _norm(host):
    return ipaddress.ip_address(host.split("%", 1)[0])


_TABLE_CACHE = {}


def _tcp_table(family, max_age=1.0):
    """(state, (local addr, port, remote addr, port)) of every TCP socket of this network
    namespace of the family, from /proc/net/tcp[6] (read once for all the connections of one
    restore's checks)."""
    now = time.monotonic()
    cached = _TABLE_CACHE.get(family)
    if cached is None or now - cached[0] > max_age:
        cached = _TABLE_CACHE[family] = (now, _read_tcp_table(family))
    return cached[1]


def _read_tcp_table(family):
    path = "/proc/net/tcp" if family == 4 else "/proc/net/tcp6"
    out = []
    try:
        with open(path) as f:
            next(f)
            for line in f:
                p = line.split()
                st = inet.TCP_STATES.get(int(p[3], 16), p[3])
                if st in ("LISTEN", "CLOSE"):
                    continue
                (la, lp), (ra, rp) = (_hexaddr(x, family) for x in (p[1], p[2]))
                out.append((st, (_norm(la), lp, _norm(ra), rp)))
    except OSError:
        pass
    return out


def _hexaddr(s, family):
    a, p = s.split(":")
    raw = bytes.fromhex(a)
    if family == 4:
        host = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:
        host = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return host, int(p, 16)
