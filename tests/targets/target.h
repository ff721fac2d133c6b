/*
 * What every C test target shares: the "ready PID" line, the error log, and the self-check
 * served on SIGUSR1.
 *
 * SIGUSR1 is blocked in every thread and taken with sigwait() by the main thread only, so the
 * request can never be lost in a worker. On SIGUSR1 the main thread takes the `park` lock for
 * writing (workers hold it for reading around each step, so they are parked between steps),
 * runs the target's full check, and prints "ok N" (N = steps done so far) or "BAD <first error>
 * (<count> errors)". Errors found by the workers' own continuous checks are reported the same way.
 */
#ifndef CKPT_TEST_TARGET_H
#define CKPT_TEST_TARGET_H
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static atomic_long t_errors;
static atomic_ulong t_steps;
static char t_first_error[256];
static pthread_mutex_t t_err_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_rwlock_t park = PTHREAD_RWLOCK_INITIALIZER;

static inline void fail(const char *fmt, ...)
{
	pthread_mutex_lock(&t_err_lock);
	if (atomic_fetch_add(&t_errors, 1) == 0) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(t_first_error, sizeof(t_first_error), fmt, ap);
		va_end(ap);
	}
	pthread_mutex_unlock(&t_err_lock);
}

static void die(const char *what)
{
	fprintf(stderr, "%s: %s\n", what, strerror(errno));
	exit(2);
}

static inline void *map_anon(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	return p;
}

/* a crash says where, on stdout, so that a test shows it */
static void on_crash(int sig, siginfo_t *si, void *uc)
{
	char msg[128];
	int n = snprintf(msg, sizeof(msg), "CRASH signal %d at %p (code %d)\n", sig, si->si_addr, si->si_code);
	(void)uc;
	if (write(1, msg, (size_t)n) < 0)
		_exit(3);
	signal(sig, SIG_DFL);
	raise(sig);
}

/* call first in main(), before any thread exists: every thread inherits the blocked SIGUSR1 */
static void target_init(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_crash;
	sa.sa_flags = SA_SIGINFO;
	sigaction(SIGSEGV, &sa, NULL);
	sigaction(SIGBUS, &sa, NULL);
	pthread_rwlockattr_t ra;
	pthread_rwlockattr_init(&ra);
	/* the full check must not starve behind workers that keep taking the read lock */
	pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&park, &ra);
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &s, NULL);
	setvbuf(stdout, NULL, _IOLBF, 0);
}

static void start_thread(void *(*fn)(void *), void *arg)
{
	pthread_t th;
	if (pthread_create(&th, NULL, fn, arg))
		die("pthread_create");
	pthread_detach(th);
}

static void step_begin(void) { pthread_rwlock_rdlock(&park); }
static void step_end(void) { pthread_rwlock_unlock(&park); atomic_fetch_add(&t_steps, 1); }

/* print the ready line, then serve self-checks forever */
static void serve(void (*full_check)(void))
{
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGUSR1);
	printf("ready %d\n", getpid());
	for (;;) {
		int sig = 0;
		if (sigwait(&s, &sig))
			continue;
		pthread_rwlock_wrlock(&park);
		if (full_check)
			full_check();
		unsigned long steps = atomic_load(&t_steps);
		pthread_rwlock_unlock(&park);
		long n = atomic_load(&t_errors);
		if (n) {
			pthread_mutex_lock(&t_err_lock);
			printf("BAD %s (%ld errors)\n", t_first_error, n);
			pthread_mutex_unlock(&t_err_lock);
		} else {
			printf("ok %lu\n", steps);
		}
	}
}

static inline uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

static inline unsigned rnd(unsigned *seed) { return (unsigned)rand_r(seed); }

#endif
