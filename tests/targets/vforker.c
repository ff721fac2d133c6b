/*
 * Test target: a thread that vfork()s and leaves its parent blocked. On SIGUSR2 a worker
 * thread calls vfork(); the child writes "vfork-child PID" and then sleeps (pause) forever,
 * neither running exec nor exiting, so the worker stays blocked in vfork (state D) until the
 * test kills the process group. The main thread keeps serving self-checks meanwhile, and a
 * second worker keeps writing pages of a private region of MB megabytes, every page of which
 * holds data (checked on SIGUSR1).
 *
 * usage: vforker [MB, default 16]
 */
#include "target.h"

static size_t npages;
static uint64_t *mem;
static uint64_t rounds;

static void *vforker(void *arg)
{
	(void)arg;
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGUSR2);
	int sig;
	while (sigwait(&s, &sig))
		;
	pid_t child = vfork();
	if (child == 0) {
		/* the vfork child: only async-signal-safe calls, on the parent's stack */
		char msg[64];
		int n = snprintf(msg, sizeof(msg), "vfork-child %d\n", (int)getpid());
		if (write(1, msg, (size_t)n) < 0)
			_exit(3);
		for (;;)
			pause();
	}
	fail("vfork returned in the parent (child %d)", (int)child);
	return NULL;
}

static void *writer(void *arg)
{
	(void)arg;
	for (;;) {
		step_begin();
		rounds++;
		for (size_t k = 0; k < 64; k++) {
			size_t i = mix(rounds * 64 + k) % npages;
			uint64_t *p = mem + i * (PAGE / 8);
			if (p[1] != p[0] * 7 + i)
				fail("page %zu inconsistent", i);
			p[0] = rounds;
			p[1] = rounds * 7 + i;
		}
		step_end();
		struct timespec ts = { 0, 2000000 };
		nanosleep(&ts, NULL);
	}
	return NULL;
}

static void full_check(void)
{
	for (size_t i = 0; i < npages; i++) {
		uint64_t *p = mem + i * (PAGE / 8);
		if (p[1] != p[0] * 7 + i) {
			fail("full check: page %zu inconsistent", i);
			return;
		}
	}
}

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], 0, 0) : 16;
	target_init();
	sigset_t s;
	sigemptyset(&s);
	sigaddset(&s, SIGUSR2);
	pthread_sigmask(SIG_BLOCK, &s, NULL);
	npages = mb * 256;
	mem = map_anon(npages * PAGE);
	for (size_t i = 0; i < npages; i++)
		mem[i * (PAGE / 8) + 1] = i;
	start_thread(vforker, NULL);
	start_thread(writer, NULL);
	serve(full_check);
}
