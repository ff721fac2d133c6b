/*
 * Test target: memory dropped with madvise(MADV_DONTNEED) and written again, in a loop.
 * THREADS threads each own every THREADS-th chunk of a SIZE_MB region. A step picks one of
 * its chunks, drops it (or half of it), checks that the dropped pages read as zero, and then
 * either rewrites it with a new generation or leaves it zero. The full check (SIGUSR1) checks
 * every chunk against the generation recorded for it (0 = must be all zero).
 *
 * usage: madviser SIZE_MB THREADS
 */
#include "target.h"

#define CHUNK_PAGES 16

static uint8_t *region;
static size_t nchunks;
static int nthreads;
static uint32_t *gen;        /* per chunk; 0 = all zero */

static uint64_t *page(size_t c, size_t i) { return (uint64_t *)(region + (c * CHUNK_PAGES + i) * PAGE); }

static void stamp(size_t c, uint32_t g)
{
	for (size_t i = 0; i < CHUNK_PAGES; i++) {
		uint64_t *w = page(c, i);
		w[0] = (uint64_t)(uintptr_t)w;
		w[1] = g;
		for (size_t k = 2; k < PAGE / 8; k += 31)
			w[k] = mix(((uint64_t)g << 32) ^ (c * CHUNK_PAGES + i) ^ (k << 48));
	}
}

static int check_chunk(size_t c, uint32_t g, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++) {
		uint64_t *w = page(c, i);
		if (!g) {
			for (size_t k = 0; k < PAGE / 8; k++)
				if (w[k]) {
					fail("chunk %zu page %zu: word %zu is %#llx, expected zero", c, i, k,
					     (unsigned long long)w[k]);
					return 0;
				}
			continue;
		}
		if (w[0] != (uint64_t)(uintptr_t)w || w[1] != g) {
			fail("chunk %zu page %zu: header (%#llx, %llu), expected (%p, %u)", c, i,
			     (unsigned long long)w[0], (unsigned long long)w[1], (void *)w, g);
			return 0;
		}
		for (size_t k = 2; k < PAGE / 8; k += 31)
			if (w[k] != mix(((uint64_t)g << 32) ^ (c * CHUNK_PAGES + i) ^ (k << 48))) {
				fail("chunk %zu page %zu word %zu differs (generation %u)", c, i, k, g);
				return 0;
			}
	}
	return 1;
}

static void *worker(void *arg)
{
	unsigned id = (unsigned)(uintptr_t)arg;
	unsigned seed = id * 7919u + 17;
	size_t mine = (nchunks - id + nthreads - 1) / nthreads;
	for (;;) {
		step_begin();
		size_t c = id + (size_t)nthreads * (rnd(&seed) % mine);
		int half = rnd(&seed) % 3 == 0;
		size_t n = half ? CHUNK_PAGES / 2 : CHUNK_PAGES;
		if (madvise(page(c, 0), n * PAGE, MADV_DONTNEED))
			fail("madvise: %s", strerror(errno));
		check_chunk(c, 0, 0, n);
		if (half)
			check_chunk(c, gen[c], n, CHUNK_PAGES);
		if (rnd(&seed) % 4 == 0 && !half) {
			gen[c] = 0;          /* leave it dropped */
		} else {
			uint32_t g = gen[c] + 1 + rnd(&seed) % 1000;
			stamp(c, g);
			gen[c] = g;
			check_chunk(c, g, 0, CHUNK_PAGES);
		}
		step_end();
	}
	return NULL;
}

static void full_check(void)
{
	for (size_t c = 0; c < nchunks; c++)
		if (!check_chunk(c, gen[c], 0, CHUNK_PAGES))
			return;
}

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], 0, 0) : 64;
	nthreads = argc > 2 ? atoi(argv[2]) : 2;
	target_init();
	nchunks = mb * 256 / CHUNK_PAGES;
	region = map_anon(nchunks * CHUNK_PAGES * PAGE);
	gen = calloc(nchunks, sizeof(*gen));
	for (size_t c = 0; c < nchunks; c++) {
		gen[c] = 1;
		stamp(c, 1);
	}
	for (int t = 0; t < nthreads; t++)
		start_thread(worker, (void *)(uintptr_t)t);
	serve(full_check);
}
