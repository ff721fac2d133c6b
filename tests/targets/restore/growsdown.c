/*
 * Restore target: a stack grown by hand (tests/test_longtail_memory.py).
 *
 * A MAP_GROWSDOWN mapping of 4 pages, at a fixed address with nothing mapped far below it. Its pages are written,
 * then it is grown page by page (a write just below its start, as a stack pushed past its end
 * grows it) by 12 pages, those written too. Besides, a coroutine runs on a second growsdown
 * stack (swapcontext): it recurses deeper each time it is resumed, growing its stack.
 * Prints "region grown ADDR" and "region costack ADDR" at start (the mapping's start then).
 *
 * On SIGUSR2: checks the content of every page it wrote, grows the mapping by 8 more pages
 * (written and checked), resumes the coroutine (deeper recursion, its checksums checked), and
 * prints "ok PAGES pages, depth D" (PAGES: how many pages the grown mapping has now).
 *
 * usage: growsdown
 */
#include "rs.h"
#include <sys/mman.h>
#include <ucontext.h>

#define PG 4096

static uint8_t *top;            /* end of the grown mapping */
static size_t pages;            /* pages it has (written) */

static uint64_t word(size_t page, size_t k) { return rs_mix(0x57ac0000ULL + page, k) | 1; }

static void write_page(size_t p)     /* page p counted down from the top */
{
	uint64_t *w = (uint64_t *)(top - (p + 1) * PG);
	for (size_t k = 0; k < PG / 8; k++)
		w[k] = word(p, k);
}

static int check_pages(void)
{
	for (size_t p = 0; p < pages; p++) {
		uint64_t *w = (uint64_t *)(top - (p + 1) * PG);
		for (size_t k = 0; k < PG / 8; k++)
			if (w[k] != word(p, k))
				return 0;
	}
	return 1;
}

static void grow(size_t n)
{
	for (size_t i = 0; i < n; i++) {
		write_page(pages);      /* below the start: the mapping grows to take it */
		pages++;
	}
}

static ucontext_t main_ctx, co_ctx;
static int depth;
static uint64_t co_sum;

static uint64_t recurse(int n, uint64_t seed)
{
	volatile uint8_t frame[1024];     /* a kilobyte of stack per level */
	for (size_t i = 0; i < sizeof(frame); i++)
		frame[i] = (uint8_t)(seed + i + n);
	if (n == 0) {
		swapcontext(&co_ctx, &main_ctx);     /* back to main, this deep */
		uint64_t h = 0;
		for (size_t i = 0; i < sizeof(frame); i++)
			h = rs_mix(h, frame[i]);
		return h;
	}
	uint64_t h = recurse(n - 1, rs_mix(seed, n));
	for (size_t i = 0; i < sizeof(frame); i++)
		if (frame[i] != (uint8_t)(seed + i + n))
			return 0;        /* a frame damaged */
	return rs_mix(h, seed);
}

static void coroutine(void)
{
	for (;;) {        /* each round 48 levels (some 50 KiB) deeper than the last */
		depth += 48;
		co_sum = recurse(depth, 12345);     /* back to main at the bottom of each round */
	}
}

static uint64_t expect_sum(int d)
{
	/* what recurse(d, 12345) returns when nothing is damaged, computed on the main stack
	   with the same arithmetic */
	uint64_t seeds[4096];
	uint64_t s = 12345;
	for (int n = d; n >= 0; n--) {
		seeds[n] = s;
		s = rs_mix(s, n);
	}
	uint64_t h = 0;
	for (size_t i = 0; i < 1024; i++)
		h = rs_mix(h, (uint8_t)(seeds[0] + i + 0));
	for (int n = 1; n <= d; n++)
		h = rs_mix(h, seeds[n]);
	return h;
}

static uint8_t *growsdown_map(uintptr_t at, size_t npages)
{
	/* at a fixed address far from the others, with GAP free below it to grow into */
	uint8_t *p = mmap((void *)at, npages * PG, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN | MAP_FIXED_NOREPLACE, -1, 0);
	if (p == MAP_FAILED)
		rs_die("mmap MAP_GROWSDOWN");
	return p;
}

int main(void)
{
	uint8_t *at = growsdown_map(0x300000000000UL, 4);
	top = at + 4 * PG;
	for (pages = 0; pages < 4;)
		write_page(pages++);
	grow(12);
	/* the coroutine's stack: 1 page, grown as it recurses */
	uint8_t *co = growsdown_map(0x310000000000UL, 1);
	getcontext(&co_ctx);
	co_ctx.uc_stack.ss_sp = co;
	co_ctx.uc_stack.ss_size = PG;
	co_ctx.uc_link = NULL;
	makecontext(&co_ctx, coroutine, 0);
	swapcontext(&main_ctx, &co_ctx);
	rs_init();
	printf("region grown %lx\n", (unsigned long)(uintptr_t)(top - pages * PG));
	printf("region costack %lx\n", (unsigned long)(uintptr_t)co);
	for (long seen = 0;; seen = rs_usr2_count) {
		while (rs_usr2_count == seen) {
			struct timespec ts = {0, 2000000};
			nanosleep(&ts, NULL);
		}
		if (!check_pages()) {
			printf("BAD grown content\n");
			continue;
		}
		grow(8);
		if (!check_pages()) {
			printf("BAD grown content after growing\n");
			continue;
		}
		int was = depth;
		swapcontext(&main_ctx, &co_ctx);     /* the coroutine finishes its round, recurses deeper */
		if (co_sum != expect_sum(was)) {
			printf("BAD coroutine sum at depth %d\n", was);
			continue;
		}
		printf("ok %zu pages, depth %d\n", pages, depth);
	}
}
