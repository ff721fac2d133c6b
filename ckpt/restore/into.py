"""Rollback: the seed's load algorithm on a running process (`ckpt restore IMAGE --into PID`).

The hibernation proposal loads an image into a running system: pages that are free are loaded
directly; every other page is write-protected and compared with what is loaded, discarded when
identical, staged when different (and compared again if it is written after being protected);
then everything stops briefly and only the differing pages are restored, at once. Here the
system is a process that runs the image's program, typically the one the image was dumped from
with --leave-running, since changed:

  plan     the image read and checked whole (ckpt/restore/build.Plan), and what cannot be rolled
           back refused before the process is touched: another program or PID, credentials or
           seccomp filters changed since, children, shared memory
  arm      its memory write-protected (the dump's tracker, async uffd-wp); with tracking kept
           since the image's dump (ckpt/dump/keep.py) the pages written since are known already
  compare  while it runs: every page that may differ from the image (those the image or the
           process holds; with kept tracking only those written since the dump) is read and
           compared with what the image says it holds; identical pages are discarded, the
           others staged
  freeze   every thread stopped; the pages written since they were protected compared again
  patch    threads created since ended; the layout put back (mappings that are not exactly the
           image's unmapped, the image's mapped and filled); only the staged pages written, or
           dropped (MADV_DONTNEED) where the image holds no page (zero, or the file's);
           process state, the fd table (fds of the same objects kept, those opened since
           closed, the others made again), pending signals, threads gone made again with their
           TIDs, per-thread state and registers; then all threads released together

A failure before the freeze leaves the process as it was (protection lifted, threads released);
a failure after it has begun kills the process: it is never left half rolled back.
"""
import bisect
import dataclasses
import errno
import os
import re
import signal
import struct
import time

from ckpt.dump import copy as copymod
from ckpt.dump.freeze import Freezer, check_target, steal_uffd
from ckpt.dump.tracker import AsyncTracker
from ckpt.dump.verify import CHUNK, _Expected, verify_frozen
from ckpt.errors import CkptError, RestoreError, TargetError, TargetGone
from ckpt.files.base import TreeObjects, _run_all
from ckpt import files
from ckpt.kernel import features, pagemap, procfs, sysno
from ckpt.kernel.memio import first_diff_page
from ckpt.kernel.native import PAGE_SIZE, runs_array
from ckpt.kernel.ptrace import _call, find_syscall_insn, sigchld_blocked
from ckpt.kernel.uffd import USER_MODE_ONLY
from ckpt.restore.build import Builder, Plan, _free_gap, _map_mode, _outside
from ckpt.restore.remote import SCRATCH_SIZE, Remote
from ckpt.state import blob, parts, process, seccomp, threads, timers, vmflags

O_CLOEXEC, O_NONBLOCK = 0o2000000, 0o4000
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
MADV_DONTNEED = 4
PTRACE_SETOPTIONS = 0x4200
PTRACE_O_TRACECLONE, PTRACE_O_EXITKILL, PTRACE_O_SUSPEND_SECCOMP = 8, 1 << 20, 1 << 21
SYS_exit = 60
WALL = 0x40000000


class RollbackInterrupted(CkptError):
    pass


def rollback(path, pid, opts, interrupted=lambda: None, verify=False):
    return Rollback(path, pid, opts, interrupted, verify).run()


class Rollback:
    def __init__(self, path, pid, opts, interrupted=lambda: None, verify=False):
        self.path = path
        self.pid = pid
        self.opts = opts
        self.interrupted = interrupted
        self.verify = verify
        self.plan = None
        self.tracker = None
        self.held = None            # the tracking kept since a dump (ckpt/dump/keep.py), if any
        self.tracking = False       # its written bits count from this image's freeze
        self.freezer = None
        self.stops = []
        self.write = _Stage()       # the pages staged live: the image's content, to be written there
        self.drop = set()           # page addresses staged: dropped (the image holds no page there)
        self.stage = None           # the pages staged live: [(runs, runs_array(runs), their content)]
        self.more = {}              # pages staged in the freeze
        self.buffers = None         # (actual, expected) page buffers of the comparisons
        self.compared = 0
        self.t0 = time.perf_counter()

    def _check(self):
        sig = self.interrupted()
        if sig:
            raise RollbackInterrupted("interrupted by signal %d; rollback abandoned, process %d left running as it was"
                                      % (sig, self.pid))

    # ------------------------------------------------------------------ run
    def run(self):
        if not isinstance(self.pid, int) or self.pid <= 0:
            raise TargetError("invalid PID %r" % (self.pid,))
        # what the plan warns of an fd (a stream leading out, reopened on /dev/null) is said
        # only if that fd is made again: a kept fd stays what it is
        warn, self.deferred = self.opts.warn, []
        self.opts.warn = self.deferred.append
        try:
            self.plan = Plan(self.path, self.opts, rollback=True)
        finally:
            self.opts.warn = warn
        try:
            self._refuse()
            check_target(self.pid, leave_running=True)
            self.pidfd = os.pidfd_open(self.pid)
            try:
                return self._run()
            finally:
                os.close(self.pidfd)
                from ckpt.dump import keep
                keep.unlock(self.pid)
        finally:
            self.plan.close()

    def _run(self):
        try:
            self._arm()
            self._compare_live()
            self._check()
            self.tracker.prepare_final()
            self.freezer = Freezer(self.pid, check=self._check)
            self.freezer.preseize()
            with sigchld_blocked():
                self.freezer.t_first_interrupt = time.perf_counter()
                self.freezer.interrupt_all()
                self.freezer.await_all()
            self._fds_at_freeze()
        except BaseException as e:
            self._abandon()
            if isinstance(e, OSError) and not isinstance(e, CkptError):
                if e.errno == errno.ESRCH or self._exited():
                    raise TargetGone("process %d exited during the rollback" % self.pid) from None
                raise CkptError("rollback of process %d failed: %s" % (self.pid, e)) from e
            raise
        # from here on the process is changed: rolled back whole, or killed. Should ckpt itself
        # die meanwhile (SIGKILL), the kernel kills the process with it (PTRACE_O_EXITKILL; the
        # detach at the release drops it)
        try:
            for t in self.freezer.threads.values():
                _call(PTRACE_SETOPTIONS, t.tid, 0, self._options())
            res = self._frozen()
        except BaseException as e:
            self._kill()
            why = e if isinstance(e, CkptError) else "%s: %s" % (type(e).__name__, e)
            raise RestoreError("rollback of process %d failed after its freeze began: %s; the process was killed "
                               "(never left half rolled back)" % (self.pid, why)) from e
        return res

    def _fds_at_freeze(self):
        """The process's fds as the freeze found them. Those of the image it holds no more (closed
        since the plan) will be made again: checked now as the plan checks them, before anything
        changes (a failure here leaves the process as it was)."""
        live = {}
        for fd in procfs.fds(self.pid):
            try:
                live[fd] = os.stat(procfs.proc(self.pid, "fd", str(fd)))
            except OSError:
                pass
        self.live_fds = live
        pp = self.plan.members[0]
        late = [e for e in self.plan.fds if e["fd"] not in pp.prechecked
                and not (e["fd"] in live and files.same_object(e, live[e["fd"]]))]
        if late:
            files.precheck(late, pp.paths, self.opts)

    @staticmethod
    def _options():
        """ptrace options of the threads held in the freeze: killed if ckpt dies; seccomp
        suspended where ckpt may (see Tracee._held)."""
        from ckpt.kernel.ptrace import _suspend_seccomp
        return PTRACE_O_EXITKILL | (PTRACE_O_SUSPEND_SECCOMP if _suspend_seccomp[0] else 0)

    def _exited(self):
        try:
            return procfs.proc_state(self.pid) in ("Z", "X")
        except CkptError:
            return True

    # ------------------------------------------------------------------ plan
    def _refuse(self):
        """What cannot be rolled back, refused before the process is touched, naming it."""
        plan, pid = self.plan, self.pid
        if len(plan.members) > 1 or plan.zombies:
            raise RestoreError("%s holds a process tree (%d processes): rollback (--into) takes the image of one "
                               "process" % (self.path, len(plan.members) + len(plan.zombies)))
        if plan.pid != pid:
            raise RestoreError("%s is an image of process %d, not %d: rollback (--into) puts a process back to its "
                               "own image (thread IDs live in its memory)" % (self.path, plan.pid, pid))
        if not procfs.exists(pid) or self._exited():
            raise TargetGone("process %d is not running" % pid)
        p = plan.proc
        try:
            st = os.stat(procfs.proc(pid, "exe"))
        except OSError as e:
            raise TargetGone("process %d: cannot read its executable: %s" % (pid, e.strerror)) from None
        exe = p.get("exe_file") or {}
        if (st.st_dev, st.st_ino) != (exe.get("dev"), exe.get("inode")):
            raise RestoreError("process %d runs %s, not the image's program %s: rollback needs the same executable"
                               % (pid, procfs.readlink(pid, "exe"), p.get("exe")))
        now = process.credentials(pid)
        for k in ("uid", "gid", "groups", "cap_eff", "cap_prm", "cap_inh", "cap_bnd"):
            if now.get(k) != p["creds"].get(k):
                raise RestoreError("process %d: its credentials changed since the image (%s %s, was %s): "
                                   "rollback never changes a process's privileges"
                                   % (pid, k, now.get(k), p["creds"].get(k)))
        kids = procfs.children(pid)
        if kids:
            raise RestoreError("process %d has children (%s): rollback (--into) takes a process alone, and would "
                               "leave them behind" % (pid, " ".join(map(str, kids))))
        if plan.shm_records:
            raise RestoreError("%s: the process maps shared memory or deleted files (%d objects), which rollback "
                               "(--into) does not put back" % (self.path, len(plan.shm_records)))
        main = next((t for t in plan.threads if t["tid"] == pid), {})
        want = len((main.get("seccomp") or {}).get("filters", []))
        have = int(procfs.status(pid).get("Seccomp_filters", "0") or 0)
        if want != have:
            raise RestoreError("process %d: it has %d seccomp filters, the image %d: filters cannot be removed "
                               "or added by a rollback" % (pid, have, want))
        feats = features.probe()
        if not feats["async"]:
            raise RestoreError("rollback (--into) needs userfaultfd WP_ASYNC and PAGEMAP_SCAN (Linux 6.7+)")
        process.refuse_namespaces(pid)
        want = {m["path"]: (m["start"], m["end"]) for m in plan.maps if m["kind"] == "special"}
        have = {v.path: (v.start, v.end) for v in procfs.read_maps(pid) if v.special}
        if want != have:
            raise RestoreError("process %d: its vdso/vvar (%s) are not where the image has them (%s): not the "
                               "process the image was made of" % (pid, _specials(have), _specials(want)))
        tasks = procfs.tasks(pid)
        for t in plan.threads:
            if t["tid"] not in tasks and procfs.exists(t["tid"]):
                raise RestoreError("thread %d of the image has exited and its TID is taken by another process: "
                                   "it cannot be made again" % t["tid"])

    # ------------------------------------------------------------------ arm, compare
    def _arm(self):
        """Write-protect the process's memory: with the tracking kept since a dump, its uffd and
        the pages written since; else a uffd made in the process, registered with every thread
        stopped (see Dump._register_stopped) and protected."""
        self._check()
        try:
            from ckpt.dump import keep
        except ImportError:
            keep = None
        self.held = keep.find(self.pid) if keep is not None else None
        self.image_id = (self.plan.metas.get("dump") or {}).get("image_id")
        if self.held is not None:
            self.tracking = self.image_id is not None and self.held.base == self.image_id
            self.tracker = AsyncTracker.adopt(self.held.take_uffd(), self.pid, self.held.ranges)
            self.tracker.rearm_final = True
            return
        t = time.perf_counter()
        fd = steal_uffd(self.pid, procfs.read_maps(self.pid), O_CLOEXEC | O_NONBLOCK | USER_MODE_ONLY,
                        check=self._check)
        self.stops.append({"what": "uffd", "ms": round((time.perf_counter() - t) * 1000, 3)})
        try:
            self.tracker = AsyncTracker(fd, self.pid)
        except BaseException:
            os.close(fd)
            raise
        self.tracker.rearm_final = True     # the freeze's scan re-arms: the last one finds only later writes
        stop = Freezer(self.pid, check=self._check)
        try:
            stop.freeze()
            ok, _ = self.tracker.register(_trackable(procfs.read_maps(self.pid)))
        finally:
            stop.thaw()
            self.stops.append({"what": "arm", "ms": round(stop.freeze_ms, 3)})
        self.tracker.protect(ok)

    def _kept(self, maps, untracked=()):
        """What of the process's memory is the image's mapping as it is: every range where a
        tracked mapping of the process and one of the image's agree (protection, kind, file
        and offset), whatever the mappings' ends (the kernel merges and splits them; a heap or
        a stack that grew keeps what it had). Returns (those ranges as the process's mappings
        cut to them, the image's mappings not wholly in them (mapped again around them), the
        ranges of the process's memory outside them (unmapped)). untracked: (start, end) of
        mappings a scan found unregistered (replaced since: mapped again)."""
        image = sorted((m for m in self.plan.maps if m["kind"] != "special"), key=lambda m: m["start"])
        istarts = [m["start"] for m in image]
        live = [v for v in maps if v.kind != "special"]
        cov = _coverage(self.tracker)
        kept = []
        for v in live:
            if not cov(v) or any(s_ < v.end and v.start < e_ for s_, e_ in untracked):
                continue
            i = max(0, bisect.bisect_right(istarts, v.start) - 1)
            while i < len(image) and image[i]["start"] < v.end:
                m = image[i]
                i += 1
                lo, hi = max(m["start"], v.start), min(m["end"], v.end)
                if lo >= hi or not _same_mapping(m, v):
                    continue
                kept.append(dataclasses.replace(v, start=lo, end=hi, offset=v.offset + (lo - v.start)))
        kr = _merged([(v.start, v.end) for v in kept])
        again = [m for m in image if not _covered(m["start"], m["end"], kr)]
        gone = []
        for v in live:
            i = max(0, bisect.bisect_right(kr, [v.start, float("inf")]) - 1)
            j = bisect.bisect_left(kr, [v.end, 0])
            gone += _outside((v.start, v.end), kr[i:j])
        return kept, again, gone

    def _compare_live(self):
        """While the process runs: the pages of kept mappings that may differ from the image,
        compared; with kept tracking only those written since the image's freeze."""
        self._check()
        maps = procfs.read_maps(self.pid)
        kept, _, _ = self._kept(maps)
        tracked = [v for v in kept if v.kind in ("anon", "file-private")]
        self.live_tracked = copymod.merge_ranges([(v.start, v.end) for v in tracked])
        if self.tracking:
            untracked, runs = self.tracker.written(tracked)
            if untracked:       # registered no more (replaced since): compared whole
                runs += self._candidates(untracked)
        else:
            self.tracker.written(tracked)      # protection (re)armed from now: later writes flagged
            runs = self._candidates(tracked)
        self._compare(tracked, runs)
        # the staged pages laid out for one write now, while the process runs: the buffer's
        # memory is touched here (a fresh page costs microseconds to touch, not in the freeze)
        self.stage = []
        for pages, data in self.write.parts():
            runs = _page_runs(pages, ordered=True)
            self.stage.append((runs, runs_array(runs), data))

    def _candidates(self, vmas):
        """Pages that may differ from the image: those the process holds (present or swapped)
        and those the image holds."""
        exp = self._expected()
        out = []
        pm = self.tracker.pm
        for v in vmas:
            present = [(s, e) for s, e, _ in pm.scan([(v.start, v.end)], anyof=pagemap.PRESENT | pagemap.SWAPPED,
                                                     ret_mask=pagemap.PRESENT)]
            out += [(s, e - s) for s, e in copymod.merge_ranges(present + exp.image_runs(v.start, v.end))]
        return out

    def _expected(self):
        if getattr(self, "_exp", None) is None:
            self._exp = _Expected(self.pid, self.plan.reader)
        return self._exp

    def _compare(self, vmas, runs, into=None, count=True):
        """Compare runs [(addr, length)] of these mappings with the image: staged into write
        (the image holds the page) or drop (it does not: the page is its source's)."""
        into = into or (self.write, self.drop)
        if not runs:
            return
        exp = self._expected()
        vmas = sorted(vmas, key=lambda v: v.start)
        starts = [v.start for v in vmas]
        if self.buffers is None:    # made once, before the freeze: fresh memory is slow to touch
            self.buffers = (bytearray(b"\1" * CHUNK), bytearray(b"\1" * CHUNK))
        actual, expected = self.buffers
        from ckpt.kernel.memio import MemIO
        mem = MemIO(self.pid)
        batch, size, cur = [], 0, None
        try:
            for a0, n0 in sorted(runs):
                if not self.freezer:
                    self._check()       # live: ckpt's own signals acted on between runs
                e0 = a0 + n0
                # a run may cross the mappings' ends (a scan's runs do): compared piece by piece,
                # the pieces of one mapping read and compared in batches of up to CHUNK bytes
                i = max(0, bisect.bisect_right(starts, a0) - 1)
                while i < len(vmas) and vmas[i].start < e0:
                    v = vmas[i]
                    i += 1
                    lo, hi = max(a0, v.start), min(e0, v.end)
                    for a in range(lo, hi, CHUNK):
                        b = min(hi, a + CHUNK)
                        if batch and (v is not cur or size + (b - a) > CHUNK):
                            self._compare_batch(mem, exp, cur, batch, into, count)
                            batch, size = [], 0
                        batch.append((a, b))
                        size += b - a
                        cur = v
            if batch:
                self._compare_batch(mem, exp, cur, batch, into, count)
        finally:
            mem.close()

    def _compare_batch(self, mem, exp, vma, batch, into, count):
        """Pieces [(start, end)] of one mapping, at most CHUNK bytes in all: read in one call
        and compared with what the image says is there in one sweep."""
        actual, expected = self.buffers
        av, ev = memoryview(actual), memoryview(expected)
        status = mem.read_runs([(a, b - a) for a, b in batch], actual, unpinned=True)
        if any(status):
            # some cannot be read (past the end of a file): one by one, page by page
            for (a, b), err in zip(batch, status):
                if not err:
                    self._compare_batch(mem, exp, vma, [(a, b)], into, count)
                elif b - a > PAGE_SIZE:
                    for p in range(a, b, PAGE_SIZE):
                        self._compare_batch(mem, exp, vma, [(p, p + PAGE_SIZE)], into, count)
            return
        offs, held = self._fill(exp, vma, batch, ev)
        total = offs[-1] + batch[-1][1] - batch[-1][0]
        npages = total // PAGE_SIZE
        k = 0
        while k < npages:
            d = first_diff_page(av[k * PAGE_SIZE:total], ev[k * PAGE_SIZE:total], npages - k)
            if d < 0:
                break
            q = (k + d) * PAGE_SIZE
            r = bisect.bisect_right(offs, q) - 1
            p = batch[r][0] + (q - offs[r])
            if _in(held, p):
                into[0].add(p, ev[q:q + PAGE_SIZE])
            else:
                into[1].add(p)
            k += d + 1
        if count:
            self.compared += npages

    def _fill(self, exp, vma, batch, out):
        """What the image says lies at each piece of the batch (sorted, in one mapping), back to
        back in out: the mapping's source (zero, or its file), with the image's pages over it,
        found in one walk along the image's extents. Returns (each piece's offset in out, the
        merged ranges the image holds pages for)."""
        fd = self._source_fd(vma)
        reader, ext = exp.reader, exp.extents
        offs, held, off = [], [], 0
        i = max(0, bisect.bisect_right(exp.starts, batch[0][0]) - 1)
        for a, b in batch:
            n = b - a
            offs.append(off)
            if fd is not None:
                data = os.pread(fd, n, vma.offset + (a - vma.start))
                out[off:off + len(data)] = data
                if len(data) < n:
                    out[off + len(data):off + n] = ZERO[:n - len(data)]
            else:
                out[off:off + n] = ZERO[:n]
            while i < len(ext) and ext[i][1] <= a:
                i += 1
            j = i
            while j < len(ext) and ext[j][0] < b:
                x = ext[j]
                j += 1
                lo, hi = max(x[0], a), min(x[1], b)
                data = reader.extent_bytes(x, lo, hi, check=False)
                out[off + lo - a:off + hi - a] = ZERO[:hi - lo] if data is None else data
                if held and held[-1][1] == lo:
                    held[-1][1] = hi
                else:
                    held.append([lo, hi])
            off += n
        return offs, _Merged(held)

    def _source_fd(self, vma):
        """ckpt's fd of the file a private file mapping shows where it has no page of its own:
        the one the plan opened as the process."""
        if vma.kind != "file-private":
            return None
        cache = self.__dict__.setdefault("_sources", {})
        if vma.start in cache:
            return cache[vma.start]
        pp = self.plan.members[0]
        m = next((m for m in pp.maps if m["start"] <= vma.start < m["end"]), None)
        key = pp.map_keys.get(m["start"]) if m else None
        fd = pp.paths.held.get(key or ("map", vma.path, 0))
        if fd is None and m is not None:
            fd = pp.paths.held.get(("map", m["path"], _map_mode(m, None)))
        cache[vma.start] = fd
        return fd

    # ------------------------------------------------------------------ the freeze
    def _frozen(self):
        t_frozen = time.perf_counter()
        marks = {"stop_threads": round((t_frozen - self.freezer.t_first_interrupt) * 1000, 3)}
        lap = [t_frozen]

        def mark(name):
            now = time.perf_counter()
            marks[name] = round((now - lap[0]) * 1000, 3)
            lap[0] = now
        pid = self.pid
        maps = procfs.read_maps(pid)
        kept, again, gone = self._kept(maps)
        tracked = [v for v in kept if v.kind in ("anon", "file-private")]
        # pages written since they were protected (and kept mappings found unregistered now:
        # replaced meanwhile, so mapped again whole)
        untracked, runs = self.tracker.final(tracked)
        self.final_pages = sum(n for _, n in runs) // PAGE_SIZE
        mark("final_scan")
        if untracked:       # replaced meanwhile: mapped again whole
            kept, again, gone = self._kept(maps, {(v.start, v.end) for v in untracked})
            tracked = [v for v in kept if v.kind in ("anon", "file-private")]
        # pages written since they were compared: compared again. A staged page stays staged
        # (its content is the image's whatever the process wrote since), so this only adds
        more, drop = _Pages(), set()
        self._compare(tracked, runs, into=(more, drop))
        self.drop |= drop
        self.more = _Pages((p, v) for p, v in more.items() if p not in self.write)
        # staged pages of mappings that are no longer kept: those are mapped again whole
        kr = _merged([(v.start, v.end) for v in tracked])
        if not all(_covered(s_, e_, kr) for s_, e_ in self.live_tracked):
            self.more = _Pages((p, v) for p, v in list(self.write.items()) + list(self.more.items()) if _in(kr, p))
            self.stage = None
            self.drop = {p for p in self.drop if _in(kr, p)}
        mark("final_compare")

        r = self.remote = Remote(pid)
        r.main = self.freezer.threads[pid]
        r.threads = self.freezer.threads
        r.insn = find_syscall_insn(pid, maps)
        self._end_new_threads()
        # a scratch area where neither the process's mappings nor the image's lie
        busy = [(v.start, v.end) for v in maps] + [(m["start"], m["end"]) for m in self.plan.maps]
        scratch = _free_gap(busy, SCRATCH_SIZE)
        # (its end holds a blob: the long batches, such as every signal's handler, run as one
        # piece of code instead of one single-step round trip a call, ckpt/state/blob.py)
        use_blob = blob.usable(pid)
        got = r.call(sysno.mmap, scratch, SCRATCH_SIZE, 7 if use_blob else 3,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0, what="mmap of the scratch area")
        r.set_scratch(got)
        if use_blob:
            r.room = SCRATCH_SIZE - blob.SIZE
            r.blob = blob.Blob(pid, got + r.room, r.mem)
        mark("threads_ended")
        # the layout: what is not exactly the image's goes, the image's comes back, filled
        unmaps = _merge(gone)
        r.many([(sysno.munmap, (s, e - s)) for s, e in unmaps], what=lambda nr, a: "munmap of %#x" % a[0])
        pp = self.plan.members[0]
        sub = _SubPlan(pp, again)
        b = Builder(self.plan, sub, self.opts, r, TreeObjects(several=False, tables={pid: pp.fds}))
        b.busy = busy + [(got, got + SCRATCH_SIZE)]
        b.kept = _merge([(v.start, v.end) for v in kept])    # mapped and filled around what is kept
        b._map_layout()
        opened = list(b.opened_fds)
        # the mappings made again are registered too: the tracking (kept by a holder, or the
        # next rollback's) covers the whole of the image's layout
        if again:
            ar = [(m["start"], m["end"]) for m in again]
            made = [v for v in procfs.read_maps(pid) if v.kind in ("anon", "file-private")
                    and any(s_ < v.end and v.start < e_ for s_, e_ in ar) and not _inside(v, b.kept)]
            ok, _ = self.tracker.register(made)
            self.tracker.protect(ok)
        b._patch_pages()
        mark("layout")
        # the differing pages of the kept mappings
        written = self._write_staged(r)
        mark("pages")
        if sub.vmflags is not None and again:
            vmflags.after_mapping(r, again, sub.vmflags, self.opts.warn)
        self._process_state(b, opened)
        mark("process_state")
        self._threads()
        mark("threads")
        # last, with no syscall injected after it: the pages written since the staged ones
        # (by the kernel, for ckpt's calls) compared again and put back
        self.settled = self._settle(r)
        mark("settle")
        verified = None
        if self.verify:
            verified = verify_frozen(pid, procfs.read_maps(pid, with_identity=True), self.plan.reader)
            mark("verify")
        process.restore_stop_state(pid, self.plan.threads)
        self._release()
        freeze_ms = (self.freezer.t_release - self.freezer.t_first_interrupt) * 1000
        return {"pid": pid, "image": os.path.abspath(self.path), "tracking": self.tracking,
                "pages_compared": self.compared, "pages_identical": max(0, self.compared - len(self.write) - len(self.more) - len(self.drop)),
                "pages_written": written + b.pages_written, "pages_dropped": len(self.drop),
                "mappings_unmapped": len(gone), "mappings_mapped": len(again),
                "pages_mapped_written": b.pages_written,
                "threads": [t["tid"] for t in self.plan.threads], "threads_ended": self.ended,
                "threads_made": self.made, "fds_kept": self.fds[0], "fds_made": self.fds[1],
                "fds_closed": self.fds[2], "freeze_ms": round(freeze_ms, 3), "freeze_breakdown_ms": marks,
                "process_state_ms": self.process_laps,
                "stops": self.stops + [{"what": "freeze", "ms": round(freeze_ms, 3)}],
                "pages_settled": self.settled, "pages_written_meanwhile": self.final_pages, "pages_verified": verified, "verified": verified is not None,
                "elapsed_s": round(time.perf_counter() - self.t0, 4)}

    def _end_new_threads(self):
        """Threads the image does not have exit (their clear-child-tid and robust list unset
        first: their exit writes nothing into the memory being rolled back)."""
        want = {t["tid"] for t in self.plan.threads}
        r = self.remote
        self.ended = []
        for tid, t in list(r.threads.items()):
            if tid in want or tid == self.pid:
                continue
            r.many([(sysno.set_tid_address, (0,)), (sysno.set_robust_list, (0, 24))], tid=tid,
                   what="unsetting the exit hooks of thread %d" % tid)
            rseq = t.get_rseq()
            if rseq:
                r.call(sysno.rseq, rseq["ptr"], rseq["size"], threads.RSEQ_FLAG_UNREGISTER, rseq["sig"], tid=tid,
                       what="unregistering the rseq of thread %d" % tid)
            regs = t.get_regs()
            regs.rip, regs.rax, regs.rdi, regs.orig_rax = r.insn, SYS_exit, 0, 0xFFFFFFFFFFFFFFFF
            t.set_regs(regs)
            t.pending_signal = 0
            t.detach()
            while True:
                try:
                    _, st = os.waitpid(tid, WALL)
                except ChildProcessError:
                    break
                if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                    break
            del r.threads[tid]
            self.ended.append(tid)
        if self.pid not in r.threads:
            raise RestoreError("the main thread of process %d has exited" % self.pid)

    def _write_staged(self, r):
        """The staged pages: the image's written, in one batch; dropped ones made absent
        (MADV_DONTNEED), or written with their source where that is refused (locked memory).
        Their written flags are then cleared: the last scan (_settle) looks for other writes."""
        drops = _page_runs(self.drop)
        res = r.many([(sysno.madvise, (a, n, MADV_DONTNEED)) for a, n in drops],
                     what=lambda nr, a: "madvise(MADV_DONTNEED) of %#x" % a[0], ok_errors=(errno.EINVAL,))
        refused = {p for (a, n), rc in zip(drops, res) if rc < 0 for p in range(a, a + n, PAGE_SIZE)}
        if self.stage:
            self._write_prepared(r)
        self._write_pages(r, self.more, refused, self._kept_now())
        return (len(self.write) if self.stage else 0) + len(self.more) + len(refused)

    def _write_prepared(self, r):
        """The pages staged live, as prepared (see _compare_live). (Two threads writing halves
        at once were no faster here: the kernel's work per page does not spread.)"""
        for runs, arr, data in self.stage:
            _check_written(runs, r.mem.write_runs(runs, data, prepared=arr))

    def _settle(self, r):
        """Last, with no syscall injected after it: the threads' rseq areas compared again and
        put back. The kernel updates them (cpu_id ...) on every return to user space, which
        ckpt's injected calls make; nothing else of the process's memory is written by them
        (their arguments and results live in the scratch area). --verify checks exactly that."""
        cov = _coverage(self.tracker)
        tracked = [v for v in procfs.read_maps(self.pid) if v.kind in ("anon", "file-private") and cov(v)]
        write, drop = _Pages(), set()
        self._compare(tracked, _page_runs(threads.rseq_pages(self.plan.threads), ordered=True),
                      into=(write, drop), count=False)
        self._write_pages(r, write, drop, tracked)
        return len(write) + len(drop)

    def _write_pages(self, r, staged, sourced, maps):
        """Write the staged pages ({address: content}) and, at the pages of `sourced`, the
        content of their source (zero, or the mapped file's page), in one batch."""
        pages = sorted(staged.keys() | set(sourced))
        if not pages:
            return
        if sourced:
            exp = self._expected()
            maps = sorted(maps, key=lambda v: v.start)
            starts = [v.start for v in maps]
            staged = dict(staged)
            for p in sourced:
                vma = maps[bisect.bisect_right(starts, p) - 1]
                data = bytearray(PAGE_SIZE)
                exp.fill(vma, p, p + PAGE_SIZE, data, self._source_fd(vma))
                staged[p] = bytes(data)
        runs = _page_runs(pages, ordered=True)
        buf = b"".join([staged[p] for p in pages])
        _check_written(runs, r.mem.write_runs(runs, buf))

    def _kept_now(self):
        maps = procfs.read_maps(self.pid)
        return [v for v in maps if v.kind in ("anon", "file-private")]

    def _process_state(self, b, opened):
        """mm fields, directories, handlers, timers, umask, the fd table, rlimits."""
        r = self.remote
        p = self.plan.proc
        paths = self.plan.paths
        laps = self.process_laps = {}
        t = [time.perf_counter()]

        def lap(name):
            now = time.perf_counter()
            laps[name] = round((now - t[0]) * 1000, 3)
            t[0] = now
        process.restore_mm(r, p, -1)
        if _dir_is(self.pid, "cwd", p.get("cwd_file")):
            cwd = []            # the same directory still: nothing to do
        else:
            cwd = [r.take(paths.get("cwd"), what="the working directory %s" % p["cwd"])]
            r.call(sysno.fchdir, cwd[0], what="fchdir to %s" % p["cwd"])
        r.many([(sysno.close, (fd,)) for fd in opened + cwd], what="close")
        if r.ckpt_pidfd is not None:
            r.call(sysno.close, r.ckpt_pidfd, ok_errors=(errno.EBADF,))
            r.ckpt_pidfd = None
        lap("mm_cwd")
        process.restore_process(r, p)
        lap("handlers")
        # POSIX timers made again with their IDs (ckpt/state/timers.py): those the process
        # holds now go first
        ids = [t["id"] for t in timers.read(self.pid)]
        r.many([(sysno.timer_delete, (i,)) for i in ids], what="deleting a timer made since", ok_errors=(errno.EINVAL,))
        live = self.live_fds
        # a TCP connection of the image the process no longer holds was closed since: its peer
        # has gone on without it, so it is made again closed (the peer sees a reset)
        lap("timers")
        opts = dataclasses.replace(self.opts, tcp_close=True)
        self.fds = files.rollback_fds(r, self.plan.fds, live, opts, paths,
                                      TreeObjects(several=False, tables={self.pid: self.plan.fds}))
        for msg in self.deferred:
            m = re.match(r"fd (\d+) ", msg)
            if m is None or int(m.group(1)) in self.fds[1]:
                self.opts.warn(msg)
        if r.ckpt_pidfd is not None:
            r.call(sysno.close, r.ckpt_pidfd, ok_errors=(errno.EBADF,))
            r.ckpt_pidfd = None
        lap("fds")
        process.restore_rlimits(self.pid, p, self.opts.warn)
        lap("rlimits")

    def _threads(self):
        """Threads gone made again with their TIDs; pending signals of now dropped and the
        image's queued; per-thread state, the parts of state (not seccomp: the same filters are
        installed already), registers."""
        r = self.remote
        pid = self.pid
        self.made = []
        have = set(r.threads)
        missing = [t for t in self.plan.threads if t["tid"] not in have]
        if missing:
            _call(PTRACE_SETOPTIONS, pid, 0, self._options() | PTRACE_O_TRACECLONE)
        for t in missing:
            threads.create_thread(r, t["tid"])
            self.made.append(t["tid"])
        self._drop_pending()
        _run_parts(r, self.plan.proc, self.plan.threads, "process")
        for t in self.plan.threads:
            d = dict(t)
            if t["tid"] in have:
                live = r.threads[t["tid"]].get_rseq()
                if live and d.get("rseq") and (live["ptr"], live["size"]) == (d["rseq"]["ptr"], d["rseq"]["size"]):
                    d["rseq"] = None
                elif live:
                    r.call(sysno.rseq, live["ptr"], live["size"], threads.RSEQ_FLAG_UNREGISTER, live["sig"],
                           tid=t["tid"], what="unregistering the rseq of thread %d" % t["tid"])
            threads.restore_thread_state(r, d)
        _run_parts(r, self.plan.proc, self.plan.threads, "threads")
        for t in self.plan.threads:
            threads.requeue_signals(r, t, pid)
        r.reset()
        calls = []
        import base64
        for raw in self.plan.proc.get("shared_signals", []):
            info = base64.b64decode(raw)
            calls.append((sysno.rt_sigqueueinfo, (pid, struct.unpack_from("<i", info)[0], r.put(info))))
        r.many(calls, what="queueing a process-wide pending signal")
        _run_parts(r, self.plan.proc, self.plan.threads, "last")
        r.blob = None
        r.call(sysno.munmap, r.scratch, SCRATCH_SIZE, what="munmap of the scratch area")
        r.scratch = None
        for t in self.plan.threads:
            threads.restore_thread_regs(r, t)

    def _drop_pending(self):
        """Signals pending now (sent since the image) are taken: the image's are queued again."""
        r = self.remote
        for tid in list(r.threads):
            st = procfs.status(self.pid, tid)
            mask = int(st.get("SigPnd", "0"), 16) | int(st.get("ShdPnd", "0"), 16)
            mask &= ~((1 << (signal.SIGKILL - 1)) | (1 << (signal.SIGSTOP - 1)))
            if not mask:
                continue
            r.reset()
            m = r.put(struct.pack("<Q", mask))
            zero = r.put(struct.pack("<qq", 0, 0))
            for _ in range(256):
                if r.call(sysno.rt_sigtimedwait, m, 0, zero, 8, tid=tid, ok_errors=(errno.EAGAIN, errno.EINTR),
                          what="taking a signal sent since") < 0:
                    break

    # ------------------------------------------------------------------ end
    def _release(self):
        """All threads go on from the image's state; the protection stays with kept tracking
        (the holder's), else is lifted with the uffd."""
        self.freezer.thaw()
        self._untrack(rolled_back=True)

    def _untrack(self, rolled_back=False):
        """The kept tracking (its holder keeps the uffd) counts from this image from now on
        once the process is rolled back to it: every page it has not flagged since is the
        image's. Else the uffd is closed, which lifts the protection."""
        tr, self.tracker = self.tracker, None
        if tr is None:
            return
        if self.held is not None:
            if rolled_back:
                self.held.rebase(self.image_id, ranges=tr.ranges())
            tr.release()
        else:
            tr.disarm()

    def _abandon(self):
        _run_all(([self.freezer.thaw] if self.freezer else []) + [self._untrack])

    def _kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            if self.freezer is not None:
                self.freezer.kill()
        except Exception:
            pass
        try:
            self._untrack()
        except Exception:
            pass


# ---------------------------------------------------------------------------- helpers
class _SubPlan:
    """A ProcPlan showing only some of its mappings (those rollback maps again)."""

    def __init__(self, pp, maps):
        self.__dict__.update(pp.__dict__)
        self.maps = maps
        self.cow = []


def _run_parts(remote, proc, thread_records, stage):
    for p in parts.PARTS:
        if p is seccomp or not hasattr(p, "restore"):
            continue
        p.restore(remote, proc, thread_records, stage)


def _trackable(maps):
    return [v for v in maps if v.kind in ("anon", "file-private")]


def _coverage(tracker):
    merged = copymod.merge_ranges(list(tracker.registered))
    starts = [s for s, _ in merged]

    def covers(v):
        if v.kind not in ("anon", "file-private"):
            return True
        i = bisect.bisect_right(starts, v.start) - 1
        return i >= 0 and merged[i][1] >= v.end
    return covers


def _dir_is(pid, name, ident):
    """Whether the process's cwd (or root) is the directory the image records (dev, inode)."""
    try:
        st = os.stat(procfs.proc(pid, name))
    except OSError:
        return False
    return isinstance(ident, dict) and (st.st_dev, st.st_ino) == (ident.get("dev"), ident.get("inode"))


def _specials(d):
    return ", ".join("%s %#x" % (k, v[0]) for k, v in sorted(d.items()))


def _same_mapping(m, v):
    """Whether image mapping m and the process's mapping v map the same thing the same way
    where they meet: protection, kind, device and inode, name, and (files) offset."""
    if (m["perms"], m["kind"], m["inode"], m["path"] or "") != (v.perms, v.kind, v.inode, v.path or ""):
        return False
    if m["dev"] != v.dev:
        return False
    return m["kind"] == "anon" or m["offset"] - m["start"] == v.offset - v.start


def _inside(v, ranges):
    return any(s <= v.start and v.end <= e for s, e in ranges)


def _covered(lo, hi, ranges):
    """Whether [lo, hi) lies in the union of (start, end) ranges (or merged, sorted [start,
    end] lists: see _merged)."""
    merged = ranges if isinstance(ranges, _Merged) else _merged(ranges)
    i = bisect.bisect_right(merged, [lo, float("inf")]) - 1
    return i >= 0 and merged[i][0] <= lo and hi <= merged[i][1]


class _Merged(list):
    pass


def _merged(ranges):
    return _Merged(copymod.merge_ranges(ranges))


ZERO = bytes(CHUNK)


class _Pages(dict):
    """Staged pages: address -> the image's content."""

    def add(self, p, view):
        self[p] = bytes(view)


class _Stage:
    """The pages staged while the process runs, their content copied as they are found (in
    increasing address order, as the comparison goes) into buffers of CHUNK bytes that the
    freeze writes as they are: no copy of them made then, no buffer grown (a grown buffer is
    copied, and fresh memory costs microseconds a page to touch)."""

    def __init__(self):
        self.chunks = []        # [(buffer, [addresses])]
        self.at = {}            # address -> (chunk index, offset)
        self.ordered = True
        self.last = -1

    def add(self, p, view):
        at = self.at.get(p)
        if at is not None:
            buf = self.chunks[at[0]][0]
            buf[at[1]:at[1] + PAGE_SIZE] = view
            return
        if not self.chunks or len(self.chunks[-1][1]) * PAGE_SIZE >= CHUNK:
            self.chunks.append((bytearray(CHUNK), []))
        buf, pages = self.chunks[-1]
        o = len(pages) * PAGE_SIZE
        buf[o:o + PAGE_SIZE] = view
        pages.append(p)
        self.at[p] = (len(self.chunks) - 1, o)
        if p < self.last:
            self.ordered = False
        self.last = p

    def __contains__(self, p):
        return p in self.at

    def __len__(self):
        return len(self.at)

    def items(self):
        return [(p, bytes(self.chunks[c][0][o:o + PAGE_SIZE])) for p, (c, o) in self.at.items()]

    def parts(self):
        """[(addresses in increasing order, their content back to back)], one a buffer."""
        if self.ordered:
            return [(pages, memoryview(buf)[:len(pages) * PAGE_SIZE]) for buf, pages in self.chunks if pages]
        pages = sorted(self.at)
        return [(pages, b"".join([bytes(self.chunks[c][0][o:o + PAGE_SIZE]) for c, o in map(self.at.get, pages)]))]


def _in(merged, p):
    """Whether page p lies in merged, sorted [start, end] ranges."""
    i = bisect.bisect_right(merged, [p, float("inf")]) - 1
    return i >= 0 and merged[i][0] <= p < merged[i][1]


def _merge(ranges):
    return [tuple(r) for r in copymod.merge_ranges(ranges)]


def _check_written(runs, status):
    bad = [(a, n, e) for (a, n), e in zip(runs, status) if e]
    if bad:
        a, n, e = bad[0]
        raise RestoreError("writing %d bytes at %#x: %s" % (n, a, os.strerror(e)))


def _page_runs(pages, ordered=False):
    """Page addresses as (address, length) runs of contiguous pages."""
    out = []
    start = prev = None
    for p in (pages if ordered else sorted(pages)):
        if p != prev:
            if start is not None:
                out.append((start, prev - start))
            start = p
        prev = p + PAGE_SIZE
    if start is not None:
        out.append((start, prev - start))
    return out
