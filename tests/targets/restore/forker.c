/*
 * A fork-heavy program: children created and reaped without pause.
 *
 *   forker MIB EVERY STEPS GATE
 *
 * The parent writes to MIB MiB of private memory, forks a child that reads and writes some of
 * it (copy-on-write) and exits with status i % 128, reaps it and checks that status. It prints
 * "forks I sum S" every EVERY children (S: a checksum of the memory the parent wrote) and
 * "done" after STEPS; "BAD ..." when a child's status or the memory is not what it should be.
 * GATE >= 0: waits for SIGUSR2 before child GATE (rs.h).
 */
#include "rs.h"
#include <sys/mman.h>
#include <sys/wait.h>

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: forker MIB EVERY STEPS GATE\n");
		return 2;
	}
	size_t pages = (size_t)atol(argv[1]) * 256;
	long every = atol(argv[2]), steps = atol(argv[3]), gate = atol(argv[4]);
	uint64_t *mem = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		rs_die("mmap");
	rs_init();
	uint64_t sum = 0;
	for (long i = 1; i <= steps; i++) {
		if (i == gate)
			rs_gate_sleep();
		size_t p = (size_t)(i * 7919) % pages;
		uint64_t *w = mem + p * 512;
		if (*w != (i > 1 ? (uint64_t)0 : 0) && *w != (uint64_t)(w[1]))
			printf("BAD memory at page %zu step %ld\n", p, i);
		w[0] = w[1] = (uint64_t)i;
		sum = rs_mix(sum, (uint64_t)i ^ p);
		pid_t c = fork();
		if (c < 0)
			rs_die("fork");
		if (c == 0) {
			uint64_t acc = 0;
			for (size_t q = 0; q < pages; q += 61)
				acc += mem[q * 512];
			mem[p * 512 + 2] = acc;
			_exit((int)(i % 128));
		}
		int st;
		if (waitpid(c, &st, 0) != c)
			rs_die("waitpid");
		if (!WIFEXITED(st) || WEXITSTATUS(st) != i % 128)
			printf("BAD child %ld ended with status %#x\n", i, st);
		if (i % every == 0)
			printf("forks %ld sum %016llx\n", i, (unsigned long long)sum);
	}
	printf("done\n");
	return 0;
}
