/*
 * Shared by the restore scenario targets (tests/test_restore*.py).
 *
 * Every target prints "ready PID" first, then only lines that do not depend on timing, so that
 * an uninterrupted run and a dumped-and-restored run print the same lines after the first one.
 * stdout is line buffered whatever it is (file or pipe).
 *
 * The gate: a target given a gate step waits there until SIGUSR2 arrives, so that it cannot
 * finish before the test has dumped it, however slow the machine. The wait prints nothing, so
 * the output is the same with or without a gate.
 */
#ifndef RS_H
#define RS_H
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t rs_go;
static volatile sig_atomic_t rs_usr2_count;   /* SIGUSR2s taken (they coalesce while pending) */

static void rs_on_usr2(int sig)
{
	(void)sig;
	rs_go = 1;
	rs_usr2_count++;
}

static void rs_on_crash(int sig)
{
	char msg[64];
	int n = snprintf(msg, sizeof(msg), "CRASH signal %d\n", sig);
	if (write(1, msg, (size_t)n) < 0)
		_exit(3);
	signal(sig, SIG_DFL);
	raise(sig);
}

static inline void rs_init(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = rs_on_usr2;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR2, &sa, NULL);
	signal(SIGSEGV, rs_on_crash);
	signal(SIGBUS, rs_on_crash);
	signal(SIGILL, rs_on_crash);
	signal(SIGFPE, rs_on_crash);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", (int)getpid());
}

/* wait for SIGUSR2, sleeping (the restored process must also restart this nanosleep) */
static inline void rs_gate_sleep(void)
{
	while (!rs_go) {
		struct timespec ts = {0, 2000000};
		nanosleep(&ts, NULL);
	}
}

static inline uint64_t rs_mix(uint64_t h, uint64_t v)
{
	h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
	h *= 0xff51afd7ed558ccdULL;
	return h ^ (h >> 33);
}

static inline void rs_die(const char *what)
{
	printf("ERROR %s: %s\n", what, strerror(errno));
	exit(2);
}
#endif
