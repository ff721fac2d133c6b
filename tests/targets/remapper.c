/*
 * Test target: the address space changes all the time. SLOTS regions are mapped, filled,
 * moved elsewhere with mremap(MREMAP_MAYMOVE|MREMAP_FIXED) (grown or shrunk on the way),
 * shrunk in place, rewritten and unmapped, in a loop; the content is checked after every
 * operation. Page content does not depend on the address, so a moved page must read exactly
 * as before. A BALLAST_MB region is rewritten a little every step, so that a dump has
 * something to stream. The full check (SIGUSR1) checks every region and the ballast.
 *
 * usage: remapper BALLAST_MB
 */
#include "target.h"

#define SLOTS 24
#define MAXPAGES 64

struct slot { uint8_t *p; size_t pages; uint64_t tag; };
static struct slot slots[SLOTS];
static uint64_t next_tag = 1;
static uint8_t *ballast;
static size_t ballast_pages;
static uint64_t *ballast_gen;

static uint64_t word(uint64_t tag, size_t pg, size_t k) { return mix(tag * 1000003u + pg * 4099u + k); }

static void fill(uint8_t *p, uint64_t tag, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++) {
		uint64_t *w = (uint64_t *)(p + i * PAGE);
		w[0] = tag;
		w[1] = i;
		for (size_t k = 2; k < PAGE / 8; k += 37)
			w[k] = word(tag, i, k);
	}
}

static int check(const char *what, uint8_t *p, uint64_t tag, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++) {
		uint64_t *w = (uint64_t *)(p + i * PAGE);
		if (w[0] != tag || w[1] != i) {
			fail("%s: page %zu at %p has (tag %llu, index %llu), expected (%llu, %zu)", what, i, (void *)w,
			     (unsigned long long)w[0], (unsigned long long)w[1], (unsigned long long)tag, i);
			return 0;
		}
		for (size_t k = 2; k < PAGE / 8; k += 37)
			if (w[k] != word(tag, i, k)) {
				fail("%s: page %zu at %p word %zu differs", what, i, (void *)w, k);
				return 0;
			}
	}
	return 1;
}

static int check_zero(const char *what, uint8_t *p, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++)
		for (size_t k = 0; k < PAGE / 8; k++)
			if (((uint64_t *)(p + i * PAGE))[k]) {
				fail("%s: page %zu at %p not zero", what, i, (void *)(p + i * PAGE));
				return 0;
			}
	return 1;
}

static void op(unsigned *seed)
{
	struct slot *s = &slots[rnd(seed) % SLOTS];
	size_t newpages = 1 + rnd(seed) % MAXPAGES;
	switch (rnd(seed) % 5) {
	case 0: { /* new mapping replaces the old one */
		uint8_t *q = map_anon(newpages * PAGE);
		uint64_t tag = next_tag++;
		fill(q, tag, 0, newpages);
		check("new mapping", q, tag, 0, newpages);
		if (s->p && munmap(s->p, s->pages * PAGE))
			fail("munmap: %s", strerror(errno));
		s->p = q, s->pages = newpages, s->tag = tag;
		break;
	}
	case 1:
	case 2: { /* move (growing or shrinking) onto a fresh placeholder: always a real move */
		void *ph = mmap(NULL, newpages * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (ph == MAP_FAILED)
			die("mmap placeholder");
		uint8_t *q = mremap(s->p, s->pages * PAGE, newpages * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, ph);
		if (q == MAP_FAILED) {
			fail("mremap move: %s", strerror(errno));
			munmap(ph, newpages * PAGE);
			break;
		}
		size_t keep = newpages < s->pages ? newpages : s->pages;
		check("moved mapping", q, s->tag, 0, keep);
		if (newpages > keep) {
			check_zero("grown tail of a moved mapping", q, keep, newpages);
			fill(q, s->tag, keep, newpages);
		}
		s->p = q, s->pages = newpages;
		break;
	}
	case 3: { /* shrink in place */
		if (s->pages < 2)
			break;
		size_t keep = 1 + rnd(seed) % (s->pages - 1);
		uint8_t *q = mremap(s->p, s->pages * PAGE, keep * PAGE, 0);
		if (q != s->p) {
			fail("mremap shrink: %s", strerror(errno));
			break;
		}
		s->pages = keep;
		check("shrunk mapping", q, s->tag, 0, keep);
		break;
	}
	case 4: { /* rewrite */
		uint64_t tag = next_tag++;
		fill(s->p, tag, 0, s->pages);
		s->tag = tag;
		check("rewritten mapping", s->p, tag, 0, s->pages);
		break;
	}
	}
}

static void ballast_step(unsigned *seed)
{
	for (int n = 0; n < 8; n++) {
		size_t i = rnd(seed) % ballast_pages;
		ballast_gen[i]++;
		fill(ballast + i * PAGE, ballast_gen[i], 0, 1);
	}
}

static void *worker(void *arg)
{
	(void)arg;
	unsigned seed = 4242;
	for (;;) {
		step_begin();
		op(&seed);
		ballast_step(&seed);
		step_end();
	}
	return NULL;
}

static void full_check(void)
{
	for (int i = 0; i < SLOTS; i++)
		if (!check("full check", slots[i].p, slots[i].tag, 0, slots[i].pages))
			return;
	for (size_t i = 0; i < ballast_pages; i++)
		if (!check("full check of the ballast", ballast + i * PAGE, ballast_gen[i], 0, 1))
			return;
}

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], 0, 0) : 64;
	target_init();
	ballast_pages = mb * 256;
	ballast = map_anon(ballast_pages * PAGE);
	ballast_gen = calloc(ballast_pages, sizeof(*ballast_gen));
	for (size_t i = 0; i < ballast_pages; i++) {
		ballast_gen[i] = 1;
		fill(ballast + i * PAGE, 1, 0, 1);
	}
	for (int i = 0; i < SLOTS; i++) {
		slots[i].pages = 1 + (size_t)i % MAXPAGES;
		slots[i].p = map_anon(slots[i].pages * PAGE);
		slots[i].tag = next_tag++;
		fill(slots[i].p, slots[i].tag, 0, slots[i].pages);
	}
	start_thread(worker, NULL);
	serve(full_check);
}
