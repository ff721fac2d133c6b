/*
 * Unix sockets between the processes of a tree (tests/test_tree_unix.py).
 *
 *   treeunix pairs  DIR ROUNDS
 *   treeunix hub    DIR ROUNDS
 *   treeunix listen DIR ROUNDS
 *   treeunix stdio  DIR ROUNDS
 *
 * Each process exchanges numbered messages with its partners: at round k it sends message k on
 * each of its sockets, then takes message k-LAG from each (so up to 2*LAG+1 wait in each
 * direction, under the datagram queue limit of 10). Message k of a side is its side letter, k,
 * and 16 + (k*37)%3000 bytes derived from both (a length word first on stream sockets); every
 * message taken is checked (sequence, size, content: "BAD ..." otherwise). After ROUNDS rounds
 * each process prints "NAME at gate" and waits for SIGUSR2 (rs.h), with the last LAG messages
 * of each direction still queued; then it takes those, goes on for ROUNDS more rounds, takes
 * the last LAG and ends. A child exits 0 if all its checks passed; the parent waits for its
 * children and prints "parent done" and each child's status. DIR holds the socket files.
 *
 * pairs: socketpair() of each type (stream, datagram, seqpacket) and one more stream pair,
 *   fork(), the parent keeps sv[0] and the child sv[1] (each closes the other end). On the
 *   extra stream pair each side writes TAIL bytes and shuts down writing before the gate; after
 *   it each takes the other's bytes and then finds the end of file. Besides, the parent's
 *   datagram socket bound to DIR/srv.sock (unconnected) and the child's bound to DIR/cli.sock,
 *   connected to it: every datagram each takes must come from the other's name.
 * hub: like nginx's channels: two stream socketpairs, the parent keeps both ends of both, child
 *   i keeps a copy of end 1 of pair i (the same open file as the parent's): the parent talks on
 *   end 0, child i on its end 1.
 * listen: the parent listens on DIR/l.sock; child A (the client) connects to it and child C
 *   (which inherited the listener) accepts the connection; the parent connects too and C
 *   accepts that one. A and C, and the parent and C, talk over them. Before the gate A makes a
 *   second connection that nobody accepts (it waits in the listener's queue at the dump); after
 *   the gate C accepts it and they talk over it too.
 * stdio: the child's standard output is a socketpair end whose other end the parent holds (not
 *   restorable: refused at dump); both keep talking until the parent is killed.
 */
#include "rs.h"
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#define LAG 3
#define MAXMSG 3100
#define TAIL 5000

static int bad;
static const char *me = "?";

static size_t msg_len(long k)
{
	return 16 + (size_t)((k * 37) % 3000);
}

static void fill(uint8_t *buf, char side, long k, size_t n)
{
	memset(buf, 0, 16);
	snprintf((char *)buf, 16, "%c %ld", side, k);
	for (size_t i = 16; i < n; i++)
		buf[i] = (uint8_t)(k * 7 + i * 13 + side);
}

static void full_write(int fd, const void *p, size_t n)
{
	const uint8_t *b = p;
	while (n) {
		ssize_t w = write(fd, b, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			rs_die("write");
		b += w;
		n -= (size_t)w;
	}
}

static int full_read(int fd, void *p, size_t n)
{
	uint8_t *b = p;
	while (n) {
		ssize_t r = read(fd, b, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			rs_die("read");
		if (r == 0)
			return 0;
		b += r;
		n -= (size_t)r;
	}
	return 1;
}

struct link {
	int fd, type;
	char mine, theirs;      /* side letters */
	const char *what;
	const struct sockaddr_un *dest;   /* datagrams sent there (sendto), if set */
	const char *from;                 /* the sender's name every datagram must carry, if set */
};

static void send_msg(struct link *l, long k)
{
	uint8_t buf[MAXMSG + 4];
	size_t n = msg_len(k);
	if (l->type == SOCK_STREAM) {
		uint32_t len = (uint32_t)n;
		memcpy(buf, &len, 4);
		fill(buf + 4, l->mine, k, n);
		full_write(l->fd, buf, n + 4);
		return;
	}
	fill(buf, l->mine, k, n);
	ssize_t w;
	do
		w = sendto(l->fd, buf, n, 0, (const struct sockaddr *)l->dest, l->dest ? sizeof(*l->dest) : 0);
	while (w < 0 && errno == EINTR);
	if (w != (ssize_t)n)
		rs_die("send");
}

static void recv_msg(struct link *l, long k)
{
	uint8_t buf[MAXMSG + 64], want[MAXMSG];
	size_t n = msg_len(k), got;
	if (l->type == SOCK_STREAM) {
		uint32_t len;
		if (!full_read(l->fd, &len, 4) || len > MAXMSG || !full_read(l->fd, buf, len)) {
			printf("BAD %s %s: message %ld cut short\n", me, l->what, k);
			bad = 1;
			return;
		}
		got = len;
	} else {
		ssize_t r;
		struct sockaddr_un sa;
		socklen_t salen;
		do {
			salen = sizeof(sa);
			memset(&sa, 0, sizeof(sa));
			r = recvfrom(l->fd, buf, sizeof(buf), 0, (struct sockaddr *)&sa, &salen);
		} while (r < 0 && errno == EINTR);
		if (r < 0)
			rs_die("recv");
		got = (size_t)r;
		if (l->from && (salen <= sizeof(sa_family_t) || strcmp(sa.sun_path, l->from) != 0)) {
			printf("BAD %s %s: message %ld came from \"%s\", not from %s\n", me, l->what, k,
			       salen > sizeof(sa_family_t) ? sa.sun_path : "(unnamed)", l->from);
			bad = 1;
		}
	}
	fill(want, l->theirs, k, n);
	if (got != n || memcmp(buf, want, n) != 0) {
		buf[15] = 0;
		printf("BAD %s %s: expected message %c %ld (%zu bytes), got %zu bytes \"%s\"\n", me, l->what,
		       l->theirs, k, n, got, (char *)buf);
		bad = 1;
	}
}

/* rounds from..to of the exchange on every link (taking message k-LAG at round k) */
static void exchange(struct link *ls, int n, long from, long to)
{
	for (long k = from; k <= to; k++) {
		for (int i = 0; i < n; i++)
			send_msg(&ls[i], k);
		if (k > LAG)
			for (int i = 0; i < n; i++)
				recv_msg(&ls[i], k - LAG);
	}
}

static void drain(struct link *ls, int n, long last)
{
	for (long k = last - LAG + 1; k <= last; k++)
		for (int i = 0; i < n; i++)
			if (k >= 1)
				recv_msg(&ls[i], k);
}

/* the whole life of one process: ROUNDS rounds, the gate, the queued ones, ROUNDS more */
static void run(struct link *ls, int n, long rounds, void (*after_gate)(void))
{
	exchange(ls, n, 1, rounds);
	printf("%s at gate\n", me);
	rs_gate_sleep();
	if (after_gate)
		after_gate();
	exchange(ls, n, rounds + 1, 2 * rounds);
	drain(ls, n, 2 * rounds);
}

static void check_type(int fd, int type, const char *what)
{
	int t = -1;
	socklen_t len = sizeof(t);
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &t, &len) < 0 || t != type) {
		printf("BAD %s %s: fd %d is not of socket type %d (%d, %s)\n", me, what, fd, type, t, strerror(errno));
		bad = 1;
	}
}

static void check_closed(int fd, const char *what)
{
	if (fcntl(fd, F_GETFD) != -1 || errno != EBADF) {
		printf("BAD %s: fd %d (%s) is open, it was closed\n", me, fd, what);
		bad = 1;
	}
}

static int finish_child(void)
{
	if (!bad)
		printf("%s ok\n", me);
	fflush(stdout);
	_exit(bad ? 1 : 0);
}

static void wait_children(pid_t *kids, const char **names, int n)
{
	for (int i = 0; i < n; i++) {
		int st;
		if (waitpid(kids[i], &st, 0) != kids[i])
			rs_die("waitpid");
		printf("parent: %s ended with %d\n", names[i], WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st));
	}
	printf("parent %s\n", bad ? "failed" : "ok");
	printf("parent done\n");
}

/* ---------------------------------------------------------------------------- pairs */
static int tail_fd;
static const int TYPES[3] = {SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET};
static const char *TNAMES[3] = {"stream", "datagram", "seqpacket"};

static void write_tail(int fd, char side)
{
	uint8_t buf[TAIL];
	for (int i = 0; i < TAIL; i++)
		buf[i] = (uint8_t)(i * 3 + side);
	full_write(fd, buf, TAIL);
	if (shutdown(fd, SHUT_WR) < 0)
		rs_die("shutdown");
}

static void tail_check(char side)
{
	uint8_t buf[TAIL + 1];
	if (!full_read(tail_fd, buf, TAIL)) {
		printf("BAD %s: the tail bytes were cut short\n", me);
		bad = 1;
		return;
	}
	for (int i = 0; i < TAIL; i++)
		if (buf[i] != (uint8_t)(i * 3 + side)) {
			printf("BAD %s: tail byte %d differs\n", me, i);
			bad = 1;
			return;
		}
	ssize_t r = read(tail_fd, buf, 1);
	if (r != 0) {
		printf("BAD %s: no end of file after the tail (%zd)\n", me, r);
		bad = 1;
	}
}

static void pairs_child_after(void)
{
	tail_check('P');
}

static void pairs_parent_after(void)
{
	tail_check('C');
}

static struct sockaddr_un srv_addr, cli_addr;

static int bound_dgram(const struct sockaddr_un *a)
{
	int fd = socket(AF_UNIX, SOCK_DGRAM, 0);
	unlink(a->sun_path);
	if (fd < 0 || bind(fd, (const struct sockaddr *)a, sizeof(*a)) < 0)
		rs_die("bind");
	return fd;
}

static int pairs(const char *dir, long rounds)
{
	int sv[4][2];
	for (int i = 0; i < 4; i++)
		if (socketpair(AF_UNIX, TYPES[i < 3 ? i : 0], 0, sv[i]) < 0)
			rs_die("socketpair");
	/* a named datagram server in the parent, a named client in the child connected to it */
	srv_addr.sun_family = cli_addr.sun_family = AF_UNIX;
	snprintf(srv_addr.sun_path, sizeof(srv_addr.sun_path), "%s/srv.sock", dir);
	snprintf(cli_addr.sun_path, sizeof(cli_addr.sun_path), "%s/cli.sock", dir);
	int srv = bound_dgram(&srv_addr), ready[2];
	if (pipe(ready) < 0)
		rs_die("pipe");
	pid_t kid = fork();
	if (kid < 0)
		rs_die("fork");
	int child = kid == 0, end = child ? 1 : 0;
	struct link ls[4];
	me = child ? "child" : "parent";
	for (int i = 0; i < 3; i++)
		ls[i] = (struct link){sv[i][end], TYPES[i], child ? 'C' : 'P', child ? 'P' : 'C', TNAMES[i], NULL, NULL};
	char x = 'x';
	if (child) {
		close(srv);
		close(ready[0]);
		int cli = bound_dgram(&cli_addr);
		if (connect(cli, (struct sockaddr *)&srv_addr, sizeof(srv_addr)) < 0)
			rs_die("connect");
		full_write(ready[1], &x, 1);
		close(ready[1]);
		ls[3] = (struct link){cli, SOCK_DGRAM, 'c', 's', "named datagram client", NULL, srv_addr.sun_path};
	} else {
		close(ready[1]);
		if (!full_read(ready[0], &x, 1))   /* the client is bound */
			rs_die("read ready");
		close(ready[0]);
		ls[3] = (struct link){srv, SOCK_DGRAM, 's', 'c', "named datagram server", &cli_addr, cli_addr.sun_path};
	}
	for (int i = 0; i < 4; i++)     /* after every socket is made: their numbers stay free */
		close(sv[i][1 - end]);
	tail_fd = sv[3][end];
	write_tail(tail_fd, child ? 'C' : 'P');
	run(ls, 4, rounds, child ? pairs_child_after : pairs_parent_after);
	for (int i = 0; i < 3; i++) {
		check_type(sv[i][end], TYPES[i], TNAMES[i]);
		check_closed(sv[i][1 - end], "the other end");
	}
	if (child)
		return finish_child();
	const char *names[1] = {"child"};
	wait_children(&kid, names, 1);
	return 0;
}

/* ------------------------------------------------------------------------------ hub */
static int hub(long rounds)
{
	int ch[2][2];
	pid_t kids[2];
	for (int i = 0; i < 2; i++)
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, ch[i]) < 0)
			rs_die("socketpair");
	for (int i = 0; i < 2; i++) {
		kids[i] = fork();
		if (kids[i] < 0)
			rs_die("fork");
		if (kids[i] == 0) {
			me = i == 0 ? "worker1" : "worker2";
			for (int j = 0; j < 2; j++) {
				close(ch[j][0]);
				if (j != i)
					close(ch[j][1]);
			}
			struct link l = {ch[i][1], SOCK_STREAM, (char)('1' + i), 'M', "channel", NULL, NULL};
			run(&l, 1, rounds, NULL);
			check_type(ch[i][1], SOCK_STREAM, "channel");
			return finish_child();
		}
	}
	me = "master";
	struct link ls[2] = {{ch[0][0], SOCK_STREAM, 'M', '1', "channel 1", NULL, NULL},
			     {ch[1][0], SOCK_STREAM, 'M', '2', "channel 2", NULL, NULL}};
	run(ls, 2, rounds, NULL);
	const char *names[2] = {"worker1", "worker2"};
	wait_children(kids, names, 2);
	return 0;
}

/* --------------------------------------------------------------------------- listen */
static struct sockaddr_un addr;
static int lfd, second;

static int connect_to_listener(void)
{
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		rs_die("connect");
	return fd;
}

static void client_after(void)
{
	/* the connection that waited in the listener's queue: now C accepts it */
	full_write(second, "A2", 2);
}

static struct link acc[3];
static void acceptor_after(void)
{
	int fd = accept(lfd, NULL, NULL);
	char who[2];
	if (fd < 0)
		rs_die("accept");
	if (!full_read(fd, who, 2) || memcmp(who, "A2", 2) != 0) {
		printf("BAD acceptor: the waiting connection did not say A2\n");
		bad = 1;
	}
	acc[2] = (struct link){fd, SOCK_STREAM, 'c', 'a', "second connection from A", NULL, NULL};
}

static int listen_mode(const char *dir, long rounds)
{
	addr.sun_family = AF_UNIX;
	snprintf(addr.sun_path, sizeof(addr.sun_path), "%s/l.sock", dir);
	unlink(addr.sun_path);
	lfd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(lfd, 8) < 0)
		rs_die("listen");
	pid_t kids[2];
	int ready[2];
	if (pipe(ready) < 0)
		rs_die("pipe");
	kids[1] = fork();      /* C, the acceptor */
	if (kids[1] < 0)
		rs_die("fork");
	if (kids[1] == 0) {
		me = "acceptor";
		close(ready[0]);
		for (int i = 0; i < 2; i++) {
			int fd = accept(lfd, NULL, NULL);
			char who[2];
			if (fd < 0 || !full_read(fd, who, 2))
				rs_die("accept");
			int a = who[0] == 'A';
			acc[a ? 0 : 1] = (struct link){fd, SOCK_STREAM, a ? 'C' : 'c', a ? 'A' : 'P',
						       a ? "connection from A" : "connection from the parent", NULL, NULL};
		}
		full_write(ready[1], "x", 1);  /* both accepted: A may connect again */
		close(ready[1]);
		exchange(acc, 2, 1, rounds);
		printf("%s at gate\n", me);
		rs_gate_sleep();
		acceptor_after();
		exchange(acc, 2, rounds + 1, 2 * rounds);
		drain(acc, 2, 2 * rounds);
		exchange(&acc[2], 1, 1, rounds);
		drain(&acc[2], 1, rounds);
		return finish_child();
	}
	kids[0] = fork();      /* A, the client */
	if (kids[0] < 0)
		rs_die("fork");
	if (kids[0] == 0) {
		me = "client";
		close(lfd);
		close(ready[1]);
		int fd = connect_to_listener();
		full_write(fd, "A1", 2);
		char x;
		if (!full_read(ready[0], &x, 1))
			rs_die("read ready");
		close(ready[0]);
		struct link ls[2] = {{fd, SOCK_STREAM, 'A', 'C', "connection", NULL, NULL},
				     {-1, SOCK_STREAM, 'a', 'c', "second connection", NULL, NULL}};
		exchange(ls, 1, 1, rounds);
		second = connect_to_listener();    /* waits in the queue: nobody accepts it before the gate */
		ls[1].fd = second;
		printf("%s at gate\n", me);
		rs_gate_sleep();
		client_after();
		exchange(ls, 1, rounds + 1, 2 * rounds);
		drain(ls, 1, 2 * rounds);
		exchange(&ls[1], 1, 1, rounds);
		drain(&ls[1], 1, rounds);
		return finish_child();
	}
	me = "parent";
	close(ready[0]);
	close(ready[1]);
	int fd = connect_to_listener();
	full_write(fd, "P1", 2);
	struct link l = {fd, SOCK_STREAM, 'P', 'c', "connection", NULL, NULL};
	run(&l, 1, rounds, NULL);
	check_type(lfd, SOCK_STREAM, "listener");
	const char *names[2] = {"client", "acceptor"};
	wait_children(kids, names, 2);
	return 0;
}

/* ---------------------------------------------------------------------------- stdio */
static int stdio_mode(long rounds)
{
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
		rs_die("socketpair");
	pid_t kid = fork();
	if (kid < 0)
		rs_die("fork");
	if (kid == 0) {
		me = "child";
		close(sv[0]);
		printf("child at gate\n");
		fflush(stdout);
		if (dup2(sv[1], 1) < 0)
			rs_die("dup2");
		close(sv[1]);
		for (long k = 1;; k++) {
			char line[64];
			int n = snprintf(line, sizeof(line), "line %ld\n", k);
			full_write(1, line, (size_t)n);
			struct timespec ts = {0, 2000000};
			nanosleep(&ts, NULL);
		}
	}
	me = "parent";
	close(sv[1]);
	char buf[256];
	long total = 0;
	printf("parent at gate\n");
	for (;;) {
		ssize_t r = read(sv[0], buf, sizeof(buf));
		if (r <= 0)
			break;
		if ((total + r) / 1000 > total / 1000)
			printf("parent read %ld\n", (total + r) / 1000);
		total += r;
	}
	(void)rounds;
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: treeunix pairs|hub|listen|stdio DIR ROUNDS\n");
		return 2;
	}
	long rounds = atol(argv[3]);
	if (rounds <= LAG)
		rounds = LAG + 1;
	rs_init();
	if (!strcmp(argv[1], "pairs"))
		return pairs(argv[2], rounds);
	if (!strcmp(argv[1], "hub"))
		return hub(rounds);
	if (!strcmp(argv[1], "listen"))
		return listen_mode(argv[2], rounds);
	if (!strcmp(argv[1], "stdio"))
		return stdio_mode(rounds);
	fprintf(stderr, "unknown mode %s\n", argv[1]);
	return 2;
}
