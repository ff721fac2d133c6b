/*
 * A process tree working together: a parent and three children linked by pipes and shared
 * memory, all writing hard, each checking its own memory as it goes.
 *
 *   family MIB STEPS EVERY GATE LOG [ZOMBIE_AT]
 *
 * MIB MiB of shared anonymous memory (MAP_SHARED, inherited across fork) are split into four
 * slices, one per process; each process also has MIB/4 MiB of private memory. Step k of child
 * i: take token k from its command pipe, write k^page^i into one word of every page of its
 * shared slice and of its private memory (after checking that each still holds step k-1's
 * value), and send (i, k, hash) back on its report pipe. The parent keeps four tokens in
 * flight per child (so that the pipes hold data), takes one report per child per step in child
 * order, checks their sequence, folds them into a running hash and prints "step K hash H"
 * every EVERY steps; "done H" after STEPS. Any inconsistency prints "BAD ...".
 *
 * Links: child 1 makes its own session, child 2 its own process group, which child 3 joins.
 * Every process appends lines to LOG through one open file description inherited across fork
 * (one offset: lines would overwrite each other if it were not shared).
 * Before forking, the parent fills 4 MiB that all four only read afterwards (copy-on-write
 * pages they share, checked at every step).
 * Child 3 has SIGTERM as its parent-death signal, the parent is a child subreaper: each checks
 * at every step that it still is (else "BAD").
 * ZOMBIE_AT > 0: a fourth child exits with status 7 at once; the parent reaps it at that step
 * and prints "reaped zombie status 7".
 * GATE >= 0: the parent waits for SIGUSR2 before step GATE (rs.h).
 */
#include "rs.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#define NCHILD 3
#define PAGE 4096

struct report {
	int64_t child, step;
	uint64_t hash;
};

static size_t slice_pages;
static uint8_t *shared;
/* written by the parent before it forks, only read since: copy-on-write pages all four share */
#define HEIRLOOM_PAGES 1024
static uint64_t *heirloom;

static int heirloom_ok(long k)
{
	size_t p = (size_t)k % HEIRLOOM_PAGES;
	return heirloom[p * 512] == p * 0x9e3779b97f4a7c15ULL + 1;
}

static void logline(int fd, const char *fmt, long a, long b)
{
	char buf[128];
	int n = snprintf(buf, sizeof(buf), fmt, a, b);
	if (write(fd, buf, (size_t)n) != n)
		rs_die("write log");
}

static uint64_t work(int who, long k, uint8_t *priv, int *bad)
{
	uint64_t h = (uint64_t)who;
	uint8_t *sl = shared + (size_t)who * slice_pages * PAGE;
	for (size_t p = 0; p < slice_pages; p++) {
		uint64_t *ws = (uint64_t *)(sl + p * PAGE + (k % 64) * 8);
		uint64_t *wp = (uint64_t *)(priv + p * PAGE + 8);
		uint64_t want = (k > 1) ? (uint64_t)((k - 1) ^ (long)p ^ who) : 0;
		if (*wp != want || *(uint64_t *)(sl + p * PAGE) != want)
			*bad = 1;
		*ws = (uint64_t)(k ^ (long)p ^ who) * 31;
		*(uint64_t *)(sl + p * PAGE) = (uint64_t)(k ^ (long)p ^ who);
		*wp = (uint64_t)(k ^ (long)p ^ who);
		h = rs_mix(h, *ws);
	}
	return h;
}

int main(int argc, char **argv)
{
	if (argc < 6) {
		fprintf(stderr, "usage: family MIB STEPS EVERY GATE LOG [ZOMBIE_AT]\n");
		return 2;
	}
	long mib = atol(argv[1]), steps = atol(argv[2]), every = atol(argv[3]), gate = atol(argv[4]);
	long zombie_at = argc > 6 ? atol(argv[6]) : 0;
	int log = open(argv[5], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (log < 0)
		rs_die("open log");
	slice_pages = (size_t)mib * 1024 * 1024 / 4 / PAGE;
	shared = mmap(NULL, slice_pages * 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (shared == MAP_FAILED)
		rs_die("mmap shared");
	heirloom = mmap(NULL, HEIRLOOM_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (heirloom == MAP_FAILED)
		rs_die("mmap heirloom");
	for (size_t p = 0; p < HEIRLOOM_PAGES; p++)
		heirloom[p * 512] = p * 0x9e3779b97f4a7c15ULL + 1;
	int cmd[NCHILD][2], rep[NCHILD][2];
	if (prctl(PR_SET_CHILD_SUBREAPER, 1) < 0)
		rs_die("PR_SET_CHILD_SUBREAPER");
	pid_t kid[NCHILD];
	rs_init();
	for (int i = 0; i < NCHILD; i++) {
		if (pipe(cmd[i]) || pipe(rep[i]))
			rs_die("pipe");
		kid[i] = fork();
		if (kid[i] < 0)
			rs_die("fork");
		if (kid[i] == 0) {
			int who = i + 1;
			if (who == 1 && setsid() < 0)
				rs_die("setsid");
			if (who == 2 && setpgid(0, 0) < 0)
				rs_die("setpgid");
			if (who == 3 && prctl(PR_SET_PDEATHSIG, SIGTERM) < 0)
				rs_die("PR_SET_PDEATHSIG");
			for (int j = 0; j <= i; j++) {     /* the parent's ends, its own and its elders' */
				close(cmd[j][1]);
				close(rep[j][0]);
			}
			uint8_t *priv = mmap(NULL, slice_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (priv == MAP_FAILED)
				rs_die("mmap private");
			for (;;) {
				int64_t k;
				ssize_t n = read(cmd[i][0], &k, sizeof(k));
				if (n == 0)
					_exit(0);
				if (n != sizeof(k))
					rs_die("read token");
				int bad = !heirloom_ok(k);
				if (who == 3) {
					int sig = 0;
					if (prctl(PR_GET_PDEATHSIG, &sig) < 0 || sig != SIGTERM)
						bad = 1;
				}
				struct report r = {who, k, work(who, k, priv, &bad)};
				if (bad)
					r.child = -who;
				if (write(rep[i][1], &r, sizeof(r)) != sizeof(r))
					rs_die("write report");
				if (k % every == 0)
					logline(log, "child %ld step %ld\n", who, k);
			}
		}
		if (i == 1)
			setpgid(kid[1], kid[1]);   /* as the child does: whichever runs first */
		close(cmd[i][0]);
		close(rep[i][1]);
	}
	if (setpgid(kid[2], kid[1]) < 0)
		rs_die("setpgid child 3");
	pid_t zombie = 0;
	if (zombie_at > 0) {
		zombie = fork();
		if (zombie == 0)
			_exit(7);
	}
	printf("family %d %d %d\n", (int)kid[0], (int)kid[1], (int)kid[2]);
	uint8_t *priv = mmap(NULL, slice_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (priv == MAP_FAILED)
		rs_die("mmap private");
	uint64_t hash = 0x243f6a8885a308d3ULL;
	int64_t sent = 0;
	for (long k = 1; k <= steps; k++) {
		if (k == gate)
			rs_gate_sleep();
		while (sent < k + 4) {
			sent++;
			for (int i = 0; i < NCHILD; i++)
				if (write(cmd[i][1], &sent, sizeof(sent)) != sizeof(sent))
					rs_die("write token");
		}
		int bad = !heirloom_ok(k), reaper = 0;
		hash = rs_mix(hash, work(0, k, priv, &bad));
		if (prctl(PR_GET_CHILD_SUBREAPER, &reaper) < 0 || reaper != 1)
			printf("BAD parent is no longer a child subreaper at step %ld\n", k);
		if (bad)
			printf("BAD parent memory at step %ld\n", k);
		for (int i = 0; i < NCHILD; i++) {
			struct report r;
			if (read(rep[i][0], &r, sizeof(r)) != sizeof(r))
				rs_die("read report");
			if (r.child != i + 1 || r.step != k)
				printf("BAD report from child %d at step %ld: child %ld step %ld\n", i + 1, k, (long)r.child, (long)r.step);
			hash = rs_mix(hash, r.hash);
		}
		if (k == zombie_at) {
			int st;
			if (waitpid(zombie, &st, 0) != zombie)
				rs_die("waitpid zombie");
			printf("reaped zombie status %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st));
		}
		if (k % every == 0) {
			printf("step %ld hash %016llx\n", k, (unsigned long long)hash);
			logline(log, "parent step %ld%.0ld\n", k, 0L);
		}
	}
	for (int i = 0; i < NCHILD; i++)
		close(cmd[i][1]);
	for (int i = 0; i < NCHILD; i++) {
		int st;
		if (waitpid(kid[i], &st, 0) != kid[i] || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
			printf("BAD child %d ended with %d\n", i + 1, st);
	}
	printf("done %016llx\n", (unsigned long long)hash);
	return 0;
}
