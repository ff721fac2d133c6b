"""The save algorithm: attach, arm, rounds, freeze, final copy, finish.

  arm      inject userfaultfd into the target and take it; register every mapping that can
           be; write-protect all of it in one PAGEMAP_SCAN(WP_MATCHING)
  round 0  stream every page whose content is not known from elsewhere, while the target runs
  round k  scan for pages written meanwhile (re-arming them in the same call) and copy them;
           stop when the predicted final copy fits the pause budget, when a round makes no
           progress, or after --rounds
  freeze   interrupt every thread; capture thread and process state; final scan; copy the
           written pages and everything tracking cannot see (shared memory, new mappings)
  finish   trailer, rename; then kill the target, or lift all protection and resume it
"""
import bisect
import errno
import os
import select
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ckpt import __version__
from ckpt.dump import copy as copymod
from ckpt.dump.freeze import O_CLOEXEC, O_NONBLOCK, Freezer, check_target, steal_uffd
from ckpt.dump.tracker import AsyncTracker, NoTracker, SyncTracker
from ckpt.dump.verify import verify_frozen
from ckpt import files
from ckpt.errors import CkptError, DumpInterrupted, KernelFeatureError, TargetError, TargetGone
from ckpt.image.reader import ImageReader
from ckpt.image.writer import ImageWriter
from ckpt.kernel import features, pagemap, procfs
from ckpt.kernel.native import PAGE_SIZE
from ckpt.kernel.ptrace import find_syscall_insn
from ckpt.kernel.uffd import USER_MODE_ONLY
from ckpt.state.inject import Injector
from ckpt.state.process import dump_process, exe_identity, refuse_namespaces
from ckpt.state.threads import dump_threads

TRACKABLE = ("anon", "file-private")
MODES = ("auto", "async", "sync", "stop-the-world")
SINK_PREPARED = 32 << 20


@dataclass
class DumpOptions:
    output: str
    leave_running: bool = False
    max_pause_ms: float = 10.0
    rounds: int = 8
    mode: str = "auto"
    verify: bool = False
    compress: str = "lz4"
    progress: Optional[Callable] = None
    interrupted: Callable = field(default=lambda: None)   # returns a signal number or None


class _Coverage:
    """Ranges registered with the uffd, to tell which current mappings are tracked."""

    def __init__(self, registered):
        merged = copymod.merge_ranges(registered)
        self.starts = [s for s, _ in merged]
        self.merged = merged

    def covers(self, v):
        i = bisect.bisect_right(self.starts, v.start) - 1
        return i >= 0 and self.merged[i][1] >= v.end


class Dump:
    def __init__(self, pid, opts):
        self.pid = pid
        self.opts = opts
        self.tracker = None
        self.freezer = Freezer(pid, check=self._check)
        self.writer = None
        self.copier = None
        self.rounds = []          # per round: {"round", "pages", "ms"}
        self._suspect = []        # registered, but protecting them failed: arm again or copy whole
        self.mode = None
        self.fdctx = files.FreezeContext(pid, opts.leave_running)
        self.described = None
        self.t0 = time.perf_counter()
        self.result = {}

    # ------------------------------------------------------------------ helpers
    def _progress(self, **info):
        if self.opts.progress:
            self.opts.progress(info)

    def _check(self):
        sig = self.opts.interrupted()
        if sig:
            raise DumpInterrupted("interrupted by signal %d; dump abandoned, process %d left running as before"
                                  % (sig, self.pid))

    def _choose_mode(self):
        mode = self.opts.mode
        if mode not in MODES:
            raise CkptError("unknown mode %r (choose from %s)" % (mode, ", ".join(MODES)))
        feats = features.probe()
        if mode == "auto":
            if feats["async"]:
                return "async"
            if feats["sync"] and _privileged(self.pid):
                return "sync"
            return "stop-the-world"
        if mode == "async" and not feats["async"]:
            raise KernelFeatureError("async mode needs userfaultfd WP_ASYNC and PAGEMAP_SCAN (Linux 6.7+); "
                                     "use --mode sync or --mode stop-the-world")
        if mode == "sync":
            if not feats["sync"]:
                raise KernelFeatureError("sync mode needs userfaultfd write-protect (Linux 5.7+)")
            if not _privileged(self.pid):
                raise KernelFeatureError("sync mode needs a privileged target (CAP_SYS_PTRACE) on this system "
                                         "(vm.unprivileged_userfaultfd=0); use --mode async")
        return mode

    def _trackable(self, maps):
        return [v for v in maps if v.kind in TRACKABLE]

    def _coverage(self):
        return _Coverage(self.tracker.registered.keys() if hasattr(self.tracker, "registered") else [])

    def _copy_round(self, index, runs, extra_pages=0, t_start=None):
        t = time.perf_counter() if t_start is None else t_start
        # round 0 streams big contiguous runs (zero runs kept apart); later rounds scattered pages
        pages = self.copier.copy(runs, check=self._check, scatter=index > 0) + extra_pages
        ms = (time.perf_counter() - t) * 1000
        info = {"round": index, "pages": pages, "ms": round(ms, 3)}
        self.rounds.append(info)
        self.writer.add_round(info)
        self.copier.held()   # brought up to date now, so that the frozen phase need not
        self._progress(event="round", **info)
        return pages, ms

    # ------------------------------------------------------------------ phases
    def run(self):
        maps = check_target(self.pid, self.opts.leave_running)
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            raise TargetGone("process %d exited" % self.pid) from None
        try:
            return self._run(maps)
        except (DumpInterrupted, KeyboardInterrupt):
            raise
        except Exception as e:
            # whatever failed while the target exited (a scan, a read, a stop, an fd that
            # vanished, ...) failed because it exited: say so, the same way every time
            if isinstance(e, TargetGone) or self._target_exited():
                raise TargetGone("process %d exited during the dump" % self.pid) from None
            raise
        finally:
            os.close(self.pidfd)

    def _target_exited(self):
        """Whether the target has exited (or is exiting) since the dump began: its pidfd (taken
        at the start, so a PID used again is no confusion) or its state says so."""
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        if p.poll(0):
            return True
        try:
            return procfs.proc_state(self.pid) in ("Z", "X")
        except CkptError:
            return True

    def _run(self, maps):
        refuse_namespaces(self.pid)
        files.refuse_untrackable(self.pid, maps)
        # every fd described while the target runs; one restore could not rebuild fails the
        # dump up front
        self.described = files.check(self.pid)
        self.mode = self._choose_mode()
        out_dir = os.path.dirname(os.path.abspath(self.opts.output))
        try:
            self.writer = ImageWriter(self.opts.output, compress=self.opts.compress, tool_version=__version__)
        except OSError as e:
            raise CkptError("cannot create the image in %s: %s" % (out_dir, e.strerror)) from None
        try:
            self.insn = find_syscall_insn(self.pid, maps)
            self.copier = copymod.Copier(self.pid, self.writer)
            if self.mode != "stop-the-world":
                # buffers for the frozen phase's copy, touched before anything starts: touching
                # fresh memory costs ~3 us a page here, and done later it would lengthen the
                # rounds or the freeze. 32 MiB holds a final copy far over any pause budget.
                self.copier.prepare_sink(SINK_PREPARED)
            if self.mode == "stop-the-world":
                self.tracker = NoTracker()
            else:
                self._arm(maps)
                self._live_rounds()
            self._check()
            self._frozen_phase()
        except BaseException as e:
            self._abandon()
            if isinstance(e, OSError) and not isinstance(e, CkptError):
                if e.errno == errno.ESRCH:
                    raise TargetGone("process %d exited during the dump" % self.pid) from None
                raise CkptError("dump of process %d failed: %s" % (self.pid, _os_message(e))) from e
            raise
        finally:
            if self.copier:
                self.copier.close()
        return self.result

    def _arm(self, maps):
        self._check()
        flags = O_CLOEXEC | O_NONBLOCK
        if self.mode == "async":
            flags |= USER_MODE_ONLY
        fd = steal_uffd(self.pid, maps, flags, check=self._check)
        try:
            self.tracker = (AsyncTracker if self.mode == "async" else SyncTracker)(fd, self.pid)
        except BaseException:
            os.close(fd)
            raise
        t = time.perf_counter()
        ok = self._register_stopped()
        # round 0: every page whose content is not known from elsewhere, while the target runs
        runs = copymod.content_runs(self.tracker.pm, ok)
        self._progress(event="arm", pages=pagemap.count_pages(runs))
        self._copy_round(0, runs, t_start=t)

    def _register_stopped(self, rescan=()):
        """Register every trackable mapping not registered yet (and those overlapping `rescan`)
        with all threads stopped, from a maps listing read while they are stopped.

        A listing read while the target runs can be stale by the time a range is registered;
        registering a stale range splits the target's mappings at its ends (UFFDIO_REGISTER
        splits the VMAs it covers partly), and the target's own mremap() of a mapping that now
        spans two VMAs then fails with EFAULT, or moves only part of it. Returns the mappings
        registered and protected; the caller copies their content. Those whose protection
        could not be set up cleanly are kept in self._suspect (see AsyncTracker.protect)."""
        rescan = [(v.start, v.end) for v in rescan]
        stop = Freezer(self.pid, check=self._check)
        try:
            stop.freeze()
            maps = self._trackable(procfs.read_maps(self.pid))
            cov = self._coverage()
            cand = [v for v in maps if not cov.covers(v) or any(s < v.end and e > v.start for s, e in rescan)]
            ok, _refused = self.tracker.register(cand)
        finally:
            stop.thaw()
        self._suspect = self.tracker.protect(ok)
        return ok

    def _live_rounds(self):
        prev = None
        t_scan_prev = time.perf_counter()
        for k in range(1, self.opts.rounds + 1):
            self._check()
            t = time.perf_counter()
            maps = procfs.read_maps(self.pid)
            cov = self._coverage()
            new = [v for v in self._trackable(maps) if not cov.covers(v)]
            tracked = [v for v in self._trackable(maps) if cov.covers(v)]
            untracked, runs = self.tracker.written(tracked)
            t_scan = time.perf_counter()
            if new or untracked or self._suspect:
                # new or moved mappings: arm them, then copy all their content; so too what
                # lies where a scan failed (the writes it had found there are lost), and what
                # could not be protected cleanly last time
                ok = self._register_stopped(untracked + self._suspect)
                whole = copymod.content_runs(self.tracker.pm, ok)
                # their absent pages, where the image holds pages of an earlier mapping: zero
                # (recorded before this round's copies, which supersede them) or the file's
                zero, reread = self.copier.stale(ok, whole)
                self.copier.zero(zero)
                runs = runs + whole + reread
            pages, ms = self._copy_round(k, runs, t_start=t)
            interval = max(t_scan - t_scan_prev, 1e-6)
            t_scan_prev = t_scan
            copy_s = time.perf_counter() - t_scan
            per_page_s = (copy_s / pages) if pages else 0.0
            # pages written during the next interval, which lasts about as long as this copy
            predicted_pages = pages / interval * copy_s
            predicted_ms = predicted_pages * max(per_page_s, 1e-6) * 1000 + 1.0
            if predicted_ms <= self.opts.max_pause_ms:
                break
            if prev is not None and pages >= prev and k >= 2:
                break   # the dirty set no longer shrinks
            prev = pages

    def _frozen_phase(self):
        self._check()
        self.freezer.freeze()
        self._progress(event="frozen")
        threads = self.freezer.threads
        t_frozen = time.perf_counter()
        marks = [("stop_threads", t_frozen - self.freezer.t_first_interrupt)]
        lap = [t_frozen]

        def mark(name):
            now = time.perf_counter()
            marks.append((name, now - lap[0]))
            lap[0] = now
        # state first: the injected calls borrow (and give back) scratch bytes on thread stacks
        injector = Injector(self.pid, self.insn)
        try:
            thread_state = dump_threads(list(threads.values()), injector)
            process_state = dump_process(self.pid, self.freezer.leader, injector)
        finally:
            injector.close()
        process_state["exe_file"] = exe_identity(self.pid)
        for name in ("cwd", "root"):     # which directories: restore checks it gets the same ones back
            process_state[name + "_file"] = _dir_identity(self.pid, name)
        fds = files.capture(self.pid, self.fdctx, self.described)
        mark("state")
        maps = procfs.read_maps(self.pid, with_identity=True)
        if not maps:
            raise TargetGone("process %d exited during the dump" % self.pid)   # its memory is gone
        mark("maps")
        cov = self._coverage()
        tracked = [v for v in self._trackable(maps) if cov.covers(v)]
        full = [v for v in maps if v.kind in TRACKABLE + ("shmem",) and not cov.covers(v)]
        untracked, runs = self.tracker.final(tracked)
        # what could not be protected cleanly in the last round is copied whole too
        untracked += [v for v in tracked if any(s.start < v.end and s.end > v.start for s in self._suspect)]
        whole = copymod.content_runs(self.copier_pm(), full + untracked, pid=self.pid)
        # absent pages of what is copied whole, where the image holds pages of an earlier
        # mapping (see Copier.stale): zero pages, or the file's content copied again
        stale_zero, reread = self.copier.stale(full + untracked, whole)
        runs = runs + whole + reread
        if self.mode == "sync":
            # sync mode sees write faults only: a page dropped meanwhile (MADV_DONTNEED) reads
            # as zero (or as its file) now and never faulted. The pages the image holds that
            # are absent now: zero pages, or the file's content copied again
            present = copymod.content_runs(self.copier_pm(), tracked)
            dropped_zero, dropped_file = self.copier.stale(tracked, present + runs)
            stale_zero += dropped_zero
            runs += dropped_file
        mark("final_scan")
        # resume first when nothing more must be checked while frozen; a killed target dies only
        # once its image is safely in place
        early = self.opts.leave_running and not self.opts.verify
        # zero records first: the final copy supersedes them where they meet
        self.copier.zero(stale_zero)
        final = []
        # the final copy is kept in memory (as far as the buffers prepared for it go) only when
        # the target resumes before the image is written; else it streams straight into the image
        sink = final if (early and self.mode != "stop-the-world") else None
        pages = self.copier.copy(runs, sink=sink, scatter=True)
        mark("final_copy")
        self.result["freeze_breakdown_ms"] = {k: round(v * 1000, 3) for k, v in marks}
        copy_ms = (time.perf_counter() - t_frozen) * 1000
        self.rounds.append({"round": len(self.rounds), "pages": pages, "ms": round(copy_ms, 3), "final": True})

        def write_tail():
            self.copier.write_sink(final)
            self.writer.add_round(self.rounds[-1])
            self.writer.add_meta("process", process_state)
            self.writer.add_meta("threads", thread_state)
            self.writer.add_meta("mappings", [v.to_json() for v in maps])
            self.writer.add_meta("fds", fds)
            for name, value in self.fdctx.meta.items():
                self.writer.add_meta(name, value)
            self.writer.add_meta("dump", {"mode": self.mode, "rounds": self.rounds, "pid": self.pid,
                                          "leave_running": self.opts.leave_running,
                                          "verified": self.opts.verify,
                                          "unreadable_pages": self.copier.unreadable_pages})

        if early:
            self._release()
        write_tail()
        self.writer.finish()
        verified = False
        if self.opts.verify:
            with ImageReader(self.writer.tmp_path) as reader:
                self.result["pages_verified"] = verify_frozen(self.pid, maps, reader)
            verified = True
        if not early:
            self._check()
            if self.opts.leave_running:
                self._release()
        self.writer.commit()
        if not self.opts.leave_running:
            self._release()
        self.result.update({
            "pid": self.pid, "mode": self.mode, "image": os.path.abspath(self.opts.output),
            "freeze_ms": round(self.freezer.freeze_ms, 3),
            "rounds": [r["pages"] for r in self.rounds],
            "round_ms": [r["ms"] for r in self.rounds],
            "pages_written": sum(r["pages"] for r in self.rounds),
            "bytes_written": sum(r["pages"] for r in self.rounds) * PAGE_SIZE,
            "image_bytes": self.writer.offset,
            "elapsed_s": round(time.perf_counter() - self.t0, 4),
            "verified": verified, "threads": len(thread_state),
            "left_running": self.opts.leave_running,
        })
        live = [r for r in self.rounds if not r.get("final")]
        live_pages = sum(r["pages"] for r in live)
        live_s = sum(r["ms"] for r in live) / 1000
        self.result["live_copy_gbps"] = round(live_pages * PAGE_SIZE / live_s / 1e9, 3) if live_s else None

    def copier_pm(self):
        if getattr(self.tracker, "pm", None) is not None:
            return self.tracker.pm
        if not hasattr(self, "_pm"):
            self._pm = pagemap.Pagemap(self.pid)
        return self._pm

    def _release(self):
        """End the freeze: resume the target (protection lifted, uffd closed) or kill it."""
        if self.opts.leave_running:
            self.fdctx.resuming()
            self.freezer.thaw()
        else:
            self.freezer.kill()
        self.fdctx.close()
        tr, self.tracker = self.tracker, None
        if tr is not None:
            tr.disarm()
        if hasattr(self, "_pm"):
            self._pm.close()

    def _abandon(self):
        """Failure or interruption: the target goes on exactly as before, no image is left."""
        try:
            try:
                self.fdctx.failed()
            finally:
                self.freezer.thaw()
        finally:
            try:
                if self.tracker is not None:
                    self.tracker.disarm()
                    self.tracker = None
            finally:
                if self.writer is not None:
                    self.writer.abort()
                if hasattr(self, "_pm"):
                    self._pm.close()


def _dir_identity(pid, name):
    try:
        st = os.stat(procfs.proc(pid, name))
    except OSError as e:
        raise TargetError("process %d: its %s directory cannot be read: %s" % (pid, name, e.strerror)) from None
    return {"dev": st.st_dev, "inode": st.st_ino}


def _privileged(pid):
    try:
        caps = int(procfs.status(pid).get("CapEff", "0"), 16)
    except CkptError:
        return False
    return bool(caps & (1 << 19))  # CAP_SYS_PTRACE


def _os_message(e):
    return "%s%s" % (e.strerror or e, (" (%s)" % e.filename) if getattr(e, "filename", None) else "")


def dump(pid, opts):
    if not isinstance(pid, int) or pid <= 0:
        raise TargetError("invalid PID %r" % (pid,))
    return Dump(pid, opts).run()
