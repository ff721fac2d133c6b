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
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

from ckpt import __version__
from ckpt.dump import copy as copymod
from ckpt.dump import keep, tree
from ckpt.dump.freeze import O_CLOEXEC, O_NONBLOCK, Freezer, check_target, steal_uffd, stop_timeout
from ckpt.dump.tracker import AsyncTracker, NoTracker, SyncTracker
from ckpt.dump.verify import verify_frozen
from ckpt import files
from ckpt.errors import CkptError, DumpInterrupted, KernelFeatureError, TargetError, TargetGone
from ckpt.image import reader as imagereader
from ckpt.image.writer import ImageWriter
from ckpt.kernel import features, pagemap, procfs
from ckpt.kernel.native import PAGE_SIZE
from ckpt.kernel.ptrace import find_syscall_insn, sigchld_blocked
from ckpt.kernel.uffd import USER_MODE_ONLY
from ckpt.state import parts, threads
from ckpt.state.inject import Injector
from ckpt.state.process import exe_identity, process_calls, process_record, refuse_namespaces
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
    single: bool = False        # the process alone, not its descendants (refused where that cuts it)
    keep_tracking: bool = False  # tracking left armed after the dump, held by a ckpt process (ckpt/dump/keep.py)
    parent: Optional[str] = None  # an incremental image: only what was written since this image's freeze
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


class Member:
    """One process of the dumped tree, as the dump works on it: its tracker, copier, threads
    held in the freeze, fds, and what the freeze captured of it."""

    def __init__(self, pid, dump, late=False):
        self.pid = pid
        self.freezer = Freezer(pid, check=dump._check)
        self.fdctx = files.FreezeContext(pid, dump.opts.leave_running)
        self.tracker = NoTracker() if late else None
        self.late = late            # appeared after the trackers were armed: copied whole in the freeze
        self.held = None            # tracking kept since an earlier dump (keep.Held), whose uffd it uses
        self.copier = None
        self.suspect = []           # registered, but protecting them failed: arm again or copy whole
        self.described = None
        self.insn = None
        self.maps = None            # at the freeze
        self.records = None         # process, threads, mappings (filled in the freeze)
        self.final = []             # the final copy kept in memory (see Copier.copy's sink)
        self._pm = None

    def coverage(self):
        return _Coverage(self.tracker.registered.keys() if hasattr(self.tracker, "registered") else [])

    def pm(self):
        if getattr(self.tracker, "pm", None) is not None:
            return self.tracker.pm
        if self._pm is None:
            self._pm = pagemap.Pagemap(self.pid)
        return self._pm

    def close(self):
        if self.copier:
            self.copier.close()
            self.copier = None
        if self._pm is not None:
            self._pm.close()
            self._pm = None


class Dump:
    """A dump of a process and, unless opts.single, all its descendants: every process tracked
    live, one freeze for all (every thread of every process stopped before any final copy),
    one image holding one address space per process (SPACE records) and the tree."""

    def __init__(self, pid, opts):
        self.pid = pid
        self.opts = opts
        self.members = {}         # pid -> Member (alive processes), parents before children
        self.zombies = []         # links of descendants that have exited, not yet reaped
        self.writer = None
        self.rounds = []          # per round: {"round", "pages", "ms"}
        self.mode = None
        self.spare = []           # buffers for the frozen phase's copy, shared by the copiers
        self.stops = []           # every stop of the target's threads: {"what", "pid", "ms"}
        self.t0 = time.perf_counter()
        self.result = {}
        self.image_id = uuid.uuid4().hex
        self.parent = None        # {"image_id", "path"} of an incremental image's parent
        self.parent_held = []     # the address ranges the parent chain holds pages for (the process's)
        self.kept = None          # the root's tracker, to be handed over once the image is in place

    @property
    def root(self):
        return self.members[self.pid]

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
            if feats["sync"] and all(_privileged(p) for p in self.members):
                return "sync"
            return "stop-the-world"
        if mode == "async" and not feats["async"]:
            raise KernelFeatureError("async mode needs userfaultfd WP_ASYNC and PAGEMAP_SCAN (Linux 6.7+); "
                                     "use --mode sync or --mode stop-the-world")
        if mode == "sync":
            if not feats["sync"]:
                raise KernelFeatureError("sync mode needs userfaultfd write-protect (Linux 5.7+)")
            if not all(_privileged(p) for p in self.members):
                raise KernelFeatureError("sync mode needs a privileged target (CAP_SYS_PTRACE) on this system "
                                         "(vm.unprivileged_userfaultfd=0); use --mode async")
        return mode

    def _trackable(self, maps):
        return [v for v in maps if v.kind in TRACKABLE]

    def _copy_round(self, index, work, t_start=None):
        """One round: work = [(member, runs)]."""
        t = time.perf_counter() if t_start is None else t_start
        # round 0 streams big contiguous runs (zero runs kept apart); later rounds scattered pages
        runs_of = dict(work)
        pages = sum(n for _, n in self._live(lambda m: m.copier.copy(runs_of[m], check=self._check, scatter=index > 0),
                                             list(runs_of)))
        ms = (time.perf_counter() - t) * 1000
        info = {"round": index, "pages": pages, "ms": round(ms, 3)}
        self.rounds.append(info)
        self.writer.add_round(info)
        for m in self.members.values():
            m.copier.held()   # brought up to date now, so that the frozen phase need not
        self._progress(event="round", **info)
        return pages, ms

    def _live(self, fn, members=None):
        """fn(member) for every member (or those given); a process of the tree (not the one
        dumped) that exits meanwhile leaves the tree (a fork-heavy program's short-lived
        children)."""
        out = []
        for m in list(self.members.values()) if members is None else members:
            if m.pid not in self.members:
                continue
            try:
                out.append((m, fn(m)))
            except Exception as e:
                if m.pid == self.pid or not (isinstance(e, (TargetGone, ProcessLookupError))
                                             or _exited(m.pid) or getattr(e, "errno", None) == errno.ESRCH):
                    raise
                self._drop(m)
        return out

    def _drop(self, m):
        self.members.pop(m.pid, None)
        try:
            m.fdctx.failed()
        except Exception:
            pass
        m.freezer.thaw()
        if m.tracker is not None:
            try:
                self._let_go(m, m.tracker, failed=True)
            except Exception:
                pass
            m.tracker = None
        m.close()

    def _let_go(self, m, tr, failed):
        """A member's tracker at the end: disarmed (registration and protection lifted, the
        uffd closed). A kept tracking's uffd (m.held) is ended with it when the dump succeeded
        (the dump was not asked to keep it); when the dump failed, its holder keeps it, but the
        pages written since its base image are no longer known (a scan re-armed them): it then
        counts from no image (an incremental dump or a rollback from it is refused)."""
        if getattr(tr, "adopted", False) and m.held is not None:
            if failed:
                tr.release()
                try:
                    m.held.rebase(None)
                except OSError:
                    pass
            else:
                tr.disarm()
                m.held.end()
            return
        tr.disarm()

    # ------------------------------------------------------------------ phases
    def run(self):
        if self.opts.keep_tracking and not self.opts.leave_running:
            raise CkptError("--keep-tracking needs --leave-running (the tracking is kept on the running process)")
        if (self.opts.keep_tracking or self.opts.parent) and self.opts.mode in ("sync", "stop-the-world"):
            raise CkptError("%s needs the async mode (userfaultfd WP_ASYNC), not --mode %s"
                            % ("--keep-tracking" if self.opts.keep_tracking else "--parent", self.opts.mode))
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
            if isinstance(e, TargetGone) and "exited during the dump" in str(e):
                raise
            if self._target_exited():
                raise TargetGone("process %d exited during the dump" % self.pid) from None
            raise
        finally:
            os.close(self.pidfd)
            for m in self.members.values():
                m.close()
            for pid in list(self.members) + [self.pid]:
                keep.unlock(pid)

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

    def _discover(self):
        """The tree: the target and its descendants (or the target alone with --single, after
        checking that nothing would be cut from it)."""
        self.members = {self.pid: Member(self.pid, self)}
        below = tree.descendants(self.pid, self.opts.single)
        if self.opts.single:
            tree.refuse_cut(self.pid, below)
            return
        if below and (self.opts.keep_tracking or self.opts.parent):
            raise TargetError("process %d has descendants (%s): %s works on one process only (with --single, "
                              "where it can be dumped alone)" % (self.pid, " ".join(str(i["pid"]) for i in below[:8]),
                                                                 "--keep-tracking" if self.opts.keep_tracking
                                                                 else "--parent"))
        for info in below:
            if info["state"] in ("Z", "X"):
                self.zombies.append(info)
            elif _joins(info["pid"]):
                self.members[info["pid"]] = Member(info["pid"], self)
        tree.check_links(self.pid, [procfs.links(p) for p in self.members] + self.zombies)
        tree.refuse_outside_sharing(self.pid, list(self.members))

    def _run(self, maps):
        self._discover()
        tree_pids = list(self.members)

        def refuse(m):
            refuse_namespaces(m.pid)
            why = parts.refuse(m.pid)
            if why:
                raise TargetError("process %d: %s" % (m.pid, why))
            files.refuse_untrackable(m.pid, maps if m.pid == self.pid else procfs.read_maps(m.pid))
            # every fd described while the target runs; one restore could not rebuild fails
            # the dump up front
            m.fdctx.tree = tree_pids
            m.described = files.check(m.pid, tree_pids)
        self._live(refuse)
        self.mode = self._choose_mode()
        self._check_kept()
        out_dir = os.path.dirname(os.path.abspath(self.opts.output))
        try:
            self.writer = ImageWriter(self.opts.output, compress=self.opts.compress, tool_version=__version__)
        except OSError as e:
            raise CkptError("cannot create the image in %s: %s" % (out_dir, e.strerror)) from None
        try:
            self._live(lambda m: self._start(m, maps if m.pid == self.pid else None))
            if self.mode != "stop-the-world":
                # buffers for the frozen phase's copy, touched before anything starts: touching
                # fresh memory costs ~3 us a page here, and done later it would lengthen the
                # rounds or the freeze. 32 MiB holds a final copy far over any pause budget.
                self.root.copier.prepare_sink(SINK_PREPARED)
            if self.mode != "stop-the-world":
                self._arm()
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
        self._hand_over()
        return self.result

    def _check_kept(self):
        """Tracking kept since an earlier dump is used (its uffd: a second one cannot register the
        same memory); --keep-tracking and --parent are refused where they cannot work."""
        o = self.opts
        if self.mode == "async":
            for m in self.members.values():
                m.held = keep.find(m.pid)
        if not (o.keep_tracking or o.parent):
            return
        what = "--keep-tracking" if o.keep_tracking else "--parent"
        if self.mode != "async":
            raise KernelFeatureError("%s needs the async mode (userfaultfd WP_ASYNC and PAGEMAP_SCAN), not %s mode"
                                     % (what, self.mode))
        if not o.parent:
            return
        if os.path.abspath(o.parent) == os.path.abspath(o.output) or (
                os.path.exists(o.output) and os.path.exists(o.parent) and os.path.samefile(o.parent, o.output)):
            raise CkptError("%s: an incremental image cannot replace its own parent; write it to another file" % o.output)
        try:
            chain = imagereader.open_chain(o.parent)
        except CkptError as e:
            raise CkptError("--parent %s: %s" % (o.parent, e)) from None
        try:
            pid_of = (chain.meta("process") or {}).get("pid")
            base = imagereader.image_id(chain)
            held = self.root.held
            if held is None or base is None or held.base != base or pid_of != self.pid:
                raise TargetError("no tracking kept for process %d since %s; dump it without --parent"
                                  % (self.pid, o.parent))
            self.parent = {"image_id": base, "path": os.path.abspath(o.parent)}
            self.parent_held = [(x[0], x[1]) for x in chain.extents(self.pid)]
        finally:
            chain.close()

    def _start(self, m, maps=None):
        try:
            m.insn = find_syscall_insn(m.pid, maps if maps is not None else procfs.read_maps(m.pid))
        except (CkptError, OSError):
            if m.pid == self.pid or not _exited_or_exiting(m.pid):
                raise
            raise TargetGone("process %d exited" % m.pid) from None
        m.copier = copymod.Copier(m.pid, self.writer)
        m.copier.spare = self.spare
        if self.parent_held and m.pid == self.pid:
            # an incremental image: the pages its parents hold count as held (see Copier.stale)
            m.copier.seed(self.parent_held)
        if self.mode == "stop-the-world":
            m.tracker = NoTracker()

    def _arm(self):
        self._check()
        t = time.perf_counter()
        work = self._live(self._arm_member)
        if self.opts.keep_tracking:
            # kept after the dump: the final scan re-arms, so that "written" counts from the freeze
            self.root.tracker.rearm_final = True
        # round 0: every page whose content is not known from elsewhere, while the target runs
        # (for an incremental image: what was written since its parent's freeze)
        self._progress(event="arm", pages=sum(pagemap.count_pages(runs) for _, runs in work))
        self._copy_round(0, work, t_start=t)

    def _stopped(self, what, pid, freezer=None, ms=None):
        """Every stop of the target's threads, counted (the freeze is one): what, pid, ms."""
        if ms is None:
            if freezer.t_first_interrupt is None or freezer.t_release is None:
                return
            ms = (freezer.t_release - freezer.t_first_interrupt) * 1000
        self.stops.append({"what": what, "pid": pid, "ms": round(ms, 3)})

    def _arm_member(self, m):
        if m.held is not None and self.mode == "async":
            return self._adopt(m)
        flags = O_CLOEXEC | O_NONBLOCK
        if self.mode == "async":
            flags |= USER_MODE_ONLY
        t = time.perf_counter()
        fd = steal_uffd(m.pid, procfs.read_maps(m.pid), flags, check=self._check)
        # one thread stopped for the uffd's creation (an upper bound: seize and release included)
        self._stopped("uffd", m.pid, ms=(time.perf_counter() - t) * 1000)
        try:
            m.tracker = (AsyncTracker if self.mode == "async" else SyncTracker)(fd, m.pid)
        except BaseException:
            os.close(fd)
            raise
        ok = self._register_stopped(m, what="arm")
        return copymod.content_runs(m.tracker.pm, ok)

    def _adopt(self, m):
        """Arm with the kept tracking's uffd (taken from its holder). For an incremental image,
        round 0 is what was written since the parent's freeze, and the mappings new since (or
        moved) copied whole; for a full image, the written bits are re-armed (they count from
        now) and everything is copied."""
        fd = m.held.take_uffd()
        try:
            m.tracker = AsyncTracker.adopt(fd, m.pid, m.held.ranges)
        except BaseException:
            os.close(fd)
            raise
        if self.parent is not None and m.pid == self.pid:
            return self._round_member(m)
        maps = self._trackable(procfs.read_maps(m.pid))
        cov = m.coverage()
        untracked, _ = m.tracker.written([v for v in maps if cov.covers(v)])
        self._register_stopped(m, untracked, what="arm")
        cov = m.coverage()
        return copymod.content_runs(m.tracker.pm, [v for v in self._trackable(procfs.read_maps(m.pid))
                                                   if cov.covers(v)])

    def _register_stopped(self, m, rescan=(), what="rearm"):
        """Register every trackable mapping not registered yet (and those overlapping `rescan`)
        with all threads stopped, from a maps listing read while they are stopped.

        A listing read while the target runs can be stale by the time a range is registered;
        registering a stale range splits the target's mappings at its ends (UFFDIO_REGISTER
        splits the VMAs it covers partly), and the target's own mremap() of a mapping that now
        spans two VMAs then fails with EFAULT, or moves only part of it. Returns the mappings
        registered and protected; the caller copies their content. Those whose protection
        could not be set up cleanly are kept in m.suspect (see AsyncTracker.protect)."""
        rescan = [(v.start, v.end) for v in rescan]
        stop = Freezer(m.pid, check=self._check)
        try:
            stop.freeze()
            maps = self._trackable(procfs.read_maps(m.pid))
            cov = m.coverage()
            cand = [v for v in maps if not cov.covers(v) or any(s < v.end and e > v.start for s, e in rescan)]
            ok, _refused = m.tracker.register(cand)
        finally:
            stop.thaw()
            self._stopped(what, m.pid, stop)
        m.suspect = m.tracker.protect(ok)
        return ok

    def _round_member(self, m):
        maps = procfs.read_maps(m.pid)
        cov = m.coverage()
        new = [v for v in self._trackable(maps) if not cov.covers(v)]
        tracked = [v for v in self._trackable(maps) if cov.covers(v)]
        untracked, runs = m.tracker.written(tracked)
        if new or untracked or m.suspect:
            # new or moved mappings: arm them, then copy all their content; so too what
            # lies where a scan failed (the writes it had found there are lost), and what
            # could not be protected cleanly last time
            ok = self._register_stopped(m, untracked + m.suspect)
            whole = copymod.content_runs(m.tracker.pm, ok)
            # their absent pages, where the image holds pages of an earlier mapping: zero
            # (recorded before this round's copies, which supersede them) or the file's
            zero, reread = m.copier.stale(ok, whole)
            m.copier.zero(zero)
            runs = runs + whole + reread
        return runs

    def _live_rounds(self):
        prev = None
        t_scan_prev = time.perf_counter()
        for k in range(1, self.opts.rounds + 1):
            self._check()
            t = time.perf_counter()
            work = self._live(self._round_member)
            t_scan = time.perf_counter()
            pages, ms = self._copy_round(k, work, t_start=t)
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

    def _freeze_all(self):
        with sigchld_blocked():
            self._freeze_members()

    def _freeze_members(self):
        """Every thread of every process of the tree held: interrupted all at once, then waited
        for. Processes forked meanwhile (before their parent stopped) join, copied whole;
        processes that exited leave (their parent, frozen, has not reaped them: zombies)."""
        pending = list(self.members.values())
        for m in pending:
            m.freezer.preseize()
        first = time.perf_counter()
        while True:
            for m in pending:
                m.freezer.interrupt_all()
            for m in pending:
                try:
                    m.freezer.await_all()
                except TargetGone:
                    if m.pid == self.pid:
                        raise
                    self._drop(m)
            if self.opts.single:
                break
            pending, unsettled = self._newcomers()
            if pending:
                continue
            if not unsettled:
                break
            if time.perf_counter() - first > stop_timeout():
                raise TargetError("a process of the tree of %d does not finish exiting; dump abandoned, "
                                  "the processes are left as they were" % self.pid)
            time.sleep(0.0005)
        # parents before children, as restore creates them
        order = [self.pid] + [i["pid"] for i in tree.descendants(self.pid, self.opts.single, stopped=True)
                              if i["pid"] in self.members]
        self.members = {p: self.members[p] for p in order if p in self.members}
        for m in self.members.values():
            m.fdctx.tree = list(self.members)
        tree.check_links(self.pid, [procfs.links(p) for p in self.members] + self.zombies)
        self.t_first_interrupt = first
        for m in self.members.values():
            m.freezer.t_first_interrupt = first

    def _frozen_phase(self):
        self._check()
        for m in self.members.values():
            if hasattr(m.tracker, "prepare_final"):
                m.tracker.prepare_final()
        self._freeze_all()
        for m in self.members.values():
            if hasattr(m.tracker, "start_final"):
                m.tracker.start_final()
        self._progress(event="frozen")
        t_frozen = time.perf_counter()
        marks = [("stop_threads", t_frozen - self.t_first_interrupt)]
        lap = [t_frozen]

        def mark(name):
            now = time.perf_counter()
            marks.append((name, now - lap[0]))
            lap[0] = now
        for m in self.members.values():
            self._capture_state(m)
        tables = files.capture_tree([(m.pid, m.fdctx, m.described) for m in self.members.values()])
        mark("state")
        for m in list(self.members.values()):
            m.maps = procfs.read_maps(m.pid, with_identity=True)
            if not m.maps:
                if m.pid == self.pid:
                    raise TargetGone("process %d exited during the dump" % m.pid)   # its memory is gone
                # a child caught in the middle of its exit (its memory already released): the
                # zombie it is about to be, with the status it is exiting with
                info = procfs.links(m.pid)
                self._drop(m)
                if info is not None:
                    self.zombies.append(dict(info, state="Z"))
        mark("maps")
        # resume first when nothing more must be checked while frozen; a killed target dies only
        # once its image is safely in place
        early = self.opts.leave_running and not self.opts.verify
        # pages children still share with their parents (copy-on-write): restored shared, and
        # not copied again for processes that appeared during the dump (copied whole)
        cow = {}
        for m in list(self.members.values())[1:]:
            ppid = m.records[0]["ppid"]
            if ppid in self.members:
                cow[m.pid] = tree.cow_ranges(m.pid, m.maps, ppid, self.members[ppid].maps)
        scans = [(m, self._final_scan(m, cow.get(m.pid))) for m in self.members.values()]
        mark("final_scan")
        pages = 0
        for m, (runs, stale_zero) in scans:
            # zero records first: the final copy supersedes them where they meet
            m.copier.zero(stale_zero)
            # the final copy is kept in memory (as far as the buffers prepared for it go) only
            # when the target resumes before the image is written; else it streams into the image
            sink = m.final if (early and self.mode != "stop-the-world") else None
            pages += m.copier.copy(runs, sink=sink, scatter=True)
        shm = tree.SharedMemory(self.writer)
        for m in self.members.values():
            shm.add(m.pid, m.maps)
            shm.add_fds(m.pid, tables[m.pid])
        pages += shm.copy({p: m.copier for p, m in self.members.items()})
        mark("final_copy")
        self.result["freeze_breakdown_ms"] = {k: round(v * 1000, 3) for k, v in marks}
        copy_ms = (time.perf_counter() - t_frozen) * 1000
        self.rounds.append({"round": len(self.rounds), "pages": pages, "ms": round(copy_ms, 3), "final": True})
        root = self.root

        def write_tail():
            for m in self.members.values():
                m.copier.write_sink(m.final)
            self.writer.add_round(self.rounds[-1])
            process_state, thread_state, maps = root.records
            self.writer.add_meta("process", process_state)
            self.writer.add_meta("threads", thread_state)
            self.writer.add_meta("mappings", [v.to_json() for v in maps])
            self.writer.add_meta("fds", tables[self.pid])
            self.writer.add_meta("tree", tree.record(self.pid, self.members, self.zombies, tables, shm, cow))
            # records the kinds add (the network lock): the target's under their name, and
            # when several processes add one, all of them under name + "s" too
            meta = {}
            for m in self.members.values():
                for name, value in m.fdctx.meta.items():
                    meta.setdefault(name, []).append(value)
            for name, values in meta.items():
                self.writer.add_meta(name, values[0])
                if len(values) > 1:
                    self.writer.add_meta(name + "s", values)
            self.writer.add_meta("dump", {"mode": self.mode, "rounds": self.rounds, "pid": self.pid,
                                          "leave_running": self.opts.leave_running,
                                          "verified": self.opts.verify,
                                          "processes": list(self.members),
                                          "image_id": self.image_id, "parent": self.parent,
                                          "keep_tracking": self.opts.keep_tracking,
                                          "unreadable_pages": sum(m.copier.unreadable_pages
                                                                  for m in self.members.values())})

        if early:
            self._release()
        write_tail()
        self.writer.finish()
        verified = False
        if self.opts.verify:
            with self.writer.reader() as top, (imagereader.open_chain(self.opts.output, top=top)
                                               if self.parent else top) as reader:
                # an incremental image: compared as restore reads it, with its parents under it
                n = 0
                spaces = {key: o["space"] for key, o in shm.objects.items()}
                for m in self.members.values():
                    inherit = (m.records[0]["ppid"], cow[m.pid]) if cow.get(m.pid) else None
                    n += verify_frozen(m.pid, m.maps, reader, spaces, inherit)
                self.result["pages_verified"] = n
            verified = True
        if not early:
            self._check()
            if self.opts.leave_running:
                self._release()
        self.writer.commit()
        if not self.opts.leave_running:
            self._release()
        freeze_ms = ((self.t_release - self.t_first_interrupt) * 1000.0)
        self.result.update({
            "pid": self.pid, "mode": self.mode, "image": os.path.abspath(self.opts.output),
            "freeze_ms": round(freeze_ms, 3),
            # every stop of the target's threads, the freeze last (the target's clients see them all)
            "stops": self.stops + [{"what": "freeze", "pid": self.pid, "ms": round(freeze_ms, 3)}],
            "stops_ms": [x["ms"] for x in self.stops] + [round(freeze_ms, 3)],
            "max_stop_ms": round(max([x["ms"] for x in self.stops] + [freeze_ms]), 3),
            "stopped_total_ms": round(sum(x["ms"] for x in self.stops) + freeze_ms, 3),
            "processes": list(self.members), "zombies": [z["pid"] for z in self.zombies],
            "rounds": [r["pages"] for r in self.rounds],
            "round_ms": [r["ms"] for r in self.rounds],
            "pages_written": sum(r["pages"] for r in self.rounds),
            "bytes_written": sum(r["pages"] for r in self.rounds) * PAGE_SIZE,
            "image_bytes": self.writer.offset,
            "elapsed_s": round(time.perf_counter() - self.t0, 4),
            "verified": verified, "threads": sum(len(m.records[1]) for m in self.members.values()),
            "left_running": self.opts.leave_running,
            "image_id": self.image_id, "parent": self.parent,
        })
        live = [r for r in self.rounds if not r.get("final")]
        live_pages = sum(r["pages"] for r in live)
        live_s = sum(r["ms"] for r in live) / 1000
        self.result["live_copy_gbps"] = round(live_pages * PAGE_SIZE / live_s / 1e9, 3) if live_s else None

    def _newcomers(self):
        """In the freeze: descendants not held yet (forked before their parent stopped) join,
        seized; zombies are listed. Returns (new members, whether a process is still exiting:
        a zombie in a moment, since its parent is frozen and cannot reap it, or gone if its
        parent ignores SIGCHLD)."""
        pending, unsettled = [], False
        self.zombies = []
        for info in tree.descendants(self.pid, stopped=True):
            if info["state"] == "Z":
                self.zombies.append(info)
            elif info["pid"] in self.members or info["ppid"] not in self.members:
                continue
            elif info["state"] == "X" or not _joins(info["pid"]):
                unsettled = unsettled or procfs.exists(info["pid"])
            else:
                m = Member(info["pid"], self, late=True)
                try:
                    self._start(m)
                    refuse_namespaces(m.pid)
                    why = parts.refuse(m.pid)
                    if why:
                        raise TargetError("process %d: %s" % (m.pid, why))
                    m.described = files.check(m.pid, list(self.members) + [m.pid])
                    m.freezer.preseize()
                except Exception as e:
                    # forked and gone before it could be stopped: it leaves no trace
                    if not (isinstance(e, TargetGone) or _exited(m.pid)):
                        raise
                    self._drop(m)
                    unsettled = unsettled or procfs.exists(m.pid)
                    continue
                self.members[m.pid] = m
                pending.append(m)
        return pending, unsettled

    def _links_to_parent(self, m, process_state):
        """What a process shares with its parent beyond memory: one fd table (CLONE_FILES)."""
        ppid = process_state["ppid"]
        if ppid in self.members and m.pid != self.pid and files.same_fd_table(m.pid, ppid):
            process_state["fd_table_of"] = ppid

    def _capture_state(self, m):
        """Thread and process state of a frozen member, through injected syscalls (which borrow,
        and give back, scratch bytes on thread stacks)."""
        # a long batch (many signal handlers) runs as one piece of code, mapped and unmapped in
        # the freeze: the running process never sees it (ckpt/state/blob.py)
        injector = Injector(m.pid, m.insn, use_blob=True)
        try:
            tracees = list(m.freezer.threads.values())
            leader = m.freezer.leader
            # one batch: every thread's own calls, the main thread the process's too
            pcalls, pctx = process_calls(m.pid)
            more = parts.calls(m.pid)
            thread_state, pres = dump_threads(tracees, injector,
                                              extra=(leader, pcalls + [c for _, cs in more for c in cs]))
            process_state = process_record(m.pid, leader, pctx, pres[:len(pcalls)])
            parts.dump(parts.Capture(m.pid, m.freezer.leader, tracees, injector, process_state, thread_state,
                                     batched=parts.split(more, pres[len(pcalls):])))
        finally:
            injector.close()
        process_state["exe_file"] = exe_identity(m.pid)
        for name in ("cwd", "root"):     # which directories: restore checks it gets the same ones back
            process_state[name + "_file"] = _dir_identity(m.pid, name)
        self._links_to_parent(m, process_state)
        m.records = [process_state, thread_state, None]

    def _final_scan(self, m, cow=None):
        """What the final copy of one member's private memory takes (shared memory is copied
        once for the whole tree: tree.SharedMemory): (runs to copy, runs to record as zero)."""
        maps = m.maps
        m.records[2] = maps
        cov = m.coverage()
        tracked = [v for v in self._trackable(maps) if cov.covers(v)]
        full = [v for v in maps if v.kind in TRACKABLE and not cov.covers(v)]
        untracked, runs = m.tracker.final(tracked)
        # each thread's rseq area, which the kernel updates on every return to user space (the
        # state's injected calls make some): copied again, wherever the scan saw it
        runs = runs + [(p, PAGE_SIZE) for p in threads.rseq_pages(m.records[1])
                       if any(v.start <= p < v.end for v in tracked)]
        # what could not be protected cleanly in the last round is copied whole too
        untracked += [v for v in tracked if any(s.start < v.end and s.end > v.start for s in m.suspect)]
        if self.opts.keep_tracking and m is self.root:
            # the tracking is kept: what is copied whole is registered and protected now (all
            # threads are stopped), so that afterwards "written" means written since this freeze
            again = list({id(v): v for v in full + untracked}.values())
            ok, _refused = m.tracker.register(again)
            m.tracker.protect(ok)
        whole = copymod.content_runs(m.pm(), full + untracked, pid=m.pid)
        # absent pages of what is copied whole, where the image holds pages of an earlier
        # mapping (see Copier.stale): zero pages, or the file's content copied again
        stale_zero, reread = m.copier.stale(full + untracked, whole)
        runs = runs + whole + reread
        if self.mode == "sync":
            # sync mode sees write faults only: a page dropped meanwhile (MADV_DONTNEED) reads
            # as zero (or as its file) now and never faulted. The pages the image holds that
            # are absent now: zero pages, or the file's content copied again
            present = copymod.content_runs(m.pm(), tracked)
            dropped_zero, dropped_file = m.copier.stale(tracked, present + runs)
            stale_zero += dropped_zero
            runs += dropped_file
        if cow and m.late:
            # copied whole: what it shares with its parent is the parent's (see tree.cow_ranges)
            runs = tree.subtract_runs(runs, cow)
        return runs, stale_zero

    def _release(self):
        """End the freeze: resume every process (protection lifted, uffd closed) or kill them."""
        if self.opts.leave_running:
            for m in self.members.values():
                m.fdctx.resuming()
            for m in self.members.values():
                m.freezer.thaw()
            self.t_release = time.perf_counter()
        else:
            # children first: a parent killed first would leave them to be reaped elsewhere
            for m in reversed(list(self.members.values())):
                m.freezer.kill()
        if not self.opts.leave_running:
            self.t_release = time.perf_counter()
        for m in self.members.values():
            m.fdctx.close()
            tr, m.tracker = m.tracker, None
            if tr is None:
                continue
            if self.opts.keep_tracking and m is self.root and self.opts.leave_running:
                self.kept = (m, tr)     # handed to its holder once the image is in place
                continue
            self._let_go(m, tr, failed=False)

    def _hand_over(self):
        """--keep-tracking: the tracking stays armed, held by a holder process (a new one, or
        the one whose uffd this dump used, now counting from this image)."""
        if self.kept is None:
            return
        m, tr = self.kept
        self.kept = None
        try:
            if m.held is not None and getattr(tr, "adopted", False):
                m.held.rebase(self.image_id, tr.ranges())
                tr.release()
            else:
                m.held = keep.hold(m.pid, tr.uffd.fd, self.image_id, tr.ranges())
                tr.release()
        except Exception as e:
            try:
                tr.disarm()
            except Exception:
                pass
            raise CkptError("the image %s is complete, but the tracking of process %d could not be kept: %s"
                            % (self.opts.output, m.pid, e)) from None
        self.result["tracking"] = {"holder": m.held.holder, "base": self.image_id, "ranges": len(m.held.ranges)}

    def _abandon(self):
        """Failure or interruption: every process goes on exactly as before, no image is left."""
        errors = []
        for m in list(self.members.values()):
            for step in (m.fdctx.failed, m.freezer.thaw):
                try:
                    step()
                except Exception as e:
                    errors.append(e)
        for m in list(self.members.values()):
            try:
                if m.tracker is not None:
                    self._let_go(m, m.tracker, failed=True)
                    m.tracker = None
            except Exception as e:
                errors.append(e)
            m.close()
        if self.kept is not None:
            m, tr = self.kept
            self.kept = None
            try:
                self._let_go(m, tr, failed=True)
            except Exception as e:
                errors.append(e)
        if self.writer is not None:
            self.writer.abort()
        if errors:
            raise errors[0]


def _joins(pid):
    """Whether a descendant found running joins the dump: checked as the target is (refused
    with the reason when it cannot be dumped); one that exits meanwhile (gone, or its memory
    already released) does not, and is found again as a zombie if its parent has not reaped it."""
    try:
        check_target(pid, leave_running=True)
        return True
    except (TargetError, TargetGone):
        try:
            running = procfs.proc_state(pid) not in ("Z", "X") and bool(procfs.read_maps(pid))
        except (CkptError, OSError):
            running = False
        if running:
            raise
        return False


def _exited_or_exiting(pid):
    """Gone, a zombie, or with its memory already released (exiting)."""
    try:
        return _exited(pid) or not procfs.read_maps(pid)
    except (CkptError, OSError):
        return True


def _exited(pid):
    try:
        return procfs.proc_state(pid) in ("Z", "X")
    except CkptError:
        return True


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
