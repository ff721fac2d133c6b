/*
 * Restore target: every kind of mapping (tests/test_longtail_memory.py).
 *
 * Regions of NP pages, one per combination of backing (anonymous, file) x sharing (private,
 * shared) x final protection (none, r, w, rw, rx, rwx). Each is mapped read-write, pages 0, 1
 * and 3 are written with a pattern of their own (page 2 is never touched: zero for anonymous
 * memory, the file's content for a file), then it is mprotect'ed to its final protection.
 * The files are DIR/priv and DIR/shared, filled with a pattern, each region at an offset of
 * its own; both opened read-write. Besides:
 *   split   8 anonymous pages all written, then pages 2-3 PROT_NONE, 4-5 PROT_READ, 6-7 PROT_EXEC
 *   ro2     DIR/shared mapped a second time, shared, from a read-only fd (the same file in two
 *           access modes): mprotect to read-write must fail there with EACCES
 *   sparse  64 anonymous pages mprotect'ed PROT_NONE with pages 5 and 40 written before
 *
 * On SIGUSR2 it checks everything: the content of every page (read through /proc/self/mem,
 * which reads PROT_NONE pages too), each region's permissions in /proc/self/maps, and that each
 * region can be mprotect'ed read-write again (as the original could: the shared file mappings
 * came from a read-write fd) and back, except ro2 (EACCES); then it writes one more page of
 * every writable-again region, so that a second check would see the same. Prints "ok N
 * regions" or the first mismatch.
 *
 * It prints "regions" lines at start: "region NAME ADDR" for the test (VmFlags before/after).
 *
 * usage: memkinds DIR
 */
#include "rs.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define NP 4
#define PG 4096

struct region {
	char name[32];
	uint8_t *at;
	size_t pages;
	int file;       /* 0 anon, 1 private file, 2 shared file */
	int prot;
	off_t off;
	char perms[5];
	uint64_t written;       /* bitmask of pages written */
	uint32_t gen[64];       /* generation of each written page's pattern */
	struct region *mirror;  /* the region whose file pages this one shows (ro2) */
};

static struct region reg[64];
static int nreg;

static uint64_t word(const char *name, size_t page, uint32_t gen, size_t k)
{
	uint64_t h = 1469598103934665603ULL;
	for (const char *c = name; *c; c++)
		h = rs_mix(h, (uint8_t)*c);
	return rs_mix(rs_mix(h, page * 131 + gen), k) | 1;
}

static uint64_t file_word(off_t off, size_t k)
{
	return rs_mix(0x5eed0000ULL + (uint64_t)off, k) | 2;
}

static void fill_file(const char *path, size_t bytes)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		rs_die(path);
	uint64_t buf[PG / 8];
	for (off_t off = 0; off < (off_t)bytes; off += PG) {
		for (size_t k = 0; k < PG / 8; k++)
			buf[k] = file_word(off, k);
		if (pwrite(fd, buf, PG, off) != PG)
			rs_die("fill");
	}
	close(fd);
}

static void write_page(struct region *r, size_t p)
{
	uint64_t *w = (uint64_t *)(r->at + p * PG);
	r->gen[p]++;
	for (size_t k = 0; k < PG / 8; k++)
		w[k] = word(r->name, p, r->gen[p], k);
	r->written |= 1ull << p;
}

static void perms_of(char *o, int prot, int shared)
{
	o[0] = prot & PROT_READ ? 'r' : '-';
	o[1] = prot & PROT_WRITE ? 'w' : '-';
	o[2] = prot & PROT_EXEC ? 'x' : '-';
	o[3] = shared ? 's' : 'p';
	o[4] = 0;
}

static int prot_list[] = {PROT_NONE, PROT_READ, PROT_WRITE, PROT_READ | PROT_WRITE, PROT_READ | PROT_EXEC,
			  PROT_READ | PROT_WRITE | PROT_EXEC};
static const char *prot_names[] = {"none", "r", "w", "rw", "rx", "rwx"};

static int check_content(int fd)
{
	uint8_t page[PG], want[PG];
	for (int i = 0; i < nreg; i++) {
		struct region *r = &reg[i], *src = r->mirror ? r->mirror : r;
		for (size_t p = 0; p < r->pages; p++) {
			if (pread(fd, page, PG, (off_t)(uintptr_t)(r->at + p * PG)) != PG) {
				printf("BAD %s page %zu unreadable: %s\n", r->name, p, strerror(errno));
				return 1;
			}
			uint64_t *w = (uint64_t *)want;
			for (size_t k = 0; k < PG / 8; k++)
				w[k] = (src->written >> p) & 1 ? word(src->name, p, src->gen[p], k)
				       : r->file ? file_word(r->off + (off_t)(p * PG), k) : 0;
			if (memcmp(page, want, PG)) {
				printf("BAD %s page %zu differs\n", r->name, p);
				return 1;
			}
		}
	}
	return 0;
}

static int check(void)
{
	int fd = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		rs_die("/proc/self/mem");
	int bad = check_content(fd);
	close(fd);
	if (bad)
		return 1;
	/* permissions as /proc/self/maps shows them */
	for (int i = 0; i < nreg; i++) {
		struct region *r = &reg[i];
		FILE *f = fopen("/proc/self/maps", "r");
		char line[512];
		int found = 0;
		while (f && fgets(line, sizeof(line), f)) {
			unsigned long lo, hi;
			char perms[8];
			if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3)
				continue;
			if (lo <= (unsigned long)(uintptr_t)r->at && (unsigned long)(uintptr_t)r->at < hi) {
				found = 1;
				if (strcmp(perms, r->perms)) {
					printf("BAD %s perms %s, want %s\n", r->name, perms, r->perms);
					fclose(f);
					return 1;
				}
			}
		}
		if (f)
			fclose(f);
		if (!found) {
			printf("BAD %s not mapped\n", r->name);
			return 1;
		}
	}
	/* writable again as the original was, and one more page written */
	for (int i = 0; i < nreg; i++) {
		struct region *r = &reg[i];
		int rc = mprotect(r->at, r->pages * PG, PROT_READ | PROT_WRITE);
		if (!strcmp(r->name, "ro2")) {
			if (rc == 0 || errno != EACCES) {
				printf("BAD ro2 mprotect read-write: %s\n", rc ? strerror(errno) : "allowed");
				return 1;
			}
			continue;
		}
		if (rc) {
			printf("BAD %s mprotect read-write: %s\n", r->name, strerror(errno));
			return 1;
		}
		write_page(r, 1);
		if (mprotect(r->at, r->pages * PG, r->prot)) {
			printf("BAD %s mprotect back: %s\n", r->name, strerror(errno));
			return 1;
		}
	}
	return 0;
}

static struct region *add(const char *name, size_t pages, int file, int shared, int prot, off_t off)
{
	struct region *r = &reg[nreg++];
	snprintf(r->name, sizeof(r->name), "%s", name);
	r->pages = pages;
	r->file = file;
	r->prot = prot;
	r->off = off;
	perms_of(r->perms, prot, shared);
	return r;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: memkinds DIR\n");
		return 2;
	}
	char ppath[4096], spath[4096];
	snprintf(ppath, sizeof(ppath), "%s/priv", argv[1]);
	snprintf(spath, sizeof(spath), "%s/shared", argv[1]);
	size_t fbytes = 6 * NP * PG * 2;
	fill_file(ppath, fbytes);
	fill_file(spath, fbytes);
	int pfd = open(ppath, O_RDWR), sfd = open(spath, O_RDWR), rofd = open(spath, O_RDONLY);
	if (pfd < 0 || sfd < 0 || rofd < 0)
		rs_die("open");
	static const char *backs[] = {"anon", "file"};
	static const char *shares[] = {"private", "shared"};
	for (int b = 0; b < 2; b++)
		for (int s = 0; s < 2; s++)
			for (int p = 0; p < 6; p++) {
				char name[32];
				snprintf(name, sizeof(name), "%s-%s-%s", backs[b], shares[s], prot_names[p]);
				int file = b ? 1 + s : 0;
				off_t off = (off_t)p * NP * PG * 2;
				struct region *r = add(name, NP, file, s, prot_list[p], file ? off : 0);
				int flags = (s ? MAP_SHARED : MAP_PRIVATE) | (b ? 0 : MAP_ANONYMOUS);
				r->at = mmap(NULL, NP * PG, PROT_READ | PROT_WRITE, flags, b ? (s ? sfd : pfd) : -1, r->off);
				if (r->at == MAP_FAILED)
					rs_die(name);
				write_page(r, 0);
				write_page(r, 1);
				write_page(r, 3);
				if (mprotect(r->at, NP * PG, r->prot))
					rs_die("mprotect");
			}
	/* one anonymous mapping split by mprotect into four parts */
	uint8_t *sp = mmap(NULL, 8 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (sp == MAP_FAILED)
		rs_die("split");
	static const int sprot[] = {PROT_READ | PROT_WRITE, PROT_NONE, PROT_READ, PROT_EXEC};
	for (int q = 0; q < 4; q++) {
		char name[32];
		snprintf(name, sizeof(name), "split%d", q);
		struct region *r = add(name, 2, 0, 0, sprot[q], 0);
		r->at = sp + q * 2 * PG;
		write_page(r, 0);
		write_page(r, 1);
	}
	for (int q = 1; q < 4; q++)
		if (mprotect(sp + q * 2 * PG, 2 * PG, sprot[q]))
			rs_die("mprotect split");
	/* the shared file again, from a read-only fd */
	struct region *ro = add("ro2", NP, 2, 1, PROT_READ, 2 * NP * PG);
	ro->at = mmap(NULL, NP * PG, PROT_READ, MAP_SHARED, rofd, ro->off);
	if (ro->at == MAP_FAILED)
		rs_die("ro2");
	/* what ro2 sees: the pages the shared-rw region wrote in the file at that offset */
	for (int i = 0; i < nreg; i++)
		if (reg[i].file == 2 && reg[i].off == ro->off && &reg[i] != ro)
			ro->mirror = &reg[i];
	/* sparse PROT_NONE */
	struct region *sv = add("sparse", 64, 0, 0, PROT_NONE, 0);
	sv->at = mmap(NULL, 64 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (sv->at == MAP_FAILED)
		rs_die("sparse");
	write_page(sv, 5);
	write_page(sv, 40);
	mprotect(sv->at, 64 * PG, PROT_NONE);
	close(pfd);
	close(sfd);
	close(rofd);
	rs_init();
	for (int i = 0; i < nreg; i++)
		printf("region %s %lx\n", reg[i].name, (unsigned long)(uintptr_t)reg[i].at);
	for (long seen = 0;; seen = rs_usr2_count) {
		while (rs_usr2_count == seen) {
			struct timespec ts = {0, 2000000};
			nanosleep(&ts, NULL);
		}
		if (!check())
			printf("ok %d regions\n", nreg);
	}
}
