/*
 * What confines a process, set up by the process itself and reported by it (tests/
 * test_restore_confinement.py): personality, securebits, ambient capabilities, no_new_privs,
 * the dumpable flag; or a ticking counter, for the stop state.
 *
 *   confine [pers] [caps] [nodump] [nnp] [tick]
 *
 *   pers    personality(PER_LINUX | UNAME26 | ADDR_NO_RANDOMIZE): uname() then reports 2.6.x
 *   caps    (run as root) inheritable and ambient CAP_NET_BIND_SERVICE, securebits NOROOT |
 *           NOROOT_LOCKED | NO_SETUID_FIXUP | NO_CAP_AMBIENT_RAISE, uid/gid 65534 with no
 *           groups, then permitted and effective CAP_KILL + CAP_NET_BIND_SERVICE, inheritable
 *           CAP_NET_BIND_SERVICE; dumpable set back to 1 (the uid change cleared it)
 *   nodump  PR_SET_DUMPABLE 0
 *   nnp     PR_SET_NO_NEW_PRIVS 1
 *   tick    instead of waiting for signals, the main thread prints "tick N w M" every 20 ms
 *           (M: how far a second thread has counted)
 *
 * Everything is set up in the main thread before a second thread is created (which inherits
 * it). Then, after "ready PID", it prints one report line and another on every SIGUSR2:
 *   "attrs pers=P/P uname=R sb=S/S nnp=N/N dumpable=D child=C"
 * (P, S, N: main thread / second thread, each asked by the thread itself; C: the effective
 * capabilities of a child that runs `cat /proc/self/status` through execve: the ambient set).
 * SIGTERM: exit 0.
 */
#include "rs.h"
#include <linux/capability.h>
#include <pthread.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>

#define CAP_BIT(c) (1u << (c))

static int req[2], rep[2];
static volatile long wcount;
static int ticking;

struct answer {
	unsigned long pers;
	int sb, nnp;
};

static void ask(struct answer *a)
{
	a->pers = (unsigned long)personality(0xffffffff);
	a->sb = prctl(PR_GET_SECUREBITS, 0, 0, 0, 0);
	a->nnp = prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0);
}

static void *second(void *arg)
{
	(void)arg;
	if (ticking) {
		for (;;) {
			struct timespec ts = {0, 5000000};
			nanosleep(&ts, NULL);
			wcount++;
		}
	}
	for (;;) {
		char c;
		ssize_t n = read(req[0], &c, 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n != 1)
			rs_die("second thread: read");
		struct answer a;
		ask(&a);
		if (write(rep[1], &a, sizeof a) != (ssize_t)sizeof a)
			rs_die("second thread: write");
	}
	return NULL;
}

/* the low 32 capabilities set as given; the others kept (keep = 1) or dropped */
static int capset3(unsigned eff, unsigned prm, unsigned inh, int keep)
{
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct d[2];
	memset(d, 0, sizeof d);
	if (keep && syscall(SYS_capget, &h, d))
		return -1;
	d[0].effective = eff;
	d[0].permitted = prm;
	d[0].inheritable = inh;
	return (int)syscall(SYS_capset, &h, d);
}

/* the effective set of a child after execve: what the ambient set gives a plain program */
static void child_caps(char *out, size_t size)
{
	int p[2];
	snprintf(out, size, "?");
	if (pipe(p))
		return;
	pid_t pid = fork();
	if (pid == 0) {
		dup2(p[1], 1);
		execl("/bin/cat", "cat", "/proc/self/status", (char *)NULL);
		_exit(127);
	}
	close(p[1]);
	char buf[8192];
	size_t len = 0;
	ssize_t n;
	while (len < sizeof(buf) - 1 && ((n = read(p[0], buf + len, sizeof(buf) - 1 - len)) > 0 || (n < 0 && errno == EINTR)))
		if (n > 0)
			len += (size_t)n;
	buf[len] = 0;
	close(p[0]);
	int st;
	while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
		;
	char *line = strstr(buf, "CapEff:\t");
	if (line) {
		line += 8;
		size_t k = strcspn(line, "\n");
		snprintf(out, size, "%.*s", (int)k, line);
	}
}

static void report(void)
{
	struct answer m, t;
	ask(&m);
	char c = 1;
	if (write(req[1], &c, 1) != 1)
		rs_die("write to the second thread");
	ssize_t n;
	while ((n = read(rep[0], &t, sizeof t)) < 0 && errno == EINTR)
		;
	if (n != (ssize_t)sizeof t)
		rs_die("read from the second thread");
	struct utsname u;
	uname(&u);
	char child[64];
	child_caps(child, sizeof child);
	printf("attrs pers=%#lx/%#lx uname=%s sb=%#x/%#x nnp=%d/%d dumpable=%d child=%s\n", m.pers, t.pers, u.release,
	       m.sb, t.sb, m.nnp, t.nnp, prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), child);
}

int main(int argc, char **argv)
{
	int pers = 0, caps = 0, nodump = 0, nnp = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "pers"))
			pers = 1;
		else if (!strcmp(argv[i], "caps"))
			caps = 1;
		else if (!strcmp(argv[i], "nodump"))
			nodump = 1;
		else if (!strcmp(argv[i], "nnp"))
			nnp = 1;
		else if (!strcmp(argv[i], "tick"))
			ticking = 1;
		else {
			fprintf(stderr, "usage: confine [pers] [caps] [nodump] [nnp] [tick]\n");
			return 2;
		}
	}
	if (pers && personality(PER_LINUX | UNAME26 | ADDR_NO_RANDOMIZE) < 0)
		rs_die("personality");
	if (caps) {
		unsigned nbs = CAP_BIT(CAP_NET_BIND_SERVICE);
		struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
		struct __user_cap_data_struct d[2];
		if (syscall(SYS_capget, &h, d))
			rs_die("capget");
		if (capset3(d[0].effective, d[0].permitted, nbs, 1))
			rs_die("capset (inheritable)");
		if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0))
			rs_die("PR_CAP_AMBIENT_RAISE");
		if (prctl(PR_SET_SECUREBITS, 0x47, 0, 0, 0))   /* NOROOT(+LOCKED) NO_SETUID_FIXUP NO_CAP_AMBIENT_RAISE */
			rs_die("PR_SET_SECUREBITS");
		if (syscall(SYS_setgroups, 0, NULL) || syscall(SYS_setresgid, 65534, 65534, 65534) ||
		    syscall(SYS_setresuid, 65534, 65534, 65534))
			rs_die("dropping to uid 65534");
		if (capset3(CAP_BIT(CAP_KILL) | nbs, CAP_BIT(CAP_KILL) | nbs, nbs, 0))
			rs_die("capset (final)");
		if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0))
			rs_die("PR_SET_DUMPABLE 1");
	}
	if (nodump && prctl(PR_SET_DUMPABLE, 0, 0, 0, 0))
		rs_die("PR_SET_DUMPABLE 0");
	if (nnp && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		rs_die("PR_SET_NO_NEW_PRIVS");
	if (pipe(req) || pipe(rep))
		rs_die("pipe");
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR2);
	sigaddset(&set, SIGTERM);
	sigprocmask(SIG_BLOCK, &set, NULL);   /* taken with sigwaitinfo by the main thread */
	pthread_t t;
	if (pthread_create(&t, NULL, second, NULL))
		rs_die("pthread_create");
	rs_init();
	if (ticking) {
		for (long i = 1;; i++) {
			struct timespec ts = {0, 20000000};
			nanosleep(&ts, NULL);
			printf("tick %ld w %ld\n", i, wcount);
		}
	}
	report();
	for (;;) {
		int sig = sigwaitinfo(&set, NULL);
		if (sig == SIGUSR2)
			report();
		else if (sig == SIGTERM)
			return 0;
	}
}
