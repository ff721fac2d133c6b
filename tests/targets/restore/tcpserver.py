"""A TCP/UDP server for the socket scenarios (tests/test_tcp_connections.py, test_files_inet.py).

usage: tcpserver.py NCONN4 NCONN6 TOTAL BALLAST_MB LATE

Listens on 127.0.0.1 and ::1 (ephemeral ports) with the options servers set, has a UDP socket
bound on 127.0.0.1, a TCP socket bound but not listening, an unbound TCP socket and, once the
test has sent its first datagram, a UDP socket connected to the test's. Prints "ready PID",
then "ports V4 V6 UDP BOUND", accepts NCONN4 connections on the v4 listener and NCONN6 on the
v6 one (clients send "hello K\\n" first: TCP_DEFER_ACCEPT), reads only that line from each, and
writes to each its stream (TOTAL bytes, see stream()) as far as the socket takes without
blocking. Prints "opts ..." (what the listeners and the UDP socket read back), "accepted" and
"waiting"; then waits for SIGUSR2 (the dump happens here: unread data, data in flight and data
not sent yet on every connection; datagrams queued on the UDP socket).

After the gate: "opts ..." again, the queued datagrams ("udp PORT PAYLOAD", each answered
"ack PAYLOAD"), "bound PORT" and "unbound" for the two unconnected TCP sockets, a datagram
"connected" from the connected UDP socket; then for each connection in order of K: the rest
of its stream (blocking), shutdown(SHUT_WR), everything the client sends until EOF:
"conn K got N SHA256" (or "conn K error ERRNO-NAME"); "done".
LATE 1: then one more connection accepted on each listener ("late4 K" / "late6 K": the
client's "hello K" line), answered "welcome K". BALLAST_MB: memory held (and touched) so
that a --verify dump stays frozen for a while.
"""
import errno
import hashlib
import os
import signal
import socket
import struct
import sys
import time

TCP_INFO, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_DEFER_ACCEPT, TCP_FASTOPEN = 11, 4, 5, 6, 9, 23
SO_REUSEPORT = 15


def stream(k, total):
    out, i = [], 0
    while 32 * len(out) < total:
        out.append(hashlib.sha256(b"stream %d block %d" % (k, i)).digest())
        i += 1
    return b"".join(out)[:total]


def listener(family, host, reuseport):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    s.setsockopt(socket.IPPROTO_TCP, TCP_KEEPIDLE, 33)
    s.setsockopt(socket.IPPROTO_TCP, TCP_KEEPINTVL, 7)
    s.setsockopt(socket.IPPROTO_TCP, TCP_KEEPCNT, 4)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 200000)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 150000)
    s.setsockopt(socket.IPPROTO_TCP, TCP_DEFER_ACCEPT, 5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 3))
    s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 16)
    s.bind((host, 0))
    s.listen(37)
    return s


def opts(name, s):
    g = s.getsockopt
    fields = ["reuseaddr=%d" % g(socket.SOL_SOCKET, socket.SO_REUSEADDR),
              "reuseport=%d" % g(socket.SOL_SOCKET, SO_REUSEPORT),
              "rcvbuf=%d" % g(socket.SOL_SOCKET, socket.SO_RCVBUF),
              "sndbuf=%d" % g(socket.SOL_SOCKET, socket.SO_SNDBUF)]
    if s.type == socket.SOCK_STREAM:
        fields += ["keepalive=%d" % g(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                   "keep=%d/%d/%d" % (g(6, TCP_KEEPIDLE), g(6, TCP_KEEPINTVL), g(6, TCP_KEEPCNT)),
                   "nodelay=%d" % g(6, socket.TCP_NODELAY),
                   "defer=%d" % g(6, TCP_DEFER_ACCEPT),
                   "linger=%d/%d" % struct.unpack("ii", g(socket.SOL_SOCKET, socket.SO_LINGER, 8)),
                   "fastopen=%d" % g(6, TCP_FASTOPEN),
                   "backlog=%d" % struct.unpack_from("I", g(6, TCP_INFO, 32), 28)[0]]
    if s.family == socket.AF_INET6:
        fields.append("v6only=%d" % g(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    return "%s %s %s" % (name, s.getsockname()[1], " ".join(fields))


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main():
    n4, n6, total, ballast_mb, late = (int(a) for a in sys.argv[1:6])
    go = [False]
    signal.signal(signal.SIGUSR2, lambda *_: go.__setitem__(0, True))
    ballast = bytearray(ballast_mb << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    say("ready %d" % os.getpid())
    l4 = listener(socket.AF_INET, "127.0.0.1", True)
    l6 = listener(socket.AF_INET6, "::1", False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 50000)
    udp.bind(("127.0.0.1", 0))
    bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    bound.bind(("127.0.0.1", 0))
    unbound = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    say("ports %d %d %d %d" % (l4.getsockname()[1], l6.getsockname()[1], udp.getsockname()[1], bound.getsockname()[1]))

    # the first datagram names the test's UDP socket: connect a second UDP socket to it
    first, peer = udp.recvfrom(65536)
    conn_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    conn_udp.connect(peer)
    say("udp-first %s %d" % (first.decode(), conn_udp.getsockname()[1]))

    conns = {}
    for lst, n in ((l4, n4), (l6, n6)):
        for _ in range(n):
            c, _ = lst.accept()
            line = b""
            while not line.endswith(b"\n"):
                line += c.recv(1)
            conns[int(line.split()[1])] = c
    sent = {}
    for k, c in sorted(conns.items()):
        data = stream(k, total)
        c.setblocking(False)
        done = 0
        try:
            while done < total:
                done += c.send(data[done:done + 65536])
        except BlockingIOError:
            pass
        c.setblocking(True)
        sent[k] = done
    for name, s in (("v4", l4), ("v6", l6), ("udp", udp)):
        say("opts " + opts(name, s))
    say("accepted %s" % " ".join(str(k) for k in sorted(conns)))
    say("waiting")
    while not go[0]:
        time.sleep(0.002)

    for name, s in (("v4", l4), ("v6", l6), ("udp", udp)):
        say("opts " + opts(name, s))
    udp.setblocking(False)
    while True:
        try:
            data, sender = udp.recvfrom(65536)
        except BlockingIOError:
            break
        say("udp %d %s" % (sender[1], data.decode()))
        udp.sendto(b"ack " + data, sender)
    say("bound %d" % bound.getsockname()[1])
    try:
        unbound.getsockname()
        say("unbound %s" % (unbound.getsockname()[1],))
    except OSError as e:
        say("unbound error %s" % errno.errorcode.get(e.errno, e.errno))
    conn_udp.send(b"connected")
    for k, c in sorted(conns.items()):
        try:
            c.sendall(stream(k, total)[sent[k]:])
            c.shutdown(socket.SHUT_WR)
            h, n = hashlib.sha256(), 0
            while True:
                d = c.recv(65536)
                if not d:
                    break
                h.update(d)
                n += len(d)
            say("conn %d got %d %s" % (k, n, h.hexdigest()))
        except OSError as e:
            say("conn %d error %s" % (k, errno.errorcode.get(e.errno, e.errno)))
        c.close()
    if late:
        for name, lst in (("late4", l4), ("late6", l6)):
            c, _ = lst.accept()
            line = b""
            while not line.endswith(b"\n"):
                line += c.recv(1)
            k = int(line.split()[1])
            c.sendall(b"welcome %d\n" % k)
            say("%s %d" % (name, k))
            c.close()
    say("done")


if __name__ == "__main__":
    main()
