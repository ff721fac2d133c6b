/*
 * Restore target: madvise, mlock and mseal state (tests/test_longtail_memory.py).
 *
 * Regions of 16 pages, each written with a pattern of its own, then given one state:
 *   dontfork wipeonfork dontdump hugepage nohugepage mergeable sequential random (madvise),
 *   combo (DONTDUMP + RANDOM + MERGEABLE), half (DONTFORK on its upper half only), locked
 *   (mlock), onfault (mlock2 MLOCK_ONFAULT), sealed (mseal, where the kernel has it), and
 *   fileseq: DIR/file mapped private with MADV_SEQUENTIAL.
 * Prints "region NAME ADDR" for each at start.
 *
 * On SIGUSR2: checks every region's content, then forks a child that checks what the flags
 * mean across fork: the dontfork regions (and half's upper half) are not mapped in it, the
 * wipeonfork region reads zero, the others are there with their content; it exits with the
 * number of failures. Prints "ok fork" or what failed.
 *
 * usage: madv DIR
 */
#include "rs.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define NP 16
#define PG 4096

#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif

struct region {
	const char *name;
	uint8_t *at;
	int file;
};

static struct region reg[32];
static int nreg;

static uint64_t word(const char *name, size_t page, size_t k)
{
	uint64_t h = 1469598103934665603ULL;
	for (const char *c = name; *c; c++)
		h = rs_mix(h, (uint8_t)*c);
	return rs_mix(rs_mix(h, page), k) | 1;
}

static uint64_t file_word(size_t page, size_t k) { return rs_mix(0xf11e0000ULL + page, k) | 2; }

static struct region *add(const char *name, int fd)
{
	struct region *r = &reg[nreg++];
	r->name = name;
	r->file = fd >= 0;
	r->at = mmap(NULL, NP * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | (fd >= 0 ? 0 : MAP_ANONYMOUS), fd, 0);
	if (r->at == MAP_FAILED)
		rs_die(name);
	/* file: half the pages written (copy-on-write), half the file's */
	for (size_t p = 0; p < NP; p++)
		if (!r->file || p % 2)
			for (size_t k = 0; k < PG / 8; k++)
				((uint64_t *)(r->at + p * PG))[k] = word(name, p, k);
	return r;
}

static int content_ok(struct region *r, size_t from, size_t to, int zero)
{
	for (size_t p = from; p < to; p++)
		for (size_t k = 0; k < PG / 8; k++) {
			uint64_t want = zero ? 0 : (r->file && !(p % 2)) ? file_word(p, k) : word(r->name, p, k);
			if (((uint64_t *)(r->at + p * PG))[k] != want)
				return 0;
		}
	return 1;
}

static int mapped(void *at)
{
	unsigned char v;
	return mincore(at, PG, &v) == 0;    /* ENOMEM: not mapped */
}

static int child_check(void)
{
	int bad = 0;
	for (int i = 0; i < nreg; i++) {
		struct region *r = &reg[i];
		if (!strcmp(r->name, "dontfork")) {
			bad += mapped(r->at);
		} else if (!strcmp(r->name, "half")) {
			bad += !mapped(r->at) || mapped(r->at + (NP / 2) * PG) || !content_ok(r, 0, NP / 2, 0);
		} else if (!strcmp(r->name, "wipeonfork")) {
			bad += !mapped(r->at) || !content_ok(r, 0, NP, 1);
		} else {
			bad += !mapped(r->at) || !content_ok(r, 0, NP, 0);
		}
	}
	return bad;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: madv DIR\n");
		return 2;
	}
	char path[4096];
	snprintf(path, sizeof(path), "%s/file", argv[1]);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		rs_die("open");
	for (size_t p = 0; p < NP; p++) {
		uint64_t buf[PG / 8];
		for (size_t k = 0; k < PG / 8; k++)
			buf[k] = file_word(p, k);
		if (pwrite(fd, buf, PG, (off_t)(p * PG)) != PG)
			rs_die("pwrite");
	}
	struct { const char *name; int advice; } adv[] = {
		{"dontfork", MADV_DONTFORK}, {"wipeonfork", MADV_WIPEONFORK}, {"dontdump", MADV_DONTDUMP},
		{"hugepage", MADV_HUGEPAGE}, {"nohugepage", MADV_NOHUGEPAGE}, {"mergeable", MADV_MERGEABLE},
		{"sequential", MADV_SEQUENTIAL}, {"random", MADV_RANDOM},
	};
	for (size_t i = 0; i < sizeof(adv) / sizeof(adv[0]); i++) {
		struct region *r = add(adv[i].name, -1);
		if (madvise(r->at, NP * PG, adv[i].advice))
			rs_die(adv[i].name);
	}
	struct region *r = add("combo", -1);
	if (madvise(r->at, NP * PG, MADV_DONTDUMP) || madvise(r->at, NP * PG, MADV_RANDOM) ||
	    madvise(r->at, NP * PG, MADV_MERGEABLE))
		rs_die("combo");
	r = add("half", -1);
	if (madvise(r->at + (NP / 2) * PG, (NP / 2) * PG, MADV_DONTFORK))
		rs_die("half");
	r = add("locked", -1);
	if (mlock(r->at, NP * PG))
		rs_die("mlock");
	r = add("onfault", -1);
	if (syscall(SYS_mlock2, r->at, NP * PG, 1 /* MLOCK_ONFAULT */))
		rs_die("mlock2");
	r = add("sealed", -1);
	if (syscall(462 /* mseal */, r->at, NP * PG, 0))
		nreg--;      /* no mseal on this kernel */
	r = add("fileseq", fd);
	if (madvise(r->at, NP * PG, MADV_SEQUENTIAL))
		rs_die("fileseq");
	close(fd);
	rs_init();
	for (int i = 0; i < nreg; i++)
		printf("region %s %lx\n", reg[i].name, (unsigned long)(uintptr_t)reg[i].at);
	for (long seen = 0;; seen = rs_usr2_count) {
		while (rs_usr2_count == seen) {
			struct timespec ts = {0, 2000000};
			nanosleep(&ts, NULL);
		}
		int bad = 0;
		for (int i = 0; i < nreg; i++)
			if (!content_ok(&reg[i], 0, NP, 0)) {
				printf("BAD %s content\n", reg[i].name);
				bad = 1;
				break;
			}
		if (bad)
			continue;
		fflush(stdout);
		pid_t c = fork();
		if (c < 0)
			rs_die("fork");
		if (c == 0)
			_exit(child_check());
		int st;
		if (waitpid(c, &st, 0) != c)
			rs_die("waitpid");
		if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
			printf("ok fork\n");
		else
			printf("BAD fork: %d failures (status %#x)\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1, st);
	}
}
