/*
 * eventfd, timerfd, signalfd and epoll sets, checked by the target itself.
 *
 *   evfds GATE [MODE]     GATE 1: wait for SIGUSR2 before checking; 0: check at once
 *                         MODE ok (default) | closed | reused: also an epoll set "bad" holding an
 *                         eventfd registered as fd N, then fd N closed (closed) or replaced by
 *                         another eventfd (reused), the first eventfd kept open as another fd
 *
 * Sets up:
 *   e5     eventfd count 5                  ebig  eventfd count 0x100000007 (more than 32 bits)
 *   esem   eventfd count 3, EFD_SEMAPHORE   e0    eventfd count 0
 *   tper   timerfd MONOTONIC, first expiry in 100 s, then every 1 s
 *   tone   timerfd MONOTONIC one-shot, expired (1 tick pending, unread)
 *   tfired timerfd MONOTONIC first expiry 1 ms, every 1000 s: expired once, unread (the kernel
 *          leaves it unarmed until it is read or asked: fdinfo shows no time left)
 *   tabs   timerfd MONOTONIC, TFD_TIMER_ABSTIME, at now + 200 s
 *   tcan   timerfd REALTIME, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, at now + 300 s
 *   sfd    signalfd for SIGUSR1 (blocked), with a SIGUSR1 queued (sigqueue value 4242)
 *   pipe   (its write end registered for EPOLLOUT)
 *   inner  epoll: e0 (IN, data 7), tfired (IN|ET, data 8), a dup of e0 (IN|OUT, data 10): one
 *          file, two items
 *   outer  epoll: e5 (IN|EXCLUSIVE), esem (IN|ET), tper, tone (IN|ONESHOT), sfd (IN|WAKEUP),
 *          inner, pipe-w (OUT|ET), ebig: distinct data values, some using all 64 bits
 *   ep3    epoll: ebig (IN|ONESHOT), already reported once (so disabled)
 *
 * Prints "ready PID" (in a bad MODE then "stale EPFD FD"), "set up", waits for the gate, then checks and
 * prints lines that do not depend on timing or fd numbers, except "tper remaining_ms N" (the
 * test bounds it), then "done", and exits 0.
 */
#include "rs.h"
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

#ifndef EPOLLEXCLUSIVE
#define EPOLLEXCLUSIVE (1u << 28)
#endif

enum { E5, ESEM, EBIG, E0, EDUP, TPER, TONE, TFIRED, TABS, TCAN, SFD, PR, PW, INNER, OUTER, EP3, NFD };
static const char *names[NFD] = {"e5", "esem", "ebig", "e0", "e0-dup", "tper", "tone", "tfired", "tabs", "tcan",
				 "sfd", "pipe-r", "pipe-w", "inner", "outer", "ep3"};
static int fd[NFD];

static const char *name_of(int n)
{
	for (int i = 0; i < NFD; i++)
		if (fd[i] == n)
			return names[i];
	return "?";
}

static int64_t ns(struct timespec t)
{
	return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int64_t now(clockid_t c)
{
	struct timespec t;
	clock_gettime(c, &t);
	return ns(t);
}

static void add(int ep, int i, uint32_t events, uint64_t data)
{
	struct epoll_event ev = {.events = events, .data.u64 = data};
	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd[i], &ev))
		rs_die(names[i]);
}

static void arm(int i, clockid_t c, int flags, int64_t value, int64_t interval)
{
	struct itimerspec its = {{interval / 1000000000LL, interval % 1000000000LL},
				 {value / 1000000000LL, value % 1000000000LL}};
	if ((fd[i] = timerfd_create(c, TFD_NONBLOCK | TFD_CLOEXEC)) < 0 || timerfd_settime(fd[i], flags, &its, NULL))
		rs_die(names[i]);
}

static void wait_readable(int f)
{
	struct pollfd p = {.fd = f, .events = POLLIN};
	while (poll(&p, 1, -1) != 1)
		;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* the items of an epoll set as its fdinfo shows them, by fd name, sorted */
static void print_items(const char *set, int ep)
{
	char path[64], line[256];
	static char out[64][128];
	char *sorted[64];
	int n = 0;
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", ep);
	FILE *f = fopen(path, "r");
	if (!f)
		rs_die("fdinfo");
	while (fgets(line, sizeof(line), f) && n < 64) {
		int tfd;
		unsigned events;
		unsigned long long data;
		if (sscanf(line, "tfd: %d events: %x data: %llx", &tfd, &events, &data) == 3) {
			snprintf(out[n], sizeof(out[n]), "item %s %s events %#x data %#llx", set, name_of(tfd), events, data);
			sorted[n] = out[n];
			n++;
		}
	}
	fclose(f);
	qsort(sorted, n, sizeof(sorted[0]), cmp_str);
	for (int i = 0; i < n; i++)
		printf("%s\n", sorted[i]);
}

static void print_ready(const char *what, int ep)
{
	struct epoll_event ev[32];
	uint64_t d[32];
	int n = epoll_wait(ep, ev, 32, 0);
	if (n < 0)
		rs_die("epoll_wait");
	for (int i = 0; i < n; i++)
		d[i] = ev[i].data.u64;
	qsort(d, n, sizeof(d[0]), cmp_u64);
	printf("%s:", what);
	for (int i = 0; i < n; i++)
		printf(" %#" PRIx64, d[i]);
	printf("%s\n", n ? "" : " none");
}

static void print_read(const char *what, int f, int times)
{
	printf("%s", what);
	for (int k = 0; k < times; k++) {
		uint64_t v;
		ssize_t r = read(f, &v, 8);
		if (r == 8)
			printf(" %#" PRIx64, v);
		else
			printf(" %s", r < 0 ? strerror(errno) : "short");
	}
	printf("\n");
}

static const char *err(int r)
{
	return r == 0 ? "0" : strerror(errno);
}

/* MOD with the same events, DEL, DEL again: proves the item is keyed by this fd number */
static void ctl_all(const char *set, int ep, const int *which, const uint32_t *events, int n)
{
	for (int k = 0; k < n; k++) {
		struct epoll_event ev = {.events = events[k] & ~EPOLLEXCLUSIVE, .data.u64 = 0};
		const char *mod = err(epoll_ctl(ep, EPOLL_CTL_MOD, fd[which[k]], &ev));
		char m[64];
		snprintf(m, sizeof(m), "%s", mod);
		const char *del = err(epoll_ctl(ep, EPOLL_CTL_DEL, fd[which[k]], NULL));
		char d[64];
		snprintf(d, sizeof(d), "%s", del);
		const char *del2 = err(epoll_ctl(ep, EPOLL_CTL_DEL, fd[which[k]], NULL));
		printf("ctl %s %s mod=%s del=%s del-again=%s\n", set, names[which[k]], m, d, del2);
	}
}

static const char *settime_flags(int f)
{
	static char buf[32];
	char path[64], line[128];
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", f);
	FILE *fp = fopen(path, "r");
	strcpy(buf, "?");
	while (fp && fgets(line, sizeof(line), fp))
		if (sscanf(line, "settime flags: %31s", buf) == 1)
			break;
	if (fp)
		fclose(fp);
	return buf;
}

static const int outer_items[] = {E5, ESEM, TPER, TONE, SFD, INNER, PW, EBIG};
static const uint32_t outer_events[] = {EPOLLIN | EPOLLEXCLUSIVE, EPOLLIN | EPOLLET, EPOLLIN, EPOLLIN | EPOLLONESHOT,
					EPOLLIN | EPOLLWAKEUP, EPOLLIN, EPOLLOUT | EPOLLET, EPOLLIN};
static const uint64_t outer_data[] = {0x1111222233334444ULL, 2, 3, 4, 5, 6, 0xffffffffffffffffULL, 9};
static const int inner_items[] = {E0, TFIRED, EDUP};
static const uint32_t inner_events[] = {EPOLLIN, EPOLLIN | EPOLLET, EPOLLIN | EPOLLOUT};
static const uint64_t inner_data[] = {7, 0x8000000000000008ULL, 10};

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: evfds GATE [ok|closed|reused]\n");
		return 2;
	}
	int gate = atoi(argv[1]);
	const char *mode = argc > 2 ? argv[2] : "ok";
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, NULL);
	rs_init();

	if ((fd[E5] = eventfd(5, EFD_NONBLOCK)) < 0 || (fd[ESEM] = eventfd(3, EFD_SEMAPHORE | EFD_NONBLOCK | EFD_CLOEXEC)) < 0 ||
	    (fd[EBIG] = eventfd(0, EFD_NONBLOCK)) < 0 || (fd[E0] = eventfd(0, EFD_NONBLOCK)) < 0)
		rs_die("eventfd");
	if ((fd[EDUP] = dup(fd[E0])) < 0)
		rs_die("dup");
	uint64_t big = 0x100000007ULL;
	if (write(fd[EBIG], &big, 8) != 8)
		rs_die("eventfd write");
	arm(TPER, CLOCK_MONOTONIC, 0, 100000000000LL, 1000000000LL);
	arm(TONE, CLOCK_MONOTONIC, 0, 1000000, 0);
	arm(TFIRED, CLOCK_MONOTONIC, 0, 1000000, 1000000000000LL);
	int64_t abs_mono = now(CLOCK_MONOTONIC) + 200000000000LL;
	arm(TABS, CLOCK_MONOTONIC, TFD_TIMER_ABSTIME, abs_mono, 0);
	int64_t abs_real = now(CLOCK_REALTIME) + 300000000000LL;
	arm(TCAN, CLOCK_REALTIME, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, abs_real, 0);
	wait_readable(fd[TONE]);
	wait_readable(fd[TFIRED]);
	if ((fd[SFD] = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC)) < 0)
		rs_die("signalfd");
	union sigval sv = {.sival_int = 4242};
	if (sigqueue(getpid(), SIGUSR1, sv))
		rs_die("sigqueue");
	int p[2];
	if (pipe2(p, O_NONBLOCK))
		rs_die("pipe");
	fd[PR] = p[0];
	fd[PW] = p[1];
	/* the outer set gets the lower number: restore must fill the inner one first all the same */
	if ((fd[OUTER] = epoll_create1(EPOLL_CLOEXEC)) < 0 || (fd[INNER] = epoll_create1(0)) < 0 ||
	    (fd[EP3] = epoll_create1(0)) < 0)
		rs_die("epoll_create1");
	for (int k = 0; k < 3; k++)
		add(fd[INNER], inner_items[k], inner_events[k], inner_data[k]);
	for (int k = 0; k < 8; k++)
		add(fd[OUTER], outer_items[k], outer_events[k], outer_data[k]);
	add(fd[EP3], EBIG, EPOLLIN | EPOLLONESHOT, 9);
	struct epoll_event ev;
	if (epoll_wait(fd[EP3], &ev, 1, -1) != 1)   /* reported once: the oneshot item is now disabled */
		rs_die("epoll_wait ep3");

	if (strcmp(mode, "ok")) {
		int bad = epoll_create1(0), a = eventfd(0, 0), keep;
		struct epoll_event bev = {.events = EPOLLIN, .data.u64 = 77};
		if (bad < 0 || a < 0 || epoll_ctl(bad, EPOLL_CTL_ADD, a, &bev) || (keep = dup(a)) < 0)
			rs_die("bad set");
		int other = eventfd(0, 0);
		if (other < 0)
			rs_die("eventfd");
		close(a);
		if (!strcmp(mode, "reused") && dup2(other, a) != a)
			rs_die("reuse");
		close(other);
		printf("stale %d %d\n", bad, a);
	}

	printf("set up\n");
	if (gate)
		rs_gate_sleep();

	/* epoll: the items as the kernel shows them, then what is ready, twice (ET, ONESHOT) */
	print_items("outer", fd[OUTER]);
	print_items("inner", fd[INNER]);
	print_items("ep3", fd[EP3]);
	print_ready("outer ready", fd[OUTER]);
	print_ready("inner ready", fd[INNER]);
	print_ready("outer again", fd[OUTER]);
	print_ready("ep3 ready", fd[EP3]);
	struct epoll_event re = {.events = EPOLLIN | EPOLLONESHOT, .data.u64 = 9};
	printf("ep3 rearm %s\n", err(epoll_ctl(fd[EP3], EPOLL_CTL_MOD, fd[EBIG], &re)));
	print_ready("ep3 after rearm", fd[EP3]);

	/* eventfd */
	print_read("e5", fd[E5], 2);
	print_read("esem", fd[ESEM], 4);
	print_read("ebig", fd[EBIG], 2);
	print_read("e0", fd[E0], 1);

	/* timerfd */
	print_read("tone", fd[TONE], 2);
	print_read("tfired", fd[TFIRED], 2);
	struct itimerspec its;
	timerfd_gettime(fd[TFIRED], &its);
	printf("tfired armed %d interval %lld\n", ns(its.it_value) > 0, (long long)ns(its.it_interval));
	print_read("tper", fd[TPER], 1);
	timerfd_gettime(fd[TPER], &its);
	printf("tper interval %lld\n", (long long)ns(its.it_interval));
	int64_t left = ns(its.it_value);
	timerfd_gettime(fd[TABS], &its);
	int64_t drift = now(CLOCK_MONOTONIC) + ns(its.it_value) - abs_mono;
	printf("tabs flags %s same-expiry %d\n", settime_flags(fd[TABS]), drift > -1000000000LL && drift < 1000000000LL);
	timerfd_gettime(fd[TCAN], &its);
	drift = now(CLOCK_REALTIME) + ns(its.it_value) - abs_real;
	printf("tcan flags %s same-expiry %d\n", settime_flags(fd[TCAN]), drift > -1000000000LL && drift < 1000000000LL);
	print_read("tabs", fd[TABS], 1);

	/* signalfd: the pending SIGUSR1 with its value */
	struct signalfd_siginfo si;
	ssize_t r = read(fd[SFD], &si, sizeof(si));
	if (r == (ssize_t)sizeof(si))
		printf("sfd signo %u value %d code %d\n", si.ssi_signo, si.ssi_int, si.ssi_code);
	else
		printf("sfd read %s\n", r < 0 ? strerror(errno) : "short");
	r = read(fd[SFD], &si, sizeof(si));
	printf("sfd again %s\n", r < 0 ? strerror(errno) : "got one");

	/* every item is keyed by its fd number */
	ctl_all("outer", fd[OUTER], outer_items, outer_events, 8);
	ctl_all("inner", fd[INNER], inner_items, inner_events, 3);
	printf("tper remaining_ms %lld\n", (long long)(left / 1000000));
	printf("done\n");
	return 0;
}
