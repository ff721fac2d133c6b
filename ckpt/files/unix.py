"""Unix domain sockets: stream, datagram and seqpacket; unbound, bound to a path or to an
abstract name; listening (with the connections waiting in the accept queue); connected to a
socket of the process (socketpairs, accepted connections) with the data queued both ways;
datagram sockets connected to a named socket outside the process (syslog's /dev/log).

Dump. sock_diag (ckpt.kernel.sockdiag) describes every unix socket of the namespace at once:
type, state, name, bound file, peer, queued bytes, a listener's waiting clients, shutdown
state. The file a socket is bound to is found by SIOCUNIXFILE (the directory of a relative
name, its mode and owner, or that it was unlinked). The queued data is read in the freeze
without taking it out: MSG_PEEK with SO_PEEK_OFF on ckpt's duplicate of the socket (the same
socket: its peek offset is put back right after), datagram and record boundaries kept with each
datagram's sender name. Refused, naming the fd:
a stream or seqpacket connection to a socket outside the process (the other end cannot be
rebuilt), a datagram socket connected to an unnamed socket outside, file descriptors in flight
(SCM_RIGHTS: /proc fdinfo `scm_fds`, and any met while peeking), a listener with connections
from outside waiting in its accept queue or with data already sent on a waiting connection (it
cannot be read before accept), a socket of another network namespace than ckpt's.

Restore. Every unix socket of the image is made when the first one is created, inside the
restored process by injected calls (so that peer credentials carry its PID, relative names
resolve from its working directory, and socket files are its own): socketpairs for pairs
without names, a connect to the restored listener and an accept for connections accepted from
a listener of the process (a temporary listener bound to the name for one accepted from a
listener that is gone), plain connects for the connections waiting in a listener's queue, in
their order. Then the queues are refilled by the peer (or a temporary sender bound to the
datagram's sender name), datagram sockets are connected, shutdown states, options and peek
offsets set, socket files given their owner and mode back (or unlinked again if they were at
the dump). A stale socket file at a bound path (nobody bound to it) is removed; anything else
in the way fails the restore before anything is made.

Process trees. A socket whose peer, listener or waiting client another process of the dumped
tree holds (FreezeContext.tree; above its standard streams) is not leading out: a socketpair
whose ends a parent and its child kept after fork(), a connection a child accepted from its
parent's listener, one waiting in the accept queue of a listener of another process. Copies of
one socket in several processes (nginx's channels: the master holds both ends, each worker a
copy of one) are one open file: the later ones take the first one's fd at restore (shares_with).
At restore the sockets linked to each other (a pair, a listener with its connections and
waiting clients, a datagram socket with the bound sockets it was connected to or whose data it
holds) are made together, with their queues, options and shutdown states, by the first process
of the restore that holds one of them (with its rights: socket files get their owner back as
usual); the processes restored after it take theirs (Table.share and Table.shared). Refused at
dump, naming both processes and fds: a socket whose peer another process of the tree holds only
as a standard stream (fd 0-2), which restore attaches to ckpt's own streams (the framework's
rule for standard streams), and what is refused within one process (a datagram socket
connected to an unnamed one that is not connected back, a client waiting in a listener's queue
that has already sent data).

Not kept: peer credentials other than the restored process's own (SO_PEERCRED of in-process
pairs names the restored PID, as it did, but the uid restore runs as; in a tree, a socket made
by another process of the tree names that process: exact for a socketpair made before a fork,
not for a connection between two processes), the credentials attached to queued messages, an
out-of-band byte (refused: the queued bytes do not add up), a pending error (SO_ERROR). Empty
datagrams at the end of the queue of a datagram socket shut down for reading cannot be told from
its end of file and are not kept. The name of a connection accepted from a listener that is gone
comes back only if nothing holds it at restore (else unnamed, with a warning). Datagrams sent by
other processes between the freeze and the kill are lost with the killed process, as they would
be. Two sockets of the image bound to one path (the first one's file unlinked) that are both
reached by name during the restore cannot both be bound.
"""
import array
import base64
import errno
import fcntl
import os
import socket
import stat
import struct

from ckpt.errors import RestoreError, TargetGone
from ckpt.files.base import AT_FDCWD, FdKind
from ckpt.kernel import procfs, sockdiag, sysno

SOL_SOCKET = socket.SOL_SOCKET
SO_PEEK_OFF, SO_SNDBUFFORCE, SO_RCVBUFFORCE = 42, 32, 33
SIOCUNIXFILE = 0x89E0      # an O_PATH fd of the file a unix socket is bound to
SO_SNDBUF, SO_RCVBUF, SO_PASSCRED = 7, 8, 16
SCM_RIGHTS, SCM_PIDFD = 1, 4
SOCK_NONBLOCK, SOCK_CLOEXEC = 0o4000, 0o2000000
MSG_PEEK, MSG_TRUNC, MSG_DONTWAIT, MSG_NOSIGNAL = 0x2, 0x20, 0x40, 0x4000
AT_SYMLINK_NOFOLLOW = 0x100
STREAM, DGRAM, SEQPACKET = socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET
ESTABLISHED, CLOSE, LISTEN = sockdiag.ESTABLISHED, sockdiag.CLOSE, sockdiag.LISTEN
TYPES = sockdiag.TYPE_NAMES
SHUT_HOW = {1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}

# socket options a process may have set, kept where they differ from a fresh socket's:
# (name, option number, length). SO_SNDBUF/SO_RCVBUF read back doubled, set again with *FORCE.
OPTIONS = [
    ("SO_PASSCRED", SO_PASSCRED, 4), ("SO_PASSSEC", 34, 4), ("SO_PASSPIDFD", 76, 4),
    ("SO_PASSRIGHTS", 83, 4), ("SO_RCVLOWAT", 18, 4), ("SO_RCVTIMEO", 20, 16), ("SO_SNDTIMEO", 21, 16),
    ("SO_PRIORITY", 12, 4), ("SO_MARK", 36, 4), ("SO_TIMESTAMP", 29, 4), ("SO_TIMESTAMPNS", 35, 4),
    ("SO_KEEPALIVE", 9, 4), ("SO_LINGER", 13, 8), ("SO_RCVMARK", 75, 4),
    ("SO_RCVBUF", SO_RCVBUF, 4), ("SO_SNDBUF", SO_SNDBUF, 4),
]
OPTION_NUMBERS = {name: (opt, size) for name, opt, size in OPTIONS}
LAST_OPTIONS = ("SO_PASSCRED", "SO_PASSPIDFD")     # set last: they autobind a socket that sends or connects

PEEK_STREAM_BUF = 1 << 20
PEEK_RECORD_BUF = 1 << 18
REFILL_CHUNK = 1 << 19
REFILL_MAX_RECORD = (1 << 20) - 4096       # what fits the restorer's scratch area at once


def _b64(data):
    return base64.b64encode(data).decode() if data is not None else None


def _unb64(text):
    return base64.b64decode(text) if text is not None else None


def _clean_name(name):
    """A bound name as sock_diag reports it: a path without its terminating NUL."""
    if name is None or name[:1] == b"\0":
        return name
    return name.split(b"\0", 1)[0]


def _addr_bytes(addr):
    """A sender address as Python's recvmsg gives it, as bytes (None: unnamed)."""
    if not addr:
        return None
    return os.fsencode(addr) if isinstance(addr, str) else bytes(addr)


def _netns(pid):
    try:
        st = os.stat("/proc/%s/ns/net" % pid)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def holder(ino):
    """Which process holds the socket inode, for messages ("process 123 (name)"), or None."""
    want = "socket:[%d]" % ino
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            for fd in os.listdir("/proc/%s/fd" % d):
                try:
                    if os.readlink("/proc/%s/fd/%s" % (d, fd)) == want:
                        return "process %s (%s)" % (d, procfs.comm(int(d)) or "?")
                except OSError:
                    continue
        except OSError:
            continue
    return None


# ------------------------------------------------------------------------------------- dump
class _View:
    """Every unix socket of the namespace (sock_diag) and which ones the target holds: one per
    FreezeContext (the live check has its own; the freeze's is read in the freeze)."""

    def __init__(self, pid, tree=()):
        self.pid = pid
        self.tree = [p for p in tree if p != pid]     # the other processes dumped with it
        self.outside = "the dumped processes" if self.tree else "the process"   # for messages
        self._others = None
        self._tree_listeners = None
        self.netns = _netns(pid)
        self.other_netns = self.netns != _netns("self")
        self.socks = {} if self.other_netns else sockdiag.unix_sockets()
        self.fds = {}           # socket inode -> the target's fds holding it
        for fd in procfs.fds(pid):
            try:
                link = os.readlink(procfs.proc(pid, "fd", str(fd)))
            except OSError:
                continue
            if link.startswith("socket:["):
                self.fds.setdefault(int(link[8:-1]), []).append(fd)
        # held: restored with the process (an fd above the standard streams, which are
        # attached to ckpt's own at restore)
        self.held = {ino for ino, fds in self.fds.items() if ino in self.socks and max(fds) > 2}
        self.pending_of = {}    # client inode -> inode of the listener whose queue it waits in
        for ino in ([] if self.other_netns else self.socks.in_state(LISTEN)):
            for c in self.socks[ino].icons or ():
                if c:
                    self.pending_of[c] = ino
        self.by_vfs, self.by_abstract = {}, {}     # held listeners by bound file / abstract name
        for ino in self.held:
            s = self.socks[ino]
            if s.state == LISTEN and s.name:
                if s.abstract:
                    self.by_abstract[s.name] = ino
                elif s.vfs:
                    self.by_vfs[s.vfs] = ino
        self.defaults = {}
        self._buffers = {}

    def buffer(self, size):
        """A peek buffer, allocated once per dump."""
        if size not in self._buffers:
            self._buffers[size] = bytearray(size)
        return self._buffers[size]

    def fd_of(self, ino):
        fds = self.fds.get(ino)
        return min(fds) if fds else None

    @property
    def others(self):
        """socket inode -> [(pid, fd)]: the unix sockets the other processes of the tree hold
        (read when first needed: a process alone, or one whose peers are all its own, never
        looks)."""
        if self._others is None:
            self._others = {}
            for pid in self.tree:
                try:
                    numbers = procfs.fds(pid)
                except TargetGone:
                    continue    # exited meanwhile (live check): the freeze looks again
                for fd in numbers:
                    try:
                        link = os.readlink(procfs.proc(pid, "fd", str(fd)))
                    except OSError:
                        continue
                    if link.startswith("socket:["):
                        ino = int(link[8:-1])
                        if ino in self.socks:
                            self._others.setdefault(ino, []).append((pid, fd))
        return self._others

    def in_tree(self, ino):
        """(pid, fd) of another process of the tree holding the socket above its standard
        streams (restored with the tree), or None."""
        if not self.tree or ino not in self.socks:
            return None
        for pid, fd in self.others.get(ino, ()):
            if fd > 2:
                return pid, fd
        return None

    def kept(self, ino):
        """Restored with the dump: held by this process or by another of the tree (above the
        standard streams, which restore attaches to ckpt's own)."""
        return ino in self.held or self.in_tree(ino) is not None

    def where(self, ino):
        """Which fd holds the socket, for messages: "fd 5" here, "fd 5 of process 12 (name)" in
        another process of the tree."""
        if ino in self.fds:
            return "fd %d" % self.fd_of(ino)
        there = self.in_tree(ino) or min(self.others.get(ino, ()) or [(None, None)])
        if there[0] is None:
            return "a socket (inode %d)" % ino
        return "fd %d of process %d (%s)" % (there[1], there[0], procfs.comm(there[0]) or "?")

    def peer(self, s):
        """("held", inode) | ("pending", listener inode) | ("outside", UnixSock) | ("dead", None)
        | None (not connected). "held": by this process or another process of the tree."""
        if s.inode in self.pending_of and s.state == ESTABLISHED:
            return "pending", self.pending_of[s.inode]
        if s.peer is None:
            return None
        if s.peer in self.held:
            return "held", s.peer
        if s.peer and s.peer in self.socks:
            if self.in_tree(s.peer) is not None:
                return "held", s.peer
            return "outside", self.socks[s.peer]
        return "dead", None

    def listener_of(self, s):
        """The listener of the process or of the tree this (accepted) socket got its name
        from, or None."""
        if not s.name:
            return None
        ino = self.by_abstract.get(s.name) if s.abstract else self.by_vfs.get(s.vfs)
        if ino is None and self.tree:
            by_abstract, by_vfs = self.tree_listeners()
            ino = by_abstract.get(s.name) if s.abstract else by_vfs.get(s.vfs)
        return ino if ino != s.inode else None

    def tree_listeners(self):
        """The named listeners the other processes of the tree hold: (by abstract name, by
        bound file)."""
        if self._tree_listeners is None:
            by_abstract, by_vfs = {}, {}
            for ino in self.others:
                s = self.socks[ino]
                if s.state == LISTEN and s.name and self.in_tree(ino) is not None:
                    if s.abstract:
                        by_abstract[s.name] = ino
                    elif s.vfs:
                        by_vfs[s.vfs] = ino
            self._tree_listeners = by_abstract, by_vfs
        return self._tree_listeners

    def bind_role(self, s):
        """How the socket gets its name back: "own" (bind), "accepted" (accept from its
        restored listener), "temp" (accept from a temporary listener bound to the name: the
        listener it was accepted from is gone), or None (unnamed)."""
        if not s.name:
            return None
        if s.type == DGRAM or s.state != ESTABLISHED or s.inode in self.pending_of:
            return "own"
        if self.listener_of(s) is not None:
            return "accepted"
        p = self.peer(s)
        if p and p[0] == "held" and self.socks[p[1]].name:
            return "own"        # both ends named: a bound socketpair end or a bound client
        return "temp"

    def fresh_options(self, type_):
        if type_ not in self.defaults:
            with socket.socket(socket.AF_UNIX, type_) as fresh:
                self.defaults[type_] = _read_options(fresh)
        return self.defaults[type_]


def _view(f):
    v = f.ctx.memo.get("unix")
    if v is None:
        v = f.ctx.memo["unix"] = _View(f.pid, f.ctx.tree)
    return v


def _read_options(sk):
    out = {}
    for name, opt, size in OPTIONS:
        try:
            out[name] = sk.getsockopt(SOL_SOCKET, opt, size)
        except OSError:
            pass
    return out


def _held_by(view, ino):
    """Who holds a socket the process cannot take along, for messages."""
    if ino in view.fds:
        return ("the process's standard stream fd %d, which restore attaches to ckpt's own instead"
                % view.fd_of(ino))
    if view.tree and view.others.get(ino):
        pid, fd = min(view.others[ino])
        return ("process %d (%s) of the dumped tree as its standard stream fd %d, which restore attaches to "
                "ckpt's own instead" % (pid, procfs.comm(pid) or "?", fd))
    who = holder(ino)
    return ("held by %s" % who) if who else "held by no process ckpt can see"


def _tree_stdio(view, ino):
    """"fd 1 (standard output) of process 12 (name)" when the socket is held by another process
    of the tree only as a standard stream, else None."""
    if not view.tree or not view.others.get(ino):
        return None
    pid, fd = min(view.others[ino])
    return "fd %d (standard %s) of process %d (%s), another process of the dumped tree" % (
        fd, ("input", "output", "error")[fd], pid, procfs.comm(pid) or "?")


def _peer_text(view, ino):
    s = view.socks.get(ino)
    return "%s (%s)" % (s.show_name() if s is not None and s.name else "an unnamed socket", _held_by(view, ino))


def _refusal(view, f):
    """Why this socket cannot be dumped, or None."""
    if view.other_netns:
        return ("a unix socket of another network namespace (net:[%d]) than ckpt's: not supported; run ckpt "
                "in the target's network namespace" % view.netns[1])
    s = view.socks.get(f.inode)
    if s is None:
        return "a unix socket that sock_diag does not report: not supported"
    if s.type not in TYPES:
        return "a unix socket of type %d: not supported" % s.type
    inflight = 0
    if s.rqueue and s.state != LISTEN:     # (else any fd in flight is met by the peek in the freeze)
        try:
            inflight = int(f.info.get("scm_fds", "0"))
        except (OSError, ValueError):
            pass
    if inflight:
        return ("%d file descriptor(s) in flight (SCM_RIGHTS) are queued in it: not supported"
                % inflight)
    if s.state == LISTEN:
        for c in s.icons or ():
            if not c:
                return ("a connection whose client has already closed waits in the accept queue of this listener "
                        "(%s), with whatever it sent, which cannot be read before it is accepted: not supported; "
                        "retry once it is accepted" % s.show_name())
            if not view.kept(c):
                return ("a connection from outside %s (%s) waits in the accept queue of this listener "
                        "(%s): not supported; retry once it is accepted"
                        % (view.outside, _held_by(view, c), s.show_name()))
            if view.socks[c].wqueue:
                return ("%s has a connection waiting in the accept queue of this listener (%s) and has already "
                        "sent data on it, which cannot be read before it is accepted: not supported"
                        % (view.where(c), s.show_name()))
        return None
    p = view.peer(s)
    kind = TYPES[s.type]
    if p is None or p[0] == "dead":
        return None
    if p[0] == "pending":
        if not view.kept(p[1]):
            return ("a %s socket connecting to %s, a listener outside %s that has not accepted it yet: "
                    "connections leading out of %s are not supported"
                    % (kind, _peer_text(view, p[1]), view.outside, view.outside))
        return None
    if p[0] == "outside":
        peer = p[1]
        stdio = _tree_stdio(view, peer.inode)
        if stdio:
            return ("a %s socket connected to %s: restore attaches a standard stream to ckpt's own streams, "
                    "which would cut this connection; not supported" % (kind, stdio))
        if s.type == DGRAM:
            if not peer.name:
                return ("a datagram socket connected to %s outside %s: without a name it could not "
                        "be reconnected: not supported" % (_peer_text(view, peer.inode), view.outside))
            return None
        return ("a %s socket connected to %s outside %s: connections leading out of %s are not supported"
                % (kind, _peer_text(view, peer.inode), view.outside, view.outside))
    y = view.socks[p[1]]
    if s.type == DGRAM and not y.name and y.peer != s.inode:
        return ("a datagram socket connected to an unnamed socket (%s) that is not connected back to it: "
                "not supported" % view.where(y.inode))
    return None


def _file_info(f, s):
    """Where a path-bound socket's file is: the directory a relative name was bound in, and
    the file's mode and owner if it is still there (else "unlinked": the name is bound again
    and unlinked). SIOCUNIXFILE opens the very file the socket is bound to; without it, the
    name is looked up (relative names from the process's working directory)."""
    name = os.fsdecode(_clean_name(s.name))
    out = {}
    try:
        fd = fcntl.ioctl(f.sock().fileno(), SIOCUNIXFILE)
    except OSError:
        fd = None
    if fd is not None:
        try:
            path = os.readlink("/proc/self/fd/%d" % fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        gone = path.endswith(" (deleted)")
        if gone:
            path = path[:-len(" (deleted)")]
        if not name.startswith("/"):
            d = path[:-len(name)] if path.endswith("/" + name) else None
            out["dir"] = (d.rstrip("/") or "/") if d else (procfs.readlink(f.pid, "cwd") or "/")
        if gone or not stat.S_ISSOCK(st.st_mode):
            out["unlinked"] = True
        else:
            out.update(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
        return out
    if name.startswith("/"):
        path = name
    else:
        out["dir"] = procfs.readlink(f.pid, "cwd") or "/"
        path = out["dir"].rstrip("/") + "/" + name
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISSOCK(st.st_mode) and s.vfs == (st.st_ino, st.st_dev):
        out.update(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
    else:
        out["unlinked"] = True
    return out


def _ancillary(f, anc):
    """Close what a peek installed in ckpt (passed fds, pidfds); refuse passed fds."""
    passed = 0
    for level, kind, data in anc:
        if level != SOL_SOCKET or kind not in (SCM_RIGHTS, SCM_PIDFD):
            continue
        fds = array.array("i")
        fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        for fd in fds:
            os.close(fd)
        if kind == SCM_RIGHTS:
            passed += len(fds)
    if passed:
        raise f.error("file descriptors in flight (SCM_RIGHTS) are queued in it: not supported")


def _peek_stream(f, sk, s):
    buf = _view(f).buffer(PEEK_STREAM_BUF)
    parts = []
    while True:
        try:
            n, anc, _, _ = sk.recvmsg_into([buf], 4096, MSG_PEEK | MSG_DONTWAIT)
        except BlockingIOError:
            break
        _ancillary(f, anc)
        if n == 0:
            break
        parts.append(bytes(buf[:n]))
    data = b"".join(parts)
    if len(data) != s.rqueue:
        raise f.error("only %d of the %d bytes queued in it could be read (out-of-band data?): not supported"
                      % (len(data), s.rqueue))
    return _b64(data)


def _peek_records(f, sk, s):
    """Every datagram (record) queued, whole, with the name of its sender."""
    buf = _view(f).buffer(PEEK_RECORD_BUF)
    records, parts = [], []
    while True:
        try:
            n, anc, flags, addr = sk.recvmsg_into([buf], 4096, MSG_PEEK | MSG_DONTWAIT)
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                break
            raise
        _ancillary(f, anc)
        parts.append(bytes(buf[:n]))
        if flags & MSG_TRUNC:
            continue    # the peek offset moved past what was copied: the next peek goes on
        data = b"".join(parts)
        parts = []
        if not data and s.shutdown & 1:
            break       # end of file of a socket shut down for reading
        records.append([_b64(data), _b64(_addr_bytes(addr))])
    return records


def _peek(f, s):
    """(the socket's own peek offset, its queue), read without taking anything out."""
    sk = f.sock()
    old = sk.getsockopt(SOL_SOCKET, SO_PEEK_OFF)
    sk.setsockopt(SOL_SOCKET, SO_PEEK_OFF, 0)
    try:
        if s.type == STREAM:
            return old, (_peek_stream(f, sk, s) if s.rqueue else "")
        return old, _peek_records(f, sk, s)
    finally:
        sk.setsockopt(SOL_SOCKET, SO_PEEK_OFF, old)


class UnixSocket(FdKind):
    """One unix socket (see the module's doc)."""
    name = "unix"
    restorable = True
    inherit_stdio = True     # a standard stream that is a socket leading out: ckpt's own at restore

    @staticmethod
    def match(f):
        if not f.link.startswith("socket:"):
            return False
        v = _view(f)
        if f.inode in v.socks:
            return True
        if v.other_netns:
            try:
                return f.sock().family == socket.AF_UNIX
            except OSError:
                return False
        return False

    @classmethod
    def describe(cls, f):
        return {"path": f.link, "inode": f.inode}

    @classmethod
    def refuse(cls, f, entry):
        return _refusal(_view(f), f)

    @classmethod
    def capture(cls, f, entry, ctx):
        v = _view(f)
        s = v.socks[f.inode]
        name = _clean_name(s.name)
        role = v.bind_role(s)
        entry.update(type=s.type, state=sockdiag.STATE_NAMES.get(s.state, str(s.state)), name=_b64(name),
                     shown=s.show_name(), bind=role, shutdown=s.shutdown)
        if name and not s.abstract and role in ("own", "temp"):
            entry["file"] = _file_info(f, s)
        if role == "accepted":
            entry["via"] = v.listener_of(s)
        if s.state == LISTEN:
            entry["backlog"] = s.wqueue
            entry["pending"] = [c for c in s.icons or () if c]
        else:
            p = v.peer(s)
            if p is not None:
                if p[0] == "outside":
                    entry["peer"] = {"outside": _b64(_clean_name(p[1].name)), "shown": p[1].show_name()}
                elif p[0] == "dead":
                    entry["peer"] = {"dead": True}
                else:
                    entry["peer"] = {p[0]: p[1]}
            entry["peek_off"], entry["queue"] = _peek(f, s)
        fresh = v.fresh_options(s.type)
        now = _read_options(f.sock())
        entry["options"] = {k: _b64(val) for k, val in now.items() if fresh.get(k) != val}

    @classmethod
    def precheck(cls, entry):
        _check_free(entry)

    @classmethod
    def create(cls, remote, entry, table):
        made = table.objects.get("unix")
        if made is None:
            made = table.objects["unix"] = _make_all(remote, table)
        if entry["inode"] not in made:
            raise RestoreError("fd %d: unix socket inode %d was not made" % (entry["fd"], entry["inode"]))
        return made[entry["inode"]]


# ------------------------------------------------------------------------------------ restore
def _made_here(e):
    """An entry whose socket a create makes (not a standard stream leading out, not another fd
    of an open file made for an earlier entry of this process or of another process)."""
    return e.get("kind") == UnixSocket.name and not e.get("inherit") and "shares" not in e \
        and "shares_with" not in e


def _components(every):
    """The unix sockets of the tree that must be made together, as groups of inodes: a socket
    and its peer, a listener and the connections accepted from it or waiting in its queue, a
    datagram socket and the bound sockets that sent what is queued in it. every: inode ->
    entry."""
    up = {ino: ino for ino in every}

    def top(x):
        while up[x] != x:
            up[x] = up[up[x]]
            x = up[x]
        return x

    def join(a, b):
        if a in up and b in up:
            up[top(a)] = top(b)
    by_name = {}
    for ino, e in every.items():
        if e.get("type") == DGRAM and e.get("bind") == "own" and e.get("name"):
            by_name.setdefault(e["name"], ino)
    for ino, e in every.items():
        peer = e.get("peer") or {}
        for k in ("held", "pending"):
            if k in peer:
                join(ino, peer[k])
        if e.get("via") is not None:
            join(ino, e["via"])
        for c in e.get("pending") or ():
            join(ino, c)
        if e.get("type") == DGRAM and isinstance(e.get("queue"), list):
            for _, sender in e["queue"]:
                if sender is not None and sender in by_name:
                    join(ino, by_name[sender])
    groups = {}
    for ino in every:
        groups.setdefault(top(ino), set()).add(ino)
    return {ino: groups[top(ino)] for ino in every}


def _make_all(remote, table):
    """Every unix socket of the restored process: {inode: its (parked) fd}.

    In a tree, sockets linked across processes (a socketpair whose ends went to a parent and
    its child, a connection accepted by a child from its parent's listener) are made together,
    with their queues, options and shutdown states, by the first process of the restore that
    holds one of them; the others take theirs from it (TreeObjects share/shared)."""
    me = remote.pid
    tables = dict(table.tree.tables or {})
    tables[me] = table.entries
    every, owner = {}, {}
    for rank, (pid, entries) in enumerate(tables.items()):
        for e in entries or ():
            if _made_here(e) and e.get("inode") is not None and e["inode"] not in every:
                every[e["inode"]] = e
                owner[e["inode"]] = (rank, pid)
    group = _components(every)
    out, todo = {}, set()
    for e in table.entries:
        if not _made_here(e) or e["inode"] in out or e["inode"] in todo:
            continue
        if owner.get(e["inode"], (0, me))[1] != me:
            continue    # another process's (a malformed image): create says it was not made
        taken = table.shared(("unix", e["inode"]))
        if taken is not None:
            out[e["inode"]] = taken[0]      # made by a process restored before
        else:
            todo |= group[e["inode"]]
    if not todo:
        return out
    entries = sorted((every[i] for i in todo), key=lambda e: (owner[e["inode"]], e["fd"]))
    holders = {i: owner[i][1] for i in todo}
    made = _Builder(remote, table, entries, holders).run()
    for ino, fd in made.items():
        if holders[ino] == me:
            out[ino] = fd
        else:
            # for the process that holds it, restored later; closed here with the parked fds
            table.share(("unix", ino), (fd,))
    return out


def _sockaddr(name):
    if name[:1] != b"\0":
        name += b"\0"
    return struct.pack("=H", socket.AF_UNIX) + name


def _path_of(entry, cwd=None):
    """The bound file of a path-named entry, absolute (bytes); None for abstract names."""
    name = _unb64(entry.get("name"))
    if not name or name[:1] == b"\0":
        return None
    if name[:1] == b"/":
        return name
    d = (entry.get("file") or {}).get("dir")
    base = os.fsencode(d) if d else os.fsencode(cwd or os.getcwd())
    return base.rstrip(b"/") + b"/" + name


def _bound(path):
    """Whether a socket is bound to the socket file at path: a datagram connect answers
    ECONNREFUSED only when none is, whatever its type or network namespace (and without a
    connection or anything sent to a listener that is there)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(path)
        except OSError as e:
            return e.errno != errno.ECONNREFUSED
    return True


def _path_in_the_way(path):
    """None if a socket can be bound at path (free, or a stale socket file nobody is bound to),
    else what is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path) or b"."
        if not os.path.isdir(parent):
            return "its directory %s does not exist" % os.fsdecode(parent)
        return None
    except OSError as e:
        return os.strerror(e.errno)
    if not stat.S_ISSOCK(st.st_mode):
        what = "directory" if stat.S_ISDIR(st.st_mode) else "file that is not a socket"
        return "a %s is there" % what
    if _bound(path):
        return "a socket in use is bound to it"
    return None


def _abstract_taken(name):
    return any(s.name == name for s in sockdiag.unix_sockets().values())


class _Builder:
    """Makes every unix socket of the image inside the restored process."""

    def __init__(self, remote, table, entries, holders=None):
        self.r = remote
        self.table = table
        self.entries = entries
        self.holders = holders or {}    # inode -> PID of the process of the tree that holds it
        self.by_ino = {e["inode"]: e for e in entries}
        self.fd = {}            # inode -> fd in the restored process
        self.dead_peer = {}     # inode -> the fd standing for its closed peer until the refill is done
        self.temps = []         # fds to close once everything is made
        self.unlink_later = []  # bound and unlinked again at the end (files unlinked at the dump)
        self.senders = {}       # sender name -> temporary datagram socket bound to it
        self.raised = {}        # fd -> bytes it puts back (with the kernel's overhead)
        self.raised_to = {}     # fd -> the send buffer it was given for them
        self.default_sndbuf = struct.unpack("=i", _fresh_options(STREAM)["SO_SNDBUF"][:4])[0]
        self.forced = set()     # inodes whose send buffer is to be set back after the refill
        self.pairs = set()      # datagram socketpairs made: {inode, inode}
        self.cwd = os.fsencode(os.readlink("/proc/%d/cwd" % remote.pid))

    # -- injected calls ---------------------------------------------------------------
    def call(self, nr, *args, what, ok=()):
        return self.r.call(nr, *args, what=what, ok_errors=ok)

    def socket(self, type_, what):
        return self.call(sysno.socket, socket.AF_UNIX, type_ | SOCK_NONBLOCK | SOCK_CLOEXEC, 0,
                         what="socket(AF_UNIX, %s) for %s" % (TYPES[type_], what))

    def socketpair(self, type_, what):
        self.r.reset()
        addr = self.r.alloc(8)
        self.call(sysno.socketpair, socket.AF_UNIX, type_ | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, addr,
                  what="socketpair(AF_UNIX, %s) for %s" % (TYPES[type_], what))
        return struct.unpack("<ii", self.r.read(addr, 8))

    def addr_call(self, nr, fd, name, what, ok=()):
        self.r.reset()
        sa = _sockaddr(name)
        return self.call(nr, fd, self.r.put(sa), len(sa), what=what, ok=ok)

    def setsockopt(self, fd, opt, value, what, ok=()):
        self.r.reset()
        data = value if isinstance(value, bytes) else struct.pack("=i", value)
        return self.call(sysno.setsockopt, fd, SOL_SOCKET, opt, self.r.put(data), len(data), what=what, ok=ok)

    def close(self, fd):
        self.call(sysno.close, fd, what="close", ok=(errno.EBADF,))

    def path_call(self, nr, path, *args, what, ok=()):
        self.r.reset()
        return self.call(nr, AT_FDCWD, self.r.put(path + b"\0"), *args, what=what, ok=ok)

    # -- names ----------------------------------------------------------------------------
    def label(self, e):
        text = "fd %d (%s unix socket %s)" % (e["fd"], TYPES.get(e["type"], "?"), e.get("shown") or "")
        pid = self.holders.get(e["inode"], self.r.pid)
        return text if pid == self.r.pid else "process %d's %s" % (pid, text)

    def bind(self, fd, e, name=None):
        """Bind fd to the entry's name (a stale socket file there removed first); relative names
        from the directory they were bound in."""
        name = name or _unb64(e["name"])
        path = _path_of(e, self.cwd) if name[:1] != b"\0" else None
        if path is not None:
            why = _path_in_the_way(path)
            if why:
                raise RestoreError("%s: cannot bind to %s: %s" % (self.label(e), os.fsdecode(path), why))
            if os.path.lexists(path):    # a stale socket file nobody is bound to
                self.path_call(sysno.unlinkat, path, 0, what="unlink of the stale socket file %s" % os.fsdecode(path),
                               ok=(errno.ENOENT,))
        d = (e.get("file") or {}).get("dir")
        chdir = path is not None and name[:1] != b"/" and d and os.fsencode(d) != self.cwd
        if chdir:
            self.path_call_chdir(os.fsencode(d), e)
        try:
            self.addr_call(sysno.bind, fd, name, what="bind of %s to %s" % (self.label(e), sockdiag.show_name(name)))
        finally:
            if chdir:
                self.path_call_chdir(self.cwd, e)
        return path

    def path_call_chdir(self, d, e):
        self.r.reset()
        self.call(sysno.chdir, self.r.put(d + b"\0"), what="chdir to %s for %s" % (os.fsdecode(d), self.label(e)))

    def bind_own(self, fd, e):
        if e.get("bind") != "own":
            return
        path = self.bind(fd, e)
        if path is not None:
            info = e.get("file") or {}
            if info.get("unlinked") and self.reached_by_path(e):
                self.unlink_later.append((path, e))    # at the end: connects need it until then
            else:
                self.file_as_dumped(path, e)

    def reached_by_path(self, e):
        """Whether the restore connects or sends to this bound socket by its name."""
        ino = e["inode"]
        if e["state"] == "listening":
            return bool(e.get("pending")) or any(o.get("via") == ino for o in self.entries)
        if e["type"] != DGRAM:
            return False
        if e.get("queue"):
            return True
        return any((o.get("peer") or {}).get("held") == ino and frozenset((ino, o["inode"])) not in self.pairs
                   for o in self.entries)

    def file_as_dumped(self, path, e):
        """The socket file just bound: its owner and mode as at the dump, or gone as it was."""
        info = e.get("file") or {}
        if "mode" not in info:
            self.path_call(sysno.unlinkat, path, 0, what="unlink of %s (as at the dump)" % os.fsdecode(path),
                           ok=(errno.ENOENT,))
            return
        self.path_call(sysno.fchownat, path, info["uid"], info["gid"], AT_SYMLINK_NOFOLLOW,
                       what="chown of %s" % os.fsdecode(path))
        self.path_call(sysno.fchmodat, path, info["mode"], 0, what="chmod of %s" % os.fsdecode(path))

    def connect_addr(self, e):
        """The address to connect to the entry's (restored) named socket."""
        name = _unb64(e["name"])
        if name[:1] == b"\0":
            return name
        return _path_of(e, self.cwd)

    def connect(self, fd, name, e, what):
        self.addr_call(sysno.connect, fd, name, what="connect of %s to %s" % (what, sockdiag.show_name(name)))

    def accept(self, lfd, e):
        return self.call(sysno.accept4, lfd, 0, 0, SOCK_NONBLOCK | SOCK_CLOEXEC, what="accept for %s" % self.label(e))

    def temp_listener(self, e):
        """A listener bound to the entry's name for the moment of one connection."""
        t = self.socket(e["type"], self.label(e))
        self.temps.append(t)
        name = _unb64(e["name"])
        path = self.bind(t, e, name)
        self.call(sysno.listen, t, 1, what="listen for %s" % self.label(e))
        addr = path if path is not None else name
        return t, addr, path

    # -- the build ----------------------------------------------------------------------
    def run(self):
        entries = self.entries      # by process (restore order), then fd
        for e in entries:
            if e["state"] == "listening":
                self.make_listener(e)
        for e in entries:
            if e["type"] != DGRAM and e["inode"] not in self.fd and "pending" not in (e.get("peer") or {}) \
                    and e.get("peer"):
                self.make_connection(e)
        for e in entries:
            if e["state"] == "listening":
                for c in e.get("pending", []):
                    self.make_pending(self.by_ino[c], e)
        for e in entries:
            if e["inode"] not in self.fd:
                self.make_other(e)
        for e in entries:
            self.refill(e)
        for e in entries:
            self.connect_datagram(e)
        for fd in self.dead_peer.values():
            self.close(fd)
        for fd in self.temps:
            self.close(fd)
        for e in entries:
            self.finish(e)
        for path, e in self.unlink_later:
            self.path_call(sysno.unlinkat, path, 0, what="unlink of %s (as at the dump)" % os.fsdecode(path),
                           ok=(errno.ENOENT,))
        return {ino: self.table.park(fd) for ino, fd in self.fd.items()}

    def make_listener(self, e):
        fd = self.socket(e["type"], self.label(e))
        self.fd[e["inode"]] = fd
        self.bind_own(fd, e)
        self.call(sysno.listen, fd, e.get("backlog", 0), what="listen of %s" % self.label(e))

    def connector(self, e):
        """A socket for the connecting end e (bound first if it was)."""
        fd = self.socket(e["type"], self.label(e))
        self.fd[e["inode"]] = fd
        self.bind_own(fd, e)
        return fd

    def make_connection(self, e):
        """A connected stream/seqpacket socket and, inside the process, its peer."""
        peer = e["peer"]
        y = self.by_ino.get(peer.get("held")) if "held" in peer else None
        if "held" in peer and y is None:
            raise RestoreError("%s: its peer (socket inode %d) is not in the image" % (self.label(e), peer["held"]))
        if y is not None and y.get("bind") in ("accepted", "temp") and e.get("bind") not in ("accepted", "temp"):
            e, y = y, e         # e: the accepted end
        role = e.get("bind")
        if role in ("accepted", "temp"):
            if role == "accepted":
                lst = self.by_ino[e["via"]]
                lfd, addr = self.fd[lst["inode"]], self.connect_addr(lst)
            else:
                taken = self.name_taken(e)
                if taken:
                    # the name went to another socket since: the connection comes back unnamed
                    self.warn("%s: its name cannot be given back (%s); it is restored "
                              "unnamed" % (self.label(e), taken))
                    return self.make_pair(e, y, bind=False)
                lfd, addr, path = self.temp_listener(e)
            if y is not None:
                cfd = self.connector(y)
                what = self.label(y)
            else:
                cfd = self.socket(e["type"], "the closed peer of %s" % self.label(e))
                self.dead_peer[e["inode"]] = cfd
                what = "the closed peer of %s" % self.label(e)
            self.connect(cfd, addr, e, what)
            self.fd[e["inode"]] = self.accept(lfd, e)
            if role == "temp":
                self.close(lfd)
                self.temps.remove(lfd)
                if path is not None:
                    self.file_as_dumped(path, e)    # a file still there at the dump stays, stale as it was
            return
        self.make_pair(e, y)

    def make_pair(self, e, y, bind=True):
        """e and its peer y (None: closed) as a socketpair, bound to their own names."""
        a, b = self.socketpair(e["type"], self.label(e))
        self.fd[e["inode"]] = a
        if bind:
            self.bind_own(a, e)
        if y is not None:
            self.fd[y["inode"]] = b
            self.bind_own(b, y)
        else:
            self.dead_peer[e["inode"]] = b

    def name_taken(self, e):
        """What holds the entry's name now (None: it can be bound)."""
        name = _unb64(e["name"])
        if name[:1] == b"\0":
            return "a socket is bound to it" if _abstract_taken(name) else None
        return _path_in_the_way(_path_of(e, self.cwd))

    def warn(self, text):
        warn = getattr(self.table.options, "warn", None)
        if warn is not None:
            warn(text)

    def make_pending(self, c, lst):
        fd = self.connector(c)
        self.connect(fd, self.connect_addr(lst), c, self.label(c))

    def make_other(self, e):
        """Datagram sockets (a socketpair for two connected to each other, or for one whose
        peer is closed), unconnected sockets."""
        peer = e.get("peer") or {}
        if e["type"] == DGRAM and ("held" in peer or "dead" in peer):
            y = self.by_ino.get(peer.get("held"))
            mutual = y is not None and (y.get("peer") or {}).get("held") == e["inode"]
            if mutual or "dead" in peer:
                a, b = self.socketpair(DGRAM, self.label(e))
                self.fd[e["inode"]] = a
                if mutual:
                    self.fd[y["inode"]] = b
                    self.pairs.add(frozenset((e["inode"], y["inode"])))
                    self.bind_own(b, y)
                else:
                    self.dead_peer[e["inode"]] = b
                self.bind_own(a, e)
                return
        fd = self.socket(e["type"], self.label(e))
        self.fd[e["inode"]] = fd
        self.bind_own(fd, e)

    # -- queues --------------------------------------------------------------------------
    def raise_sndbuf(self, fd, size):
        """Room in the sender's send buffer for all it puts back, over all receivers (its own
        size is set back after the refill)."""
        total = self.raised.get(fd, 0) + size
        self.raised[fd] = total
        if total <= self.default_sndbuf // 2:
            return      # a fresh socket's send buffer holds it (kept until the options are set)
        want = min(total * 2 + (1 << 20), 1 << 30)
        if want <= self.raised_to.get(fd, 0):
            return
        self.raised_to[fd] = want
        self.forced.update(ino for ino, f in self.fd.items() if f == fd)
        r = self.setsockopt(fd, SO_SNDBUFFORCE, want // 2, what="SO_SNDBUFFORCE", ok=(errno.EPERM,))
        if r < 0:
            self.setsockopt(fd, SO_SNDBUF, want // 2, what="SO_SNDBUF")

    def send(self, fd, data, dest, e):
        """One datagram, or stream bytes in chunks, from fd (to dest, a name, if given)."""
        flags = MSG_DONTWAIT | MSG_NOSIGNAL
        done = 0
        while True:
            self.r.reset()
            chunk = data[done:done + REFILL_CHUNK] if e["type"] == STREAM else data
            if len(chunk) > REFILL_MAX_RECORD:
                raise RestoreError("%s: a queued datagram of %d bytes is too large to be put back"
                                   % (self.label(e), len(chunk)))
            buf = self.r.put(chunk)
            sa = _sockaddr(dest) if dest is not None else b""
            sa_addr = self.r.put(sa) if sa else 0
            n = self.call(sysno.sendto, fd, buf, len(chunk), flags, sa_addr, len(sa),
                          what="putting back the data queued in %s" % self.label(e), ok=(errno.EAGAIN,))
            if n < 0 or (e["type"] != STREAM and n != len(chunk)):
                raise RestoreError("%s: only %d of the %d queued bytes could be put back%s"
                                   % (self.label(e), done, len(data), " (its queue is full)" if n < 0 else ""))
            done += n
            if e["type"] != STREAM or done >= len(data):
                return

    def refill(self, e):
        queue = e.get("queue")
        if not queue or e["state"] == "listening":
            return
        ino = e["inode"]
        peer = e.get("peer") or {}
        if e["type"] == STREAM:
            data = _unb64(queue)
            sender = self.fd.get(peer.get("held")) if "held" in peer else self.dead_peer.get(ino)
            if sender is None:
                raise RestoreError("%s: %d bytes are queued in it but it has no peer to send them"
                                   % (self.label(e), len(data)))
            self.raise_sndbuf(sender, len(data) + len(data) // 4 + 4096)
            self.send(sender, data, None, e)
            return
        records = [(_unb64(d), _unb64(n)) for d, n in queue]
        for data, sender_name in records:
            fd, dest = self.record_sender(e, sender_name)
            self.raise_sndbuf(fd, len(data) + 2048)
            self.send(fd, data, dest, e)

    def record_sender(self, e, sender_name):
        """(fd, destination name or None) to send one queued datagram (record) to e from, its
        sender named as at the dump where possible."""
        ino = e["inode"]
        peer = e.get("peer") or {}
        y = self.by_ino.get(peer.get("held")) if "held" in peer else None
        mine = _unb64(e.get("name"))
        if e["type"] == SEQPACKET:
            fd = self.fd.get(peer.get("held")) if y is not None else self.dead_peer.get(ino)
            if fd is None:
                raise RestoreError("%s: records are queued in it but it has no peer to send them" % self.label(e))
            return fd, None
        mutual = y is not None and (y.get("peer") or {}).get("held") == ino
        if mutual and _unb64(y.get("name")) == sender_name:
            return self.fd[y["inode"]], None
        if ino in self.dead_peer and sender_name is None:
            return self.dead_peer[ino], None
        if mine is None:
            if mutual:
                return self.fd[y["inode"]], None
            if ino in self.dead_peer:
                return self.dead_peer[ino], None
            raise RestoreError("%s: datagrams are queued in it but, unnamed and unconnected, nothing can send "
                               "them to it" % self.label(e))
        dest = mine if mine[:1] == b"\0" else _path_of(e, self.cwd)
        if sender_name is not None:
            for other in self.entries:
                if other["type"] == DGRAM and other.get("bind") == "own" and _unb64(other.get("name")) == sender_name \
                        and other["inode"] in self.fd:
                    return self.fd[other["inode"]], dest
        return self.temp_sender(sender_name, e), dest

    def temp_sender(self, name, e):
        """A datagram socket bound to name (if it can be: else unnamed) to send from."""
        if name in self.senders:
            return self.senders[name]
        fd = self.socket(DGRAM, "a sender of data queued in %s" % self.label(e))
        self.temps.append(fd)
        if name is not None:
            path = None
            if name[:1] != b"\0":
                path = name if name[:1] == b"/" else self.cwd.rstrip(b"/") + b"/" + name
                if os.path.lexists(path):
                    path = False    # taken: the datagram comes from an unnamed sender
            if path is not False:
                r = self.addr_call(sysno.bind, fd, name, what="bind of a sender", ok=(errno.EADDRINUSE, errno.ENOENT,
                                                                                     errno.EACCES))
                if r >= 0 and path:
                    self.path_call(sysno.unlinkat, path, 0, what="unlink of %s" % os.fsdecode(path),
                                   ok=(errno.ENOENT,))
        self.senders[name] = fd
        return fd

    # -- last steps -------------------------------------------------------------------------
    def connect_datagram(self, e):
        if e["type"] != DGRAM:
            return
        peer = e.get("peer") or {}
        fd = self.fd[e["inode"]]
        if "outside" in peer:
            name = _unb64(peer["outside"])
            self.connect(fd, name, e, self.label(e))
        elif "held" in peer:
            y = self.by_ino.get(peer["held"])
            if y is None:
                raise RestoreError("%s: its peer (socket inode %d) is not in the image" % (self.label(e), peer["held"]))
            if frozenset((e["inode"], y["inode"])) in self.pairs:
                return      # one socketpair: connected to each other from the start
            if not y.get("name"):
                raise RestoreError("%s: connected to an unnamed socket" % self.label(e))
            self.connect(fd, self.connect_addr(y), e, self.label(e))

    def finish(self, e):
        fd = self.fd[e["inode"]]
        how = SHUT_HOW.get(e.get("shutdown", 0) & 3)
        if how is not None and e["inode"] not in self.dead_peer:
            self.call(sysno.shutdown, fd, how, what="shutdown of %s" % self.label(e), ok=(errno.ENOTCONN,))
        opts = dict(e.get("options") or {})
        fresh = _fresh_options(e["type"])
        if e["inode"] in self.forced and "SO_SNDBUF" not in opts:
            opts["SO_SNDBUF"] = _b64(fresh.get("SO_SNDBUF"))   # as it was: a fresh socket's
        later = [(n, opts.pop(n)) for n in LAST_OPTIONS if n in opts]
        for name, value in list(opts.items()) + later:
            if value is None or name not in OPTION_NUMBERS:
                continue
            raw = _unb64(value)
            opt, _ = OPTION_NUMBERS[name]
            if name in ("SO_SNDBUF", "SO_RCVBUF"):
                val = struct.unpack("=i", raw[:4])[0] // 2
                force = SO_SNDBUFFORCE if name == "SO_SNDBUF" else SO_RCVBUFFORCE
                if self.setsockopt(fd, force, val, what="%s of %s" % (name, self.label(e)), ok=(errno.EPERM,)) < 0:
                    self.setsockopt(fd, opt, val, what="%s of %s" % (name, self.label(e)))
                continue
            self.setsockopt(fd, opt, raw, what="%s of %s" % (name, self.label(e)))
        if e.get("peek_off", -1) != -1:
            self.setsockopt(fd, SO_PEEK_OFF, e["peek_off"], what="SO_PEEK_OFF of %s" % self.label(e))


_FRESH = {}


def _fresh_options(type_):
    if type_ not in _FRESH:
        with socket.socket(socket.AF_UNIX, type_) as fresh:
            _FRESH[type_] = _read_options(fresh)
    return _FRESH[type_]


def _check_free(entry):
    """At restore, before anything is made: the names to bind are free (a stale socket file
    nobody is bound to counts as free), named peers outside are still there."""
    label = "fd %d (%s unix socket)" % (entry["fd"], TYPES.get(entry.get("type"), "?"))
    name = _unb64(entry.get("name"))
    if name and entry.get("bind") == "own":
        if name[:1] == b"\0":
            if _abstract_taken(name):
                raise RestoreError("%s: cannot bind to the abstract name %s: a socket is bound to it"
                                   % (label, sockdiag.show_name(name)))
        else:
            path = _path_of(entry)
            why = _path_in_the_way(path)
            if why:
                raise RestoreError("%s: cannot bind to %s: %s" % (label, os.fsdecode(path), why))
    peer = entry.get("peer") or {}
    if "outside" in peer:
        pname = _unb64(peer["outside"])
        if pname[:1] == b"\0":
            gone = not _abstract_taken(pname)
        else:
            try:
                gone = not stat.S_ISSOCK(os.stat(pname).st_mode)
            except OSError:
                gone = True
        if gone:
            raise RestoreError("%s: it was connected to %s outside the process, which is no longer there to "
                               "reconnect to" % (label, sockdiag.show_name(pname)))
