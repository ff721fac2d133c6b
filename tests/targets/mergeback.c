/*
 * Test target: a mapping moved away and back next to where it came from, so that the kernel
 * merges it into its old neighbour again. A SIZE_MB region B is followed by a small region S
 * that the kernel merged into B's VMA. In a loop S is moved away (mremap onto a placeholder),
 * and once a checkpointer has registered its new VMA for write-protect (seen as "uw" in
 * /proc/self/smaps; a short bounded wait, so that it also runs undumped) it is moved back onto
 * its old place, where it merges into B again. With userfaultfd registered this merge drops the
 * registration of the whole merged VMA, B included, while B's pages keep their write-protect
 * bits; B is then written. A checkpointer that registers B again must still see those writes.
 * Every page holds its address, a counter and a checksum. SIGUSR1: full check.
 *
 * usage: mergeback SIZE_MB
 */
#include "target.h"
#include <fcntl.h>

#define SPAGES 16
#define HOT 32

static uint8_t *B, *S;
static size_t bpages;

struct hdr { uint64_t addr, counter, sum; };

static void stamp(uint8_t *p, uint64_t counter)
{
	uint64_t *w = (uint64_t *)p;
	for (size_t k = 3; k < PAGE / 8; k += 41)
		w[k] = mix(counter ^ (k << 40));
	struct hdr *h = (struct hdr *)w;
	h->addr = (uint64_t)(uintptr_t)w;
	h->counter = counter;
	h->sum = mix(h->addr ^ counter);
}

static int page_ok(uint8_t *p)
{
	uint64_t *w = (uint64_t *)p;
	struct hdr *h = (struct hdr *)w;
	if (h->addr != (uint64_t)(uintptr_t)w || h->sum != mix(h->addr ^ h->counter))
		return 0;
	for (size_t k = 3; k < PAGE / 8; k += 41)
		if (w[k] != mix(h->counter ^ (k << 40)))
			return 0;
	return 1;
}

static int smaps_fd;    /* /proc/self/smaps, opened once: the fd table stays as it was */

/* is the VMA holding addr registered for uffd write-protect? */
static int registered(void *addr)
{
	static char buf[1 << 16];
	int found = 0, in = 0;
	ssize_t n;
	size_t have = 0;
	off_t off = 0;
	/* line-wise scan; lines are short, a carry-over buffer is enough */
	while ((n = pread(smaps_fd, buf + have, sizeof(buf) - 1 - have, off)) > 0) {
		off += n;
		have += (size_t)n;
		buf[have] = 0;
		char *line = buf, *nl;
		while ((nl = strchr(line, '\n'))) {
			*nl = 0;
			unsigned long lo, hi;
			if (line[0] != 'V' && sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' '))
				in = lo <= (unsigned long)(uintptr_t)addr && (unsigned long)(uintptr_t)addr < hi;
			else if (in && !strncmp(line, "VmFlags:", 8))
				return strstr(line, " uw") != NULL;
			line = nl + 1;
		}
		have = strlen(line);
		memmove(buf, line, have);
	}
	return found;
}

static void *worker(void *arg)
{
	(void)arg;
	unsigned seed = 31;
	uint64_t counter = 1;
	for (;;) {
		step_begin();
		void *ph = mmap(NULL, SPAGES * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (ph == MAP_FAILED)
			die("mmap placeholder");
		uint8_t *away = mremap(S, SPAGES * PAGE, SPAGES * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, ph);
		if (away == MAP_FAILED)
			die("mremap away");
		/* give a running checkpointer the chance to register the moved VMA (bounded; the
		 * full check waits meanwhile, as S is not where it looks) */
		for (int i = 0; i < 2000 && !registered(away); i++) {
			struct timespec ts = { 0, 1000000 };
			nanosleep(&ts, NULL);
		}
		if (mmap(S, SPAGES * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != S)
			die("mmap placeholder back");
		if (mremap(away, SPAGES * PAGE, SPAGES * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, S) != S)
			die("mremap back");
		for (size_t i = 0; i < SPAGES; i++)
			if (!page_ok(S + i * PAGE))
				fail("moved page %zu of S at %p is inconsistent", i, (void *)(S + i * PAGE));
		step_end();
		/* now write B (and S) for a while: the same hot pages again and again (written
		 * first while B is unregistered, they are the ones that keep stale bits), and a
		 * few others; long enough for a checkpointer to register B again meanwhile */
		for (int round = 0; round < 200; round++) {
			struct timespec ts = { 0, 1000000 };   /* about a quarter of a second in all */
			nanosleep(&ts, NULL);
			step_begin();
			for (size_t h = 0; h < HOT; h++) {
				uint8_t *p = B + ((h * 997) % bpages) * PAGE;
				if (!page_ok(p))
					fail("hot page of B at %p is inconsistent", (void *)p);
				stamp(p, counter++);
			}
			for (int n = 0; n < 8; n++) {
				size_t i = rnd(&seed) % bpages;
				uint8_t *p = B + i * PAGE;
				if (!page_ok(p))
					fail("page %zu of B at %p is inconsistent", i, (void *)p);
				stamp(p, counter++);
			}
			stamp(S + (rnd(&seed) % SPAGES) * PAGE, counter++);
			step_end();
		}
	}
	return NULL;
}

static void full_check(void)
{
	for (size_t i = 0; i < bpages; i++)
		if (!page_ok(B + i * PAGE)) {
			fail("full check: page %zu of B at %p is inconsistent", i, (void *)(B + i * PAGE));
			return;
		}
	for (size_t i = 0; i < SPAGES; i++)
		if (!page_ok(S + i * PAGE)) {
			fail("full check: page %zu of S at %p is inconsistent", i, (void *)(S + i * PAGE));
			return;
		}
}

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], 0, 0) : 64;
	target_init();
	smaps_fd = open("/proc/self/smaps", O_RDONLY | O_CLOEXEC);
	if (smaps_fd < 0)
		die("open /proc/self/smaps");
	bpages = mb * 256;
	/* reserve room for B and S together, so that S can sit right after B */
	uint8_t *res = mmap(NULL, (bpages + SPAGES) * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (res == MAP_FAILED)
		die("mmap reserve");
	B = mmap(res, bpages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	if (B != res)
		die("mmap B");
	for (size_t i = 0; i < bpages; i++)
		stamp(B + i * PAGE, 0);
	S = mmap(B + bpages * PAGE, SPAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	if (S != B + bpages * PAGE)
		die("mmap S");
	for (size_t i = 0; i < SPAGES; i++)
		stamp(S + i * PAGE, 0);
	start_thread(worker, NULL);
	serve(full_check);
}
