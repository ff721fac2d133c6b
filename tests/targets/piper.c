/*
 * Test target: the kernel writes into the target's memory. A feeder thread writes a stream of
 * 64-bit sequence numbers into a pipe; the reader thread read()s it straight into a SIZE_MB
 * buffer, CHUNK bytes at a time, cycling through the buffer, and checks every number it got.
 * The full check (SIGUSR1) checks that every chunk still holds the numbers it last received.
 *
 * usage: piper SIZE_MB
 */
#include "target.h"
#include <fcntl.h>

#define CHUNK (64 * 1024UL)
#define WORDS (CHUNK / 8)

static uint64_t *buf;
static size_t nchunks;
static uint64_t *first;   /* first sequence number held by each chunk, 0 = never filled */
static int pfd[2];

static void *feeder(void *arg)
{
	(void)arg;
	static uint64_t tmp[WORDS];
	uint64_t seq = 1;
	for (;;) {
		for (size_t i = 0; i < WORDS; i++)
			tmp[i] = seq++;
		size_t off = 0;
		while (off < CHUNK) {
			ssize_t n = write(pfd[1], (char *)tmp + off, CHUNK - off);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				fail("write to pipe: %s", strerror(errno));
				return NULL;
			}
			off += (size_t)n;
		}
	}
	return NULL;
}

static void *reader(void *arg)
{
	(void)arg;
	uint64_t expect = 1;
	for (size_t c = 0;; c = (c + 1) % nchunks) {
		step_begin();
		char *dst = (char *)(buf + c * WORDS);
		size_t off = 0;
		while (off < CHUNK) {
			ssize_t n = read(pfd[0], dst + off, CHUNK - off);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				fail("read from pipe returned %zd: %s", n, n ? strerror(errno) : "EOF");
				step_end();
				return NULL;
			}
			off += (size_t)n;
		}
		uint64_t *w = buf + c * WORDS;
		for (size_t i = 0; i < WORDS; i++)
			if (w[i] != expect + i) {
				fail("chunk %zu word %zu: read %llu, expected %llu", c, i,
				     (unsigned long long)w[i], (unsigned long long)(expect + i));
				break;
			}
		first[c] = expect;
		expect += WORDS;
		step_end();
	}
	return NULL;
}

static void full_check(void)
{
	for (size_t c = 0; c < nchunks; c++) {
		if (!first[c])
			continue;
		uint64_t *w = buf + c * WORDS;
		for (size_t i = 0; i < WORDS; i++)
			if (w[i] != first[c] + i) {
				fail("full check: chunk %zu word %zu holds %llu, expected %llu", c, i,
				     (unsigned long long)w[i], (unsigned long long)(first[c] + i));
				return;
			}
	}
}

int main(int argc, char **argv)
{
	size_t mb = argc > 1 ? strtoul(argv[1], 0, 0) : 32;
	target_init();
	nchunks = mb * (1 << 20) / CHUNK;
	buf = map_anon(nchunks * CHUNK);
	first = calloc(nchunks, sizeof(*first));
	if (pipe(pfd))
		die("pipe");
	fcntl(pfd[1], F_SETPIPE_SZ, 1 << 20);
	start_thread(feeder, NULL);
	start_thread(reader, NULL);
	serve(full_check);
}
