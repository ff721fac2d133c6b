/*
 * A table of fds of several kinds, checked by the target itself.
 *
 *   fdcheck DIR        (DIR holds data.bin, at least 8192 bytes: byte i = (i * 7 + 3) & 0xff)
 *
 * Opens: DIR/append.log O_WRONLY|O_APPEND|O_CREAT (and writes a line), DIR/data.bin O_RDONLY|
 * O_CLOEXEC read up to offset 1234, a dup() of it (same open file description), DIR/data.bin
 * O_RDWR at offset 3000, /dev/null O_RDWR, DIR itself O_DIRECTORY|O_CLOEXEC, a pipe (read end
 * O_NONBLOCK, write end FD_CLOEXEC) holding 5000 unread bytes, and a pipe grown to 1 MiB
 * (F_SETPIPE_SZ) holding 200000 unread bytes, more than a pipe of the default size can hold.
 * It records every fd's F_GETFL, F_GETFD and offset, prints "ready PID" and
 * "fds A R D W N DIR PR PW BR BW" (the numbers),
 * then waits for signals (blocked, taken with sigwaitinfo):
 *   SIGUSR1  check everything but the sharing of the dup; print "ok N" or "BAD <what>; ..."
 *   SIGUSR2  check that the dup still shares its offset with the original; "ok shared" or "BAD ..."
 *   SIGTERM  exit 0
 */
#include "rs.h"
#include <fcntl.h>
#include <sys/stat.h>

#define NFD 7
#define PIPE_BYTES 5000
#define BIG_PIPE_BYTES 200000
#define BIG_PIPE_SIZE (1 << 20)
enum { A, R, D, W, N, DIRFD, PR };   /* PW is kept apart: the write end */

static int fd[NFD], pw, big[2];
static int fl[NFD], fdfl[NFD], pw_fl, pw_fdfl;
static off_t pos[NFD];
static struct stat dir_st;
static char bad[2048];
static long checks;

static void badf(const char *fmt, long a, long b)
{
	size_t n = strlen(bad);
	if (n < sizeof(bad) - 100)
		snprintf(bad + n, sizeof(bad) - n, "%s" "%s %ld %ld", n ? "; " : "", fmt, a, b);
}

static unsigned char pat(off_t i)
{
	return (unsigned char)((i * 7 + 3) & 0xff);
}

static void record(void)
{
	for (int i = 0; i < NFD; i++) {
		fl[i] = fcntl(fd[i], F_GETFL);
		fdfl[i] = fcntl(fd[i], F_GETFD);
		pos[i] = (i == N || i == PR) ? 0 : lseek(fd[i], 0, SEEK_CUR);
	}
	pw_fl = fcntl(pw, F_GETFL);
	pw_fdfl = fcntl(pw, F_GETFD);
}

static void check_content(int i, const char *name)
{
	unsigned char buf[64];
	ssize_t n = read(fd[i], buf, sizeof(buf));
	if (n != (ssize_t)sizeof(buf)) {
		badf(name, (long)n, (long)errno);
		return;
	}
	for (int k = 0; k < (int)sizeof(buf); k++)
		if (buf[k] != pat(pos[i] + k)) {
			badf(name, (long)pos[i], k);
			break;
		}
	lseek(fd[i], pos[i], SEEK_SET);
}

static void check_all(void)
{
	static const char *names[NFD] = {"append", "read", "dup", "rdwr", "null", "dir", "pipe-r"};
	char what[64];
	bad[0] = 0;
	for (int i = 0; i < NFD; i++) {
		snprintf(what, sizeof(what), "%s F_GETFL", names[i]);
		if (fcntl(fd[i], F_GETFL) != fl[i])
			badf(what, fcntl(fd[i], F_GETFL), fl[i]);
		snprintf(what, sizeof(what), "%s F_GETFD", names[i]);
		if (fcntl(fd[i], F_GETFD) != fdfl[i])
			badf(what, fcntl(fd[i], F_GETFD), fdfl[i]);
		if (i != N && i != PR && i != DIRFD) {
			snprintf(what, sizeof(what), "%s offset", names[i]);
			off_t p = lseek(fd[i], 0, SEEK_CUR);
			if (p != pos[i])
				badf(what, (long)p, (long)pos[i]);
		}
	}
	if (fcntl(pw, F_GETFL) != pw_fl)
		badf("pipe-w F_GETFL", fcntl(pw, F_GETFL), pw_fl);
	if (fcntl(pw, F_GETFD) != pw_fdfl)
		badf("pipe-w F_GETFD", fcntl(pw, F_GETFD), pw_fdfl);
	/* O_APPEND: a write lands at the end of the file, wherever the offset was */
	lseek(fd[A], 0, SEEK_SET);
	if (write(fd[A], "check\n", 6) != 6)
		badf("append write", (long)errno, 0);
	struct stat st;
	fstat(fd[A], &st);
	pos[A] = lseek(fd[A], 0, SEEK_CUR);
	if (pos[A] != st.st_size)
		badf("append offset after write vs size", (long)pos[A], (long)st.st_size);
	check_content(R, "read content");
	check_content(W, "rdwr content");
	char c;
	if (write(fd[N], "hello", 5) != 5 || read(fd[N], &c, 1) != 0)
		badf("/dev/null", (long)errno, 0);
	if (fstat(fd[DIRFD], &st) || !S_ISDIR(st.st_mode) || st.st_ino != dir_st.st_ino)
		badf("dir identity", (long)st.st_ino, (long)dir_st.st_ino);
	int f = openat(fd[DIRFD], "data.bin", O_RDONLY | O_CLOEXEC);
	if (f < 0)
		badf("openat via dir fd", (long)errno, 0);
	else
		close(f);
	/* the pipe holds exactly the bytes written at the start; put them back afterwards */
	static unsigned char buf[2 * PIPE_BYTES];
	ssize_t got = 0, n;
	while ((n = read(fd[PR], buf + got, sizeof(buf) - (size_t)got)) > 0)
		got += n;
	if (n < 0 && errno != EAGAIN)
		badf("pipe read errno", (long)errno, 0);
	if (got != PIPE_BYTES)
		badf("pipe bytes", (long)got, PIPE_BYTES);
	for (ssize_t k = 0; k < got && k < PIPE_BYTES; k++)
		if (buf[k] != pat(k * 13)) {
			badf("pipe byte", (long)k, buf[k]);
			break;
		}
	if (got > 0 && write(pw, buf, (size_t)got) != got)
		badf("pipe refill", (long)errno, 0);
	/* the big pipe: its capacity and every byte it held */
	if (fcntl(big[0], F_GETPIPE_SZ) != BIG_PIPE_SIZE)
		badf("big pipe F_GETPIPE_SZ", fcntl(big[0], F_GETPIPE_SZ), BIG_PIPE_SIZE);
	static unsigned char bbuf[BIG_PIPE_SIZE];
	got = 0;
	while ((n = read(big[0], bbuf + got, sizeof(bbuf) - (size_t)got)) > 0)
		got += n;
	if (got != BIG_PIPE_BYTES)
		badf("big pipe bytes", (long)got, BIG_PIPE_BYTES);
	for (ssize_t k = 0; k < got && k < BIG_PIPE_BYTES; k++)
		if (bbuf[k] != pat(k * 5)) {
			badf("big pipe byte", (long)k, bbuf[k]);
			break;
		}
	if (got > 0 && write(big[1], bbuf, (size_t)got) != got)
		badf("big pipe refill", (long)errno, 0);
	checks++;
	if (bad[0])
		printf("BAD %s\n", bad);
	else
		printf("ok %ld\n", checks);
}

static void check_shared(void)
{
	bad[0] = 0;
	off_t a = lseek(fd[R], 0, SEEK_CUR), b = lseek(fd[D], 0, SEEK_CUR);
	if (a != b)
		badf("dup offset differs", (long)a, (long)b);
	lseek(fd[R], 777, SEEK_SET);
	b = lseek(fd[D], 0, SEEK_CUR);
	if (b != 777)
		badf("seek on the original did not move the dup", (long)b, 777);
	lseek(fd[R], pos[R], SEEK_SET);
	if (bad[0])
		printf("BAD %s\n", bad);
	else
		printf("ok shared\n");
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: fdcheck DIR\n");
		return 2;
	}
	const char *dir = argv[1];
	char path[4096];
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGUSR2);
	sigaddset(&set, SIGTERM);
	sigprocmask(SIG_BLOCK, &set, NULL);
	rs_init();
	snprintf(path, sizeof(path), "%s/append.log", dir);
	if ((fd[A] = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644)) < 0)
		rs_die("open append.log");
	if (write(fd[A], "before\n", 7) != 7)
		rs_die("write append.log");
	snprintf(path, sizeof(path), "%s/data.bin", dir);
	if ((fd[R] = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		rs_die("open data.bin");
	static char skip[1234];
	lseek(fd[R], 1000, SEEK_SET);
	if (read(fd[R], skip, 234) != 234)
		rs_die("read data.bin");
	fd[D] = dup(fd[R]);
	if ((fd[W] = open(path, O_RDWR)) < 0)
		rs_die("open data.bin rw");
	lseek(fd[W], 3000, SEEK_SET);
	if ((fd[N] = open("/dev/null", O_RDWR)) < 0)
		rs_die("open /dev/null");
	if ((fd[DIRFD] = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
		rs_die("open dir");
	stat(dir, &dir_st);
	int p[2];
	if (pipe2(p, 0))
		rs_die("pipe2");
	fd[PR] = p[0];
	pw = p[1];
	fcntl(fd[PR], F_SETFL, O_NONBLOCK);
	fcntl(pw, F_SETFD, FD_CLOEXEC);
	static unsigned char buf[PIPE_BYTES];
	for (int k = 0; k < PIPE_BYTES; k++)
		buf[k] = pat(k * 13);
	if (write(pw, buf, PIPE_BYTES) != PIPE_BYTES)
		rs_die("write pipe");
	if (pipe2(big, O_NONBLOCK) || fcntl(big[1], F_SETPIPE_SZ, BIG_PIPE_SIZE) != BIG_PIPE_SIZE)
		rs_die("big pipe");
	static unsigned char bbuf[BIG_PIPE_BYTES];
	for (int k = 0; k < BIG_PIPE_BYTES; k++)
		bbuf[k] = pat(k * 5);
	if (write(big[1], bbuf, BIG_PIPE_BYTES) != BIG_PIPE_BYTES)
		rs_die("write big pipe");
	record();
	printf("fds %d %d %d %d %d %d %d %d %d %d\n", fd[A], fd[R], fd[D], fd[W], fd[N], fd[DIRFD], fd[PR], pw,
	       big[0], big[1]);
	for (;;) {
		int sig = sigwaitinfo(&set, NULL);
		if (sig < 0) {
			if (errno == EINTR)
				continue;
			rs_die("sigwaitinfo");
		}
		if (sig == SIGUSR1)
			check_all();
		else if (sig == SIGUSR2)
			check_shared();
		else
			return 0;
	}
}
