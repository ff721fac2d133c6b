/*
 * inotify watches, checked by the target itself (issue 10).
 *
 *   inotify DIR [unlinked]
 *
 * fd A (IN_NONBLOCK): a watch on DIR/w (IN_CREATE|IN_DELETE), two watches added and removed (so
 * that the next descriptors skip two numbers), a watch on DIR/w/file (IN_MODIFY|IN_CLOSE_WRITE)
 * and an IN_ONESHOT watch on DIR/once (IN_ATTRIB): descriptors 1, 4, 5. fd B (blocking): a watch
 * on DIR (IN_CREATE), with one event left unread before the gate (DIR/pending created).
 * Prints "ready PID", "wds 1 4 5 1", "set up"; waits for SIGUSR2 (rs.h gate); then creates
 * DIR/w/new, writes DIR/w/file, changes the mode of DIR/once twice, creates DIR/after, and prints
 * every event read from A then B as "A|B WD MASK NAME" (a restored B lost its pending event);
 * "done".
 * unlinked: DIR/w/file is unlinked before "set up" (the watch lives on: an fd holds the file);
 * after the gate only "done".
 */
#include "rs.h"
#include <fcntl.h>
#include <poll.h>
#include <sys/inotify.h>
#include <sys/stat.h>

static char dir[400];

static const char *at(const char *name)
{
	static char buf[4][512];
	static int k;
	k = (k + 1) % 4;
	snprintf(buf[k], sizeof(buf[k]), "%s/%s", dir, name);
	return buf[k];
}

static void touch(const char *path)
{
	int fd = open(path, O_WRONLY | O_CREAT, 0644);
	if (fd < 0)
		rs_die(path);
	close(fd);
}

static int add(int fd, const char *path, uint32_t mask)
{
	int wd = inotify_add_watch(fd, path, mask);
	if (wd < 0)
		rs_die("inotify_add_watch");
	return wd;
}

/* events of fd until `want` have come (poll with a bound), printed as they come */
static void show(const char *which, int fd, int want)
{
	char buf[4096] __attribute__((aligned(8)));
	int got = 0;
	while (got < want) {
		struct pollfd p = {fd, POLLIN, 0};
		if (poll(&p, 1, 30000) != 1) {
			printf("BAD %s: %d events, %d expected\n", which, got, want);
			return;
		}
		ssize_t n = read(fd, buf, sizeof(buf));
		if (n <= 0)
			rs_die("read events");
		for (char *p = buf; p < buf + n;) {
			struct inotify_event *e = (struct inotify_event *)p;
			printf("%s %d %x %s\n", which, e->wd, e->mask, e->len ? e->name : "-");
			got++;
			p += sizeof(*e) + e->len;
		}
	}
}

int main(int argc, char **argv)
{
	rs_init();
	if (argc < 2)
		return 2;
	snprintf(dir, sizeof(dir), "%s", argv[1]);
	if (mkdir(at("w"), 0755))
		rs_die("mkdir");
	touch(at("w/file"));
	touch(at("other"));
	touch(at("once"));
	int a = inotify_init1(IN_NONBLOCK);
	int b = inotify_init1(0);
	if (a < 0 || b < 0)
		rs_die("inotify_init1");
	int wd_dir = add(a, at("w"), IN_CREATE | IN_DELETE);
	for (int i = 0; i < 2; i++)
		inotify_rm_watch(a, add(a, at("other"), IN_OPEN));
	char buf[4096];
	struct pollfd p = {a, POLLIN, 0};
	while (poll(&p, 1, 0) == 1 && read(a, buf, sizeof(buf)) > 0)   /* the two IN_IGNORED */
		;
	int wd_file = add(a, at("w/file"), IN_MODIFY | IN_CLOSE_WRITE);
	int wd_once = add(a, at("once"), IN_ATTRIB | IN_ONESHOT);
	int wd_b = add(b, dir, IN_CREATE);
	printf("wds %d %d %d %d\n", wd_dir, wd_file, wd_once, wd_b);
	touch(at("pending"));
	if (argc > 2 && !strcmp(argv[2], "unlinked")) {
		if (open(at("w/file"), O_RDONLY) < 0 || unlink(at("w/file")))
			rs_die("unlink");
		printf("set up\n");
		rs_gate_sleep();
		printf("done\n");
		return 0;
	}
	printf("set up\n");
	rs_gate_sleep();

	touch(at("w/new"));
	int fd = open(at("w/file"), O_WRONLY);
	if (fd < 0 || write(fd, "x", 1) != 1)
		rs_die("write");
	close(fd);
	chmod(at("once"), 0600);
	chmod(at("once"), 0644);
	touch(at("after"));
	/* new in w; modify, close-write of file; attrib then ignored of the one-shot watch */
	show("A", a, 5);
	show("B", b, 1);
	struct pollfd q[2] = {{a, POLLIN, 0}, {b, POLLIN, 0}};
	if (poll(q, 2, 0) != 0)
		show("more", q[0].revents ? a : b, 1);
	printf("done\n");
	return 0;
}
