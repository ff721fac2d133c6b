/*
 * Deterministic computation over memory by T threads that meet at a mutex/condvar barrier.
 *
 *   compute THREADS STEPS EVERY MIB GATE EXIT [PAUSE_US [CREDIT]]
 *
 * MIB MiB of anonymous memory are split into THREADS slices. In step s, thread t rewrites
 * one word in 8 of its slice (so every page is written every step), mixing in the summary its
 * left neighbour published at the end of step s-1, and publishes the hash of what it wrote.
 * Thread 0 folds the summaries in thread order into the running result, prints
 * "iter S hash H" every EVERY steps, and after STEPS steps prints "done H" and exits EXIT.
 * With THREADS = 1 the main thread does all the work and the process has one thread.
 * GATE >= 0: thread 0 waits for SIGUSR2 before step GATE (see rs.h). PAUSE_US > 0: thread 0
 * sleeps that long before each step (a slower pace, same output). CREDIT > 0: thread 0 starts
 * step s only once s < (1 + SIGUSR2s taken) * CREDIT, so a test lets it advance in bounded
 * stretches. SIGUSR1 lifts both the pace and the credit limit.
 */
#include "rs.h"
#include <pthread.h>
#include <sys/mman.h>

static int nthreads;
static long steps, every, gate, pause_us, credit;
static volatile sig_atomic_t unlimited;
static int exit_code;
static uint64_t *mem;
static size_t words_per_slice;
static uint64_t *summary, *next_summary;
static uint64_t result = 0x243f6a8885a308d3ULL;

static void on_usr1(int sig)
{
	(void)sig;
	unlimited = 1;
}

/* a barrier of a mutex and a condition variable, with a generation so it can be reused */
static pthread_mutex_t bar_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t bar_cond = PTHREAD_COND_INITIALIZER;
static int bar_count;
static unsigned long bar_gen;

static void barrier(void)
{
	pthread_mutex_lock(&bar_lock);
	unsigned long gen = bar_gen;
	if (++bar_count == nthreads) {
		bar_count = 0;
		bar_gen++;
		pthread_cond_broadcast(&bar_cond);
	} else {
		while (gen == bar_gen)
			pthread_cond_wait(&bar_cond, &bar_lock);
	}
	pthread_mutex_unlock(&bar_lock);
}

static void *worker(void *arg)
{
	int t = (int)(intptr_t)arg;
	uint64_t *w = mem + (size_t)t * words_per_slice;
	for (long s = 0; s < steps; s++) {
		if (t == 0 && s == gate)
			rs_gate_sleep();
		while (t == 0 && credit > 0 && !unlimited && s >= (1 + (long)rs_usr2_count) * credit) {
			struct timespec ts = {0, 2000000};
			nanosleep(&ts, NULL);
		}
		if (t == 0 && pause_us > 0 && !unlimited) {
			struct timespec ts = {pause_us / 1000000, (pause_us % 1000000) * 1000};
			while (nanosleep(&ts, &ts) && errno == EINTR && !unlimited)
				;
		}
		uint64_t nbr = summary[(t + nthreads - 1) % nthreads];
		uint64_t h = (uint64_t)s * 0x100000001b3ULL + (uint64_t)t;
		for (size_t i = (size_t)(s & 7); i < words_per_slice; i += 8) {
			uint64_t x = (w[i] ^ nbr) * 6364136223846793005ULL + 1442695040888963407ULL + i;
			x ^= x >> 29;
			w[i] = x;
			h = (h ^ x) * 0x100000001b3ULL;
		}
		next_summary[t] = h;
		barrier();
		if (t == 0) {
			for (int k = 0; k < nthreads; k++) {
				summary[k] = next_summary[k];
				result = rs_mix(result, summary[k]);
			}
			if ((s + 1) % every == 0)
				printf("iter %ld hash %016llx\n", s + 1, (unsigned long long)result);
		}
		barrier();
	}
	return NULL;
}

/* 16 real-time signal handlers, each with its own flags and mask: the dump reads them in one
 * batch long enough to run as a blob (ckpt/state/blob.py); checked before "done" */
#define NHANDLERS 16
static void on_rt(int sig, siginfo_t *si, void *ctx)
{
	(void)sig; (void)si; (void)ctx;
}

static int mask_signal(int i)
{
	int sig = 1 + i % 15;
	return sig == SIGKILL ? SIGUSR1 : sig;     /* SIGKILL cannot be blocked */
}

static void install_handlers(void)
{
	for (int i = 0; i < NHANDLERS; i++) {
		struct sigaction sa;
		memset(&sa, 0, sizeof(sa));
		sa.sa_sigaction = on_rt;
		sa.sa_flags = SA_SIGINFO | (i & 1 ? SA_RESTART : 0) | (i & 2 ? SA_NODEFER : 0);
		sigemptyset(&sa.sa_mask);
		sigaddset(&sa.sa_mask, mask_signal(i));
		sigaction(SIGRTMIN + i, &sa, NULL);
	}
}

static void check_handlers(void)
{
	for (int i = 0; i < NHANDLERS; i++) {
		struct sigaction sa;
		sigaction(SIGRTMIN + i, NULL, &sa);
		int flags = SA_SIGINFO | (i & 1 ? SA_RESTART : 0) | (i & 2 ? SA_NODEFER : 0);
		if (sa.sa_sigaction != on_rt || (sa.sa_flags & flags) != flags || !sigismember(&sa.sa_mask, mask_signal(i)))
			printf("BAD handler of signal %d\n", SIGRTMIN + i);
	}
}

int main(int argc, char **argv)
{
	if (argc < 7 || argc > 9) {
		fprintf(stderr, "usage: compute THREADS STEPS EVERY MIB GATE EXIT [PAUSE_US [CREDIT]]\n");
		return 2;
	}
	nthreads = atoi(argv[1]);
	steps = atol(argv[2]);
	every = atol(argv[3]);
	size_t bytes = (size_t)atol(argv[4]) << 20;
	gate = atol(argv[5]);
	exit_code = atoi(argv[6]);
	pause_us = argc > 7 ? atol(argv[7]) : 0;
	credit = argc > 8 ? atol(argv[8]) : 0;
	rs_init();
	install_handlers();
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		rs_die("mmap");
	words_per_slice = bytes / sizeof(uint64_t) / (size_t)nthreads;
	for (size_t i = 0; i < bytes / sizeof(uint64_t); i++)
		mem[i] = i * 0x9e3779b97f4a7c15ULL;
	summary = calloc((size_t)nthreads, sizeof(uint64_t));
	next_summary = calloc((size_t)nthreads, sizeof(uint64_t));
	pthread_t *th = calloc((size_t)nthreads, sizeof(pthread_t));
	for (int t = 1; t < nthreads; t++)
		if ((errno = pthread_create(&th[t], NULL, worker, (void *)(intptr_t)t)))
			rs_die("pthread_create");
	worker((void *)0);
	for (int t = 1; t < nthreads; t++)
		pthread_join(th[t], NULL);
	check_handlers();
	printf("done %016llx\n", (unsigned long long)result);
	return exit_code;
}
