/*
 * A process holding paths open, for the tests of what restore trusts (test_restore_security.py).
 *
 *   holder files FILE MAPFILE   FILE open read-write (fd 3), MAPFILE mapped shared twice: read-
 *                               write, then read-only (below it: one file, two access modes);
 *                               on SIGUSR2: appends "w\n" to FILE and bumps the first byte of
 *                               the read-write map, prints "wrote SIZE BYTE ROBYTE" (FILE's
 *                               size, the byte as seen through each map)
 *   holder chroot DIR           chroot(DIR) and chdir("/") after starting (needs root); on
 *                               SIGUSR2 prints "marker yes|no": whether /marker is seen
 *   holder idle                 on SIGUSR2 prints "alive"
 *
 * The main loop sleeps in nanosleep; output is line buffered.
 */
#include "rs.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

int main(int argc, char **argv)
{
	int fd = -1;
	unsigned char *map = NULL, *ro = NULL;
	const char *mode = argc > 1 ? argv[1] : "idle";

	if (!strcmp(mode, "files") && argc > 3) {
		fd = open(argv[2], O_RDWR | O_APPEND);
		if (fd < 0)
			rs_die("open FILE");
		int mfd = open(argv[3], O_RDWR);
		if (mfd < 0)
			rs_die("open MAPFILE");
		map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
		if (map == MAP_FAILED)
			rs_die("mmap MAPFILE");
		close(mfd);
		mfd = open(argv[3], O_RDONLY);
		ro = mfd < 0 ? MAP_FAILED : mmap(NULL, 4096, PROT_READ, MAP_SHARED, mfd, 0);
		if (ro == MAP_FAILED)
			rs_die("mmap MAPFILE read-only");
		close(mfd);
	} else if (!strcmp(mode, "chroot") && argc > 2) {
		if (chroot(argv[2]) || chdir("/"))
			rs_die("chroot");
	}
	rs_init();
	for (;;) {
		int seen = rs_usr2_count;
		while (seen == rs_usr2_count) {
			struct timespec ts = {0, 2000000};
			nanosleep(&ts, NULL);
		}
		if (fd >= 0) {
			struct stat st;
			if (write(fd, "w\n", 2) != 2 || fstat(fd, &st))
				rs_die("write FILE");
			map[0]++;
			printf("wrote %lld %d %d\n", (long long)st.st_size, map[0], ro[0]);
		} else if (!strcmp(mode, "chroot")) {
			printf("marker %s\n", access("/marker", F_OK) == 0 ? "yes" : "no");
		} else {
			printf("alive\n");
		}
	}
}
