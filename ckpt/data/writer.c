/*
 * Test target: THREADS threads stamp pages of a SIZE_MB buffer with counters, as fast as they
 * can or at RATE pages per second per thread. Each page holds its own address and a counter, so
 * the target can check itself: on SIGUSR1 it verifies every page it owns and prints "ok N" or
 * "BAD addr" on stdout.
 *
 * Every page write is timed (the stamp's stores, with the fault a protected page takes): on
 * SIGUSR2 the target prints "lat n N p50 A p99 B p999 C max D" (microseconds, all threads, since
 * the previous SIGUSR2) and starts counting again: what a dump costs the target's own threads.
 *
 * usage: writer SIZE_MB THREADS RATE(0 = flat out) [ctl]
 *
 * With a fourth argument "ctl" (benchmarks/rollback.py), THREADS may be 0 (then nothing writes
 * memory but the commands), "ready" is followed by " buf ADDR bytes N", and the main thread reads
 * commands from stdin, one a line, answering each with one line on stdout:
 *   stamp STRIDE OFFSET  stamp every page i with i % STRIDE == OFFSET (a new counter each time):
 *                        "stamped N"
 *   check                as SIGUSR1: "ok N" or "BAD ..."
 *   ping                 "pong G" (G: how many stamp commands ran)
 * At end of input it goes back to waiting for SIGUSR1 / SIGUSR2 as without "ctl".
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
static uint8_t *buf;
static size_t npages;
static int nthreads;
static long rate;
static pthread_rwlock_t park = PTHREAD_RWLOCK_INITIALIZER;

struct page_hdr { uint64_t addr; uint64_t counter; uint64_t owner; uint64_t sum; };

static void stamp(size_t i, uint64_t owner, uint64_t counter)
{
	struct page_hdr *h = (struct page_hdr *)(buf + i * PAGE);
	/* fill the page with a pattern derived from counter, header last-but-consistent */
	uint64_t *w = (uint64_t *)(buf + i * PAGE);
	for (size_t k = 4; k < PAGE / 8; k += 64)
		w[k] = counter * 2654435761u + k;
	h->addr = (uint64_t)(uintptr_t)h;
	h->owner = owner;
	h->counter = counter;
	h->sum = h->addr ^ h->counter ^ h->owner;
}

static int check_page(size_t i)
{
	struct page_hdr *h = (struct page_hdr *)(buf + i * PAGE);
	if (h->addr == 0 && h->counter == 0)
		return 1; /* never stamped */
	if (h->addr != (uint64_t)(uintptr_t)h || h->sum != (h->addr ^ h->counter ^ h->owner))
		return 0;
	uint64_t *w = (uint64_t *)(buf + i * PAGE);
	for (size_t k = 4; k < PAGE / 8; k += 64)
		if (w[k] != h->counter * 2654435761u + k)
			return 0;
	return 1;
}

/* write latency histogram per thread: 0.25 us buckets up to 1 ms, then one overflow bucket */
#define LAT_BUCKETS 4001
static uint64_t (*lat)[LAT_BUCKETS];
static uint64_t *lat_max_ns;

static inline uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void report_latency(void)
{
	uint64_t total = 0, max = 0;
	static uint64_t sum[LAT_BUCKETS];
	memset(sum, 0, sizeof(sum));
	for (int t = 0; t < nthreads; t++) {
		for (int b = 0; b < LAT_BUCKETS; b++) {
			sum[b] += lat[t][b];
			total += lat[t][b];
			lat[t][b] = 0;
		}
		if (lat_max_ns[t] > max)
			max = lat_max_ns[t];
		lat_max_ns[t] = 0;
	}
	double q[3] = { 0.5, 0.99, 0.999 }, v[3] = { 0, 0, 0 };
	for (int k = 0; k < 3; k++) {
		uint64_t want = (uint64_t)(q[k] * (double)total), acc = 0;
		for (int b = 0; b < LAT_BUCKETS; b++) {
			acc += sum[b];
			if (acc > want) {
				v[k] = b < LAT_BUCKETS - 1 ? (b + 1) * 0.25 : (double)max / 1000.0;
				break;
			}
		}
	}
	printf("lat n %llu p50 %.2f p99 %.2f p999 %.2f max %.1f\n", (unsigned long long)total, v[0], v[1], v[2],
	       (double)max / 1000.0);
	fflush(stdout);
}

static void *worker(void *arg)
{
	uint64_t id = (uint64_t)(uintptr_t)arg;
	uint64_t counter = 1;
	unsigned seed = (unsigned)id * 7919u + 1;
	size_t per = npages / nthreads, base = per * id;
	struct timespec ts = { 0, 0 };
	long batch = rate > 1000 ? rate / 1000 : 1;
	for (;;) {
		pthread_rwlock_rdlock(&park);
		for (long b = 0; b < batch; b++) {
			size_t i = base + (size_t)(rand_r(&seed) % per);
			uint64_t t0 = now_ns();
			stamp(i, id, counter++);
			uint64_t d = now_ns() - t0;
			lat[id][d / 250 < LAT_BUCKETS - 1 ? d / 250 : LAT_BUCKETS - 1]++;
			if (d > lat_max_ns[id])
				lat_max_ns[id] = d;
		}
		pthread_rwlock_unlock(&park);
		if (rate) {
			long ns = rate > 1000 ? 1000000 : 1000000000L / rate;
			ts.tv_sec = ns / 1000000000L;
			ts.tv_nsec = ns % 1000000000L;
			nanosleep(&ts, NULL);
		}
	}
	return NULL;
}

/* "check": every page consistent (workers parked meanwhile) */
static void check_all(void)
{
	pthread_rwlock_wrlock(&park);
	size_t bad = 0, first = 0;
	for (size_t i = 0; i < npages; i++)
		if (!check_page(i) && !bad++)
			first = i;
	if (bad)
		printf("BAD %zu pages, first %p\n", bad, (void *)(buf + first * PAGE));
	else
		printf("ok %zu\n", npages);
	fflush(stdout);
	pthread_rwlock_unlock(&park);
}

/* the "ctl" mode's command loop (see the head of this file); returns at end of input */
static void control(void)
{
	static uint64_t generation;
	char line[256];
	while (fgets(line, sizeof(line), stdin)) {
		unsigned long stride, offset;
		if (sscanf(line, "stamp %lu %lu", &stride, &offset) == 2 && stride > 0) {
			pthread_rwlock_wrlock(&park);
			generation++;
			size_t n = 0;
			for (size_t i = offset; i < npages; i += stride, n++)
				stamp(i, 0, generation);
			pthread_rwlock_unlock(&park);
			printf("stamped %zu\n", n);
		} else if (strncmp(line, "check", 5) == 0) {
			check_all();
		} else if (strncmp(line, "ping", 4) == 0) {
			printf("pong %llu\n", (unsigned long long)generation);
		} else {
			printf("error: unknown command\n");
		}
		fflush(stdout);
	}
}

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], 0, 0) : 64;
	nthreads = argc > 2 ? atoi(argv[2]) : 1;
	rate = argc > 3 ? atol(argv[3]) : 0;
	/* SIGUSR1 is taken by the main thread alone, with sigwait(): blocked before any thread
	 * exists, so that no worker can swallow it */
	sigset_t usr1;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	sigaddset(&usr1, SIGUSR2);
	pthread_sigmask(SIG_BLOCK, &usr1, NULL);
	/* the check must not starve behind workers that keep taking the read lock */
	pthread_rwlockattr_t ra;
	pthread_rwlockattr_init(&ra);
	pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&park, &ra);
	npages = mb * 256;
	buf = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) { perror("mmap"); return 1; }
	for (size_t i = 0; i < npages; i++)
		stamp(i, i * nthreads / npages, 0);
	int ctl = argc > 4 && strcmp(argv[4], "ctl") == 0;
	if (nthreads < (ctl ? 0 : 1) || nthreads > 256) { fprintf(stderr, "1 to 256 threads\n"); return 1; }
	lat = calloc((size_t)nthreads, sizeof(*lat));
	lat_max_ns = calloc((size_t)nthreads, sizeof(*lat_max_ns));
	pthread_t th[256];
	for (int t = 0; t < nthreads; t++)
		pthread_create(&th[t], NULL, worker, (void *)(uintptr_t)t);
	if (ctl) {
		printf("ready %d buf %p bytes %zu\n", getpid(), (void *)buf, npages * PAGE);
		fflush(stdout);
		control();
	} else {
		printf("ready %d\n", getpid());
		fflush(stdout);
	}
	for (;;) {
		int sig = 0;
		if (sigwait(&usr1, &sig) == 0 && sig == SIGUSR2) {
			report_latency();
		} else if (sig == SIGUSR1) {
			check_all();
		}
	}
}
