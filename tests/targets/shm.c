/*
 * Test target: shared memory written by a second process. The target maps a MAP_SHARED |
 * MAP_ANONYMOUS region and a memfd (MAP_SHARED) of SIZE_MB each, then forks a child that keeps
 * rewriting both: the region through its own (inherited) mapping, the memfd with pwrite().
 * Neither kind of write faults in the target, so write tracking cannot see them.
 *
 * Every page holds a sequence number (word 0, odd while the page is being written) and data
 * derived from it; the target's reader thread reads pages under this sequence lock and checks
 * them. The full check (SIGUSR1) checks every page of both and that the child is alive.
 * The target also writes a private region of its own. It keeps no memfd fd, only the mapping
 * (ckpt refuses fds that restore cannot rebuild yet, and a memfd is one).
 *
 * usage: shm SIZE_MB [PAGES_PER_MS written by the child, default 64]
 */
#include "target.h"
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sched.h>
#include <sys/wait.h>

static size_t npages;
static uint8_t *shanon, *shmfd, *priv;
static int memfd;
static pid_t child;
static long rate;

static uint64_t word(size_t page, uint64_t seq, size_t k) { return mix(page * 0x9e3779b97f4a7c15ULL + seq * 131 + k); }

static void fill_words(uint64_t *w, size_t page, uint64_t seq)
{
	for (size_t k = 1; k < PAGE / 8; k++)
		w[k] = word(page, seq, k);
}

/* the child: rewrite pages of both regions, forever */
static void writer(void)
{
	static uint64_t data[PAGE / 8];
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	uint8_t *mfd = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (mfd == MAP_FAILED)
		_exit(3);
	struct timespec ts = { 0, 1000000 };
	size_t i = 0;
	for (;;) {
		for (long b = 0; b < rate; b++, i = (i + 1) % npages) {
			/* shared anonymous: through our mapping */
			_Atomic uint64_t *seq = (_Atomic uint64_t *)(shanon + i * PAGE);
			uint64_t s = atomic_load(seq);
			atomic_store_explicit(seq, s + 1, memory_order_release);
			atomic_thread_fence(memory_order_seq_cst);
			fill_words((uint64_t *)(shanon + i * PAGE), i, s + 2);
			atomic_store_explicit(seq, s + 2, memory_order_release);
			/* memfd: sequence word through the mapping, data with pwrite() */
			seq = (_Atomic uint64_t *)(mfd + i * PAGE);
			s = atomic_load(seq);
			atomic_store_explicit(seq, s + 1, memory_order_release);
			atomic_thread_fence(memory_order_seq_cst);
			fill_words(data, i + npages, s + 2);
			if (pwrite(memfd, &data[1], PAGE - 8, (off_t)(i * PAGE + 8)) != (ssize_t)(PAGE - 8))
				_exit(4);
			atomic_thread_fence(memory_order_seq_cst);
			atomic_store_explicit(seq, s + 2, memory_order_release);
		}
		nanosleep(&ts, NULL);
		if (getppid() == 1)
			_exit(0);
	}
}

/* read one page under its sequence lock; 1 = checked, 0 = busy (try again), -1 = bad */
static int read_page(uint8_t *base, size_t i, size_t id)
{
	static __thread uint64_t copy[PAGE / 8];
	volatile uint64_t *w = (volatile uint64_t *)(base + i * PAGE);
	uint64_t s1 = atomic_load_explicit((_Atomic uint64_t *)w, memory_order_acquire);
	if (s1 & 1)
		return 0;
	for (size_t k = 1; k < PAGE / 8; k++)
		copy[k] = w[k];
	atomic_thread_fence(memory_order_acquire);
	uint64_t s2 = atomic_load_explicit((_Atomic uint64_t *)w, memory_order_relaxed);
	if (s1 != s2)
		return 0;
	for (size_t k = 1; k < PAGE / 8; k++)
		if (copy[k] != word(id, s1, k)) {
			fail("%s page %zu (seq %llu): word %zu differs", base == shanon ? "shared anonymous" : "memfd",
			     i, (unsigned long long)s1, k);
			return -1;
		}
	return 1;
}

static int check_page(uint8_t *base, size_t i, size_t id)
{
	/* the child may be descheduled in the middle of a page for a long while on a busy machine */
	time_t deadline = time(NULL) + 60;
	for (;;) {
		for (int tries = 0; tries < 1000; tries++) {
			int r = read_page(base, i, id);
			if (r)
				return r > 0;
		}
		if (time(NULL) > deadline)
			break;
		sched_yield();
	}
	fail("page %zu never stable", i);
	return 0;
}

static void *reader(void *arg)
{
	(void)arg;
	unsigned seed = 7;
	uint64_t c = 1;
	for (;;) {
		step_begin();
		for (int n = 0; n < 64; n++) {
			size_t i = rnd(&seed) % npages;
			check_page(shanon, i, i);
			check_page(shmfd, i, i + npages);
			/* and a private page of our own */
			uint64_t *p = (uint64_t *)(priv + i * PAGE);
			if (p[0] != p[1] * 3)
				fail("private page %zu inconsistent", i);
			p[1] = c++;
			p[0] = p[1] * 3;
		}
		step_end();
	}
	return NULL;
}

static void full_check(void)
{
	int st;
	if (waitpid(child, &st, WNOHANG) == child)
		fail("the writer child died (status %#x)", st);
	for (size_t i = 0; i < npages; i++) {
		if (!check_page(shanon, i, i) || !check_page(shmfd, i, i + npages))
			return;
		uint64_t *p = (uint64_t *)(priv + i * PAGE);
		if (p[0] != p[1] * 3) {
			fail("full check: private page %zu inconsistent", i);
			return;
		}
	}
}

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], 0, 0) : 16;
	rate = argc > 2 ? atol(argv[2]) : 64;
	target_init();
	npages = mb * 256;
	shanon = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (shanon == MAP_FAILED)
		die("mmap shared");
	memfd = (int)syscall(SYS_memfd_create, "ckpt-test", 0);
	if (memfd < 0 || ftruncate(memfd, (off_t)(npages * PAGE)))
		die("memfd");
	shmfd = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (shmfd == MAP_FAILED)
		die("mmap memfd");
	priv = map_anon(npages * PAGE);
	for (size_t i = 0; i < npages; i++) {
		((uint64_t *)(shanon + i * PAGE))[0] = 2;
		fill_words((uint64_t *)(shanon + i * PAGE), i, 2);
		((uint64_t *)(shmfd + i * PAGE))[0] = 2;
		fill_words((uint64_t *)(shmfd + i * PAGE), i + npages, 2);
	}
	child = fork();
	if (child < 0)
		die("fork");
	if (child == 0)
		writer();
	close(memfd);   /* the target keeps only the mapping; the child writes through its own fd */
	start_thread(reader, NULL);
	serve(full_check);
}
