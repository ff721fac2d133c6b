/*
 * Restore target: names that are not plain text. The process's name (comm) and an argument
 * hold bytes that are not UTF-8; it maps files in DIR whose names are awkward:
 *
 *   "a\nb"          a newline in the name (maps shows it as the four characters \012)
 *   "a\\012b"       a name that really holds backslash, 0, 1, 2 (shown the same way)
 *   "x (deleted)"   a file that exists, whose name ends like a deleted file's
 *   "bin-\xff\xfe"  bytes that are not UTF-8; also kept open as fd 5
 *   "gone"          mapped, written (copy-on-write), then unlinked: really deleted
 *   "gone2"         a second name of "keep2", mapped by that name, which is then unlinked
 *
 * Each file holds 4 pages of its own pattern; the private mappings of "a\nb" and "gone" have
 * page 1 written. After "ready" it prints "maps TAG=ADDR ..." (where each file is mapped), then
 * on each SIGUSR2 checks every mapping and prints "ok names" (or BAD ...).
 *
 * usage: names DIR ARG
 */
#include "rs.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/prctl.h>

#define NPG 4
#define NFILES 6
static const char *names[NFILES] = { "a\nb", "a\\012b", "x (deleted)", "bin-\xff\xfe", "gone", "keep2" };
static const char *tags[NFILES] = { "nl", "lit", "xdel", "bin", "gone", "gone2" };
static uint8_t *maps[NFILES];
static int written[NFILES] = { 1, 0, 0, 0, 1, 0 };

static uint8_t pattern(int f, size_t off, int cow) { return (uint8_t)(f * 31 + off * 7 + (off >> 12) + cow * 101); }

static void make_file(int dir, int f)
{
	int fd = openat(dir, names[f], O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	static uint8_t buf[NPG * 4096];
	if (fd < 0)
		rs_die("create");
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = pattern(f, i, 0);
	if (write(fd, buf, sizeof(buf)) != (ssize_t)sizeof(buf))
		rs_die("write");
	close(fd);
}

static int check(int f)
{
	for (size_t i = 0; i < NPG * 4096; i++) {
		int cow = written[f] && i / 4096 == 1;
		if (maps[f][i] != pattern(f, i, cow))
			return 0;
	}
	return 1;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: names DIR ARG\n");
		return 2;
	}
	prctl(PR_SET_NAME, "n\xff\xfe-ckpt", 0, 0, 0);
	rs_init();
	int dir = open(argv[1], O_DIRECTORY | O_RDONLY | O_CLOEXEC);
	if (dir < 0)
		rs_die("open DIR");
	for (int f = 0; f < NFILES; f++)
		make_file(dir, f);
	if (linkat(dir, "keep2", dir, "gone2", 0))
		rs_die("link");
	for (int f = 0; f < NFILES; f++) {
		const char *name = f == 5 ? "gone2" : names[f];
		int fd = openat(dir, name, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			rs_die("open");
		int shared = f == 3;
		maps[f] = mmap(NULL, NPG * 4096, PROT_READ | (written[f] ? PROT_WRITE : 0),
			       shared ? MAP_SHARED : MAP_PRIVATE, fd, 0);
		if (maps[f] == MAP_FAILED)
			rs_die("mmap");
		if (f == 3) {
			if (dup2(fd, 5) != 5)
				rs_die("dup2");
		}
		close(fd);
		if (written[f])
			for (size_t i = 4096; i < 8192; i++)
				maps[f][i] = pattern(f, i, 1);
	}
	if (unlinkat(dir, "gone", 0) || unlinkat(dir, "gone2", 0))
		rs_die("unlink");
	close(dir);
	printf("maps");
	for (int f = 0; f < NFILES; f++)
		printf(" %s=%p", tags[f], (void *)maps[f]);
	printf("\n");
	for (long seen = 0;; seen = rs_usr2_count) {
		while (rs_usr2_count == seen) {
			struct timespec ts = { 0, 2000000 };
			nanosleep(&ts, NULL);
		}
		int bad = -1;
		for (int f = 0; f < NFILES && bad < 0; f++)
			if (!check(f))
				bad = f;
		if (bad >= 0)
			printf("BAD mapping %s differs\n", tags[bad]);
		else
			printf("ok names\n");
	}
}
