/*
 * FIFOs opened by path, checked by the processes themselves (issue 10).
 *
 *   fifo tree PATH   a parent writing and its child reading through the FIFO PATH (made here)
 *   fifo gone PATH   the same, the FIFO unlinked once both have it open
 *   fifo out PATH    a writer alone; the FIFO (made by the caller) is read by a process outside
 *
 * tree/gone: the parent writes 3000 bytes the child does not read before the gate (they are
 * buffered in the FIFO at the dump). After the gate the parent writes 1000 more bytes, and (tree)
 * opens PATH again for writing (O_NONBLOCK: ENXIO unless a reader has the FIFO open, the child)
 * and writes 1000 more through it, closes its ends; the child reads to the end and checks every
 * byte: byte i of the stream is (i * 7 + 3) & 0xff. Prints "ok child N" (N bytes read in order),
 * "ok parent" or "BAD ...".
 * out: writes "before\n" before the gate, "after\n" after it; prints "ok out".
 * First lines "ready PID", "set up"; last line "done" (the parent's, after its child's).
 */
#include "rs.h"
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>

#define AT_DUMP 3000
#define AFTER 1000

static unsigned char pat(long i)
{
	return (unsigned char)((i * 7 + 3) & 0xff);
}

static long sent;

static int put(int fd, long n)
{
	unsigned char buf[4096];
	for (long k = 0; k < n; k++)
		buf[k] = pat(sent + k);
	if (write(fd, buf, (size_t)n) != n)
		return -1;
	sent += n;
	return 0;
}

static void on_alarm(int sig)
{
	(void)sig;
	if (write(1, "BAD stuck\n", 10) < 0)
		_exit(4);
	_exit(4);
}

static int child(const char *path, int sync)
{
	int r = open(path, O_RDONLY);
	if (r < 0)
		rs_die("open for reading");
	if (write(sync, "c", 1) != 1)
		rs_die("sync");
	close(sync);
	rs_gate_sleep();
	signal(SIGALRM, on_alarm);
	alarm(30);
	unsigned char buf[512];
	long got = 0;
	ssize_t n;
	while ((n = read(r, buf, sizeof(buf))) > 0) {
		for (ssize_t k = 0; k < n; k++)
			if (buf[k] != pat(got + k)) {
				printf("BAD child byte %ld is %d\n", got + k, buf[k]);
				return 1;
			}
		got += n;
	}
	if (n < 0)
		rs_die("read");
	printf("ok child %ld\n", got);
	return 0;
}

static int out(const char *path)
{
	int w = open(path, O_WRONLY);
	if (w < 0)
		rs_die("open");
	if (write(w, "before\n", 7) != 7)
		rs_die("write");
	printf("set up\n");
	rs_gate_sleep();
	if (write(w, "after\n", 6) != 6)
		rs_die("write after");
	printf("ok out\n");
	return 0;
}

int main(int argc, char **argv)
{
	rs_init();
	if (argc < 3)
		return 2;
	const char *mode = argv[1], *path = argv[2];
	if (!strcmp(mode, "out")) {
		int rc = out(path);
		printf("done\n");
		return rc;
	}
	int sync[2];
	if (mkfifo(path, 0600) || pipe(sync))
		rs_die("mkfifo");
	pid_t kid = fork();
	if (kid < 0)
		rs_die("fork");
	if (kid == 0) {
		close(sync[0]);
		exit(child(path, sync[1]));
	}
	close(sync[1]);
	int w = open(path, O_WRONLY);
	if (w < 0)
		rs_die("open for writing");
	if (put(w, AT_DUMP))
		rs_die("write");
	char c;
	if (read(sync[0], &c, 1) != 1)     /* the child has the FIFO open */
		rs_die("sync");
	close(sync[0]);
	if (!strcmp(mode, "gone") && unlink(path))
		rs_die("unlink");
	printf("set up\n");
	rs_gate_sleep();
	signal(SIGALRM, on_alarm);
	alarm(30);
	kill(kid, SIGUSR2);
	int bad = 0;
	if (put(w, AFTER)) {
		printf("BAD parent write: %s\n", strerror(errno));
		bad = 1;
	}
	if (!strcmp(mode, "tree")) {
		struct stat a, b;
		int w2 = open(path, O_WRONLY | O_NONBLOCK);
		if (w2 < 0 || fstat(w, &a) || fstat(w2, &b) || a.st_ino != b.st_ino) {
			printf("BAD parent reopening the FIFO: %s\n", strerror(errno));
			bad = 1;
		} else if (put(w2, AFTER)) {
			printf("BAD parent write through the path: %s\n", strerror(errno));
			bad = 1;
		}
		if (w2 >= 0)
			close(w2);
	}
	close(w);
	int st;
	if (waitpid(kid, &st, 0) != kid || !WIFEXITED(st) || WEXITSTATUS(st)) {
		printf("BAD child status %#x\n", st);
		bad = 1;
	}
	if (!bad)
		printf("ok parent\n");
	printf("done\n");
	return bad;
}
