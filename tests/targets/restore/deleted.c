/*
 * Restore target: deleted files still mapped, a deleted working directory
 * (tests/test_longtail_memory.py).
 *
 *   deleted files DIR   DIR/a (5 pages and 2000 bytes) mapped shared read-write twice ("a1":
 *                       all of it, 6 pages, the last one past the end of the file; "a2": 3
 *                       pages at offset 1 page), shared read-only from a read-only fd ("aro"),
 *                       and private ("apriv": pages 1 and 2 written, copy-on-write); then
 *                       DIR/a is unlinked. DIR/sub/b (3 pages) mapped private ("bpriv", page 0
 *                       written), unlinked, and DIR/sub removed: its directory is gone. DIR/c
 *                       (2 pages) mapped shared ("cshared"), unlinked, and a new DIR/c made
 *                       (its name is taken). Every fd closed.
 *                       On SIGUSR2: checks every page (the file's pattern, what was written
 *                       since), that the two shared mappings of a and the read-only one are one
 *                       file (a write through a1 is seen in a2, aro and in apriv's pages it has
 *                       not copied), that each is still a deleted file of its size (fstat of
 *                       /proc/self/map_files: no link, st_size) and that /proc/self/maps says
 *                       " (deleted)"; writes one more page through a1; prints "ok files" or
 *                       what failed. Prints "region NAME ADDR" at start.
 *   deleted tree DIR    as files, then forks a child with the same mappings (inherited), which
 *                       answers SIGUSR2 too ("child ok files"); prints "child PID". The count of
 *                       writes through a1 is in shared memory: both know what the file holds.
 *   deleted cwd DIR     makes DIR/wd, enters it, removes it. On SIGUSR2: checks that the
 *                       working directory is a deleted one (getcwd fails with ENOENT, nothing
 *                       can be created in it, "." has no link) and that /proc/self/cwd ends in
 *                       " (deleted)"; prints "ok cwd".
 */
#include "rs.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define PG 4096
#define ASIZE (5 * PG + 2000)

static uint8_t *a1, *a2, *aro, *apriv, *bpriv, *cshared;
static int *genp;      /* how many times a1's page 3 was rewritten (shared with a child) */
static const char *who = "";

static uint8_t fbyte(int file, size_t off) { return (uint8_t)(rs_mix(file * 1000003ULL, off / 8) >> (8 * (off % 8))); }

static void fill(const char *path, int file, size_t size)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0640);
	if (fd < 0)
		rs_die(path);
	uint8_t *buf = malloc(size);
	for (size_t i = 0; i < size; i++)
		buf[i] = fbyte(file, i);
	if (write(fd, buf, size) != (ssize_t)size)
		rs_die("write");
	free(buf);
	close(fd);
}

static uint8_t *map(const char *path, int oflags, size_t len, int prot, int flags, off_t off)
{
	int fd = open(path, oflags);
	if (fd < 0)
		rs_die(path);
	uint8_t *p = mmap(NULL, len, prot, flags, fd, off);
	if (p == MAP_FAILED)
		rs_die("mmap");
	close(fd);
	return p;
}

/* the byte a's file holds at off, with the writes made through a1 */
static uint8_t a_now(size_t off)
{
	if (off >= 3 * PG && off < 4 * PG && *genp)
		return (uint8_t)(off + *genp);
	return fbyte(1, off);
}

static int check_deleted(uint8_t *at, off_t size, const char *what)
{
	char link[128], line[512];
	FILE *f = fopen("/proc/self/maps", "r");
	int ok = 0;
	while (f && fgets(line, sizeof(line), f)) {
		unsigned long lo, hi;
		if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo <= (unsigned long)(uintptr_t)at &&
		    (unsigned long)(uintptr_t)at < hi) {
			ok = strstr(line, " (deleted)\n") != NULL;
			snprintf(link, sizeof(link), "/proc/self/map_files/%lx-%lx", lo, hi);
		}
	}
	if (f)
		fclose(f);
	if (!ok) {
		printf("%sBAD %s not shown deleted in /proc/self/maps\n", who, what);
		return 0;
	}
	struct stat st;
	if (stat(link, &st) || st.st_nlink != 0 || st.st_size != size || !S_ISREG(st.st_mode)) {
		printf("%sBAD %s: not a deleted regular file of %lld bytes (links %ld, size %lld)\n", who, what,
		       (long long)size, (long)st.st_nlink, (long long)st.st_size);
		return 0;
	}
	return 1;
}

static int check_files(void)
{
	for (size_t off = 0; off < 6 * PG; off++) {
		uint8_t want = off < ASIZE ? a_now(off) : 0;
		if (a1[off] != want) {
			printf("%sBAD a1 byte %zu\n", who, off);
			return 0;
		}
	}
	for (size_t i = 0; i < 3 * PG; i++)
		if (a2[i] != a_now(PG + i)) {
			printf("%sBAD a2 byte %zu\n", who, i);
			return 0;
		}
	for (size_t i = 0; i < 4 * PG; i++)
		if (aro[i] != a_now(i)) {
			printf("%sBAD aro byte %zu\n", who, i);
			return 0;
		}
	for (size_t i = 0; i < 4 * PG; i++) {
		uint8_t want = (i >= PG && i < 3 * PG) ? (uint8_t)(i * 7 + 1) : a_now(i);
		if (apriv[i] != want) {
			printf("%sBAD apriv byte %zu\n", who, i);
			return 0;
		}
	}
	for (size_t i = 0; i < 3 * PG; i++) {
		uint8_t want = i < PG ? (uint8_t)(i * 5 + 3) : fbyte(2, i);
		if (bpriv[i] != want) {
			printf("%sBAD bpriv byte %zu\n", who, i);
			return 0;
		}
	}
	for (size_t i = 0; i < 2 * PG; i++)
		if (cshared[i] != fbyte(3, i)) {
			printf("%sBAD cshared byte %zu\n", who, i);
			return 0;
		}
	if (!check_deleted(a1, ASIZE, "a1") || !check_deleted(a2, ASIZE, "a2") || !check_deleted(aro, ASIZE, "aro") ||
	    !check_deleted(apriv, ASIZE, "apriv") || !check_deleted(bpriv, 3 * PG, "bpriv") ||
	    !check_deleted(cshared, 2 * PG, "cshared"))
		return 0;
	/* one file: a write through a1 shows in a2 and aro */
	++*genp;
	for (size_t off = 3 * PG; off < 4 * PG; off++)
		a1[off] = (uint8_t)(off + *genp);
	if (a2[2 * PG + 5] != a_now(3 * PG + 5) || aro[3 * PG + 5] != a_now(3 * PG + 5) ||
	    apriv[3 * PG + 5] != a_now(3 * PG + 5)) {
		printf("%sBAD a1, a2, aro and apriv are not one file\n", who);
		return 0;
	}
	return 1;
}

static int check_cwd(void)
{
	char buf[4096];
	if (getcwd(buf, sizeof(buf)) != NULL || errno != ENOENT) {
		printf("%sBAD getcwd: %s\n", who, getcwd(buf, sizeof(buf)) ? buf : strerror(errno));
		return 0;
	}
	struct stat st;
	if (stat(".", &st) || st.st_nlink != 0 || !S_ISDIR(st.st_mode)) {
		printf("%sBAD . is not a deleted directory\n", who);
		return 0;
	}
	if (open("x", O_CREAT | O_WRONLY, 0600) >= 0 || errno != ENOENT) {
		printf("%sBAD a file could be made in the deleted directory\n", who);
		return 0;
	}
	ssize_t n = readlink("/proc/self/cwd", buf, sizeof(buf) - 1);
	buf[n > 0 ? n : 0] = 0;
	if (n < 10 || strcmp(buf + n - 10, " (deleted)")) {
		printf("%sBAD /proc/self/cwd is %s\n", who, buf);
		return 0;
	}
	return 1;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: deleted files|tree|cwd DIR\n");
		return 2;
	}
	char a[4096], sub[4096], b[4096], c[4096];
	int tree = !strcmp(argv[1], "tree");
	int files = tree || !strcmp(argv[1], "files");
	genp = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (genp == MAP_FAILED)
		rs_die("mmap");
	snprintf(a, sizeof(a), "%s/a", argv[2]);
	snprintf(sub, sizeof(sub), "%s/sub", argv[2]);
	snprintf(b, sizeof(b), "%s/sub/b", argv[2]);
	snprintf(c, sizeof(c), "%s/c", argv[2]);
	if (files) {
		fill(a, 1, ASIZE);
		a1 = map(a, O_RDWR, 6 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, 0);
		a2 = map(a, O_RDWR, 3 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, PG);
		aro = map(a, O_RDONLY, 4 * PG, PROT_READ, MAP_SHARED, 0);
		apriv = map(a, O_RDONLY, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, 0);
		for (size_t i = PG; i < 3 * PG; i++)
			apriv[i] = (uint8_t)(i * 7 + 1);
		if (unlink(a))
			rs_die("unlink a");
		if (mkdir(sub, 0755))
			rs_die("mkdir sub");
		fill(b, 2, 3 * PG);
		bpriv = map(b, O_RDONLY, 3 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, 0);
		for (size_t i = 0; i < PG; i++)
			bpriv[i] = (uint8_t)(i * 5 + 3);
		if (unlink(b) || rmdir(sub))
			rs_die("unlink b");
		fill(c, 3, 2 * PG);
		cshared = map(c, O_RDWR, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, 0);
		if (unlink(c))
			rs_die("unlink c");
		fill(c, 4, 100);     /* a new file of that name */
	} else {
		char wd[4096];
		snprintf(wd, sizeof(wd), "%s/wd", argv[2]);
		if (mkdir(wd, 0751) || chdir(wd) || rmdir(wd))
			rs_die("cwd");
	}
	rs_init();
	if (files) {
		printf("region a1 %lx\nregion a2 %lx\nregion aro %lx\nregion apriv %lx\nregion bpriv %lx\nregion cshared %lx\n",
		       (unsigned long)(uintptr_t)a1, (unsigned long)(uintptr_t)a2, (unsigned long)(uintptr_t)aro,
		       (unsigned long)(uintptr_t)apriv, (unsigned long)(uintptr_t)bpriv, (unsigned long)(uintptr_t)cshared);
	}
	if (tree) {
		/* a child with the same mappings (inherited): it answers SIGUSR2 too, "child ok files" */
		fflush(stdout);
		pid_t c = fork();
		if (c < 0)
			rs_die("fork");
		if (c == 0)
			who = "child ";
		else
			printf("child %d\n", (int)c);
	}
	for (long seen = 0;; seen = rs_usr2_count) {
		while (rs_usr2_count == seen) {
			struct timespec ts = {0, 2000000};
			nanosleep(&ts, NULL);
		}
		if (files ? check_files() : check_cwd())
			printf("%sok %s\n", who, files ? "files" : "cwd");
	}
}
