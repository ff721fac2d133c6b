/*
 * Restore target: sparse shared memory. Three regions of MB megabytes each: MAP_SHARED |
 * MAP_ANONYMOUS | MAP_NORESERVE memory, a memfd mapped MAP_SHARED (the fd closed), and a SysV
 * segment (removed, still attached). In each, only PAGES pages, spread evenly, are ever written
 * (with a pattern of their own); the rest is never touched, so it is not even allocated.
 *
 * On SIGUSR2 the target checks every page it wrote (a page it never wrote is not read: reading
 * it would allocate it) and prints "ok PAGES pages, A+B+C kB resident" where A, B and C are
 * what its own /proc/self/smaps says of the three regions. Restored, it must print the same
 * line: the same pages, and nothing more resident than before.
 *
 * usage: sparseshm MB PAGES
 */
#include "rs.h"
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/syscall.h>

#define NREG 3
static uint8_t *region[NREG];
static size_t npages, nwritten, stride;

static uint64_t word(int r, size_t page, size_t k) { return rs_mix(page * 0x9e3779b97f4a7c15ULL + r, k) | 1; }

static long resident_kb(uint8_t *at)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[512];
	int in = 0;
	long kb = -1;
	if (!f)
		rs_die("smaps");
	while (fgets(line, sizeof(line), f)) {
		unsigned long lo, hi;
		if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2)
			in = lo == (unsigned long)(uintptr_t)at;
		else if (in && sscanf(line, "Rss: %ld kB", &kb) == 1)
			break;
	}
	fclose(f);
	return kb;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: sparseshm MB PAGES\n");
		return 2;
	}
	size_t bytes = (size_t)atol(argv[1]) << 20;
	npages = bytes / 4096;
	nwritten = (size_t)atol(argv[2]);
	stride = npages / nwritten;
	region[0] = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	int mfd = (int)syscall(SYS_memfd_create, "ckpt-sparse", 1 /* MFD_CLOEXEC */);
	if (mfd < 0 || ftruncate(mfd, (off_t)bytes))
		rs_die("memfd");
	region[1] = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, mfd, 0);
	close(mfd);
	int id = shmget(IPC_PRIVATE, bytes, IPC_CREAT | SHM_NORESERVE | 0600);
	if (id < 0)
		rs_die("shmget");
	region[2] = shmat(id, NULL, 0);
	shmctl(id, IPC_RMID, NULL);
	if (region[0] == MAP_FAILED || region[1] == MAP_FAILED || region[2] == (void *)-1)
		rs_die("mmap");
	for (int r = 0; r < NREG; r++)
		for (size_t i = 0; i < nwritten; i++) {
			uint64_t *w = (uint64_t *)(region[r] + i * stride * 4096);
			for (size_t k = 0; k < 512; k++)
				w[k] = word(r, i, k);
		}
	rs_init();
	for (long seen = 0;; seen = rs_usr2_count) {
		while (rs_usr2_count == seen) {
			struct timespec ts = { 0, 2000000 };
			nanosleep(&ts, NULL);
		}
		size_t bad = 0;
		for (int r = 0; r < NREG; r++)
			for (size_t i = 0; i < nwritten; i++) {
				uint64_t *w = (uint64_t *)(region[r] + i * stride * 4096);
				for (size_t k = 0; k < 512; k++)
					if (w[k] != word(r, i, k)) {
						bad++;
						break;
					}
			}
		if (bad)
			printf("BAD %zu pages differ\n", bad);
		else
			printf("ok %zu pages, %ld+%ld+%ld kB resident\n", nwritten, resident_kb(region[0]),
			       resident_kb(region[1]), resident_kb(region[2]));
	}
}
