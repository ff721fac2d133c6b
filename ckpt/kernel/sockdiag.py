"""sock_diag for AF_UNIX (NETLINK_SOCK_DIAG, UNIX_DIAG): what the kernel knows of every unix
socket of ckpt's network namespace, keyed by socket inode.

One dump request answers for all sockets at once: type, state, bound name (path or abstract),
the inode and device of the bound file, the peer's inode, queued bytes, the inodes of the
clients waiting in a listener's accept queue, the shutdown state and the owner's uid.
Pure Python: struct over an AF_NETLINK socket.
"""
import os
import socket
import struct
from collections.abc import Mapping

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3

UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER = 0x01, 0x02, 0x04
UDIAG_SHOW_ICONS, UDIAG_SHOW_RQLEN, UDIAG_SHOW_MEMINFO, UDIAG_SHOW_UID = 0x08, 0x10, 0x20, 0x40
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_ICONS = 0, 1, 2, 3
UNIX_DIAG_RQLEN, UNIX_DIAG_MEMINFO, UNIX_DIAG_SHUTDOWN, UNIX_DIAG_UID = 4, 5, 6, 7

# socket states as sock_diag reports them (the TCP numbering)
ESTABLISHED, CLOSE, LISTEN = 1, 7, 10
STATE_NAMES = {ESTABLISHED: "established", CLOSE: "unconnected", LISTEN: "listening", 2: "connecting"}
TYPE_NAMES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "datagram", socket.SOCK_SEQPACKET: "seqpacket"}

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBHIII II")      # unix_diag_req: family, protocol, pad, states, ino, show, cookie[2]
_MSG = struct.Struct("=BBBBI II")       # unix_diag_msg: family, type, state, pad, ino, cookie[2]
_NLA = struct.Struct("=HH")
ALL_STATES = 0xFFFFFFFF
SHOW_ALL = (UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN
            | UDIAG_SHOW_UID)


class UnixSock:
    """One unix socket as sock_diag describes it."""
    __slots__ = ("inode", "type", "state", "name", "vfs", "peer", "icons", "rqueue", "wqueue",
                 "shutdown", "uid")

    def __init__(self, inode, type_, state):
        self.inode, self.type, self.state = inode, type_, state
        self.name = None        # bytes (abstract names start with NUL) or None: not bound
        self.vfs = None         # (inode, device) of the bound file: os.makedev form
        self.peer = None        # the peer's inode (0: a peer without an inode), None: no peer
        self.icons = None       # listener: inodes of the clients waiting in its accept queue
        self.rqueue = 0         # bytes queued to read (datagram: the first datagram's size);
        self.wqueue = 0         # listener: connections waiting / backlog; else bytes sent not read
        self.shutdown = 0       # bit 0: no more receiving, bit 1: no more sending
        self.uid = None

    @property
    def abstract(self):
        return bool(self.name) and self.name[:1] == b"\0"

    def show_name(self):
        return show_name(self.name)

    def __repr__(self):
        return "<unix %d %s %s name=%r peer=%r>" % (self.inode, TYPE_NAMES.get(self.type, self.type),
                                                   STATE_NAMES.get(self.state, self.state), self.name, self.peer)


def show_name(name):
    """A bound name for messages: a path as is, an abstract name as @name."""
    if not name:
        return "(unnamed)"
    if name[:1] == b"\0":
        return "@" + name[1:].decode("utf-8", "backslashreplace")
    return name.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _kdev(dev):
    """The kernel's internal dev_t (major << 20 | minor) as os.stat gives devices."""
    return os.makedev(dev >> 20, dev & 0xFFFFF)


def _parse(payload):
    family, type_, state, _, ino, _, _ = _MSG.unpack_from(payload, 0)
    s = UnixSock(ino, type_, state)
    off = (_MSG.size + 3) & ~3
    while off + _NLA.size <= len(payload):
        alen, atype = _NLA.unpack_from(payload, off)
        if alen < _NLA.size:
            break
        data = payload[off + _NLA.size: off + alen]
        atype &= 0x3FFF
        if atype == UNIX_DIAG_NAME:
            s.name = bytes(data)
        elif atype == UNIX_DIAG_VFS:
            vino, vdev = struct.unpack_from("=II", data)
            s.vfs = (vino, _kdev(vdev))
        elif atype == UNIX_DIAG_PEER:
            s.peer = struct.unpack_from("=I", data)[0]
        elif atype == UNIX_DIAG_ICONS:
            s.icons = list(struct.unpack_from("=%dI" % (len(data) // 4), data))
        elif atype == UNIX_DIAG_RQLEN:
            s.rqueue, s.wqueue = struct.unpack_from("=II", data)
        elif atype == UNIX_DIAG_SHUTDOWN:
            s.shutdown = data[0]
        elif atype == UNIX_DIAG_UID:
            s.uid = struct.unpack_from("=I", data)[0]
        off += (alen + 3) & ~3
    return s


class UnixTable(Mapping):
    """inode -> UnixSock for a whole dump, each answer parsed only when asked for (a machine
    may have thousands of unix sockets; a dump in the freeze looks at a few)."""

    def __init__(self, raw):
        self._raw = raw         # inode -> (state, the answer's bytes)
        self._parsed = {}

    def __getitem__(self, ino):
        s = self._parsed.get(ino)
        if s is None:
            s = self._parsed[ino] = _parse(self._raw[ino][1])
        return s

    def __contains__(self, ino):
        return ino in self._raw

    def __iter__(self):
        return iter(self._raw)

    def __len__(self):
        return len(self._raw)

    def in_state(self, state):
        """Inodes of the sockets in this state (read from the answers' headers only)."""
        return [ino for ino, (st, _) in self._raw.items() if st == state]


def _dump(sock, raw):
    """Every unix socket's answer into raw: inode -> (state, bytes)."""
    req = _REQ.pack(socket.AF_UNIX, 0, 0, ALL_STATES, 0, SHOW_ALL, 0xFFFFFFFF, 0xFFFFFFFF)
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
    while True:
        buf = sock.recv(1 << 20)
        if not buf:
            return
        off = 0
        while off + _NLMSGHDR.size <= len(buf):
            length, mtype, _, _, _ = _NLMSGHDR.unpack_from(buf, off)
            if length < _NLMSGHDR.size:
                return
            body = memoryview(buf)[off + _NLMSGHDR.size: off + length]
            if mtype == NLMSG_DONE:
                return
            if mtype == NLMSG_ERROR:
                err = -struct.unpack_from("=i", body)[0]
                if err:
                    raise OSError(err, "sock_diag (AF_UNIX): %s" % os.strerror(err))
                return
            if mtype == SOCK_DIAG_BY_FAMILY:
                _, _, state, _, sino, _, _ = _MSG.unpack_from(body, 0)
                raw[sino] = (state, bytes(body))
            off += (length + 3) & ~3


def _netlink():
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)


def unix_sockets():
    """Every unix socket of ckpt's network namespace: a mapping inode -> UnixSock."""
    raw = {}
    with _netlink() as s:
        _dump(s, raw)
    return UnixTable(raw)

