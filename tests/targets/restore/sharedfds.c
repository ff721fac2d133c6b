/*
 * A parent and a child sharing one fd table (clone with CLONE_FILES, as a fork otherwise).
 *
 *   sharedfds EVERY
 *
 * Round k: the child opens /dev/null and publishes the fd number in shared memory; the parent
 * checks that it sees that fd in its own table, closes it, and acknowledges; the child checks
 * that its fd is gone too. The parent prints "round K ok" every EVERY rounds, "BAD ..." when
 * the table is not shared.
 */
#include "rs.h"
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/syscall.h>

struct shared {
	volatile int fd;
	volatile long round, ack;
};

int main(int argc, char **argv)
{
	long every = argc > 1 ? atol(argv[1]) : 100;
	struct shared *sh = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED)
		rs_die("mmap");
	rs_init();
	long pid = syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
	if (pid < 0)
		rs_die("clone");
	if (pid == 0) {
		for (long k = 1;; k++) {
			int fd = open("/dev/null", O_RDONLY);
			if (fd < 0)
				rs_die("child open");
			sh->fd = fd;
			__atomic_store_n(&sh->round, k, __ATOMIC_SEQ_CST);
			while (__atomic_load_n(&sh->ack, __ATOMIC_SEQ_CST) != k)
				usleep(100);
			if (fcntl(fd, F_GETFD) != -1 || errno != EBADF) {
				printf("BAD child still has fd %d the parent closed (round %ld)\n", fd, k);
				_exit(1);
			}
		}
	}
	for (long k = 1;; k++) {
		while (__atomic_load_n(&sh->round, __ATOMIC_SEQ_CST) != k)
			usleep(100);
		int fd = sh->fd;
		if (fcntl(fd, F_GETFD) < 0)
			printf("BAD parent does not see the child's fd %d (round %ld)\n", fd, k);
		close(fd);
		__atomic_store_n(&sh->ack, k, __ATOMIC_SEQ_CST);
		if (k % every == 0)
			printf("round %ld ok\n", k);
	}
}
