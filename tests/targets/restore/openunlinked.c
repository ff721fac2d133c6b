/*
 * Deleted files held open, checked by the target itself (issue 10).
 *
 *   openunlinked DIR          the files below
 *   openunlinked DIR big MIB  only DIR/big, MIB MiB of data, unlinked (for the size limit)
 *
 * DIR/a: 3 pages and 100 bytes, O_RDWR, at offset 5000. DIR/b: O_WRONLY|O_APPEND, "hello\n"
 * written. DIR/sub/c: O_RDONLY, 10 bytes read; DIR/sub is removed too (no directory to make c
 * in again). DIR/m: 2 pages, open O_RDWR and mapped shared from that fd. DIR/sparse: 100 MiB,
 * data only at 50 MiB ("mid"). DIR/t: an O_TMPFILE file in DIR (never had a name), "tmp" written.
 * All unlinked. Byte i of a and c is (i * 7 + 3) & 0xff, of m (i * 13) & 0xff.
 * Prints "ready PID", "set up"; waits for SIGUSR2 (rs.h gate); then checks each: still a
 * deleted file (no link), its size, content, position and status flags; that m's fd and its
 * mapping are one file (a write through either is seen through the other); that c and b go on
 * where they were. Prints "ok deleted N" or "BAD ..."; "done".
 */
#include "rs.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define PG 4096
#define ASIZE (3 * PG + 100)
#define SPARSE (100L << 20)

static char dir[400], bad[2048];
static long checks;

static const char *at(const char *name)
{
	static char buf[4][512];
	static int k;
	k = (k + 1) % 4;
	snprintf(buf[k], sizeof(buf[k]), "%s/%s", dir, name);
	return buf[k];
}

static void badf(const char *what, long a, long b)
{
	size_t n = strlen(bad);
	if (n < sizeof(bad) - 100)
		snprintf(bad + n, sizeof(bad) - n, "%s%s %ld %ld", n ? "; " : "", what, a, b);
}

static unsigned char pat(long i) { return (unsigned char)((i * 7 + 3) & 0xff); }

static int make(const char *path, long size, int mul)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0640);
	if (fd < 0)
		rs_die(path);
	unsigned char *buf = malloc((size_t)size);
	for (long i = 0; i < size; i++)
		buf[i] = mul ? (unsigned char)((i * mul) & 0xff) : pat(i);
	if (write(fd, buf, (size_t)size) != size)
		rs_die("write");
	free(buf);
	return fd;
}

static void deleted(const char *name, int fd, long size, int flags)
{
	struct stat st;
	checks++;
	if (fstat(fd, &st) || st.st_nlink != 0 || st.st_size != size)
		badf(name, (long)st.st_nlink, (long)st.st_size);
	if ((fcntl(fd, F_GETFL) & (O_ACCMODE | O_APPEND)) != flags)
		badf(name, fcntl(fd, F_GETFL), flags);
}

static void content(const char *name, int fd, long off, long n)
{
	unsigned char buf[256];
	checks++;
	if (pread(fd, buf, (size_t)n, off) != n) {
		badf(name, off, errno);
		return;
	}
	for (long i = 0; i < n; i++)
		if (buf[i] != pat(off + i)) {
			badf(name, off + i, buf[i]);
			return;
		}
}

int main(int argc, char **argv)
{
	rs_init();
	if (argc < 2)
		return 2;
	snprintf(dir, sizeof(dir), "%s", argv[1]);
	if (argc > 3 && !strcmp(argv[2], "big")) {
		int big = make(at("big"), atol(argv[3]) << 20, 0);
		unlink(at("big"));
		printf("set up\n");
		rs_gate_sleep();
		deleted("big", big, atol(argv[3]) << 20, O_RDWR);
		if (bad[0])
			printf("BAD %s\n", bad);
		printf("done\n");
		return 0;
	}
	int a = make(at("a"), ASIZE, 0);
	lseek(a, 5000, SEEK_SET);
	int b = open(at("b"), O_WRONLY | O_APPEND | O_CREAT | O_TRUNC, 0600);
	if (b < 0 || write(b, "hello\n", 6) != 6)
		rs_die("b");
	if (mkdir(at("sub"), 0755))
		rs_die("mkdir");
	close(make(at("sub/c"), 1000, 0));
	int c = open(at("sub/c"), O_RDONLY);
	char ten[10];
	if (c < 0 || read(c, ten, 10) != 10)
		rs_die("c");
	int m = make(at("m"), 2 * PG, 13);
	unsigned char *map = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
	if (map == MAP_FAILED)
		rs_die("mmap");
	int sp = open(at("sparse"), O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (sp < 0 || ftruncate(sp, SPARSE) || pwrite(sp, "mid", 3, 50L << 20) != 3)
		rs_die("sparse");
	int t = open(dir, O_TMPFILE | O_RDWR, 0600);
	if (t < 0 || write(t, "tmp", 3) != 3)
		rs_die("O_TMPFILE");
	if (unlink(at("a")) || unlink(at("b")) || unlink(at("sub/c")) || rmdir(at("sub")) || unlink(at("m"))
	    || unlink(at("sparse")))
		rs_die("unlink");
	printf("set up\n");
	rs_gate_sleep();

	deleted("a", a, ASIZE, O_RDWR);
	checks++;
	if (lseek(a, 0, SEEK_CUR) != 5000)
		badf("a position", (long)lseek(a, 0, SEEK_CUR), 5000);
	content("a content", a, 0, 256);
	content("a content at its end", a, ASIZE - 200, 200);
	unsigned char x = 0xAB;
	if (write(a, &x, 1) != 1 || lseek(a, 0, SEEK_CUR) != 5001)
		badf("a write", errno, 0);

	deleted("b", b, 6, O_WRONLY | O_APPEND);
	checks++;
	if (write(b, "again\n", 6) != 6 || lseek(b, 0, SEEK_CUR) != 12)
		badf("b append", (long)lseek(b, 0, SEEK_CUR), errno);

	deleted("c", c, 1000, O_RDONLY);
	unsigned char buf[16];
	checks++;
	if (read(c, buf, 5) != 5 || buf[0] != pat(10) || buf[4] != pat(14))
		badf("c read on", buf[0], pat(10));

	deleted("m", m, 2 * PG, O_RDWR);
	checks++;
	if (map[PG + 1] != (unsigned char)(((PG + 1) * 13) & 0xff))
		badf("m mapped content", map[PG + 1], 0);
	if (pwrite(m, "Z", 1, 7) != 1 || map[7] != 'Z')
		badf("m write through the fd, seen in the mapping", map[7], 'Z');
	map[100] = 'Q';
	if (pread(m, buf, 1, 100) != 1 || buf[0] != 'Q')
		badf("m write in the mapping, seen through the fd", buf[0], 'Q');

	deleted("sparse", sp, SPARSE, O_RDWR);
	checks++;
	if (pread(sp, buf, 3, 50L << 20) != 3 || memcmp(buf, "mid", 3) || pread(sp, buf, 1, 1000) != 1 || buf[0])
		badf("sparse content", buf[0], 0);

	deleted("t", t, 3, O_RDWR);
	checks++;
	if (pread(t, buf, 3, 0) != 3 || memcmp(buf, "tmp", 3))
		badf("t content", buf[0], 0);

	if (bad[0])
		printf("BAD %s\n", bad);
	else
		printf("ok deleted %ld\n", checks);
	printf("done\n");
	return 0;
}
