"""Trackers: what flags the pages the target writes while memory is streamed out.

The proposal's fault handler, in three forms:
  AsyncTracker  uffd-wp with WP_ASYNC: the kernel flags the page and lets the write go on;
                PAGEMAP_SCAN(PAGE_IS_WRITTEN, WP_MATCHING) reads and re-arms the flags.
  SyncTracker   plain uffd-wp: a native thread receives each write fault, flags the page,
                lifts the protection and wakes the writer (kernels without WP_ASYNC).
  NoTracker     stop-the-world: nothing is tracked; everything is copied while frozen.

All share one interface: register(vmas), protect(vmas), arm(vmas) (both), written(vmas),
final(vmas), disarm(). Registration must happen with the target stopped (see
Dump._register_stopped); protecting happens after the target runs again and returns the
mappings it could not protect cleanly.
`written` and `final` return (untracked, runs): the mappings found unregistered (their
pages must all be copied) and the (addr, length) runs written since the previous call.
"""
import errno
import os
import signal

from ckpt.errors import KernelFeatureError
from ckpt.kernel import pagemap, procfs
from ckpt.kernel.native import PAGE_SIZE, ffi, lib
from ckpt.kernel.uffd import ASYNC_FEATURES, SYNC_FEATURES, Uffd


def _ranges(vmas):
    return [(v.start, v.end) for v in vmas]


class _UffdTracker:
    def __init__(self, uffd_fd, pid, features):
        self.uffd = Uffd(uffd_fd)
        got = self.uffd.api(features)
        if got & features != features:
            self.uffd.close()
            raise KernelFeatureError("userfaultfd lacks features %#x" % (features & ~got))
        self.pid = pid
        self.pm = pagemap.Pagemap(pid)
        self.registered = {}   # (start, end) -> True for every range we registered
        self.adopted = False   # built on a uffd initialised elsewhere (tracking kept: adopt())

    def register(self, vmas):
        return self._register(vmas)

    def arm(self, vmas):
        ok, refused = self.register(vmas)
        self.protect(ok)
        return ok, refused

    add = arm

    def _register(self, vmas):
        """Register what can be; return (registered, refused) mappings."""
        ok, refused = [], []
        for v in vmas:
            r = self.uffd.register(v.start, v.size)
            if r == 0:
                self.registered[v.key()] = True
                ok.append(v)
            else:
                refused.append(v)
        return ok, refused

    def disarm(self):
        """Unregister every range (this also lifts the protection) and close the uffd."""
        for start, end in list(self.registered):
            self.uffd.unregister(start, end - start)
        self.registered.clear()
        self.pm.close()
        self.uffd.close()

    def ranges(self):
        """The registered ranges, merged: [(start, end)] (what a kept tracking records)."""
        out = []
        for s, e in sorted(self.registered):
            if out and s <= out[-1][1]:
                out[-1] = (out[-1][0], max(e, out[-1][1]))
            else:
                out.append((s, e))
        return out

    def release(self):
        """Close ckpt's own fds only: the registration and protection stay, for whoever else
        holds the uffd (the holder of a kept tracking, ckpt/dump/keep.py)."""
        self.pm.close()
        self.uffd.close()

    def unregister_all(self, maps=None):
        """Unregister every trackable mapping of the target as it is now (maps: its listing,
        read if not given) and every range known as registered: the protection is lifted."""
        if maps is None:
            try:
                maps = procfs.read_maps(self.pid)
            except Exception:
                maps = []
        for v in maps:
            if v.kind in ("anon", "file-private"):
                self.uffd.unregister(v.start, v.size)
        for start, end in list(self.registered):
            self.uffd.unregister(start, end - start)
        self.registered.clear()


class AsyncTracker(_UffdTracker):
    mode = "async"

    def __init__(self, uffd_fd, pid):
        super().__init__(uffd_fd, pid, ASYNC_FEATURES)
        self._helper = None
        self.rearm_final = False   # the final scan re-arms too (tracking kept after the dump)

    @classmethod
    def adopt(cls, fd, pid, ranges):
        """A tracker on a uffd initialised already (UFFDIO_API cannot be done twice): the held
        uffd of a kept tracking (ckpt/dump/keep.py), registered on `ranges` [(start, end)].
        Takes ownership of fd (closed by disarm() or release())."""
        self = cls.__new__(cls)
        self.uffd = Uffd(fd)
        self.uffd.features = ASYNC_FEATURES
        self.pid = pid
        self.pm = pagemap.Pagemap(pid)
        self.registered = {(int(s), int(e)): True for s, e in ranges}
        self.adopted = True
        self._helper = None
        self.rearm_final = False
        return self

    def protect(self, vmas):
        """Protect freshly registered mappings. Returns those whose old protection bits could
        not be cleared first (the mapping changed meanwhile): they must be registered and
        protected again, or copied whole.

        The bits are cleared first because a page can carry a stale uffd-wp bit on a writable
        PTE: when a moved mapping merges back into a registered neighbour, the kernel drops the
        registration of the whole merged VMA (userfaultfd_reset_ctx) but leaves its PTEs' bits;
        a write there then makes the PTE writable and keeps the bit. WP_MATCHING takes such a
        page for protected and never reports it again, whatever is written to it.

        Runs while the target runs: a bulk protect of a range that has changed meanwhile
        skips what is not registered there, which later scans report (EPERM)."""
        failed = [v for v in vmas if self.uffd.protect(v.start, v.size, False) != 0]
        # bulk protect: every page not yet protected counts as written; re-arm them all
        self.pm.scan(_ranges(vmas), flags=pagemap.WP_MATCHING, mask=pagemap.WRITTEN,
                     ret_mask=pagemap.WRITTEN, vec=False)
        return failed

    def _scan(self, vmas, flags, pm=None, ranges=None):
        """Scan for written pages; a mapping found unregistered (EPERM) is returned apart.
        ranges: the (start, end) to scan, one per entry of vmas (default: the whole of each)."""
        pm = pm or self.pm
        untracked, regions = [], []
        ranges = _ranges(vmas) if ranges is None else ranges
        i = 0
        while i < len(ranges):
            try:
                regions += pm.scan(ranges[i:], flags=flags | pagemap.CHECK_WPASYNC,
                                   mask=pagemap.WRITTEN, ret_mask=pagemap.WRITTEN)
                break
            except pagemap.ScanError as e:
                if e.errno != errno.EPERM:
                    raise
                regions += e.partial   # the ranges before the failing one were scanned (and re-armed)
                j = i + e.range_index
                untracked.append(vmas[j])
                i = j + 1
        return untracked, [(s, e - s) for s, e, _ in regions]

    def written(self, vmas):
        return self._scan(vmas, pagemap.WP_MATCHING)

    def start_final(self):
        """Begin the last scan as soon as the process is frozen, in the helper thread (see
        prepare_final), over every registered range, while the main thread reads the frozen
        process's state (waiting on ptrace most of that time); final() takes its result. The
        ranges go in pieces of at most EARLY_PIECE bytes, one ioctl each: the scan holds the
        process's mmap lock for reading while it walks, and the injected calls that need it for
        writing (the blob's mmap, brk) wait for one piece at most. What the kernel writes into
        the process while its state is read (each thread's rseq area, on every return to user
        space) the caller copies again (see Dump._final_scan)."""
        if self._helper is None:
            return
        flags = pagemap.WP_MATCHING if self.rearm_final else 0
        pieces = []
        for s, e in sorted(self.registered):
            for a in range(s, e, EARLY_PIECE):
                pieces.append(_Span(a, min(e, a + EARLY_PIECE)))
        self._early = self._helper.submit(lambda pm: self._scan(pieces, flags, pm))

    def final(self, vmas):
        """The last scan, frozen (nothing writes again: no re-arming, unless the tracking is
        kept after the dump: rearm_final). A large one is split in two halves scanned at once
        on two CPUs (the ioctl walks page tables without the GIL), or was begun early
        (start_final)."""
        early, self._early = getattr(self, "_early", None), None
        if early is not None:
            bad, runs = early.result()
            return [v for v in vmas if any(b.start < v.end and v.start < b.end for b in bad)], runs
        flags = pagemap.WP_MATCHING if self.rearm_final else 0
        total = sum(v.size for v in vmas)
        if total < PARALLEL_SCAN_MIN or (os.cpu_count() or 1) < 2:
            return self._scan(vmas, flags)
        halves = _split(vmas, total // 2)
        if self._helper is None:
            self._helper = _ScanHelper(self.pid)
        job = self._helper.submit(lambda pm: self._scan(halves[1][0], flags, pm, halves[1][1]))
        first = self._scan(halves[0][0], flags, None, halves[0][1])
        second = job.result()
        untracked = list({id(v): v for v in first[0] + second[0]}.values())
        return untracked, first[1] + second[1]

    def prepare_final(self):
        """Start the second scanning thread before the freeze (its start is not free), if the
        final scan will be large enough to split."""
        if self._helper is None and sum(e - s for s, e in self.registered) >= PARALLEL_SCAN_MIN:
            self._helper = _ScanHelper(self.pid)

    def disarm(self):
        if self._helper is not None:
            self._helper.close()
            self._helper = None
        super().disarm()

    def release(self):
        if self._helper is not None:
            self._helper.close()
            self._helper = None
        super().release()


PARALLEL_SCAN_MIN = 256 << 20      # below it one scan is faster than handing half to a thread
EARLY_PIECE = 64 << 20             # the early final scan's pieces (one ioctl each)


class _Span:
    """A range scanned apart (start_final), in the place of a mapping."""
    __slots__ = ("start", "end")

    def __init__(self, start, end):
        self.start, self.end = start, end


def _split(vmas, half):
    """Two lists of (vmas, ranges) holding about `half` bytes in the first: a mapping that
    straddles the middle is split (a range each; both name the mapping)."""
    a, b, acc = ([], []), ([], []), 0
    for v in vmas:
        if acc >= half:
            b[0].append(v)
            b[1].append((v.start, v.end))
        elif acc + v.size <= half:
            a[0].append(v)
            a[1].append((v.start, v.end))
        else:
            mid = v.start + ((half - acc) & ~(PAGE_SIZE - 1))
            if mid <= v.start:
                b[0].append(v)
                b[1].append((v.start, v.end))
                acc += v.size
                continue
            a[0].append(v)
            a[1].append((v.start, mid))
            b[0].append(v)
            b[1].append((mid, v.end))
        acc += v.size
    return a, b


class _ScanHelper:
    """One worker thread with a pagemap of its own, for the final scan's second half."""

    def __init__(self, pid):
        import concurrent.futures
        self.pm = pagemap.Pagemap(pid)
        # all signals blocked there: ckpt's ptrace waits take SIGCHLD in the main thread alone
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ckpt-scan",
            initializer=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals()))
        self.pool.submit(lambda: None).result()      # the thread exists now

    def submit(self, fn):
        return self.pool.submit(fn, self.pm)

    def close(self):
        self.pool.shutdown(wait=True)
        self.pm.close()


class SyncTracker(_UffdTracker):
    mode = "sync"

    def __init__(self, uffd_fd, pid):
        super().__init__(uffd_fd, pid, SYNC_FEATURES)
        fl = os.get_blocking(uffd_fd)
        if fl:
            os.set_blocking(uffd_fd, False)
        self.thread = lib.ck_tracker_start(uffd_fd)
        if self.thread == ffi.NULL:
            raise OSError(errno.ENOMEM, "cannot start the tracker thread")
        self._buf = ffi.new("uint64_t[]", 1 << 16)

    def protect(self, vmas):
        """Protect every page of freshly registered mappings (whatever bits they carried).
        Runs while the target runs: UFFDIO_WRITEPROTECT stops at the first part of a range that
        is no longer registered, so such mappings are returned, to be armed again or copied
        whole."""
        return [v for v in vmas if self.uffd.protect(v.start, v.size, True) != 0]

    def _unregistered(self, vmas):
        """Mappings that lost their registration (moved by mremap, or merged into a VMA
        whose registration the kernel dropped): there is no scan to tell in this mode, but
        protecting one page fails with ENOENT where the VMA is not registered. Protecting
        that page again costs one more fault at most, which the tracker records."""
        return [v for v in vmas if self.uffd.protect(v.start, PAGE_SIZE, True) == -errno.ENOENT]

    def _drain(self):
        pages = set()
        while True:
            n = lib.ck_tracker_drain(self.thread, self._buf, 1 << 16)
            pages.update(ffi.unpack(self._buf, n))
            if n < (1 << 16):
                break
        err = lib.ck_tracker_error(self.thread)
        if err:
            raise OSError(err, "uffd tracker thread: %s" % os.strerror(err))
        return _pages_to_runs(sorted(pages))

    def written(self, vmas):
        untracked = self._unregistered(vmas)
        runs = self._drain()
        # re-arm before the caller copies: a write after this point faults again
        self.uffd.protect_runs(runs, True)
        return untracked, runs

    def final(self, vmas):
        return self._unregistered(vmas), self._drain()

    @property
    def faults(self):
        return lib.ck_tracker_faults(self.thread)

    def disarm(self):
        # unregister first: it wakes any writer still blocked on a fault; then stop the thread
        for start, end in list(self.registered):
            self.uffd.unregister(start, end - start)
        self.registered.clear()
        lib.ck_tracker_stop(self.thread)
        self.pm.close()
        self.uffd.close()


class NoTracker:
    mode = "stop-the-world"

    def register(self, vmas):
        return [], list(vmas)

    def protect(self, vmas):
        return []

    def arm(self, vmas):
        return [], list(vmas)

    add = arm

    def written(self, vmas):
        return list(vmas), []

    final = written

    def disarm(self):
        pass


def _pages_to_runs(pages):
    runs = []
    for p in pages:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1][1] += PAGE_SIZE
        else:
            runs.append([p, PAGE_SIZE])
    return [tuple(r) for r in runs]
