/*
 * Unix sockets of every kind, with data queued in them, for tests/test_files_unix.py.
 *
 *   rs_unixfds DIR LOGPATH       builds every case below, prints "set up", waits at the gate
 *                                (SIGUSR2), then checks every socket and prints "ok WHAT" per
 *                                check (or "FAIL ..."), then "done fails=N"
 *   rs_unixfds outside PATH      a stream socket connected to the listener at PATH (outside the
 *                                process); prints "set up FD"; after the gate sends "still-works",
 *                                expects "reply" back
 *   rs_unixfds scm DIR           a socketpair with an fd in flight (SCM_RIGHTS) in its queue;
 *                                prints "set up FD"; after the gate receives it
 *   rs_unixfds early DIR         a listener at DIR/early.sock with a connection waiting in its
 *                                accept queue that has already sent data; prints "set up FD";
 *                                after the gate accepts it and reads the data
 *
 * Cases: stream, datagram and seqpacket socketpairs with data queued both ways (an empty and a
 * 100000-byte datagram among them); a listener bound to DIR/listen.sock (mode 0660) with an
 * accepted connection carrying data both ways and a connection waiting in its accept queue;
 * a seqpacket listener on an abstract name with an accepted connection; a datagram server bound
 * to DIR/dgram.sock with datagrams from a client bound to an abstract name (connected to it) and
 * from an unbound socket; an unconnected stream socket; a stream pair shut down for writing on
 * one side; options (SO_PASSCRED, buffer sizes, receive timeout, peek offset); a datagram socket
 * connected to LOGPATH, bound outside the process; a datagram socket bound to the relative name
 * "rel.sock" in DIR, the working directory changed since; a stream socket whose peer was closed
 * with data left for it; a listener whose file was unlinked.
 *
 * After the gate the test has connected once more to DIR/listen.sock and sent "test-hello":
 * the second accept gets that connection (the first gets the one that waited in the queue).
 */
#include "rs.h"
#include <fcntl.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#ifndef SO_PEEK_OFF
#define SO_PEEK_OFF 42
#endif

static int fails;

#define CHECK(cond, what)                                                                     \
	do {                                                                                  \
		if (cond)                                                                     \
			printf("ok %s\n", what);                                               \
		else {                                                                        \
			printf("FAIL %s (line %d, errno %s)\n", what, __LINE__, strerror(errno)); \
			fails++;                                                              \
		}                                                                             \
	} while (0)

static socklen_t mkaddr(struct sockaddr_un *a, const char *name, int abstract)
{
	memset(a, 0, sizeof(*a));
	a->sun_family = AF_UNIX;
	size_t n = strlen(name);
	if (abstract) {
		memcpy(a->sun_path + 1, name, n);
		return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
	}
	memcpy(a->sun_path, name, n);
	return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
}

static int sock(int type)
{
	int fd = socket(AF_UNIX, type, 0);
	if (fd < 0)
		rs_die("socket");
	return fd;
}

static void xbind(int fd, const char *name, int abstract)
{
	struct sockaddr_un a;
	socklen_t n = mkaddr(&a, name, abstract);
	if (bind(fd, (struct sockaddr *)&a, n) < 0)
		rs_die(name);
}

static void xconnect(int fd, const char *name, int abstract)
{
	struct sockaddr_un a;
	socklen_t n = mkaddr(&a, name, abstract);
	if (connect(fd, (struct sockaddr *)&a, n) < 0)
		rs_die(name);
}

static void xsend(int fd, const void *buf, size_t n)
{
	if (send(fd, buf, n, MSG_NOSIGNAL) != (ssize_t)n)
		rs_die("send");
}

static void xpair(int type, int sv[2])
{
	if (socketpair(AF_UNIX, type, 0, sv) < 0)
		rs_die("socketpair");
}

/* the next message (datagram/record) or exactly n stream bytes equal want */
static int got(int fd, const char *want, size_t n)
{
	char buf[256];
	size_t have = 0;
	int type;
	socklen_t tl = sizeof(type);
	getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl);
	do {
		ssize_t r = recv(fd, buf + have, sizeof(buf) - have, MSG_DONTWAIT);
		if (r < 0)
			return 0;
		have += (size_t)r;
		if (type != SOCK_STREAM || r == 0)
			break;
	} while (have < n);
	return have == n && memcmp(buf, want, n) == 0;
}

#define GOT(fd, lit) got(fd, lit, sizeof(lit) - 1)

/* the name bound to fd (or its peer's) equals want (NULL: unnamed) */
static int named(int fd, int peer, const char *want, int abstract)
{
	struct sockaddr_un a;
	socklen_t n = sizeof(a);
	memset(&a, 0, sizeof(a));
	if ((peer ? getpeername(fd, (struct sockaddr *)&a, &n) : getsockname(fd, (struct sockaddr *)&a, &n)) < 0)
		return 0;
	if (!want)
		return n == sizeof(sa_family_t);
	if (abstract)
		return n == offsetof(struct sockaddr_un, sun_path) + 1 + strlen(want) && a.sun_path[0] == 0 &&
		       memcmp(a.sun_path + 1, want, strlen(want)) == 0;
	return strcmp(a.sun_path, want) == 0;
}

static int sockopt(int fd, int opt)
{
	int v = -12345;
	socklen_t l = sizeof(v);
	getsockopt(fd, SOL_SOCKET, opt, &v, &l);
	return v;
}

/* send on a, receive it whole on b */
static int ping(int a, int b, const char *msg)
{
	if (send(a, msg, strlen(msg), MSG_NOSIGNAL) != (ssize_t)strlen(msg))
		return 0;
	return got(b, msg, strlen(msg));
}

static int outside(const char *path)
{
	int fd = sock(SOCK_STREAM);
	xconnect(fd, path, 0);
	printf("set up %d\n", fd);
	rs_gate_sleep();
	char buf[16];
	xsend(fd, "still-works", 11);
	ssize_t n = recv(fd, buf, 5, MSG_WAITALL);
	CHECK(n == 5 && memcmp(buf, "reply", 5) == 0, "outside connection still works");
	printf("done fails=%d\n", fails);
	return fails != 0;
}

static int scm(void)
{
	int sv[2];
	xpair(SOCK_STREAM, sv);
	char cbuf[CMSG_SPACE(sizeof(int))];
	memset(cbuf, 0, sizeof(cbuf));
	struct iovec iov = {"fd", 2};
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf)};
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	int passed = 0;
	memcpy(CMSG_DATA(c), &passed, sizeof(int));
	if (sendmsg(sv[0], &mh, 0) != 2)
		rs_die("sendmsg");
	printf("set up %d\n", sv[1]);
	rs_gate_sleep();
	char data[2];
	iov.iov_base = data;
	mh.msg_controllen = sizeof(cbuf);
	int fd = -1;
	if (recvmsg(sv[1], &mh, MSG_DONTWAIT) == 2 && (c = CMSG_FIRSTHDR(&mh)) && c->cmsg_type == SCM_RIGHTS)
		memcpy(&fd, CMSG_DATA(c), sizeof(int));
	CHECK(fd >= 0 && fcntl(fd, F_GETFD) >= 0, "fd in flight received");
	printf("done fails=%d\n", fails);
	return fails != 0;
}

static int early(const char *dir)
{
	char path[256];
	snprintf(path, sizeof(path), "%s/early.sock", dir);
	int L = sock(SOCK_STREAM);
	xbind(L, path, 0);
	if (listen(L, 4) < 0)
		rs_die("listen");
	int c = sock(SOCK_STREAM);
	xconnect(c, path, 0);
	xsend(c, "early", 5);
	printf("set up %d\n", L);
	rs_gate_sleep();
	int a = accept(L, NULL, NULL);
	CHECK(a >= 0 && GOT(a, "early"), "waiting connection's data");
	printf("done fails=%d\n", fails);
	return fails != 0;
}

int main(int argc, char **argv)
{
	rs_init();
	if (argc == 3 && strcmp(argv[1], "outside") == 0)
		return outside(argv[2]);
	if (argc == 3 && strcmp(argv[1], "scm") == 0)
		return scm();
	if (argc == 3 && strcmp(argv[1], "early") == 0)
		return early(argv[2]);
	if (argc != 3) {
		printf("usage: rs_unixfds DIR LOGPATH | outside PATH | scm DIR | early DIR\n");
		return 2;
	}
	const char *dir = argv[1], *logpath = argv[2];
	char lpath[256], dpath[256], gpath[256], rpath[256], tpath[256], abs_l[64], abs_dc[64], abs_c3[64];
	snprintf(lpath, sizeof(lpath), "%s/listen.sock", dir);
	snprintf(dpath, sizeof(dpath), "%s/dgram.sock", dir);
	snprintf(gpath, sizeof(gpath), "%s/gone.sock", dir);
	snprintf(rpath, sizeof(rpath), "%s/rel.sock", dir);
	snprintf(abs_l, sizeof(abs_l), "ckpt-unixfds-%d", (int)getpid());
	snprintf(abs_dc, sizeof(abs_dc), "ckpt-unixfds-dc-%d", (int)getpid());
	snprintf(abs_c3, sizeof(abs_c3), "ckpt-unixfds-c3-%d", (int)getpid());
	snprintf(tpath, sizeof(tpath), "%s/temp.sock", dir);
	static char big[100000];
	for (size_t i = 0; i < sizeof(big); i++)
		big[i] = (char)(i * 31 + 7);

	/* 1-3: socketpairs with data both ways */
	int sp[2], dp[2], qp[2];
	xpair(SOCK_STREAM, sp);
	xsend(sp[0], "stream-a", 8);
	xsend(sp[0], "stream-b", 8);
	xsend(sp[1], "stream-back", 11);
	xpair(SOCK_DGRAM, dp);
	xsend(dp[0], "d1", 2);
	xsend(dp[0], "", 0);
	xsend(dp[0], big, sizeof(big));
	xsend(dp[0], "d3", 2);
	xsend(dp[1], "dback", 5);
	xpair(SOCK_SEQPACKET, qp);
	xsend(qp[0], "r1", 2);
	xsend(qp[0], "r2-longer", 9);
	xsend(qp[1], "rback", 5);

	/* 4: a listener, an accepted connection, a connection waiting */
	int L = sock(SOCK_STREAM);
	xbind(L, lpath, 0);
	if (listen(L, 7) < 0 || chmod(lpath, 0660) < 0)
		rs_die("listen");
	int c1 = sock(SOCK_STREAM);
	xconnect(c1, lpath, 0);
	int a1 = accept(L, NULL, NULL);
	if (a1 < 0)
		rs_die("accept");
	xsend(c1, "to-server", 9);
	xsend(a1, "to-client", 9);
	int c3 = sock(SOCK_STREAM); /* a client bound to a name of its own */
	xbind(c3, abs_c3, 1);
	xconnect(c3, lpath, 0);
	int a4 = accept(L, NULL, NULL);
	if (a4 < 0)
		rs_die("accept");
	xsend(c3, "bound-client", 12);
	int c2 = sock(SOCK_STREAM);
	xconnect(c2, lpath, 0);

	/* 5: a seqpacket listener on an abstract name */
	int AL = sock(SOCK_SEQPACKET);
	xbind(AL, abs_l, 1);
	if (listen(AL, 3) < 0)
		rs_die("listen");
	int s1 = sock(SOCK_SEQPACKET);
	xconnect(s1, abs_l, 1);
	int as1 = accept(AL, NULL, NULL);
	if (as1 < 0)
		rs_die("accept");
	xsend(s1, "sq-to-server", 12);

	/* 6: a datagram server with datagrams from a named client and an unbound one */
	int DS = sock(SOCK_DGRAM);
	xbind(DS, dpath, 0);
	int DC = sock(SOCK_DGRAM);
	xbind(DC, abs_dc, 1);
	xconnect(DC, dpath, 0);
	xsend(DC, "from-dc-1", 9);
	xsend(DC, "from-dc-2", 9);
	int U = sock(SOCK_DGRAM);
	struct sockaddr_un da;
	socklen_t dal = mkaddr(&da, dpath, 0);
	if (sendto(U, "from-unbound", 12, 0, (struct sockaddr *)&da, dal) != 12)
		rs_die("sendto");

	/* 7: unconnected; 8: shut down for writing on one side */
	int P = sock(SOCK_STREAM);
	int sh[2];
	xpair(SOCK_STREAM, sh);
	xsend(sh[0], "last words", 10);
	shutdown(sh[0], SHUT_WR);

	/* 9: options */
	int one = 1, rcv = 50000, snd = 60000, zero = 0;
	struct timeval tv = {3, 0};
	setsockopt(sp[0], SOL_SOCKET, SO_PASSCRED, &one, sizeof(one));
	setsockopt(sp[0], SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
	setsockopt(sp[0], SOL_SOCKET, SO_SNDBUF, &snd, sizeof(snd));
	setsockopt(sp[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(qp[1], SOL_SOCKET, SO_PEEK_OFF, &zero, sizeof(zero));
	int want_rcv = sockopt(sp[0], SO_RCVBUF), want_snd = sockopt(sp[0], SO_SNDBUF);

	/* 10: connected to a datagram socket outside the process */
	int LG = sock(SOCK_DGRAM);
	xconnect(LG, logpath, 0);
	xsend(LG, "log-before", 10);

	/* 11: bound to a relative name, the working directory changed since */
	if (chdir(dir) < 0)
		rs_die("chdir");
	int RB = sock(SOCK_DGRAM);
	xbind(RB, "rel.sock", 0);
	if (chdir("/") < 0)
		rs_die("chdir");

	/* 12: its peer closed, data left for it; 13: a listener whose file is gone */
	int dz[2];
	xpair(SOCK_STREAM, dz);
	xsend(dz[1], "orphan-data", 11);
	close(dz[1]);
	int UL = sock(SOCK_STREAM);
	xbind(UL, gpath, 0);
	if (listen(UL, 2) < 0 || unlink(gpath) < 0)
		rs_die("listen");

	/* 14, 15: datagram and seqpacket peers closed with data left; 16: accepted from a listener
	 * closed since (its file left behind) */
	int ez[2], zq[2];
	xpair(SOCK_DGRAM, ez);
	xsend(ez[1], "dz-1", 4);
	xsend(ez[1], "dz-2", 4);
	close(ez[1]);
	xpair(SOCK_SEQPACKET, zq);
	xsend(zq[1], "zq-1", 4);
	xsend(zq[1], "zq-2", 4);
	close(zq[1]);
	int TL = sock(SOCK_STREAM);
	xbind(TL, tpath, 0);
	if (listen(TL, 1) < 0)
		rs_die("listen");
	int tc = sock(SOCK_STREAM);
	xconnect(tc, tpath, 0);
	int at = accept(TL, NULL, NULL);
	if (at < 0)
		rs_die("accept");
	close(TL);
	xsend(tc, "via-closed-listener", 19);

	/* 17: 3 MB queued in a stream pair (its sender's buffer raised for it) */
	static char many[3000000];
	for (size_t i = 0; i < sizeof(many); i++)
		many[i] = (char)(i * 13 + (i >> 12));
	int mp[2], force = 4 << 20;
	xpair(SOCK_STREAM, mp);
	if (setsockopt(mp[0], SOL_SOCKET, SO_SNDBUFFORCE, &force, sizeof(force)) < 0)
		rs_die("SO_SNDBUFFORCE");
	for (size_t done = 0; done < sizeof(many);) {
		ssize_t n = send(mp[0], many + done, sizeof(many) - done, MSG_DONTWAIT);
		if (n <= 0)
			rs_die("send 3 MB");
		done += (size_t)n;
	}

	printf("set up\n");
	rs_gate_sleep();

	/* the queues, in order, boundaries kept */
	CHECK(GOT(sp[1], "stream-astream-b") && GOT(sp[0], "stream-back"), "stream pair queues");
	{
		static char back[sizeof(big) + 16];
		int ok = GOT(dp[1], "d1") && got(dp[1], "", 0);
		ok &= recv(dp[1], back, sizeof(back), MSG_DONTWAIT) == (ssize_t)sizeof(big) && memcmp(back, big, sizeof(big)) == 0;
		CHECK(ok && GOT(dp[1], "d3") && GOT(dp[0], "dback"), "datagram pair queues");
	}
	CHECK(GOT(qp[1], "r1") && GOT(qp[1], "r2-longer") && GOT(qp[0], "rback"), "seqpacket pair queues");
	CHECK(GOT(a1, "to-server") && GOT(c1, "to-client"), "accepted connection queues");
	CHECK(GOT(as1, "sq-to-server"), "seqpacket accepted queue");
	{
		char buf[64];
		struct sockaddr_un from;
		socklen_t fl = sizeof(from);
		int ok = 1;
		const char *want[] = {"from-dc-1", "from-dc-2", "from-unbound"};
		for (int i = 0; i < 3; i++) {
			fl = sizeof(from);
			memset(&from, 0, sizeof(from));
			ssize_t n = recvfrom(DS, buf, sizeof(buf), MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
			ok &= n == (ssize_t)strlen(want[i]) && memcmp(buf, want[i], (size_t)n) == 0;
			if (i < 2)
				ok &= fl == offsetof(struct sockaddr_un, sun_path) + 1 + strlen(abs_dc) &&
				      memcmp(from.sun_path + 1, abs_dc, strlen(abs_dc)) == 0;
			else
				ok &= fl <= sizeof(sa_family_t);
		}
		CHECK(ok, "datagram server queue with senders");
	}
	CHECK(GOT(dz[0], "orphan-data") && recv(dz[0], big, 1, MSG_DONTWAIT) == 0, "closed peer: data then end of file");
	CHECK(GOT(sh[1], "last words") && recv(sh[1], big, 1, MSG_DONTWAIT) == 0, "shut down: data then end of file");
	CHECK(send(sh[0], "x", 1, MSG_NOSIGNAL) < 0 && errno == EPIPE, "shut down for writing");
	CHECK(ping(sh[1], sh[0], "still"), "other way still open");
	{
		/* the large datagram, whole */
		static char back[sizeof(big) + 16];
		xsend(dp[0], big, sizeof(big));
		ssize_t n = recv(dp[1], back, sizeof(back), 0);
		CHECK(n == (ssize_t)sizeof(big) && memcmp(back, big, sizeof(big)) == 0, "large datagram");
	}

	{
		char lab[80];
		int ok = GOT(ez[0], "dz-1") && GOT(ez[0], "dz-2");
		errno = 0;
		ssize_t n = send(ez[0], "x", 1, MSG_NOSIGNAL);
		snprintf(lab, sizeof(lab), "closed datagram peer: data, then send gives %zd errno %d", n, n < 0 ? errno : 0);
		CHECK(ok, lab);
	}
	CHECK(GOT(zq[0], "zq-1") && GOT(zq[0], "zq-2") && recv(zq[0], big, 1, MSG_DONTWAIT) == 0,
	      "closed seqpacket peer: records then end of file");
	CHECK(GOT(at, "via-closed-listener") && ping(at, tc, "p14") && ping(tc, at, "p15"),
	      "accepted from a closed listener");
	{
		struct stat st;
		CHECK(named(at, 0, tpath, 0) && named(tc, 1, tpath, 0) && stat(tpath, &st) == 0 && S_ISSOCK(st.st_mode),
		      "closed listener's name and stale file");
	}
	CHECK(GOT(a4, "bound-client") && named(c3, 0, abs_c3, 1) && named(a4, 1, abs_c3, 1) && named(c3, 1, lpath, 0) &&
	      named(a4, 0, lpath, 0) && ping(a4, c3, "p16"), "bound client");

	{
		static char back[sizeof(many)];
		size_t have = 0;
		ssize_t n;
		while (have < sizeof(back) && (n = recv(mp[1], back + have, sizeof(back) - have, MSG_DONTWAIT)) > 0)
			have += (size_t)n;
		CHECK(have == sizeof(many) && memcmp(back, many, sizeof(many)) == 0 && recv(mp[1], back, 1, MSG_DONTWAIT) < 0 &&
		      errno == EAGAIN, "3 MB stream queue");
	}

	/* names */
	CHECK(named(L, 0, lpath, 0) && named(a1, 0, lpath, 0) && named(c1, 1, lpath, 0) && named(c1, 0, NULL, 0),
	      "listener and accepted names");
	CHECK(named(AL, 0, abs_l, 1) && named(as1, 0, abs_l, 1) && named(s1, 1, abs_l, 1), "abstract names");
	CHECK(named(DS, 0, dpath, 0) && named(DC, 0, abs_dc, 1) && named(DC, 1, dpath, 0), "datagram names");
	CHECK(named(sp[0], 0, NULL, 0) && named(P, 0, NULL, 0), "unnamed");
	CHECK(named(LG, 1, logpath, 0), "outside peer name");
	CHECK(named(RB, 0, "rel.sock", 0), "relative name");
	CHECK(named(UL, 0, gpath, 0) && access(gpath, F_OK) < 0 && errno == ENOENT, "unlinked listener");
	{
		struct stat st;
		CHECK(stat(lpath, &st) == 0 && S_ISSOCK(st.st_mode) && (st.st_mode & 0777) == 0660, "socket file mode");
	}

	/* options */
	CHECK(sockopt(sp[0], SO_PASSCRED) == 1 && sockopt(sp[1], SO_PASSCRED) == 0, "SO_PASSCRED");
	CHECK(sockopt(sp[0], SO_RCVBUF) == want_rcv && sockopt(sp[0], SO_SNDBUF) == want_snd, "buffer sizes");
	{
		struct timeval t;
		socklen_t l = sizeof(t);
		getsockopt(sp[0], SOL_SOCKET, SO_RCVTIMEO, &t, &l);
		CHECK(t.tv_sec == 3 && t.tv_usec == 0, "SO_RCVTIMEO");
	}
	CHECK(sockopt(qp[1], SO_PEEK_OFF) == 0 && sockopt(qp[0], SO_PEEK_OFF) == -1, "SO_PEEK_OFF");
	CHECK(sockopt(P, SO_TYPE) == SOCK_STREAM && sockopt(RB, SO_TYPE) == SOCK_DGRAM && sockopt(AL, SO_ACCEPTCONN) == 1 &&
	      sockopt(UL, SO_ACCEPTCONN) == 1 && sockopt(P, SO_ACCEPTCONN) == 0, "types and listening");

	{
		/* peer credentials: made inside the process, they name it (same PID after restore) */
		int ok = 1, fds[] = {sp[0], sp[1], c1, a1, as1, c2};
		for (int i = 0; i < 6; i++) {
			struct ucred cr;
			socklen_t l = sizeof(cr);
			ok &= getsockopt(fds[i], SOL_SOCKET, SO_PEERCRED, &cr, &l) == 0 && cr.pid == getpid() &&
			      cr.uid == getuid() && cr.gid == getgid();
		}
		CHECK(ok, "peer credentials");
	}

	/* every pair works both ways */
	CHECK(ping(sp[0], sp[1], "p1") && ping(sp[1], sp[0], "p2"), "stream pair");
	CHECK(ping(dp[0], dp[1], "p3") && ping(dp[1], dp[0], "p4"), "datagram pair");
	CHECK(ping(qp[0], qp[1], "p5") && ping(qp[1], qp[0], "p6"), "seqpacket pair");
	CHECK(ping(c1, a1, "p7") && ping(a1, c1, "p8"), "accepted connection");
	CHECK(ping(s1, as1, "p9") && ping(as1, s1, "p10"), "seqpacket connection");
	CHECK(ping(DC, DS, "p11"), "datagram client");
	{
		struct sockaddr_un ra;
		socklen_t rl = mkaddr(&ra, rpath, 0);
		CHECK(sendto(U, "p12", 3, 0, (struct sockaddr *)&ra, rl) == 3 && GOT(RB, "p12"), "relative name reachable");
	}
	CHECK(send(LG, "log-after", 9, 0) == 9, "outside peer");

	/* the connection that waited, then the test's */
	int a2 = accept(L, NULL, NULL);
	CHECK(a2 >= 0 && ping(c2, a2, "waited") && ping(a2, c2, "p13"), "connection from the accept queue");
	int a3 = accept(L, NULL, NULL);
	int ok3 = a3 >= 0;
	if (ok3) {
		char buf[16];
		ok3 = recv(a3, buf, 10, MSG_WAITALL) == 10 && memcmp(buf, "test-hello", 10) == 0;
		ok3 &= send(a3, "target-hello", 12, MSG_NOSIGNAL) == 12;
	}
	CHECK(ok3, "new connection from the test");
	CHECK(named(a3, 0, lpath, 0), "new connection name");

	printf("done fails=%d\n", fails);
	return fails != 0;
}
