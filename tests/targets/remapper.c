/*
 * Test target: the address space changes all the time. SLOTS regions are mapped, filled,
 * moved elsewhere with mremap(MREMAP_MAYMOVE|MREMAP_FIXED) (grown or shrunk on the way),
 * shrunk in place, rewritten, unmapped, and replaced in place (MAP_FIXED over the same
 * addresses) by a fresh anonymous mapping left untouched (it must read as zero although pages
 * of the earlier mapping were there) or by a private mapping of a file (it must read as the
 * file), in a loop; the content is checked after every operation. Page content does not
 * depend on the address, so a moved page must read exactly as before. A BALLAST_MB region is
 * rewritten a little every step, so that a dump has something to stream. The full check
 * (SIGUSR1) checks every region and the ballast.
 *
 * usage: remapper BALLAST_MB
 */
#include "target.h"
#include <fcntl.h>
#include <sys/stat.h>

#define SLOTS 24
#define MAXPAGES 64

enum content { PATTERN, ZERO, FILEDATA };
struct slot {
	uint8_t *p;
	size_t pages;
	uint64_t tag;          /* PATTERN: the pattern's tag */
	enum content content;
	int filebacked;        /* a file mapping (even once rewritten) must not grow past the file */
};
static struct slot slots[SLOTS];
static uint64_t next_tag = 1;
static uint8_t *ballast;
static size_t ballast_pages;
static uint64_t *ballast_gen;
static int file_fd;            /* our own executable, kept open from the start */
static size_t file_pages;
static uint8_t *file_copy;     /* its first file_pages pages */

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

static int check_file(const char *what, uint8_t *p, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++)
		if (memcmp(p + i * PAGE, file_copy + i * PAGE, PAGE)) {
			fail("%s: page %zu at %p differs from the file", what, i, (void *)(p + i * PAGE));
			return 0;
		}
	return 1;
}

static int check_slot(const char *what, struct slot *s, size_t from, size_t to)
{
	switch (s->content) {
	case PATTERN: return check(what, s->p, s->tag, from, to);
	case ZERO: return check_zero(what, s->p, from, to);
	case FILEDATA: return check_file(what, s->p, from, to);
	}
	return 0;
}

static void op(unsigned *seed)
{
	struct slot *s = &slots[rnd(seed) % SLOTS];
	size_t newpages = 1 + rnd(seed) % MAXPAGES;
	switch (rnd(seed) % 7) {
	case 0: { /* new mapping replaces the old one */
		uint8_t *q = map_anon(newpages * PAGE);
		uint64_t tag = next_tag++;
		fill(q, tag, 0, newpages);
		check("new mapping", q, tag, 0, newpages);
		if (s->p && munmap(s->p, s->pages * PAGE))
			fail("munmap: %s", strerror(errno));
		s->p = q, s->pages = newpages, s->tag = tag, s->content = PATTERN, s->filebacked = 0;
		break;
	}
	case 1:
	case 2: { /* move (growing or shrinking) onto a fresh placeholder: always a real move */
		if (s->filebacked && newpages > s->pages)
			newpages = s->pages;
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
		s->p = q;
		check_slot("moved mapping", s, 0, keep);
		if (newpages > keep) {
			check_zero("grown tail of a moved mapping", q, keep, newpages);
			if (s->content == PATTERN)
				fill(q, s->tag, keep, newpages);
		}
		s->pages = newpages;
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
		check_slot("shrunk mapping", s, 0, keep);
		break;
	}
	case 4: { /* rewrite */
		uint64_t tag = next_tag++;
		fill(s->p, tag, 0, s->pages);
		s->tag = tag, s->content = PATTERN;
		check("rewritten mapping", s->p, tag, 0, s->pages);
		break;
	}
	case 5: { /* a fresh mapping in place of the old one, left untouched: it reads as zero */
		uint8_t *q = mmap(s->p, s->pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
		if (q != s->p)
			die("mmap MAP_FIXED");
		s->content = ZERO, s->filebacked = 0;
		break;      /* not read now: its pages stay absent until someone looks */
	}
	case 6: { /* a private mapping of a file in place of the old one: it reads as the file */
		size_t n = s->pages < file_pages ? s->pages : file_pages;
		if (n < s->pages && munmap(s->p + n * PAGE, (s->pages - n) * PAGE))
			fail("munmap tail: %s", strerror(errno));
		uint8_t *q = mmap(s->p, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, file_fd, 0);
		if (q != s->p)
			die("mmap file MAP_FIXED");
		s->pages = n, s->content = FILEDATA, s->filebacked = 1;
		if (rnd(seed) % 2)
			check_file("file mapping", q, 0, n);
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
		if (!check_slot("full check", &slots[i], 0, slots[i].pages))
			return;
	for (size_t i = 0; i < ballast_pages; i++)
		if (!check("full check of the ballast", ballast + i * PAGE, ballast_gen[i], 0, 1))
			return;
}

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], 0, 0) : 64;
	target_init();
	file_fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (file_fd < 0 || fstat(file_fd, &st))
		die("open /proc/self/exe");
	file_pages = (size_t)st.st_size / PAGE;
	if (file_pages < 2)
		die("executable too small");
	file_copy = malloc(file_pages * PAGE);
	if (pread(file_fd, file_copy, file_pages * PAGE, 0) != (ssize_t)(file_pages * PAGE))
		die("pread");
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
		slots[i].content = PATTERN;
		fill(slots[i].p, slots[i].tag, 0, slots[i].pages);
	}
	start_thread(worker, NULL);
	serve(full_check);
}
