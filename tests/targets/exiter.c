/*
 * Test target: exits by itself as soon as a checkpointer has armed it. MB megabytes of private
 * memory hold data (so that round 0 has much to stream); a watcher thread reads, every
 * millisecond, the pagemap entry of one page of it that nobody writes, and when that page is
 * write-protected by userfaultfd (pagemap bit 57: the dump has armed the process and round 0
 * is starting) it waits DELAY_MS and ends the process: HOW = "kill" raises SIGKILL, "exit"
 * calls exit_group(0). THREADS workers keep writing a few pages each meanwhile.
 *
 * usage: exiter MB DELAY_MS HOW [THREADS, default 2]
 */
#include "target.h"
#include <fcntl.h>
#include <sys/syscall.h>

static size_t npages;
static uint8_t *mem;
static long delay_ms;
static int how_kill;

static void *watcher(void *arg)
{
	(void)arg;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0)
		die("open pagemap");
	uint64_t probe = (uint64_t)(uintptr_t)(mem + (npages - 1) * PAGE);
	for (;;) {
		uint64_t e = 0;
		if (pread(fd, &e, 8, (off_t)(probe / PAGE * 8)) != 8)
			die("pread pagemap");
		if (e & (1ULL << 57)) {
			struct timespec ts = { delay_ms / 1000, (delay_ms % 1000) * 1000000 };
			nanosleep(&ts, NULL);
			if (how_kill)
				raise(SIGKILL);
			syscall(SYS_exit_group, 0);
		}
		struct timespec ts = { 0, 1000000 };
		nanosleep(&ts, NULL);
	}
	return NULL;
}

static void *worker(void *arg)
{
	uint64_t seed = (uint64_t)(uintptr_t)arg, n = 0;
	for (;;) {
		step_begin();
		for (int k = 0; k < 16; k++) {
			size_t i = mix(seed + n++) % (npages - 1);
			((uint64_t *)(mem + i * PAGE))[1] = n;
		}
		step_end();
		struct timespec ts = { 0, 200000 };
		nanosleep(&ts, NULL);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 4)
		return 2;
	size_t mb = strtoul(argv[1], 0, 0);
	delay_ms = atol(argv[2]);
	how_kill = strcmp(argv[3], "kill") == 0;
	long threads = argc > 4 ? atol(argv[4]) : 2;
	target_init();
	npages = mb * 256;
	mem = map_anon(npages * PAGE);
	for (size_t i = 0; i < npages; i++)
		((uint64_t *)(mem + i * PAGE))[0] = mix(i) | 1;
	for (long t = 0; t < threads; t++)
		start_thread(worker, (void *)(uintptr_t)(t + 1));
	start_thread(watcher, NULL);
	serve(NULL);
}
