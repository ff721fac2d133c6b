/*
 * ckpt native core: the batch work and struct ioctls Python does poorly.
 *
 * One call per batch: scan many ranges, copy thousands of pages, classify or
 * compare pages. Every function returns 0 / a count on success and -errno on
 * failure; none of them prints or exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ckpt_compat.h"
#include "ckpt_core.h"

#define CK_IOV_BATCH 1024

/* ---------------------------------------------------------------- uffd */

int ck_uffd_api(int fd, uint64_t features, uint64_t *out_features)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return -errno;
	if (out_features)
		*out_features = api.features;
	return 0;
}

int ck_uffd_register_wp(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_register reg = {
		.range = { .start = start, .len = len },
		.mode = UFFDIO_REGISTER_MODE_WP,
	};
	if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	return 0;
}

int ck_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { .start = start, .len = len };
	if (ioctl(fd, UFFDIO_UNREGISTER, &range) < 0)
		return -errno;
	return 0;
}

int ck_uffd_wp(int fd, uint64_t start, uint64_t len, int protect)
{
	struct uffdio_writeprotect wp = {
		.range = { .start = start, .len = len },
		.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
	};
	if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0)
		return -errno;
	return 0;
}

int64_t ck_uffd_wp_runs(int fd, const uint64_t *runs, int64_t nruns, int protect)
{
	/* runs: (start, len) pairs. Stops at the first failure, returning -errno. */
	for (int64_t i = 0; i < nruns; i++) {
		int r = ck_uffd_wp(fd, runs[2 * i], runs[2 * i + 1], protect);
		/* ENOENT: the range was unmapped meanwhile; nothing to protect there */
		if (r < 0 && r != -ENOENT)
			return r;
	}
	return nruns;
}

/* --------------------------------------------------------- PAGEMAP_SCAN */

int64_t ck_scan(int pagemap_fd, const uint64_t *ranges, int nranges,
		uint64_t flags, uint64_t inverted, uint64_t mask, uint64_t anyof,
		uint64_t ret_mask, uint64_t *out, int64_t cap,
		int *next_range, uint64_t *next_addr)
{
	int64_t n = 0;
	int i = *next_range;
	uint64_t addr = *next_addr;

	for (; i < nranges; i++) {
		uint64_t end = ranges[2 * i + 1];
		if (addr < ranges[2 * i])
			addr = ranges[2 * i];
		while (addr < end) {
			if (out && n >= cap) {
				*next_range = i;
				*next_addr = addr;
				return n;
			}
			struct pm_scan_arg arg = {
				.size = sizeof(arg),
				.flags = flags,
				.start = addr,
				.end = end,
				.vec = out ? (uint64_t)(uintptr_t)(out + 3 * n) : 0,
				.vec_len = out ? (uint64_t)(cap - n) : 0,
				.category_inverted = inverted,
				.category_mask = mask,
				.category_anyof_mask = anyof,
				.return_mask = ret_mask,
			};
			long got = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
			if (got < 0) {
				int err = errno;
				*next_range = i;
				*next_addr = addr;
				/* hand back what earlier calls found first (with WP_MATCHING those pages
				 * are re-armed already: dropping them would lose their writes); the
				 * error is reported by the next call, which starts here */
				return n ? n : -err;
			}
			n += got;
			if (arg.walk_end <= addr)
				break; /* no progress: should not happen */
			addr = arg.walk_end;
		}
		addr = 0;
	}
	*next_range = nranges;
	*next_addr = 0;
	return n;
}

/* ----------------------------------------------- data ranges of a file */

/*
 * The data ranges of file fd within [lo, hi) as (start, end) offset pairs in out (at most cap
 * pairs), found with lseek SEEK_DATA / SEEK_HOLE, so that its holes are never read. Returns
 * the number of pairs; *next is where to go on (hi when done). -errno on failure, -ENOTSUP for
 * a file whose lseek ignores SEEK_DATA (it returns an offset before the one asked).
 */
int64_t ck_data_ranges(int fd, uint64_t lo, uint64_t hi, uint64_t *out, int64_t cap, uint64_t *next)
{
	int64_t n = 0;
	uint64_t pos = lo;
	while (pos < hi && n < cap) {
		off_t d = lseek(fd, (off_t)pos, SEEK_DATA);
		if (d < 0) {
			if (errno == ENXIO)
				break;
			return -errno;
		}
		if ((uint64_t)d < pos)
			return -ENOTSUP;
		if ((uint64_t)d >= hi)
			break;
		off_t h = lseek(fd, d, SEEK_HOLE);
		if (h < 0)
			return -errno;
		if (h <= d)
			return -ENOTSUP;
		out[2 * n] = (uint64_t)d;
		out[2 * n + 1] = (uint64_t)h < hi ? (uint64_t)h : hi;
		n++;
		pos = (uint64_t)h;
	}
	*next = n < cap ? hi : pos;
	return n;
}

/* ----------------------------------------------- bulk memory of another process */

static int64_t mem_fallback(int mem_fd, uint64_t addr, uint64_t len, uint8_t *buf, int write)
{
	uint64_t done = 0;
	while (done < len) {
		ssize_t r = write ? pwrite(mem_fd, buf + done, len - done, (off_t)(addr + done))
				  : pread(mem_fd, buf + done, len - done, (off_t)(addr + done));
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			return -EIO;
		done += (uint64_t)r;
	}
	return (int64_t)done;
}

static int64_t rw_runs(int pid, int mem_fd, const uint64_t *runs, int64_t nruns,
		       uint8_t *buf, int32_t *status, int write)
{
	struct iovec local[CK_IOV_BATCH], remote[CK_IOV_BATCH];
	int64_t total = 0;
	uint64_t off = 0;
	int64_t i = 0;

	while (i < nruns) {
		int k = 0;
		uint64_t batch_off = off;
		for (; k < CK_IOV_BATCH && i + k < nruns; k++) {
			uint64_t len = runs[2 * (i + k) + 1];
			local[k].iov_base = buf + off;
			local[k].iov_len = len;
			remote[k].iov_base = (void *)(uintptr_t)runs[2 * (i + k)];
			remote[k].iov_len = len;
			off += len;
		}
		ssize_t r = write ? process_vm_writev(pid, local, k, remote, k, 0)
				  : process_vm_readv(pid, local, k, remote, k, 0);
		if (r < 0) {
			if (errno == EINTR)
				r = 0;
			else if (errno == ESRCH)
				return -ESRCH;
			else
				r = 0; /* handle the first iovec through the fallback below */
		}
		/* account fully transferred iovecs, then repair the one that stopped it */
		int j = 0;
		uint64_t left = (uint64_t)r;
		while (j < k && left >= local[j].iov_len) {
			left -= local[j].iov_len;
			status[i + j] = 0;
			total += local[j].iov_len;
			j++;
		}
		if (j < k) {
			/* iovec j failed or was partial: finish it through /proc/PID/mem */
			int64_t fr = -EFAULT;
			if (mem_fd >= 0)
				fr = mem_fallback(mem_fd, remote[j].iov_base ? (uint64_t)(uintptr_t)remote[j].iov_base : 0,
						  local[j].iov_len, local[j].iov_base, write);
			if (fr < 0) {
				status[i + j] = (int32_t)-fr;
			} else {
				status[i + j] = 0;
				total += fr;
			}
			j++;
			/* restart after iovec j */
			uint64_t consumed = 0;
			for (int q = 0; q < j; q++)
				consumed += local[q].iov_len;
			off = batch_off + consumed;
		}
		i += j;
	}
	return total;
}

int64_t ck_read_runs(int pid, int mem_fd, const uint64_t *runs, int64_t nruns,
		     uint8_t *dst, int32_t *status)
{
	return rw_runs(pid, mem_fd, runs, nruns, dst, status, 0);
}

/*
 * ck_read_runs through /proc/PID/mem alone (one pread per run): unlike process_vm_readv, which
 * pins the pages it reads, it leaves pages the process shares copy-on-write with its parent or
 * children shared (a pin of a shared anonymous page makes the kernel give the process its own
 * copy). For the big runs of a full copy; the scattered written pages are private already.
 */
int64_t ck_read_runs_unpinned(int mem_fd, const uint64_t *runs, int64_t nruns, uint8_t *dst, int32_t *status)
{
	int64_t total = 0;
	uint64_t off = 0;
	for (int64_t i = 0; i < nruns; i++) {
		uint64_t len = runs[2 * i + 1];
		int64_t r = mem_fallback(mem_fd, runs[2 * i], len, dst + off, 0);
		if (r < 0) {
			if (r == -ESRCH)
				return -ESRCH;
			status[i] = (int32_t)-r;
		} else {
			status[i] = 0;
			total += r;
		}
		off += len;
	}
	return total;
}

int64_t ck_write_runs(int pid, int mem_fd, const uint64_t *runs, int64_t nruns,
		      const uint8_t *src, int32_t *status)
{
	return rw_runs(pid, mem_fd, runs, nruns, (uint8_t *)src, status, 1);
}

/* ------------------------------------------------------ page classification */

static int page_is_zero(const uint8_t *p, uint64_t page_size)
{
	const uint64_t *w = (const uint64_t *)p;
	uint64_t acc = 0;
	for (uint64_t i = 0; i < page_size / 8; i += 8) {
		acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
		if (acc)
			return 0;
	}
	return 1;
}

int64_t ck_zero_pages(const uint8_t *buf, int64_t npages, uint64_t page_size, uint8_t *is_zero)
{
	int64_t zeros = 0;
	for (int64_t i = 0; i < npages; i++) {
		is_zero[i] = (uint8_t)page_is_zero(buf + (uint64_t)i * page_size, page_size);
		zeros += is_zero[i];
	}
	return zeros;
}

int64_t ck_first_diff_page(const uint8_t *a, const uint8_t *b, int64_t npages, uint64_t page_size)
{
	for (int64_t i = 0; i < npages; i++)
		if (memcmp(a + (uint64_t)i * page_size, b + (uint64_t)i * page_size, page_size))
			return i;
	return -1;
}

/* ------------------------------------------------------- small syscalls */

int ck_pidfd_open(int pid)
{
	long r = syscall(__NR_pidfd_open, pid, 0);
	return r < 0 ? -errno : (int)r;
}

int ck_pidfd_getfd(int pidfd, int fd)
{
	long r = syscall(__NR_pidfd_getfd, pidfd, fd, 0);
	return r < 0 ? -errno : (int)r;
}

int ck_get_robust_list(int tid, uint64_t *head, uint64_t *len)
{
	void *h = NULL;
	size_t l = 0;
	if (syscall(SYS_get_robust_list, tid, &h, &l) < 0)
		return -errno;
	*head = (uint64_t)(uintptr_t)h;
	*len = (uint64_t)l;
	return 0;
}

/*
 * A child with the given PID (clone3 set_tid), stopped under ptrace before it runs any code of
 * ours: it asks to be traced and stops itself. It is a copy of the calling process; the restorer
 * then replaces its whole address space by injected syscalls. Only raw syscalls run in the child.
 */
int ck_spawn_stopped(int pid)
{
	pid_t tid = pid;
	struct ck_clone_args args;
	memset(&args, 0, sizeof(args));
	args.exit_signal = SIGCHLD;
	args.set_tid = (uint64_t)(uintptr_t)&tid;
	args.set_tid_size = 1;
	long r = syscall(__NR_clone3, &args, sizeof(args));
	if (r < 0)
		return -errno;
	if (r == 0) {
		/* die with the restorer if it dies before the release (which clears this again) */
		syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
		syscall(SYS_ptrace, PTRACE_TRACEME, 0, 0, 0);
		syscall(SYS_kill, syscall(SYS_getpid), SIGSTOP);
		syscall(SYS_exit_group, 127);
	}
	return (int)r;
}

/* --------------------------------------------- fd table, in the freeze */

/*
 * For each fd of pid: what its /proc link says, fstat of it, and the status flags and position
 * from its fdinfo; one call for the whole table (the freeze reads it while the target is
 * stopped). out[i].err is 0 or the errno of the fd (ENOENT: closed meanwhile).
 */
static int64_t fdinfo_field(const char *buf, const char *name, int base)
{
	const char *p = strstr(buf, name);
	if (!p)
		return 0;
	return strtoll(p + strlen(name), NULL, base);
}

int64_t ck_fd_scan(int pid, const int32_t *fds, int64_t n, struct ck_fdstat *out)
{
	char path[64], info[512];
	snprintf(path, sizeof(path), "/proc/%d/fd", pid);
	int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		return -errno;
	snprintf(path, sizeof(path), "/proc/%d/fdinfo", pid);
	int ifd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (ifd < 0) {
		int e = errno;
		close(dfd);
		return -e;
	}
	for (int64_t i = 0; i < n; i++) {
		struct ck_fdstat *o = &out[i];
		char name[16];
		struct stat st;
		memset(o, 0, sizeof(*o));
		o->fd = fds[i];
		snprintf(name, sizeof(name), "%d", fds[i]);
		ssize_t len = readlinkat(dfd, name, o->link, sizeof(o->link) - 1);
		if (len < 0) {
			o->err = errno;
			continue;
		}
		o->link[len] = 0;
		o->link_len = (int32_t)len;
		if (fstatat(dfd, name, &st, 0) < 0) {
			/* closed between the two looks (the target runs while the dump first describes
			 * its fds): as if closed before */
			if (errno == ENOENT) {
				o->err = errno;
				continue;
			}
		} else {
			o->has_stat = 1;
			o->mode = st.st_mode;
			o->dev = st.st_dev;
			o->ino = st.st_ino;
			o->rdev = st.st_rdev;
			o->size = st.st_size;
			o->mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
		}
		int f = openat(ifd, name, O_RDONLY | O_CLOEXEC);
		if (f < 0) {
			o->err = errno;
			continue;
		}
		ssize_t r = read(f, info, sizeof(info) - 1);
		close(f);
		if (r < 0) {
			o->err = errno;
			continue;
		}
		info[r] = 0;
		o->pos = fdinfo_field(info, "pos:", 10);
		o->flags = (uint32_t)fdinfo_field(info, "flags:", 8);
		o->has_lock = strstr(info, "\nlock:") != NULL;
	}
	close(ifd);
	close(dfd);
	return n;
}

/* --------------------------------------------- sync uffd-wp tracker thread */

struct ck_tracker {
	int uffd;
	int stop_pipe[2];
	pthread_t thread;
	pthread_mutex_t lock;
	uint64_t *pages;
	int64_t npages, cap;
	int64_t faults;
	int error;
};

static void tracker_record(struct ck_tracker *t, uint64_t page)
{
	pthread_mutex_lock(&t->lock);
	if (t->npages == t->cap) {
		int64_t ncap = t->cap ? t->cap * 2 : 4096;
		uint64_t *np = realloc(t->pages, (size_t)ncap * sizeof(uint64_t));
		if (!np) {
			t->error = ENOMEM;
			pthread_mutex_unlock(&t->lock);
			return;
		}
		t->pages = np;
		t->cap = ncap;
	}
	t->pages[t->npages++] = page;
	t->faults++;
	pthread_mutex_unlock(&t->lock);
}

static void *tracker_main(void *arg)
{
	struct ck_tracker *t = arg;
	struct uffd_msg msgs[64];
	long psz = sysconf(_SC_PAGESIZE);

	for (;;) {
		struct pollfd pfd[2] = {
			{ .fd = t->uffd, .events = POLLIN },
			{ .fd = t->stop_pipe[0], .events = POLLIN },
		};
		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			t->error = errno;
			break;
		}
		if (pfd[1].revents)
			break;
		if (pfd[0].revents & (POLLERR | POLLHUP)) {
			t->error = EPIPE;
			break;
		}
		ssize_t r = read(t->uffd, msgs, sizeof(msgs));
		if (r < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			t->error = errno;
			break;
		}
		for (size_t i = 0; i < (size_t)r / sizeof(msgs[0]); i++) {
			if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
				continue;
			uint64_t page = msgs[i].arg.pagefault.address & ~((uint64_t)psz - 1);
			/* lift the protection (this wakes the writer), then flag the page. Not the
			 * other way round: the checkpointer drains the flags and then protects the
			 * pages it got again; a flag drained before this unprotect would have its
			 * page left unprotected, and every later write to it unseen */
			int e = ck_uffd_wp(t->uffd, page, (uint64_t)psz, 0);
			if (e < 0 && e != -ENOENT)
				t->error = -e;
			tracker_record(t, page);
		}
	}
	return NULL;
}

struct ck_tracker *ck_tracker_start(int uffd)
{
	struct ck_tracker *t = calloc(1, sizeof(*t));
	if (!t)
		return NULL;
	t->uffd = uffd;
	pthread_mutex_init(&t->lock, NULL);
	if (pipe(t->stop_pipe) < 0) {
		free(t);
		return NULL;
	}
	/* the thread takes no signal: ckpt's main thread waits for its tracees' stops with
	 * SIGCHLD blocked (sigtimedwait), and a SIGCHLD this thread let in would be lost */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	int failed = pthread_create(&t->thread, NULL, tracker_main, t);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (failed) {
		close(t->stop_pipe[0]);
		close(t->stop_pipe[1]);
		free(t);
		return NULL;
	}
	return t;
}

int64_t ck_tracker_drain(struct ck_tracker *t, uint64_t *out, int64_t cap)
{
	pthread_mutex_lock(&t->lock);
	int64_t n = t->npages < cap ? t->npages : cap;
	memcpy(out, t->pages, (size_t)n * sizeof(uint64_t));
	memmove(t->pages, t->pages + n, (size_t)(t->npages - n) * sizeof(uint64_t));
	t->npages -= n;
	pthread_mutex_unlock(&t->lock);
	return n;
}

int64_t ck_tracker_pending(struct ck_tracker *t)
{
	pthread_mutex_lock(&t->lock);
	int64_t n = t->npages;
	pthread_mutex_unlock(&t->lock);
	return n;
}

int64_t ck_tracker_faults(struct ck_tracker *t)
{
	return t->faults;
}

int ck_tracker_error(struct ck_tracker *t)
{
	return t->error;
}

void ck_tracker_stop(struct ck_tracker *t)
{
	char c = 1;
	ssize_t ignored = write(t->stop_pipe[1], &c, 1);
	(void)ignored;
	pthread_join(t->thread, NULL);
	close(t->stop_pipe[0]);
	close(t->stop_pipe[1]);
	free(t->pages);
	pthread_mutex_destroy(&t->lock);
	free(t);
}

/*
 * The bytes buffered in a pipe, copied without consuming them: tee() into a private pipe,
 * then read that. Returns the number of bytes (at most cap) or -errno.
 */
int64_t ck_pipe_peek(int src_fd, uint8_t *dst, int64_t cap)
{
	int p[2];
	if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
		return -errno;
	fcntl(p[1], F_SETPIPE_SZ, (int)cap);
	int64_t total = 0;
	ssize_t n = tee(src_fd, p[1], (size_t)cap, SPLICE_F_NONBLOCK);
	if (n < 0 && errno != EAGAIN) {
		total = -errno;
	} else if (n > 0) {
		while (total < n) {
			ssize_t r = read(p[0], dst + total, (size_t)(n - total));
			if (r <= 0)
				break;
			total += r;
		}
	}
	close(p[0]);
	close(p[1]);
	return total;
}

/* --------------------------------------------- pages a child shares with its parent */

/*
 * The pages of [start, end) that process `child` and process `parent` both map to the same
 * physical page (copy-on-write since a fork, neither side has written it since): both present
 * in /proc/PID/pagemap with the same page frame number (root only: others read PFN 0, and
 * nothing is found). Writes merged runs as (start, end) pairs into out (at most cap runs);
 * returns the number of runs, or -errno. One call per mapping; pagemap read in 512-page batches.
 */
#define CK_PM_BATCH 512
#define CK_PM_PRESENT (1ULL << 63)
#define CK_PM_PFN ((1ULL << 55) - 1)

int64_t ck_cow_shared(int child_pm, int parent_pm, uint64_t start, uint64_t end, uint64_t *out, int64_t cap)
{
	uint64_t a[CK_PM_BATCH], b[CK_PM_BATCH];
	int64_t n = 0;
	uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
	for (uint64_t addr = start; addr < end;) {
		uint64_t count = (end - addr) / page;
		if (count > CK_PM_BATCH)
			count = CK_PM_BATCH;
		off_t off = (off_t)(addr / page * 8);
		ssize_t ra = pread(child_pm, a, count * 8, off);
		ssize_t rb = pread(parent_pm, b, count * 8, off);
		if (ra < 0 || rb < 0)
			return -errno;
		uint64_t got = (uint64_t)(ra < rb ? ra : rb) / 8;
		if (got == 0)
			break;
		for (uint64_t i = 0; i < got; i++) {
			uint64_t x = a[i], y = b[i];
			int same = (x & CK_PM_PRESENT) && (y & CK_PM_PRESENT) && (x & CK_PM_PFN) &&
				   (x & CK_PM_PFN) == (y & CK_PM_PFN);
			if (!same)
				continue;
			uint64_t p = addr + i * page;
			if (n > 0 && out[2 * n - 1] == p) {
				out[2 * n - 1] = p + page;
			} else {
				if (n == cap)
					return n;
				out[2 * n] = p;
				out[2 * n + 1] = p + page;
				n++;
			}
		}
		addr += got * page;
	}
	return n;
}

/* --------------------------------------------- per-thread state, in the freeze */

/*
 * What the freeze reads of one stopped thread with ptrace, in one call: the general registers
 * (struct user_regs_struct, 27 words), the xstate area (up to xstate_cap bytes), the signal
 * mask, the rseq configuration, the robust list, the signals queued for the thread alone (up to
 * sig_cap siginfos of 128 bytes) and the siginfo of the stop itself. Fields that cannot be read
 * are left zero with their flag bit clear. Returns 0 or -errno (the registers are required).
 */
#include <sys/user.h>
#include <elf.h>
#include <linux/ptrace.h>

struct ck_rseq_conf {
	uint64_t ptr;
	uint32_t size, sig, flags, pad;
};

int ck_thread_state(int tid, struct ck_thread *t, uint8_t *xstate, int64_t xstate_cap, uint8_t *sigs, int32_t sig_cap)
{
	memset(t, 0, sizeof(*t));
	if (ptrace(PTRACE_GETREGS, tid, 0, t->regs) < 0)
		return -errno;
	struct iovec iov = { .iov_base = xstate, .iov_len = (size_t)xstate_cap };
	if (ptrace(PTRACE_GETREGSET, tid, (void *)NT_X86_XSTATE, &iov) == 0)
		t->xstate_len = (int64_t)iov.iov_len;
	if (ptrace(PTRACE_GETSIGMASK, tid, (void *)8, &t->sigmask) == 0)
		t->have |= 1;
	struct ck_rseq_conf rc;
	memset(&rc, 0, sizeof(rc));
	long n = ptrace(0x420f /* PTRACE_GET_RSEQ_CONFIGURATION */, tid, (void *)sizeof(rc), &rc);
	if (n > 0 && rc.ptr) {
		t->have |= 2;
		t->rseq_ptr = rc.ptr;
		t->rseq_size = rc.size;
		t->rseq_sig = rc.sig;
	}
	void *h = NULL;
	size_t l = 0;
	if (syscall(SYS_get_robust_list, tid, &h, &l) == 0) {
		t->have |= 4;
		t->robust_head = (uint64_t)(uintptr_t)h;
		t->robust_len = (uint64_t)l;
	}
	int32_t got = 0;
	while (got < sig_cap) {
		struct ptrace_peeksiginfo_args a = { .off = (uint64_t)got, .flags = 0, .nr = sig_cap - got };
		long k = ptrace(PTRACE_PEEKSIGINFO, tid, &a, sigs + (size_t)got * 128);
		if (k <= 0)
			break;
		got += (int32_t)k;
	}
	t->nsigs = got;
	if (ptrace(PTRACE_GETSIGINFO, tid, 0, t->stop_siginfo) == 0)
		t->have |= 8;
	return 0;
}
