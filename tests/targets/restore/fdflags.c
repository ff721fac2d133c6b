/*
 * Status flags of fds, checked by the target itself (issue 10, "fd status flags come back wrong").
 *
 *   fdflags one DIR     one process
 *   fdflags tree DIR    a parent and a child sharing pipes
 *
 * one: pipes whose two ends have different flags (read end O_NONBLOCK and write end not, and the
 * other way round), a pipe end opened a second time through /proc/self/fd (another open file of
 * the same pipe, with other flags), a pipe in packet mode (pipe2 O_DIRECT) holding two packets,
 * a pipe read end with O_ASYNC, an owner (F_SETOWN) and a signal (F_SETSIG), a file O_APPEND,
 * a file O_DIRECT, a file O_NOATIME.
 * tree: a pipe whose read end only the child holds (plain) and whose write end only the parent
 * holds (O_NONBLOCK); the other way round; a pipe end both hold as one open file (inherited
 * across fork) to which the child added O_NONBLOCK after the fork (the parent sees it too).
 *
 * Prints "ready PID", "set up", then waits for SIGUSR2 (rs.h gate); then each process checks
 * every fd's F_GETFL and F_GETFD against what it recorded before the gate, and that data still
 * flows as it should, and prints "ok one N" / "ok parent N" / "ok child N" or "BAD ...".
 * The parent passes SIGUSR2 on to its child and waits for it. Last line "done".
 */
#include "rs.h"
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>

#define MAXFD 32

static int fds[MAXFD], fls[MAXFD], fdfls[MAXFD], nfd;
static const char *names[MAXFD];
static long checks;

static const char *volatile stage = "start";
static char bad[4096];

/* a check that would block forever (a read end that lost O_NONBLOCK) ends the run instead */
static void on_alarm(int sig)
{
	char msg[256];
	(void)sig;
	int n = snprintf(msg, sizeof(msg), "BAD stuck in %s; %.200s\n", stage, bad);
	if (write(1, msg, (size_t)n) < 0)
		_exit(4);
	_exit(4);
}

static void watchdog(void)
{
	signal(SIGALRM, on_alarm);
	alarm(30);
}

static void badf(const char *fmt, long a, long b)
{
	size_t n = strlen(bad);
	if (n < sizeof(bad) - 200)
		snprintf(bad + n, sizeof(bad) - n, "%s" "%s %ld %ld", n ? "; " : "", fmt, a, b);
}

static int keep(const char *name, int fd)
{
	if (fd < 0)
		rs_die(name);
	names[nfd] = name;
	fds[nfd++] = fd;
	return fd;
}

static void setfl(int fd, int add)
{
	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | add) < 0)
		rs_die("F_SETFL");
}

static int reopen(int fd, int flags)
{
	char p[64];
	snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
	return open(p, flags);
}

static void record(void)
{
	for (int i = 0; i < nfd; i++) {
		fls[i] = fcntl(fds[i], F_GETFL);
		fdfls[i] = fcntl(fds[i], F_GETFD);
	}
}

static void check_flags(void)
{
	char what[96];
	for (int i = 0; i < nfd; i++) {
		int f = fcntl(fds[i], F_GETFL), d = fcntl(fds[i], F_GETFD);
		checks++;
		snprintf(what, sizeof(what), "%s F_GETFL", names[i]);
		if (f != fls[i])
			badf(what, f, fls[i]);
		snprintf(what, sizeof(what), "%s F_GETFD", names[i]);
		if (d != fdfls[i])
			badf(what, d, fdfls[i]);
	}
}

/* a write on w is read on r */
static void check_flow(const char *name, int w, int r, const char *msg)
{
	char buf[64];
	size_t n = strlen(msg);
	checks++;
	stage = name;
	if (write(w, msg, n) != (ssize_t)n) {
		badf(name, -1, errno);
		return;
	}
	ssize_t got = read(r, buf, sizeof(buf));
	if (got != (ssize_t)n || memcmp(buf, msg, n))
		badf(name, (long)got, errno);
}

/* a read on an empty non-blocking pipe end: EAGAIN at once */
static void check_eagain(const char *name, int r)
{
	char c;
	checks++;
	stage = name;
	if (read(r, &c, 1) != -1 || errno != EAGAIN)
		badf(name, 0, errno);
}

static void report(const char *who)
{
	if (bad[0])
		printf("BAD %s: %s\n", who, bad);
	else
		printf("ok %s %ld\n", who, checks);
}

static int one(const char *dir)
{
	int a[2], b[2], c[2], d[2], e[2];
	char path[512];
	if (pipe(a) || pipe(b) || pipe(c) || pipe2(d, O_DIRECT) || pipe(e))
		rs_die("pipe");
	keep("a-r", a[0]); keep("a-w", a[1]);
	setfl(a[0], O_NONBLOCK);
	keep("b-r", b[0]); keep("b-w", b[1]);
	setfl(b[1], O_NONBLOCK);
	keep("c-r", c[0]); keep("c-w", c[1]);
	int c_r2 = keep("c-r2", reopen(c[0], O_RDONLY | O_NONBLOCK));
	int c_w2 = keep("c-w2", reopen(c[1], O_WRONLY));
	setfl(c[1], O_NONBLOCK);
	keep("d-r", d[0]); keep("d-w", d[1]);
	if (write(d[1], "abc", 3) != 3 || write(d[1], "defgh", 5) != 5)
		rs_die("packet write");
	keep("e-r", e[0]); keep("e-w", e[1]);
	if (fcntl(e[0], F_SETOWN, getpid()) || fcntl(e[0], F_SETSIG, SIGRTMIN + 2))
		rs_die("F_SETOWN");
	setfl(e[0], O_ASYNC | O_NONBLOCK);
	snprintf(path, sizeof(path), "%s/append.log", dir);
	int ap = keep("append", open(path, O_WRONLY | O_APPEND | O_CREAT | O_TRUNC, 0644));
	if (write(ap, "first\n", 6) != 6)
		rs_die("write");
	snprintf(path, sizeof(path), "%s/direct.bin", dir);
	int dr = keep("direct", open(path, O_RDWR | O_CREAT | O_DIRECT, 0644));
	snprintf(path, sizeof(path), "%s/noatime.bin", dir);
	keep("noatime", open(path, O_RDONLY | O_CREAT | O_NOATIME, 0644));
	if (fcntl(dr, F_SETFD, FD_CLOEXEC))
		rs_die("F_SETFD");
	sigset_t rt;
	sigemptyset(&rt);
	sigaddset(&rt, SIGRTMIN + 2);
	sigprocmask(SIG_BLOCK, &rt, NULL);
	record();
	printf("set up\n");
	rs_gate_sleep();
	watchdog();

	check_flags();
	check_eagain("a-r nonblocking", a[0]);
	check_flow("a", a[1], a[0], "a1");
	check_eagain("c-r2 nonblocking", c_r2);
	check_flow("c via w2 r", c_w2, c[0], "c1");
	check_flow("c via w r2", c[1], c_r2, "c2");
	/* packets come out one by one whatever the read size */
	char buf[64];
	stage = "packets";
	checks++;
	ssize_t n1 = read(d[0], buf, sizeof(buf));
	if (n1 != 3 || memcmp(buf, "abc", 3))
		badf("packet 1", (long)n1, errno);
	ssize_t n2 = read(d[0], buf, sizeof(buf));
	if (n2 != 5 || memcmp(buf, "defgh", 5))
		badf("packet 2", (long)n2, errno);
	/* O_ASYNC: a write on e signals its owner with its signal */
	checks++;
	if (fcntl(e[0], F_GETOWN) != getpid())
		badf("e owner", fcntl(e[0], F_GETOWN), getpid());
	if (fcntl(e[0], F_GETSIG) != SIGRTMIN + 2)
		badf("e signal", fcntl(e[0], F_GETSIG), SIGRTMIN + 2);
	stage = "O_ASYNC";
	if (write(e[1], "x", 1) != 1)
		badf("e write", errno, 0);
	struct timespec ts = {30, 0};
	siginfo_t si;
	if (sigtimedwait(&rt, &si, &ts) != SIGRTMIN + 2 || si.si_fd != e[0])
		badf("e SIGIO", errno, si.si_fd);
	/* O_APPEND: a write lands at the end wherever the offset is */
	checks++;
	stage = "append";
	lseek(ap, 0, SEEK_SET);
	if (write(ap, "second\n", 7) != 7 || lseek(ap, 0, SEEK_CUR) != 13)
		badf("append", (long)lseek(ap, 0, SEEK_CUR), errno);
	report("one");
	return 0;
}

static int tree(const char *dir)
{
	int a[2], b[2], s[2], t[2];
	(void)dir;
	if (pipe(a) || pipe(b) || pipe(s) || pipe(t))
		rs_die("pipe");
	pid_t kid = fork();
	if (kid < 0)
		rs_die("fork");
	if (kid == 0) {
		close(a[1]);
		close(b[0]);
		keep("a-r (child)", a[0]);
		keep("b-w (child)", b[1]);
		setfl(b[1], O_NONBLOCK);
		keep("s-r (both)", s[0]);
		keep("s-w (both)", s[1]);
		setfl(s[0], O_NONBLOCK);     /* one open file: the parent's s[0] too */
		close(t[1]);
		keep("t-r (child)", t[0]);
		record();
		if (write(b[1], "k", 1) != 1)
			rs_die("write");
		rs_go = 0;
		rs_gate_sleep();
		watchdog();
		check_flags();
		char m[8];
		checks++;
		if (read(a[0], m, sizeof(m)) != 2 || memcmp(m, "pa", 2))    /* blocking: waits for the parent */
			badf("child read a", errno, 0);
		if (write(b[1], "kb", 2) != 2)
			badf("child write b", errno, 0);
		if (read(t[0], m, sizeof(m)) != 2 || memcmp(m, "pt", 2))    /* blocking */
			badf("child read t", errno, 0);
		report("child");
		exit(0);
	}
	close(a[0]);
	close(b[1]);
	keep("a-w (parent)", a[1]);
	keep("b-r (parent)", b[0]);
	setfl(a[1], O_NONBLOCK);
	keep("s-r (both)", s[0]);
	keep("s-w (both)", s[1]);
	/* another open file of t's read end, the child keeping the one pipe() made */
	int t2 = keep("t-r2 (parent)", reopen(t[0], O_RDONLY | O_NONBLOCK));
	close(t[0]);
	keep("t-w (parent)", t[1]);
	char c;
	if (read(b[0], &c, 1) != 1)     /* the child has set its flags */
		rs_die("read");
	record();
	printf("set up\n");
	rs_gate_sleep();
	watchdog();
	check_flags();
	check_eagain("parent s-r nonblocking (the child's flag)", s[0]);
	check_eagain("parent t-r2 nonblocking", t2);
	kill(kid, SIGUSR2);
	char m[8];
	checks++;
	if (write(a[1], "pa", 2) != 2)
		badf("parent write a", errno, 0);
	if (read(b[0], m, sizeof(m)) != 2 || memcmp(m, "kb", 2))     /* blocking: waits for the child */
		badf("parent read b", errno, 0);
	if (write(t[1], "pt", 2) != 2)
		badf("parent write t", errno, 0);
	int st;
	if (waitpid(kid, &st, 0) != kid || !WIFEXITED(st) || WEXITSTATUS(st))
		badf("child status", st, errno);
	report("parent");
	return 0;
}

int main(int argc, char **argv)
{
	rs_init();
	if (argc < 3)
		return 2;
	int rc = !strcmp(argv[1], "tree") ? tree(argv[2]) : one(argv[2]);
	printf("done\n");
	return rc;
}
