/* Declarations of the ckpt native core; also fed to cffi's cdef. Plain C only. */
int ck_uffd_api(int fd, uint64_t features, uint64_t *out_features);
int ck_uffd_register_wp(int fd, uint64_t start, uint64_t len);
int ck_uffd_unregister(int fd, uint64_t start, uint64_t len);
int ck_uffd_wp(int fd, uint64_t start, uint64_t len, int protect);
int64_t ck_uffd_wp_runs(int fd, const uint64_t *runs, int64_t nruns, int protect);

int64_t ck_scan(int pagemap_fd, const uint64_t *ranges, int nranges,
		uint64_t flags, uint64_t inverted, uint64_t mask, uint64_t anyof,
		uint64_t ret_mask, uint64_t *out, int64_t cap,
		int *next_range, uint64_t *next_addr);

int64_t ck_data_ranges(int fd, uint64_t lo, uint64_t hi, uint64_t *out, int64_t cap, uint64_t *next);

int64_t ck_read_runs(int pid, int mem_fd, const uint64_t *runs, int64_t nruns,
		     uint8_t *dst, int32_t *status);
int64_t ck_write_runs(int pid, int mem_fd, const uint64_t *runs, int64_t nruns,
		      const uint8_t *src, int32_t *status);

int64_t ck_zero_pages(const uint8_t *buf, int64_t npages, uint64_t page_size, uint8_t *is_zero);
int64_t ck_first_diff_page(const uint8_t *a, const uint8_t *b, int64_t npages, uint64_t page_size);

int ck_pidfd_open(int pid);
int ck_pidfd_getfd(int pidfd, int fd);
int ck_get_robust_list(int tid, uint64_t *head, uint64_t *len);
int ck_spawn_stopped(int pid);

struct ck_fdstat {
	int32_t fd, err, has_stat, link_len;
	uint32_t mode, flags;
	int32_t has_lock, pad;    /* fdinfo lists a lock ("lock:") on the fd's file */
	uint64_t dev, ino, rdev;
	int64_t size, mtime_ns, pos;
	char link[480];
};
int64_t ck_fd_scan(int pid, const int32_t *fds, int64_t n, struct ck_fdstat *out);
int64_t ck_pipe_peek(int src_fd, uint8_t *dst, int64_t cap);

struct ck_tracker;
struct ck_tracker *ck_tracker_start(int uffd);
int64_t ck_tracker_drain(struct ck_tracker *t, uint64_t *out, int64_t cap);
int64_t ck_tracker_pending(struct ck_tracker *t);
int64_t ck_tracker_faults(struct ck_tracker *t);
int ck_tracker_error(struct ck_tracker *t);
void ck_tracker_stop(struct ck_tracker *t);
int64_t ck_cow_shared(int child_pm, int parent_pm, uint64_t start, uint64_t end, uint64_t *out, int64_t cap);

struct ck_thread {
	uint64_t regs[27];
	int64_t xstate_len;
	uint64_t sigmask;
	uint64_t rseq_ptr;
	uint32_t rseq_size, rseq_sig;
	uint64_t robust_head, robust_len;
	int32_t nsigs;
	int32_t have;           /* 1 sigmask, 2 rseq, 4 robust list, 8 stop siginfo */
	uint8_t stop_siginfo[128];
};
int ck_thread_state(int tid, struct ck_thread *t, uint8_t *xstate, int64_t xstate_cap, uint8_t *sigs, int32_t sig_cap);
int64_t ck_read_runs_unpinned(int mem_fd, const uint64_t *runs, int64_t nruns, uint8_t *dst, int32_t *status);
