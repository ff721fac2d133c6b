/*
 * Process and thread state that checks itself across dump and restore (tests/test_longtail_state.py):
 * POSIX timers, membarrier registrations, seccomp, scheduling, sleeping calls interrupted by the
 * dump. Every mode prints "ready PID", sets its state up, prints what it saw ("before ..."), waits
 * for SIGUSR2 (the gate; "sleep" has none), checks again and prints "ok ..." or "BAD ...", then
 * "done" and exits 0. Lines that do not depend on timing are the same before and after.
 *
 *   ltstate timers      timers A..F (IDs with gaps: two spare timers deleted), see below
 *   ltstate membarrier  every membarrier registration this kernel offers
 *   ltstate seccomp     filters shared by two threads (one with the LOG flag) and one of the second
 *                       thread's own; they forbid what ckpt's restorer calls last (munmap of 1 MiB,
 *                       prctl, setpgid), kill the process on calls ckpt injects to dump it
 *                       (userfaultfd, getitimer, sigaltstack, timer_gettime, membarrier), make
 *                       getppid fail (EACCES) and getpgid (EPERM, thread 2); after the
 *                       gate thread 2 adds a filter for every thread with TSYNC (getsid: ENOTSUP)
 *   ltstate strict      a second thread in strict mode: it echoes, and dies on getpid
 *   ltstate sched       three threads with their own policy, nice, affinity and I/O priority
 *   ltstate cputimer-of PID   a POSIX timer on the CPU clock of process PID (refused)
 *   ltstate notify      a seccomp filter with a user-space notifier, its listener closed (refused)
 *   ltstate idle-thread-timer   a second thread's CLOCK_THREAD_CPUTIME_ID timer, never armed (refused)
 *   ltstate sleep MS [handler]
 *                       threads sleeping MS ms each in poll, nanosleep with and without `rem`,
 *                       clock_nanosleep TIMER_ABSTIME, pthread_cond_timedwait (FUTEX_WAIT_BITSET)
 *                       and ppoll; "handler": a SIGUSR1 handler no thread blocks (a program that
 *                       may see EINTR), else none (SIGUSR2 ignored)
 */
#include "rs.h"
#include <linux/filter.h>
#include <linux/membarrier.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>

#ifndef MEMBARRIER_CMD_GET_REGISTRATIONS
#define MEMBARRIER_CMD_GET_REGISTRATIONS (1 << 9)
#endif

static int64_t mono(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void gate(void)
{
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGUSR2);
	pthread_sigmask(SIG_UNBLOCK, &s, NULL);
	rs_gate_sleep();
}

static void block(int sig)
{
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, sig);
	pthread_sigmask(SIG_BLOCK, &s, NULL);
}

/* ------------------------------------------------------------------------------ timers
 * A  MONOTONIC, SIGRTMIN+1 value 0xA11CE, every 60 s, armed at an absolute time 3 intervals and a
 *    second ago: it expires at once, its signal (blocked) is taken: timer_getoverrun is 3, and the
 *    same after the restore (its next expiry is a minute away); then armed every 10 ms, it fires
 *    with its value
 * B  REALTIME, SIGEV_NONE, one-shot in 1000 s: time left after <= before, > 900 s
 * C  MONOTONIC, SIGRTMIN+2 to thread 2 (SIGEV_THREAD_ID), value 0xC0C0, one-shot in 1 s: thread 2
 *    takes it after the gate (pending at the dump if it fired before)
 * D  process CPU time, SIGEV_NONE, one-shot in 1000 s of CPU: time left after <= before
 * E  CPU time of thread 2 (made by thread 2, CLOCK_THREAD_CPUTIME_ID), SIGEV_NONE, 500 s: burning
 *    CPU in the main thread leaves it, in thread 2 lowers it
 * F  MONOTONIC, SIGRTMIN+3 value 0xF00D, one-shot in 1 ms: fired before the gate, its signal
 *    pending (blocked): taken at once after
 * G  MONOTONIC, SIGRTMIN+4 value 0x6, every 10 s, first in 1 ms: fired, pending; taken at once after,
 *    then its time left is under 10 s
 */
static timer_t tA, tB, tC, tD, tE, tF, tG;
static int t2_cmd[2], t2_rep[2];
static pid_t t2_tid;

static int64_t left(timer_t t)
{
	struct itimerspec its;
	if (timer_gettime(t, &its))
		return -1;
	return (int64_t)its.it_value.tv_sec * 1000000000LL + its.it_value.tv_nsec;
}

static void mk(timer_t *t, clockid_t c, int notify, int sig, long value, pid_t tid)
{
	struct sigevent se;
	memset(&se, 0, sizeof se);
	se.sigev_notify = notify;
	se.sigev_signo = sig;
	se.sigev_value.sival_ptr = (void *)value;
	if (notify & SIGEV_THREAD_ID)
		se._sigev_un._tid = tid;
	if (timer_create(c, &se, t))
		rs_die("timer_create");
}

static void arm(timer_t t, int64_t value, int64_t interval)
{
	struct itimerspec its = {{interval / 1000000000LL, interval % 1000000000LL}, {value / 1000000000LL, value % 1000000000LL}};
	if (timer_settime(t, 0, &its, NULL))
		rs_die("timer_settime");
}

static void burn(int64_t ns)
{
	struct timespec a, b;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
	do
		clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
	while ((b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec) < ns);
}

static int take(int sig, int wait_ms, siginfo_t *si)
{
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, sig);
	struct timespec ts = {wait_ms / 1000, (wait_ms % 1000) * 1000000L};
	return sigtimedwait(&s, si, &ts);
}

static void *timers_thread(void *arg)
{
	(void)arg;
	t2_tid = gettid();
	mk(&tE, CLOCK_THREAD_CPUTIME_ID, SIGEV_NONE, 0, 0, 0);
	arm(tE, 500000000000LL, 0);
	char c = 0;
	if (write(t2_rep[1], &c, 1) != 1)
		rs_die("write");
	for (;;) {
		if (read(t2_cmd[0], &c, 1) != 1) {
			if (errno == EINTR)
				continue;
			rs_die("read");
		}
		if (c == 'b') {
			burn(20000000);
		} else if (c == 'c') {
			siginfo_t si;
			int r = take(SIGRTMIN + 2, 60000, &si);
			printf("C in thread 2: signal %s value %#lx timer %s\n", r == SIGRTMIN + 2 ? "ok" : "MISSING",
			       (long)si.si_value.sival_ptr, si.si_timerid == (int)(long)tC ? "ok" : "BAD");
		}
		if (write(t2_rep[1], &c, 1) != 1)
			rs_die("write");
	}
	return NULL;
}

static void ask(char c)
{
	if (write(t2_cmd[1], &c, 1) != 1 || read(t2_rep[0], &c, 1) != 1)
		rs_die("thread 2");
}

static int timers_mode(void)
{
	for (int s = SIGRTMIN + 1; s <= SIGRTMIN + 4; s++)
		block(s);
	if (pipe(t2_cmd) || pipe(t2_rep))
		rs_die("pipe");
	timer_t spare1, spare2;
	mk(&tA, CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRTMIN + 1, 0xA11CE, 0);
	mk(&spare1, CLOCK_MONOTONIC, SIGEV_NONE, 0, 0, 0);
	mk(&tB, CLOCK_REALTIME, SIGEV_NONE, 0, 0xB, 0);
	mk(&spare2, CLOCK_MONOTONIC, SIGEV_NONE, 0, 0, 0);
	pthread_t th;
	pthread_create(&th, NULL, timers_thread, NULL);
	char c;
	if (read(t2_rep[0], &c, 1) != 1)
		rs_die("read");
	mk(&tC, CLOCK_MONOTONIC, SIGEV_SIGNAL | SIGEV_THREAD_ID, SIGRTMIN + 2, 0xC0C0, t2_tid);
	mk(&tD, CLOCK_PROCESS_CPUTIME_ID, SIGEV_NONE, 0, 0, 0);
	mk(&tF, CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRTMIN + 3, 0xF00D, 0);
	mk(&tG, CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRTMIN + 4, 0x6, 0);
	timer_delete(spare1);
	timer_delete(spare2);
	struct itimerspec past = {{60, 0}, {0, 0}};
	clock_gettime(CLOCK_MONOTONIC, &past.it_value);
	past.it_value.tv_sec -= 181;
	if (timer_settime(tA, TIMER_ABSTIME, &past, NULL))
		rs_die("timer_settime A");
	arm(tB, 1000000000000LL, 0);
	arm(tC, 1000000000, 0);
	arm(tD, 1000000000000LL, 0);
	arm(tF, 1000000, 0);
	arm(tG, 1000000, 10000000000LL);
	struct timespec ts = {0, 50000000};
	while (nanosleep(&ts, &ts))
		;
	siginfo_t si;
	if (take(SIGRTMIN + 1, 5000, &si) != SIGRTMIN + 1)
		rs_die("timer A did not fire");
	int n = timer_getoverrun(tA);
	printf("before: ids A=%ld B=%ld C=%ld D=%ld E=%ld F=%ld G=%ld; A overrun %d, delivered %s\n", (long)tA, (long)tB,
	       (long)tC, (long)tD, (long)tE, (long)tF, (long)tG, n, si.si_overrun == n ? "alike" : "BAD");
	int64_t b0 = left(tB), d0 = left(tD), e0 = left(tE);
	gate();
	int64_t a1 = left(tA);
	printf("%s timer A overrun %d after %d, next expiry within a minute (%s)\n", timer_getoverrun(tA) == n ? "ok" : "BAD",
	       timer_getoverrun(tA), n, a1 > 0 && a1 <= 60000000000LL ? "ok" : "BAD");
	arm(tA, 10000000, 10000000);
	int r = take(SIGRTMIN + 1, 60000, &si);
	printf("%s timer A fires again: value %#lx timer %s code %s\n", r == SIGRTMIN + 1 ? "ok" : "BAD",
	       (long)si.si_value.sival_ptr, si.si_timerid == (int)(long)tA ? "ok" : "BAD", si.si_code == SI_TIMER ? "SI_TIMER" : "BAD");
	int64_t b1 = left(tB), d1 = left(tD);
	printf("%s timer B left after <= before, > 900 s\n", b1 > 900000000000LL && b1 <= b0 ? "ok" : "BAD");
	printf("%s timer D (process CPU) left after <= before\n", d1 > 0 && d1 <= d0 ? "ok" : "BAD");
	int64_t e1 = left(tE);
	burn(20000000);
	int64_t e2 = left(tE);
	ask('b');
	int64_t e3 = left(tE);
	printf("%s timer E (thread 2 CPU): after <= before, kept by main's CPU, lowered by thread 2's\n",
	       e1 > 0 && e1 <= e0 && e2 == e1 && e3 < e2 ? "ok" : "BAD");
	r = take(SIGRTMIN + 3, 0, &si);
	printf("%s timer F pending: value %#lx timer %s\n", r == SIGRTMIN + 3 ? "ok" : "BAD", (long)si.si_value.sival_ptr,
	       si.si_timerid == (int)(long)tF ? "ok" : "BAD");
	r = take(SIGRTMIN + 4, 0, &si);
	int64_t g = left(tG);
	printf("%s timer G pending: value %#lx, then armed (%s)\n", r == SIGRTMIN + 4 ? "ok" : "BAD",
	       (long)si.si_value.sival_ptr, g > 0 && g <= 10000000000LL ? "ok" : "BAD");
	ask('c');
	struct itimerspec its;
	printf("%s a deleted timer stays deleted\n", timer_gettime(spare1, &its) && errno == EINVAL ? "ok" : "BAD");
	return 0;
}

/* ------------------------------------------------------------------------------ membarrier */
static int membarrier(int cmd, unsigned flags)
{
	return (int)syscall(SYS_membarrier, cmd, flags, 0);
}

static int membarrier_mode(void)
{
	int q = membarrier(MEMBARRIER_CMD_QUERY, 0);
	int want = q & (MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED | MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE |
			MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ | MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED);
	for (int b = 0; b < 10; b++)
		if (want & (1 << b) && membarrier(1 << b, 0))
			rs_die("membarrier register");
	int before = membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS, 0);
	printf("before: registrations %#x (of %#x)\n", before, want);
	gate();
	int after = membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS, 0);
	printf("%s registrations %#x\n", after == before ? "ok" : "BAD", after);
	static const int cmds[] = {MEMBARRIER_CMD_PRIVATE_EXPEDITED, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE,
				   MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ, MEMBARRIER_CMD_GLOBAL_EXPEDITED};
	for (unsigned i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
		if (want & (cmds[i] << 1) || cmds[i] == MEMBARRIER_CMD_GLOBAL_EXPEDITED) {
			int r = membarrier(cmds[i], 0);
			printf("%s barrier %#x: %s\n", r == 0 ? "ok" : "BAD", cmds[i], r == 0 ? "done" : strerror(errno));
		}
	return 0;
}

/* ------------------------------------------------------------------------------ seccomp */
#define ARCH_OK BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)), \
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0), BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS)
#define NR BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr))
#define DENY(nr, ret) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (nr), 0, 1), BPF_STMT(BPF_RET | BPF_K, (ret))
#define ALLOW BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)
#ifndef AUDIT_ARCH_X86_64
#define AUDIT_ARCH_X86_64 0xc000003e
#endif

static int install(struct sock_filter *f, unsigned short n, unsigned flags)
{
	struct sock_fprog p = {n, f};
	return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &p);
}

static int sc_cmd[2], sc_rep[2], st_cmd[2], st_rep[2];

static void seccomp_state(char *out, size_t n)
{
	/* what the thread meets: getppid, prctl, setpgid, munmap of 1 MiB (of an address never mapped), getpgid */
	errno = 0;
	long a = syscall(SYS_getppid);
	int ea = errno;
	errno = 0;
	long b = syscall(SYS_prctl, PR_GET_DUMPABLE, 0, 0, 0, 0);
	int eb = errno;
	errno = 0;
	long c = syscall(SYS_setpgid, 0, 0);
	int ec = errno;
	errno = 0;
	long d = syscall(SYS_munmap, (void *)0x10000000000UL, 1 << 20);
	int ed = errno;
	errno = 0;
	long e = syscall(SYS_getpgid, 0);
	int ee = errno;
	errno = 0;
	long f = syscall(SYS_getsid, 0);
	int ef = errno;
	snprintf(out, n, "getppid %s prctl %s setpgid %s munmap %s getpgid %s getsid %s", a < 0 ? strerrorname_np(ea) : "allowed",
		 b < 0 ? strerrorname_np(eb) : "allowed", c < 0 ? strerrorname_np(ec) : "allowed",
		 d < 0 ? strerrorname_np(ed) : "allowed", e < 0 ? strerrorname_np(ee) : "allowed",
		 f < 0 ? strerrorname_np(ef) : "allowed");
}

static void *seccomp_thread(void *arg)
{
	(void)arg;
	/* this thread's own filter, on top of the shared ones: getpgid fails with EPERM */
	struct sock_filter own[] = {ARCH_OK, NR, DENY(SYS_getpgid, SECCOMP_RET_ERRNO | EPERM), ALLOW};
	if (install(own, sizeof own / sizeof own[0], 0))
		rs_die("own filter");
	char c, line[256];
	for (;;) {
		if (read(sc_cmd[0], &c, 1) != 1) {
			if (errno == EINTR)
				continue;
			_exit(4);
		}
		if (c == 't') {
			struct sock_filter more[] = {ARCH_OK, NR, DENY(SYS_getsid, SECCOMP_RET_ERRNO | ENOTSUP), ALLOW};
			int r = install(more, sizeof more / sizeof more[0], SECCOMP_FILTER_FLAG_TSYNC);
			errno = 0;
			long sid = syscall(SYS_getsid, 0);
			snprintf(line, sizeof line, "tsync %d getsid %s", r, sid < 0 ? strerrorname_np(errno) : "allowed");
		} else
			seccomp_state(line, sizeof line);
		size_t len = strlen(line) + 1;
		if (write(sc_rep[1], line, len) != (ssize_t)len)
			_exit(4);
	}
	return NULL;
}

static void *strict_thread(void *arg)
{
	(void)arg;
	char c;
	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_STRICT, 0, NULL))
		_exit(5);
	for (;;) {      /* only read and write from here on: 'e' echoes, 'g' calls getpid (killed) */
		if (syscall(SYS_read, st_cmd[0], &c, 1) != 1)
			continue;
		if (c == 'g')
			syscall(SYS_getpid);
		syscall(SYS_write, st_rep[1], &c, 1);
	}
	return NULL;
}

static void other(char *line, size_t n)
{
	char c = 's';
	if (write(sc_cmd[1], &c, 1) != 1)
		rs_die("write");
	size_t len = 0;
	while (len < n && read(sc_rep[0], line + len, 1) == 1 && line[len])
		len++;
}

static int seccomp_mode(void)
{
	if (pipe(sc_cmd) || pipe(sc_rep))
		rs_die("pipe");
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		rs_die("no_new_privs");
	/* installed before thread 2 is made, so shared with it: the restorer's last calls, getppid */
	struct sock_filter shared[] = {ARCH_OK, NR, DENY(SYS_getppid, SECCOMP_RET_ERRNO | EACCES),
		DENY(SYS_prctl, SECCOMP_RET_ERRNO | EPERM), DENY(SYS_setpgid, SECCOMP_RET_ERRNO | EPERM),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_munmap, 0, 3),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 1 << 20, 0, 1), BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EFAULT),
		ALLOW};
	/* kills on what ckpt injects to dump a process: it never filters them (suspended) */
	struct sock_filter logged[] = {ARCH_OK, NR, DENY(SYS_userfaultfd, SECCOMP_RET_KILL_PROCESS),
		DENY(SYS_getitimer, SECCOMP_RET_KILL_PROCESS), DENY(SYS_sigaltstack, SECCOMP_RET_KILL_PROCESS),
		DENY(SYS_timer_gettime, SECCOMP_RET_KILL_PROCESS), DENY(SYS_membarrier, SECCOMP_RET_KILL_PROCESS), ALLOW};
	if (install(shared, sizeof shared / sizeof shared[0], 0) ||
	    install(logged, sizeof logged / sizeof logged[0], SECCOMP_FILTER_FLAG_LOG))
		rs_die("filters");
	pthread_t th;
	pthread_create(&th, NULL, seccomp_thread, NULL);
	char mine[256], its[256];
	seccomp_state(mine, sizeof mine);
	other(its, sizeof its);
	printf("before: main %s; thread 2 %s\n", mine, its);
	gate();
	char mine2[256], its2[256];
	seccomp_state(mine2, sizeof mine2);
	other(its2, sizeof its2);
	printf("%s main %s\n", strcmp(mine, mine2) ? "BAD" : "ok", mine2);
	printf("%s thread 2 %s\n", strcmp(its, its2) ? "BAD" : "ok", its2);
	/* thread 2 synchronizes a new filter to every thread: it can only if the main thread's
	 * filters are its own ancestors -- shared, not copies */
	char c = 't';
	if (write(sc_cmd[1], &c, 1) != 1)
		rs_die("write");
	other(its2, sizeof its2);
	seccomp_state(mine2, sizeof mine2);
	printf("%s TSYNC from thread 2: %s; main then %s\n", strncmp(its2, "tsync 0", 7) ? "BAD" : "ok", its2, mine2);
	return 0;
}

static int strict_mode(void)
{
	if (pipe(st_cmd) || pipe(st_rep))
		rs_die("pipe");
	pthread_t st;
	pthread_create(&st, NULL, strict_thread, NULL);
	char c = 'e';
	syscall(SYS_write, st_cmd[1], &c, 1);       /* it echoes once in strict mode */
	if (syscall(SYS_read, st_rep[0], &c, 1) != 1)
		rs_die("strict thread");
	printf("before: strict thread echoes\n");
	gate();
	c = 'e';
	syscall(SYS_write, st_cmd[1], &c, 1);
	printf("%s strict thread echoes\n", syscall(SYS_read, st_rep[0], &c, 1) == 1 && c == 'e' ? "ok" : "BAD");
	c = 'g';
	syscall(SYS_write, st_cmd[1], &c, 1);       /* getpid in strict mode: the thread is killed */
	struct timespec ts = {0, 10000000};
	int threads = 0;
	for (int i = 0; i < 2000; i++) {
		char buf[4096];
		FILE *f = fopen("/proc/self/status", "r");
		threads = 0;
		while (f && fgets(buf, sizeof buf, f))
			if (!strncmp(buf, "Threads:", 8))
				threads = atoi(buf + 8);
		if (f)
			fclose(f);
		if (threads == 1)
			break;
		nanosleep(&ts, NULL);
	}
	printf("%s strict thread killed by getpid\n", threads == 1 ? "ok" : "BAD");
	return 0;
}

/* ------------------------------------------------------------------------------ sched
 * main     SCHED_BATCH nice 7, CPU 0, I/O best-effort level 2
 * thread 2 SCHED_FIFO 10 (reset-on-fork), nice -3 kept aside, CPU 1, I/O real-time level 4
 * thread 3 SCHED_IDLE, every CPU, I/O idle
 */
static int sc_ask[3][2], sc_ans[3][2];

static void sched_report(char *out, size_t n)
{
	struct {
		uint32_t size, policy;
		uint64_t flags;
		int32_t nice;
		uint32_t prio;
		uint64_t rt, dl, per;
		uint32_t umin, umax;
	} a;
	memset(&a, 0, sizeof a);
	syscall(SYS_sched_getattr, 0, &a, sizeof a, 0);
	cpu_set_t cs;
	sched_getaffinity(0, sizeof cs, &cs);
	char cpus[64] = "";
	for (int i = 0; i < 64 && i < CPU_SETSIZE; i++)
		if (CPU_ISSET(i, &cs))
			snprintf(cpus + strlen(cpus), sizeof cpus - strlen(cpus), "%s%d", cpus[0] ? "," : "", i);
	snprintf(out, n, "policy %u prio %u flags %#lx nice %d cpus %s ioprio %#lx", a.policy, a.prio, (unsigned long)a.flags,
		 getpriority(PRIO_PROCESS, 0), cpus, syscall(SYS_ioprio_get, 1, 0));
}

struct sched_set {
	int idx, policy, prio, nice, cpu, ioprio, reset;
};

static void *sched_thread(void *arg)
{
	struct sched_set *s = arg;
	setpriority(PRIO_PROCESS, 0, s->nice);
	struct sched_param p = {s->prio};
	if (sched_setscheduler(0, s->policy | (s->reset ? SCHED_RESET_ON_FORK : 0), &p))
		rs_die("sched_setscheduler");
	if (s->cpu >= 0) {
		cpu_set_t cs;
		CPU_ZERO(&cs);
		CPU_SET(s->cpu, &cs);
		if (sched_setaffinity(0, sizeof cs, &cs))
			rs_die("sched_setaffinity");
	}
	if (syscall(SYS_ioprio_set, 1, 0, s->ioprio))
		rs_die("ioprio_set");
	char c, line[256];
	for (;;) {
		if (read(sc_ask[s->idx][0], &c, 1) != 1) {
			if (errno == EINTR)
				continue;
			_exit(4);
		}
		sched_report(line, sizeof line);
		if (write(sc_ans[s->idx][1], line, sizeof line) != sizeof line)
			_exit(4);
	}
	return NULL;
}

static void sched_all(char out[3][256])
{
	for (int i = 0; i < 3; i++) {
		char c = 1;
		if (write(sc_ask[i][1], &c, 1) != 1)
			rs_die("write");
		if (read(sc_ans[i][0], out[i], 256) != 256)
			rs_die("read");
	}
}

static int sched_mode(void)
{
	static struct sched_set set[3] = {
		{0, SCHED_BATCH, 0, 7, 0, (2 << 13) | 2, 0},
		{1, SCHED_FIFO, 10, -3, 1, (1 << 13) | 4, 1},
		{2, SCHED_IDLE, 0, 0, -1, 3 << 13, 0},
	};
	pthread_t th;
	for (int i = 0; i < 3; i++) {
		if (pipe(sc_ask[i]) || pipe(sc_ans[i]))
			rs_die("pipe");
		pthread_create(&th, NULL, sched_thread, &set[i]);
	}
	char before[3][256], after[3][256];
	sched_all(before);
	for (int i = 0; i < 3; i++)
		printf("before: thread %d %s\n", i, before[i]);
	gate();
	sched_all(after);
	for (int i = 0; i < 3; i++)
		printf("%s thread %d %s\n", strcmp(before[i], after[i]) ? "BAD" : "ok", i, after[i]);
	return 0;
}

/* ------------------------------------------------------------------------------ sleep */
enum { POLL, NANO_REM, NANO, ABS, CONDVAR, PPOLL, NKIND };
static const char *kinds[NKIND] = {"poll", "nanosleep-rem", "nanosleep", "clock_nanosleep-abs", "condvar", "ppoll"};
static int64_t t0, ms;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv;

static void on_usr1(int sig)
{
	(void)sig;
}

static void *sleeper(void *arg)
{
	int k = (int)(long)arg;
	int64_t end = t0 + ms * 1000000;
	int eintr = 0, r = 0;
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000}, abs_ts = {end / 1000000000, end % 1000000000};
	for (;;) {
		int64_t rest = end - mono();
		if (rest < 0)
			rest = 0;
		switch (k) {
		case POLL:
			/* a program that keeps its deadline: after EINTR it polls for what is left */
			r = poll(NULL, 0, eintr ? (int)(rest / 1000000) : (int)ms);
			break;
		case NANO_REM:
			r = nanosleep(&ts, &ts);
			break;
		case NANO: {
			struct timespec t = {rest / 1000000000, rest % 1000000000};
			r = nanosleep(eintr ? &t : &ts, NULL);
			break;
		}
		case ABS:
			r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &abs_ts, NULL);
			if (r) {
				errno = r;
				r = -1;
			}
			break;
		case CONDVAR:
			pthread_mutex_lock(&mu);
			r = pthread_cond_timedwait(&cv, &mu, &abs_ts);
			pthread_mutex_unlock(&mu);
			r = r == ETIMEDOUT ? 0 : -1;
			break;
		case PPOLL:
			r = ppoll(NULL, 0, &ts, NULL);
			break;
		}
		if (r < 0 && errno == EINTR) {
			eintr++;
			continue;
		}
		break;
	}
	printf("woke %s at %.3f r=%d eintr=%d\n", kinds[k], mono() / 1e9, r, eintr);
	return NULL;
}

static int sleep_mode(int argc, char **argv)
{
	ms = argc > 2 ? atol(argv[2]) : 8000;
	int handler = argc > 3 && !strcmp(argv[3], "handler");
	if (handler) {
		struct sigaction sa;
		memset(&sa, 0, sizeof sa);
		sa.sa_handler = on_usr1;
		sigaction(SIGUSR1, &sa, NULL);
	}
	signal(SIGUSR2, handler ? rs_on_usr2 : SIG_IGN);    /* without "handler": no handler at all */
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&cv, &ca);
	t0 = mono();
	printf("sleeping at %.3f for %ld ms\n", t0 / 1e9, (long)ms);
	pthread_t th[NKIND];
	for (int k = 1; k < NKIND; k++)
		pthread_create(&th[k], NULL, sleeper, (void *)(long)k);
	sleeper((void *)(long)POLL);
	for (int k = 1; k < NKIND; k++)
		pthread_join(th[k], NULL);
	return 0;
}

/* ------------------------------------------------------------------------------ refused */
static int foreign_cpu_timer_mode(int argc, char **argv)
{
	/* a timer on the CPU clock of another process (PID given) */
	clockid_t c;
	timer_t t;
	if (argc < 3 || clock_getcpuclockid(atoi(argv[2]), &c))
		rs_die("clock_getcpuclockid");
	mk(&t, c, SIGEV_NONE, 0, 0, 0);
	arm(t, 1000000000000LL, 0);
	printf("before: timer on the CPU clock of %s\n", argv[2]);
	gate();
	printf("%s timer still armed\n", left(t) > 0 ? "ok" : "BAD");
	return 0;
}

static void *idle_timer_thread(void *arg)
{
	mk((timer_t *)arg, CLOCK_THREAD_CPUTIME_ID, SIGEV_NONE, 0, 0, 0);    /* made, never armed */
	for (;;)
		pause();
	return NULL;
}

static int idle_thread_timer_mode(void)
{
	timer_t t = (timer_t)-1L;
	pthread_t th;
	pthread_create(&th, NULL, idle_timer_thread, &t);
	while (t == (timer_t)-1L)
		usleep(1000);
	printf("before: a thread CPU-time timer, not armed\n");
	gate();
	printf("%s timer still there\n", left(t) == 0 ? "ok" : "BAD");
	return 0;
}

static int notify_mode(void)
{
	/* a filter handing getsid to a supervisor (SECCOMP_RET_USER_NOTIF), its listener closed */
	struct sock_filter f[] = {ARCH_OK, NR, DENY(SYS_getsid, SECCOMP_RET_USER_NOTIF), ALLOW};
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		rs_die("no_new_privs");
	int listener = install(f, sizeof f / sizeof f[0], SECCOMP_FILTER_FLAG_NEW_LISTENER);
	if (listener < 0)
		rs_die("seccomp");
	close(listener);
	errno = 0;
	long r = syscall(SYS_getsid, 0);
	printf("before: getsid %s\n", r < 0 ? strerrorname_np(errno) : "allowed");
	gate();
	errno = 0;
	r = syscall(SYS_getsid, 0);
	printf("%s getsid %s\n", r < 0 && errno == ENOSYS ? "ok" : "BAD", r < 0 ? strerrorname_np(errno) : "allowed");
	return 0;
}

int main(int argc, char **argv)
{
	rs_init();
	block(SIGUSR2);         /* taken by the gate only (threads inherit it blocked) */
	const char *mode = argc > 1 ? argv[1] : "";
	int r;
	if (!strcmp(mode, "timers"))
		r = timers_mode();
	else if (!strcmp(mode, "membarrier"))
		r = membarrier_mode();
	else if (!strcmp(mode, "seccomp"))
		r = seccomp_mode();
	else if (!strcmp(mode, "strict"))
		r = strict_mode();
	else if (!strcmp(mode, "cputimer-of"))
		r = foreign_cpu_timer_mode(argc, argv);
	else if (!strcmp(mode, "notify"))
		r = notify_mode();
	else if (!strcmp(mode, "idle-thread-timer"))
		r = idle_thread_timer_mode();
	else if (!strcmp(mode, "sched"))
		r = sched_mode();
	else if (!strcmp(mode, "sleep")) {
		sigset_t s;
		sigemptyset(&s);
		pthread_sigmask(SIG_SETMASK, &s, NULL);
		r = sleep_mode(argc, argv);
	} else {
		printf("ERROR unknown mode %s\n", mode);
		return 2;
	}
	printf("done\n");
	fflush(stdout);
	_exit(r);
}
