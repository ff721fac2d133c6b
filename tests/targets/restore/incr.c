/*
 * Restore target for incremental images (tests/test_incremental.py): memory changed a little
 * between dumps, with writes, new mappings, unmappings and MADV_DONTNEED.
 *
 *   incr MIB [auto]
 *
 * Phase 0 (at start): region A, MIB MiB of anonymous memory, every page written. Each later
 * phase runs once SIGUSR2 has been taken as many times as its number (or at once with
 * "auto"); before it, the target checks its memory against the checksum it recorded at the end
 * of the previous phase ("check K ok" or "check K BAD ..."); after it, it prints
 * "phase K sum S" (S: a hash of every byte of its regions).
 *   1: writes 10 pages of A, drops 8 (MADV_DONTNEED), maps B (64 pages) and writes half of it
 *   2: writes 10 pages of A, drops 4 it wrote in phase 1, unmaps B and maps C at B's address
 *      (64 pages, 8 written: the rest must read zero, not B's pages), unmaps A's last 16 pages
 *   3: writes 10 pages of A, drops 2, writes 4 pages of C
 *   4: writes pages everywhere again; then prints "done S" and exits 0.
 */
#include "rs.h"
#include <sys/mman.h>

#define PG 4096UL
#define BC 64UL

static uint8_t *A, *B, *C;
static size_t an;                 /* pages of A */
static uint64_t recorded;         /* checksum at the end of the last phase */
static int automatic;

static void fill(uint8_t *page, uint64_t seed)
{
	uint64_t *w = (uint64_t *)page;
	for (size_t k = 0; k < PG / 8; k++)
		w[k] = rs_mix(seed, k) | 1;
}

static uint64_t hash_region(uint64_t h, const uint8_t *p, size_t pages)
{
	const uint64_t *w = (const uint64_t *)p;
	for (size_t k = 0; k < pages * PG / 8; k++)
		h = (h ^ w[k]) * 0x100000001b3ULL;
	return rs_mix(h, pages);
}

static uint64_t checksum(void)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	h = hash_region(h, A, an);
	if (B)
		h = hash_region(h, B, BC);
	if (C)
		h = hash_region(h, C, BC);
	return h;
}

static void drop(uint8_t *p, size_t first, size_t n)
{
	if (madvise(p + first * PG, n * PG, MADV_DONTNEED))
		rs_die("madvise");
}

static void phase(int k)
{
	switch (k) {
	case 1:
		for (size_t i = 0; i < 10; i++)
			fill(A + i * 37 % an * PG, 100 + i);
		drop(A, 100, 8);
		B = mmap(NULL, BC * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (B == MAP_FAILED)
			rs_die("mmap B");
		for (size_t i = 0; i < BC / 2; i++)
			fill(B + i * PG, 200 + i);
		break;
	case 2:
		for (size_t i = 0; i < 10; i++)
			fill(A + (i * 53 + 7) % an * PG, 300 + i);
		drop(A, 0, 1);
		drop(A, 37, 1);
		drop(A, 74, 2);
		C = B;
		if (munmap(B, BC * PG))
			rs_die("munmap B");
		B = NULL;
		if (mmap(C, BC * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != C)
			rs_die("mmap C");
		for (size_t i = 40; i < 48; i++)
			fill(C + i * PG, 400 + i);
		if (munmap(A + (an - 16) * PG, 16 * PG))
			rs_die("munmap A");
		an -= 16;
		break;
	case 3:
		for (size_t i = 0; i < 10; i++)
			fill(A + (i * 71 + 11) % an * PG, 500 + i);
		drop(A, 200, 2);
		for (size_t i = 0; i < 4; i++)
			fill(C + i * PG, 600 + i);
		break;
	case 4:
		for (size_t i = 0; i < an; i += 9)
			fill(A + i * PG, 700 + i);
		for (size_t i = 0; i < BC; i += 5)
			fill(C + i * PG, 800 + i);
		break;
	}
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: incr MIB [auto]\n");
		return 2;
	}
	an = (size_t)atol(argv[1]) * 256;
	automatic = argc > 2 && strcmp(argv[2], "auto") == 0;
	rs_init();
	A = mmap(NULL, an * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (A == MAP_FAILED)
		rs_die("mmap A");
	for (size_t i = 0; i < an; i++)
		fill(A + i * PG, i);
	recorded = checksum();
	printf("phase 0 sum %016llx\n", (unsigned long long)recorded);
	for (int k = 1; k <= 4; k++) {
		while (!automatic && rs_usr2_count < k) {
			struct timespec ts = {0, 2000000};
			nanosleep(&ts, NULL);
		}
		uint64_t now = checksum();
		if (now == recorded)
			printf("check %d ok\n", k - 1);
		else
			printf("check %d BAD %016llx != %016llx\n", k - 1, (unsigned long long)now,
			       (unsigned long long)recorded);
		phase(k);
		recorded = checksum();
		printf("phase %d sum %016llx\n", k, (unsigned long long)recorded);
	}
	printf("done %016llx\n", (unsigned long long)recorded);
	return 0;
}
