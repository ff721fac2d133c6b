/*
 * File locks, checked by another process (issue 10).
 *
 *   flocks DIR [tree]
 *
 * DIR/f (1000 bytes): fd A (O_RDWR) holds a POSIX write lock on bytes 10-19 and a POSIX read lock
 * from byte 400 to the end; fd B (another open file, O_RDWR) an OFD write lock on bytes 200-299.
 * DIR/g: fd C (O_RDONLY) an exclusive flock lock, fd D a dup of C (one open file, one lock).
 * Prints "ready PID", "set up"; waits for SIGUSR2 (rs.h gate); then a child process it forks
 * asks: F_GETLK on 10-19 (a write lock of the parent's), on 450 (a read lock of the parent's),
 * F_OFD_GETLK on 250 (an OFD write lock), F_GETLK on 50 (nothing), flock(LOCK_EX|LOCK_NB) on g
 * (EWOULDBLOCK); after the parent closes C only (D keeps the open file) g is still locked.
 * Prints "ok locks N" or "BAD ..."; "done".
 * tree: after setting them, forks a child that holds a POSIX write lock on bytes 300-309 of its
 * copy of A (the OFD and flock locks it shares with its parent through the open files); the
 * asking child also finds that lock, the child's; then the child is told to exit.
 */
#include "rs.h"
#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>

static char dir[400];

static const char *at(const char *name)
{
	static char buf[2][512];
	static int k;
	k = (k + 1) % 2;
	snprintf(buf[k], sizeof(buf[k]), "%s/%s", dir, name);
	return buf[k];
}

static int setlk(int fd, int cmd, short type, off_t start, off_t len)
{
	struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
	return fcntl(fd, cmd, &fl);
}

/* in a child: what another process sees */
static pid_t kid;

static int ask(pid_t owner)
{
	int bad = 0, checks = 0;
	int f = open(at("f"), O_RDWR), g = open(at("g"), O_RDONLY);
	struct flock fl;
	if (f < 0 || g < 0)
		return 100;
#define GETLK(cmd, start, len) (memset(&fl, 0, sizeof(fl)), fl.l_type = F_WRLCK, fl.l_whence = SEEK_SET, \
	fl.l_start = (start), fl.l_len = (len), fcntl(f, (cmd), &fl))
	checks++;
	if (GETLK(F_GETLK, 10, 10) || fl.l_type != F_WRLCK || fl.l_pid != owner || fl.l_start != 10 || fl.l_len != 10) {
		printf("BAD posix write lock: type %d pid %d start %ld len %ld\n", fl.l_type, fl.l_pid, (long)fl.l_start,
		       (long)fl.l_len);
		bad++;
	}
	checks++;
	if (GETLK(F_GETLK, 450, 1) || fl.l_type != F_RDLCK || fl.l_pid != owner || fl.l_start != 400 || fl.l_len != 0) {
		printf("BAD posix read lock: type %d pid %d start %ld len %ld\n", fl.l_type, fl.l_pid, (long)fl.l_start,
		       (long)fl.l_len);
		bad++;
	}
	checks++;
	if (GETLK(F_OFD_GETLK, 250, 1) || fl.l_type != F_WRLCK || fl.l_pid != -1 || fl.l_start != 200 || fl.l_len != 100) {
		printf("BAD ofd lock: type %d pid %d start %ld len %ld\n", fl.l_type, fl.l_pid, (long)fl.l_start,
		       (long)fl.l_len);
		bad++;
	}
	checks++;
	if (GETLK(F_GETLK, 50, 10) || fl.l_type != F_UNLCK) {
		printf("BAD bytes 50-59 locked: type %d pid %d\n", fl.l_type, fl.l_pid);
		bad++;
	}
	checks++;
	if (kid && (GETLK(F_GETLK, 305, 1) || fl.l_type != F_WRLCK || fl.l_pid != kid || fl.l_start != 300)) {
		printf("BAD the child's posix lock: type %d pid %d start %ld\n", fl.l_type, fl.l_pid, (long)fl.l_start);
		bad++;
	}
	checks++;
	if (flock(g, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK) {
		printf("BAD flock on g not held\n");
		bad++;
	}
	return bad ? 1 : 0;
}

static int ask_in_child(pid_t owner)
{
	pid_t k = fork();
	if (k == 0)
		exit(ask(owner));
	int st;
	if (waitpid(k, &st, 0) != k || !WIFEXITED(st))
		return 99;
	return WEXITSTATUS(st);
}

int main(int argc, char **argv)
{
	rs_init();
	if (argc < 2)
		return 2;
	snprintf(dir, sizeof(dir), "%s", argv[1]);
	int a = open(at("f"), O_RDWR | O_CREAT | O_TRUNC, 0644);
	int g0 = open(at("g"), O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (a < 0 || g0 < 0 || ftruncate(a, 1000))
		rs_die("open");
	close(g0);
	int b = open(at("f"), O_RDWR);
	int c = open(at("g"), O_RDONLY);
	if (b < 0 || c < 0)
		rs_die("open");
	int d = dup(c);
	if (setlk(a, F_SETLK, F_WRLCK, 10, 10) || setlk(a, F_SETLK, F_RDLCK, 400, 0))
		rs_die("F_SETLK");
	if (setlk(b, F_OFD_SETLK, F_WRLCK, 200, 100))
		rs_die("F_OFD_SETLK");
	if (flock(c, LOCK_EX | LOCK_NB))
		rs_die("flock");
	if (argc > 2 && !strcmp(argv[2], "tree")) {
		int sync[2];
		if (pipe(sync))
			rs_die("pipe");
		kid = fork();
		if (kid == 0) {
			close(sync[0]);
			if (setlk(a, F_SETLK, F_WRLCK, 300, 10) || write(sync[1], "k", 1) != 1)
				rs_die("child F_SETLK");
			close(sync[1]);
			rs_gate_sleep();
			exit(0);
		}
		close(sync[1]);
		char k;
		if (read(sync[0], &k, 1) != 1)
			rs_die("sync");
		close(sync[0]);
	}
	printf("set up\n");
	rs_gate_sleep();

	int r1 = ask_in_child(getpid());
	close(c);       /* d keeps the open file, and so the flock lock */
	int r2 = ask_in_child(getpid());
	int r3 = 0;
	if (kid) {
		int st;
		kill(kid, SIGUSR2);
		if (waitpid(kid, &st, 0) != kid || !WIFEXITED(st) || WEXITSTATUS(st))
			r3 = 1;
	}
	if (r1 || r2 || r3)
		printf("BAD locks %d %d %d\n", r1, r2, r3);
	else
		printf("ok locks %d\n", kid ? 12 : 10);
	(void)d;
	printf("done\n");
	return 0;
}
