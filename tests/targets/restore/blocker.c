/*
 * Threads that spend nearly all their time blocked in the kernel: "sleeper" in nanosleep,
 * "reader" in read() on a pipe, "waiter" in a futex wait (pthread_cond_wait); the main thread
 * ticks every TICK_MS ms, writing the tick number into the pipe and bumping a generation the
 * waiter waits for, then waits until both have taken the tick.
 *
 *   blocker TICKS TICK_MS SLEEP_MS GATE
 *
 * Prints "tick I pipe P HP cv C HC" per tick (counts and hashes of what each thread took: all
 * of it deterministic); at the end waits until
 * the sleeper has finished two more sleeps and prints "done H". A pipe read that returns
 * anything but a whole value, or a value out of order, prints "ERROR ..." and exits 3.
 * GATE >= 0: the main thread waits for SIGUSR2 before tick GATE (see rs.h).
 */
#include "rs.h"
#include <pthread.h>

static int pfd[2];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;     /* waiter waits here for gen */
static pthread_cond_t ack = PTHREAD_COND_INITIALIZER;    /* main waits here for both */
static pthread_cond_t slept = PTHREAD_COND_INITIALIZER;  /* main waits here for the sleeper */
static long gen, seen_cv, seen_pipe, sleeps, sleep_ms;
static uint64_t hash_pipe = 1469598103934665603ULL, hash_cv = 1469598103934665603ULL;

static void *sleeper(void *arg)
{
	(void)arg;
	pthread_setname_np(pthread_self(), "sleeper");
	for (;;) {
		struct timespec ts = {sleep_ms / 1000, (sleep_ms % 1000) * 1000000L};
		while (nanosleep(&ts, &ts) && errno == EINTR)
			;
		pthread_mutex_lock(&mu);
		sleeps++;
		pthread_cond_broadcast(&slept);
		pthread_mutex_unlock(&mu);
	}
	return NULL;
}

static void *reader(void *arg)
{
	(void)arg;
	pthread_setname_np(pthread_self(), "reader");
	for (long expect = 1;; expect++) {
		long v;
		ssize_t n = read(pfd[0], &v, sizeof v);
		if (n < 0 && errno == EINTR) {
			expect--;
			continue;
		}
		if (n != sizeof v || v != expect) {
			printf("ERROR read returned %zd (errno %d), value %ld, expected %ld\n", n, errno, v, expect);
			exit(3);
		}
		pthread_mutex_lock(&mu);
		hash_pipe = (hash_pipe ^ (uint64_t)v) * 1099511628211ULL;
		seen_pipe++;
		pthread_cond_broadcast(&ack);
		pthread_mutex_unlock(&mu);
	}
	return NULL;
}

static void *waiter(void *arg)
{
	(void)arg;
	pthread_setname_np(pthread_self(), "waiter");
	long mine = 0;
	for (;;) {
		pthread_mutex_lock(&mu);
		while (gen == mine)
			pthread_cond_wait(&cv, &mu);
		mine = gen;
		seen_cv++;
		hash_cv = (hash_cv ^ (uint64_t)(mine * 7)) * 1099511628211ULL;
		pthread_cond_broadcast(&ack);
		pthread_mutex_unlock(&mu);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: blocker TICKS TICK_MS SLEEP_MS GATE\n");
		return 2;
	}
	long ticks = atol(argv[1]), tick_ms = atol(argv[2]);
	sleep_ms = atol(argv[3]);
	long gate = atol(argv[4]);
	rs_init();
	if (pipe(pfd))
		rs_die("pipe");
	pthread_t t[3];
	pthread_create(&t[0], NULL, sleeper, NULL);
	pthread_create(&t[1], NULL, reader, NULL);
	pthread_create(&t[2], NULL, waiter, NULL);
	for (long i = 1; i <= ticks; i++) {
		if (i == gate)
			rs_gate_sleep();
		struct timespec ts = {tick_ms / 1000, (tick_ms % 1000) * 1000000L};
		while (nanosleep(&ts, &ts) && errno == EINTR)
			;
		if (write(pfd[1], &i, sizeof i) != sizeof i)
			rs_die("write");
		pthread_mutex_lock(&mu);
		gen = i;
		pthread_cond_signal(&cv);
		while (seen_pipe < i || seen_cv < i)
			pthread_cond_wait(&ack, &mu);
		printf("tick %ld pipe %ld %016llx cv %ld %016llx\n", i, seen_pipe, (unsigned long long)hash_pipe, seen_cv,
		       (unsigned long long)hash_cv);
		pthread_mutex_unlock(&mu);
	}
	pthread_mutex_lock(&mu);
	long until = sleeps + 2;
	while (sleeps < until)
		pthread_cond_wait(&slept, &mu);
	pthread_mutex_unlock(&mu);
	printf("done %016llx\n", (unsigned long long)rs_mix(hash_pipe, hash_cv));
	return 0;
}
