/*
 * Test target: fork() in a loop. A step rewrites some pages of a SIZE_MB region, forks a
 * child that checks a sample of the memory it inherited (and writes to its copy), exits at
 * once with 0 or 1, and is reaped by the parent, which checks its status and then writes to
 * its own copy (copy-on-write breaks in the parent). Every page holds its address, a counter
 * and a checksum, so any page can be checked alone. The full check (SIGUSR1) checks all pages.
 *
 * usage: forker SIZE_MB
 */
#include "target.h"
#include <sys/wait.h>

static uint8_t *region;
static size_t npages;

struct hdr { uint64_t addr, counter, sum; };

static void stamp(size_t i, uint64_t counter)
{
	uint64_t *w = (uint64_t *)(region + i * PAGE);
	for (size_t k = 3; k < PAGE / 8; k += 29)
		w[k] = mix(counter ^ (k << 40));
	struct hdr *h = (struct hdr *)w;
	h->addr = (uint64_t)(uintptr_t)w;
	h->counter = counter;
	h->sum = mix(h->addr ^ counter);
}

static int page_ok(size_t i)
{
	uint64_t *w = (uint64_t *)(region + i * PAGE);
	struct hdr *h = (struct hdr *)w;
	if (h->addr != (uint64_t)(uintptr_t)w || h->sum != mix(h->addr ^ h->counter))
		return 0;
	for (size_t k = 3; k < PAGE / 8; k += 29)
		if (w[k] != mix(h->counter ^ (k << 40)))
			return 0;
	return 1;
}

static void *worker(void *arg)
{
	(void)arg;
	unsigned seed = 99;
	uint64_t counter = 1;
	for (;;) {
		step_begin();
		for (int n = 0; n < 16; n++)
			stamp(rnd(&seed) % npages, counter++);
		pid_t pid = fork();
		if (pid < 0) {
			fail("fork: %s", strerror(errno));
		} else if (pid == 0) {
			unsigned s2 = seed ^ 0x5555;
			int bad = 0;
			for (int n = 0; n < 256; n++) {
				size_t i = rnd(&s2) % npages;
				if (!page_ok(i))
					bad = 1;
				stamp(i, counter + n);   /* the child's own copy */
			}
			_exit(bad);
		} else {
			int st = 0;
			while (waitpid(pid, &st, 0) < 0)
				if (errno != EINTR) {
					fail("waitpid: %s", strerror(errno));
					break;
				}
			if (!WIFEXITED(st) || WEXITSTATUS(st))
				fail("child %d found bad memory or died (status %#x)", pid, st);
			for (int n = 0; n < 16; n++)
				stamp(rnd(&seed) % npages, counter++);
		}
		step_end();
	}
	return NULL;
}

static void full_check(void)
{
	for (size_t i = 0; i < npages; i++)
		if (!page_ok(i)) {
			fail("full check: page %zu at %p is inconsistent", i, (void *)(region + i * PAGE));
			return;
		}
}

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], 0, 0) : 64;
	target_init();
	npages = mb * 256;
	region = map_anon(npages * PAGE);
	for (size_t i = 0; i < npages; i++)
		stamp(i, 0);
	start_thread(worker, NULL);
	serve(full_check);
}
