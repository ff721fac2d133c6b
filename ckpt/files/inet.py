"""IPv4 and IPv6 sockets that are not established connections: TCP listening, bound or unbound
(CLOSE state), UDP unbound, bound or connected, with their queued datagrams.

What a server sets on its sockets is read while the target runs (describe): address, port,
backlog, and every option whose value differs from what a fresh socket of the same family and
type has (SO_REUSEADDR, SO_REUSEPORT, SO_KEEPALIVE and TCP_KEEPIDLE/INTVL/CNT, TCP_NODELAY,
SO_RCVBUF/SO_SNDBUF (the kernel doubles what was set: the image holds what was set),
IPV6_V6ONLY, TCP_DEFER_ACCEPT, SO_LINGER, TCP_FASTOPEN, ...). Restore makes the socket in ckpt
with the same options, binds it, listens or connects it, and hands it to the restored process.

In the freeze (capture): a UDP socket's queued datagrams are peeked one after the other (with
SO_PEEK_OFF, put back as it was) with their senders, and put back at restore as datagrams
from the same sender (a raw socket writes them with the sender's address and port); a
listener's accept queue is counted: connections the kernel completed but the process had not
accepted yet die with the killed process (their clients see a reset), and the image records
how many (`lost_pending`). New connection attempts during the freeze are held by the network
lock (ckpt/kernel/netlock.py) and retried by the clients once the lock is lifted.

Not restored: multicast group memberships (the kernel does not list them per socket),
SO_ATTACH_FILTER/BPF programs, IP options (IP_OPTIONS), TCP MD5/AO keys, TCP_ULP (kTLS).
Sockets are made by ckpt (root), so their owner (sk_uid) is root.
"""
import base64
import errno
import ipaddress
import os
import socket
import struct
import time

from ckpt.errors import RestoreError
from ckpt.files.base import FdKind

SOL_SOCKET, IPPROTO_IP, IPPROTO_IPV6, IPPROTO_TCP, IPPROTO_UDP = 1, 0, 41, 6, 17
SO_RCVBUFFORCE, SO_SNDBUFFORCE, SO_PEEK_OFF = 33, 32, 42
TCP_INFO = 11
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B

# TCP states (include/net/tcp_states.h)
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
              12: "NEW_SYN_RECV"}
ESTABLISHED, CLOSE, LISTEN = 1, 7, 10

# (level, optname, name, format, families, types): format "i" an int, "linger" two ints,
# "timeval" two longs, "str" a name; families/types the sockets it applies to
_BOTH, _TCP, _UDP = ("tcp", "udp"), ("tcp",), ("udp",)
OPTIONS = [
    (SOL_SOCKET, 15, "SO_REUSEPORT", "i", (4, 6), _BOTH),
    (SOL_SOCKET, 9, "SO_KEEPALIVE", "i", (4, 6), _BOTH),
    (SOL_SOCKET, 13, "SO_LINGER", "linger", (4, 6), _TCP),
    (SOL_SOCKET, 8, "SO_RCVBUF", "i", (4, 6), _BOTH),
    (SOL_SOCKET, 7, "SO_SNDBUF", "i", (4, 6), _BOTH),
    (SOL_SOCKET, 6, "SO_BROADCAST", "i", (4, 6), _UDP),
    (SOL_SOCKET, 10, "SO_OOBINLINE", "i", (4, 6), _TCP),
    (SOL_SOCKET, 12, "SO_PRIORITY", "i", (4, 6), _BOTH),
    (SOL_SOCKET, 36, "SO_MARK", "i", (4, 6), _BOTH),
    (SOL_SOCKET, 18, "SO_RCVLOWAT", "i", (4, 6), _BOTH),
    (SOL_SOCKET, 20, "SO_RCVTIMEO", "timeval", (4, 6), _BOTH),
    (SOL_SOCKET, 21, "SO_SNDTIMEO", "timeval", (4, 6), _BOTH),
    (SOL_SOCKET, 5, "SO_DONTROUTE", "i", (4, 6), _BOTH),
    (SOL_SOCKET, 29, "SO_TIMESTAMP", "i", (4, 6), _BOTH),
    (SOL_SOCKET, 35, "SO_TIMESTAMPNS", "i", (4, 6), _BOTH),
    (SOL_SOCKET, 40, "SO_RXQ_OVFL", "i", (4, 6), _UDP),
    (SOL_SOCKET, 25, "SO_BINDTODEVICE", "str", (4, 6), _BOTH),
    (SOL_SOCKET, SO_PEEK_OFF, "SO_PEEK_OFF", "i", (4, 6), _BOTH),
    (SOL_SOCKET, 60, "SO_ZEROCOPY", "i", (4, 6), _BOTH),
    (IPPROTO_TCP, 1, "TCP_NODELAY", "i", (4, 6), _TCP),
    (IPPROTO_TCP, 2, "TCP_MAXSEG", "i", (4, 6), _TCP),
    (IPPROTO_TCP, 3, "TCP_CORK", "i", (4, 6), _TCP),
    (IPPROTO_TCP, 4, "TCP_KEEPIDLE", "i", (4, 6), _TCP),
    (IPPROTO_TCP, 5, "TCP_KEEPINTVL", "i", (4, 6), _TCP),
    (IPPROTO_TCP, 6, "TCP_KEEPCNT", "i", (4, 6), _TCP),
    (IPPROTO_TCP, 7, "TCP_SYNCNT", "i", (4, 6), _TCP),
    (IPPROTO_TCP, 8, "TCP_LINGER2", "i", (4, 6), _TCP),
    (IPPROTO_TCP, 9, "TCP_DEFER_ACCEPT", "i", (4, 6), _TCP),
    (IPPROTO_TCP, 10, "TCP_WINDOW_CLAMP", "i", (4, 6), _TCP),
    (IPPROTO_TCP, 13, "TCP_CONGESTION", "str", (4, 6), _TCP),
    (IPPROTO_TCP, 18, "TCP_USER_TIMEOUT", "i", (4, 6), _TCP),
    (IPPROTO_TCP, 23, "TCP_FASTOPEN", "i", (4, 6), _TCP),
    (IPPROTO_TCP, 25, "TCP_NOTSENT_LOWAT", "i", (4, 6), _TCP),
    (IPPROTO_TCP, 36, "TCP_INQ", "i", (4, 6), _TCP),
    (IPPROTO_IP, 1, "IP_TOS", "i", (4,), _BOTH),
    (IPPROTO_IP, 2, "IP_TTL", "i", (4,), _BOTH),
    (IPPROTO_IP, 8, "IP_PKTINFO", "i", (4,), _UDP),
    (IPPROTO_IP, 10, "IP_MTU_DISCOVER", "i", (4,), _BOTH),
    (IPPROTO_IP, 11, "IP_RECVERR", "i", (4,), _BOTH),
    (IPPROTO_IP, 13, "IP_RECVTOS", "i", (4,), _UDP),
    (IPPROTO_IP, 15, "IP_FREEBIND", "i", (4,), _BOTH),
    (IPPROTO_IP, 19, "IP_TRANSPARENT", "i", (4,), _BOTH),
    (IPPROTO_IP, 24, "IP_BIND_ADDRESS_NO_PORT", "i", (4,), _BOTH),
    (IPPROTO_IP, 33, "IP_MULTICAST_TTL", "i", (4,), _UDP),
    (IPPROTO_IP, 34, "IP_MULTICAST_LOOP", "i", (4,), _UDP),
    (IPPROTO_IPV6, 16, "IPV6_UNICAST_HOPS", "i", (6,), _BOTH),
    (IPPROTO_IPV6, 18, "IPV6_MULTICAST_HOPS", "i", (6,), _UDP),
    (IPPROTO_IPV6, 19, "IPV6_MULTICAST_LOOP", "i", (6,), _UDP),
    (IPPROTO_IPV6, 23, "IPV6_MTU_DISCOVER", "i", (6,), _BOTH),
    (IPPROTO_IPV6, 25, "IPV6_RECVERR", "i", (6,), _BOTH),
    (IPPROTO_IPV6, 49, "IPV6_RECVPKTINFO", "i", (6,), _UDP),
    (IPPROTO_IPV6, 67, "IPV6_TCLASS", "i", (6,), _BOTH),
    (IPPROTO_IPV6, 75, "IPV6_TRANSPARENT", "i", (6,), _BOTH),
    (IPPROTO_IPV6, 78, "IPV6_FREEBIND", "i", (6,), _BOTH),
]
SO_REUSEADDR = (SOL_SOCKET, 2, "SO_REUSEADDR", "i", (4, 6), _BOTH)
IPV6_V6ONLY = (IPPROTO_IPV6, 26, "IPV6_V6ONLY", "i", (6,), _BOTH)
BY_NAME = {o[2]: o for o in OPTIONS + [SO_REUSEADDR, IPV6_V6ONLY]}
# meaningful only on a socket that is not connected (the kernel computes them for a connection)
UNCONNECTED_ONLY = ("TCP_MAXSEG", "TCP_WINDOW_CLAMP", "TCP_DEFER_ACCEPT", "TCP_FASTOPEN")
DOUBLED = ("SO_RCVBUF", "SO_SNDBUF")      # the kernel stores twice what was set
FORCE = {"SO_RCVBUF": SO_RCVBUFFORCE, "SO_SNDBUF": SO_SNDBUFFORCE}


# ------------------------------------------------------------------------------ reading
def _get(s, opt):
    level, name, _, fmt, _, _ = opt
    if fmt == "i":
        return s.getsockopt(level, name)
    if fmt == "linger":
        return list(struct.unpack("ii", s.getsockopt(level, name, 8)))
    if fmt == "timeval":
        return list(struct.unpack("qq", s.getsockopt(level, name, 16)))
    return s.getsockopt(level, name, 64).split(b"\0", 1)[0].decode(errors="replace")


def _set(s, opt, value):
    level, name, label, fmt, _, _ = opt
    if label in FORCE:
        level, name = SOL_SOCKET, FORCE[label]
    if fmt == "i":
        s.setsockopt(level, name, int(value))
    elif fmt == "linger":
        s.setsockopt(level, name, struct.pack("ii", *value))
    elif fmt == "timeval":
        s.setsockopt(level, name, struct.pack("qq", *value))
    else:
        s.setsockopt(level, name, value.encode())


def _applies(opt, family, proto):
    return family in opt[4] and proto in opt[5]


_DEFAULTS = {}


def defaults(family, proto):
    """Option values of a fresh socket of this family and protocol (cached)."""
    key = (family, proto)
    if key not in _DEFAULTS:
        s = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6,
                          socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        try:
            d = {}
            for opt in OPTIONS:
                if _applies(opt, family, proto):
                    try:
                        d[opt[2]] = _get(s, opt)
                    except OSError:
                        d[opt[2]] = None
            _DEFAULTS[key] = d
        finally:
            s.close()
    return _DEFAULTS[key]


def read_options(s, family, proto, connected=False):
    """The options of socket s that differ from a fresh socket's, as {name: value} (buffer
    sizes as set, i.e. half what the kernel reports); SO_REUSEADDR and IPV6_V6ONLY always."""
    d = defaults(family, proto)
    out = {"SO_REUSEADDR": s.getsockopt(SOL_SOCKET, 2)}
    if family == 6:
        out["IPV6_V6ONLY"] = s.getsockopt(IPPROTO_IPV6, 26)
    for opt in OPTIONS:
        label = opt[2]
        if not _applies(opt, family, proto) or (connected and label in UNCONNECTED_ONLY):
            continue
        try:
            v = _get(s, opt)
        except OSError:
            continue
        if v == d.get(label):
            continue
        if label in DOUBLED:
            # autotuning only grows a connection's buffers: one smaller than a fresh socket's
            # was set; a larger one is left to the kernel (it cannot tell the two apart)
            if connected and v > (d.get(label) or 0):
                continue
            v //= 2
        out[label] = v
    return out


def apply_options(s, options, skip=()):
    for label, value in options.items():
        if label in skip:
            continue
        opt = BY_NAME.get(label)
        if opt is None:
            continue
        try:
            _set(s, opt, value)
        except OSError as e:
            raise RestoreError("setsockopt %s=%r: %s" % (label, value, e.strerror)) from None


def family_of(s):
    return 4 if s.family == socket.AF_INET else 6


def addr(sa):
    """A socket address as [host, port] (IPv6 scope id kept as host%scope)."""
    if sa is None:
        return None
    host, port = sa[0], sa[1]
    if len(sa) >= 4 and sa[3]:
        host = "%s%%%d" % (host, sa[3])
    return [host, port]


def sockaddr(family, a):
    host, port = a
    if family == 4:
        return (host, port)
    scope = 0
    if "%" in host:
        host, sc = host.split("%", 1)
        scope = int(sc) if sc.isdigit() else socket.if_nametoindex(sc)
    return (host, port, 0, scope)


def peer_of(s):
    try:
        return addr(s.getpeername())
    except OSError:
        return None


def tcp_info(s, n=32):
    return s.getsockopt(IPPROTO_TCP, TCP_INFO, n)


def tcp_state(s):
    return tcp_info(s, 8)[0]


def inet_info(f):
    """(family 4|6, "tcp"|"udp", tcp state or None) of an inet socket fd, else None. Cached on f."""
    cached = getattr(f, "_inet_info", False)
    if cached is not False:
        return cached
    res = None
    if f.link.startswith("socket:"):
        try:
            s = f.sock()
            if s.family in (socket.AF_INET, socket.AF_INET6):
                if s.type == socket.SOCK_STREAM and s.proto in (0, IPPROTO_TCP):
                    res = (family_of(s), "tcp", tcp_state(s))
                elif s.type == socket.SOCK_DGRAM and s.proto in (0, IPPROTO_UDP):
                    res = (family_of(s), "udp", None)
        except OSError:
            res = None
    f._inet_info = res
    return res


def _unspecified(host):
    return ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified


def _fresh(family, proto):
    return socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6,
                         socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)


def _any(family):
    return "0.0.0.0" if family == 4 else "::"


# ------------------------------------------------------------------------------ UDP queue
def peek_datagrams(s, limit=1 << 16):
    """Every datagram queued on UDP socket s, oldest first, as (sender [host, port], bytes),
    without taking them out (SO_PEEK_OFF walks the queue; put back as it was)."""
    old = s.getsockopt(SOL_SOCKET, SO_PEEK_OFF)
    out = []
    s.setsockopt(SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        while len(out) < limit:
            try:
                data, sender = s.recvfrom(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break
                raise
            out.append((addr(sender), data))
    finally:
        s.setsockopt(SOL_SOCKET, SO_PEEK_OFF, old)
    return out


def _csum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def send_datagram(family, src, dst, payload):
    """Deliver payload to dst as a UDP datagram from src (a raw socket writes the IP header, so
    the sender's own address and port can be given even where another socket holds them)."""
    sa, sp = src
    da, dp = dst
    sa, da = sa.split("%", 1)[0], da.split("%", 1)[0]
    ulen = 8 + len(payload)
    if family == 4:
        sb, db = socket.inet_pton(socket.AF_INET, sa), socket.inet_pton(socket.AF_INET, da)
        pseudo = sb + db + struct.pack("!BBH", 0, IPPROTO_UDP, ulen)
    else:
        sb, db = socket.inet_pton(socket.AF_INET6, sa), socket.inet_pton(socket.AF_INET6, da)
        pseudo = sb + db + struct.pack("!I3xB", ulen, IPPROTO_UDP)
    udp = struct.pack("!HHHH", sp, dp, ulen, 0) + payload
    c = _csum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    if family == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0x4000, 64, IPPROTO_UDP, 0, sb, db)
        hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        dest = (da, 0)
    else:
        hdr = struct.pack("!IHBB16s16s", 6 << 28, ulen, IPPROTO_UDP, 64, sb, db)
        r = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        dest = (da, 0)
    try:
        r.sendto(hdr + udp, dest)
    finally:
        r.close()


# ------------------------------------------------------------------------------ the kind
class InetSocket(FdKind):
    """A TCP socket listening, bound or unbound (not connected); a UDP socket."""
    name = "inet"
    restorable = True

    @staticmethod
    def match(f):
        info = inet_info(f)
        return info is not None and (info[1] == "udp" or info[2] in (LISTEN, CLOSE))

    @classmethod
    def describe(cls, f):
        family, proto, state = inet_info(f)
        s = f.sock()
        local = addr(s.getsockname())
        e = {"path": f.link, "inode": f.inode, "family": family, "proto": proto,
             "state": "udp" if proto == "udp" else TCP_STATES.get(state, str(state)).lower(),
             "local": local if local and (local[1] or not _unspecified(local[0])) else None,
             "options": read_options(s, family, proto)}
        if proto == "udp":
            e["peer"] = peer_of(s)
        if state == LISTEN:
            from ckpt.files import tcp
            tcp._warm_up()
            info = tcp_info(s)
            e["backlog"] = struct.unpack_from("I", info, 28)[0]     # tcpi_sacked: the backlog
        return e

    @classmethod
    def refuse(cls, f, entry):
        return None

    @classmethod
    def capture(cls, f, entry, ctx):
        s = f.sock()
        if entry["proto"] == "udp":
            q = peek_datagrams(s)
            entry["queue"] = [[a, base64.b64encode(d).decode()] for a, d in q]
        elif entry["state"] == "listen":
            info = tcp_info(s)
            pending = struct.unpack_from("I", info, 24)[0]          # tcpi_unacked: accept queue
            if pending and not ctx.leave_running:
                entry["lost_pending"] = pending
            from ckpt.files import tcp
            tcp.lock_process(ctx)

    @classmethod
    def precheck(cls, entry):
        if not entry.get("local") or not entry["local"][1]:
            return
        s = _fresh(entry["family"], entry["proto"])
        try:
            _prepare(s, entry)
            try:
                s.bind(sockaddr(entry["family"], entry["local"]))
            except OSError as e:
                raise RestoreError("fd %d: %s %s port %d cannot be bound again: %s"
                                   % (entry["fd"], entry["proto"].upper(), entry["local"][0], entry["local"][1],
                                      "in use" if e.errno == errno.EADDRINUSE else e.strerror)) from None
        finally:
            s.close()

    @classmethod
    def create(cls, remote, entry, table):
        family, proto = entry["family"], entry["proto"]
        s = _fresh(family, proto)
        try:
            _prepare(s, entry)
            apply_options(s, entry.get("options", {}), skip=("SO_REUSEADDR", "IPV6_V6ONLY"))
            where = "fd %d" % entry["fd"]
            if entry.get("local"):
                try:
                    s.bind(sockaddr(family, entry["local"]))
                except OSError as e:
                    raise RestoreError("%s: %s %s port %d: bind: %s" % (where, proto.upper(), entry["local"][0],
                                                                       entry["local"][1], e.strerror)) from None
            if entry["state"] == "listen":
                s.listen(entry.get("backlog", 128))
            if proto == "udp" and entry.get("peer"):
                try:
                    s.connect(sockaddr(family, entry["peer"]))
                except OSError as e:
                    raise RestoreError("%s: UDP connect to %s port %d: %s" % (where, entry["peer"][0], entry["peer"][1],
                                                                             e.strerror)) from None
            if entry.get("queue"):
                table.objects[("udp-local", entry["fd"])] = socket.socket(fileno=os.dup(s.fileno()))
        except BaseException:
            s.close()
            raise
        return table.adopt(s.detach(), what="the %s socket of fd %d" % (proto.upper(), entry["fd"]))

    @classmethod
    def finish(cls, remote, entry, table):
        s = table.objects.pop(("udp-local", entry["fd"]), None)
        if s is None:
            return
        try:
            local = addr(s.getsockname())
            if _unspecified(local[0]):
                local[0] = "127.0.0.1" if entry["family"] == 4 else "::1"
            for sender, data in entry["queue"]:
                send_datagram(entry["family"], sender, local, base64.b64decode(data))
            _wait_queued(s, len(entry["queue"]))
        finally:
            s.close()


def _prepare(s, entry):
    """What must be set before bind."""
    opts = entry.get("options", {})
    if opts.get("SO_REUSEADDR"):
        s.setsockopt(SOL_SOCKET, 2, 1)
    if entry["family"] == 6 and "IPV6_V6ONLY" in opts:
        s.setsockopt(IPPROTO_IPV6, 26, opts["IPV6_V6ONLY"])
    for label in ("SO_REUSEPORT", "IP_FREEBIND", "IP_TRANSPARENT", "IPV6_FREEBIND", "IPV6_TRANSPARENT",
                  "SO_BINDTODEVICE", "IP_BIND_ADDRESS_NO_PORT"):
        if label in opts:
            apply_options(s, {label: opts[label]})


def _wait_queued(s, n, timeout=2.0):
    """Wait until the n datagrams written are on s's queue (loopback delivery completes in
    softirq context, not within sendto)."""
    deadline = time.monotonic() + timeout
    while len(peek_datagrams(s, limit=n)) < n:
        if time.monotonic() > deadline:
            raise RestoreError("the %d datagram(s) queued on a UDP socket at the dump could not all be put back" % n)
        time.sleep(0.001)
