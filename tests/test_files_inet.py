"""IPv4/IPv6 sockets that are not connections, across `ckpt dump` (killed) and `ckpt restore`:
listeners on 127.0.0.1 and ::1 with the options servers set, a TCP socket bound but not
listening, an unbound one, a UDP socket with datagrams queued at the dump, a connected UDP
socket. The restored server (tests/targets/restore/tcpserver.py, no connections) prints what
its sockets read back, answers the queued datagrams to their senders, and accepts new
connections on the restored listeners, one of them attempted while the process was dead
(the lock holds the SYN; the client's retry reaches the restored listener).
"""
import os
import socket
import threading

from restore_support import (WAIT, dump, image_meta, procs, reap_killed, restore, restore_ok,  # noqa: F401
                             rs_built, subreaper)
from test_tcp_connections import locks, scenario  # noqa: F401

EXPECTED = {"reuseaddr": "1", "rcvbuf": "400000", "sndbuf": "300000", "keepalive": "1", "keep": "33/7/4",
            "nodelay": "1", "linger": "1/3", "fastopen": "16", "backlog": "37"}


def _fields(line):
    parts = line.split()
    return parts[1], int(parts[2]), dict(p.split("=", 1) for p in parts[3:])


def _late_client(k, family, port, out):
    host = "127.0.0.1" if family == 4 else "::1"
    try:
        s = socket.create_connection((host, port), timeout=WAIT)
        s.sendall(b"hello %d\n" % k)
        out[k] = s.makefile("rb").readline()
        s.close()
    except OSError as e:
        out[k] = e


def test_listeners_udp_and_unconnected_sockets_survive(procs, scenario):
    sc = scenario(n4=0, n6=0, ackdrop=(), late=1)
    before = sc.opts_lines()
    assert len(before) == 3
    for line in before:
        name, port, f = _fields(line)
        if name in ("v4", "v6"):
            for k, v in EXPECTED.items():
                assert f[k] == v, "%s: %s=%s, the target set %s" % (name, k, f[k], v)
    assert _fields(before[0])[2]["reuseport"] == "1" and _fields(before[1])[2]["v6only"] == "1"
    dump(sc.pid, sc.img)
    reap_killed(sc.p)
    meta = image_meta(sc.img)
    inet = [e for e in meta["fds"] if e["kind"] == "inet"]
    assert sorted(e["state"] for e in inet) == ["close", "close", "listen", "listen", "udp", "udp"], inet
    (udp,) = [e for e in inet if e["state"] == "udp" and e["local"][1] == sc.udp_port]
    assert [d[1] for d in udp["queue"]] == ["ZDE=", "ZDI=", "ZDM="], udp["queue"]     # d1 d2 d3
    lock = meta["netlock"]
    assert sorted(p for _, p in lock["listeners"]) == sorted([sc.port4, sc.port6]) and lock["conns"] == []
    # a client connecting while the process is dead: its SYN waits in the lock
    answers = {}
    early = threading.Thread(target=_late_client, args=(100, 4, sc.port4, answers), daemon=True)
    early.start()
    pid, _, err = restore_ok(procs, sc.img)
    assert locks(sc.pid) == []
    os.kill(pid, __import__("signal").SIGUSR2)
    late = threading.Thread(target=_late_client, args=(101, 6, sc.port6, answers), daemon=True)
    late.start()
    for t in (early, late):
        t.join(WAIT)
    lines = sc.wait_done(pid)
    assert answers == {100: b"welcome 100\n", 101: b"welcome 101\n"}, answers
    assert "late4 100" in lines and "late6 101" in lines, lines[-5:]
    after = sc.opts_lines()[len(before):]
    assert after == before, "options read back differ:\n%s\n%s" % (before, after)
    assert "bound %d" % sc.bound_port in lines
    assert "unbound 0" in lines
    sc.check_udp(lines)


def test_udp_port_taken_at_restore_is_a_clear_error(procs, scenario):
    sc = scenario(n4=0, n6=0, ackdrop=())
    dump(sc.pid, sc.img)
    reap_killed(sc.p)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        squatter.bind(("127.0.0.1", sc.udp_port))
        rc, out, err = restore(procs, sc.img)
        assert rc != 0, out
        msg = err.strip().splitlines()[-1]
        assert "UDP 127.0.0.1 port %d" % sc.udp_port in msg and "in use" in msg, msg
        assert locks(sc.pid) == [], "the failed restore left the lock"
    finally:
        squatter.close()
