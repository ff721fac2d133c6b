"""Restoring a process tree.

Every process is created by its parent, as the kernel made it: a fork (clone3 with set_tid:
the original PID) injected into the parent while both are still blank copies of ckpt, the
child traced from its first instruction (PTRACE_O_TRACEFORK). Parent links thus come back as
they were; a session leader calls setsid() before it forks, so its children inherit its
session; process groups are joined once every process exists (leaders first). Zombies are
forked too and exit with the status they had, so their parent's wait() finds them; the
SIGCHLD their exit sends the parent (which had it long ago) is taken back. Then each process
is rebuilt in order (parents first: fds inherited across fork are taken from the parent
already rebuilt) and all are released together, children first.

While it is built, every process dies with ckpt: the target by its parent-death signal, the
others with their parent (each gets SIGKILL as its parent-death signal until the release).
"""
import base64
import errno
import os
import signal
import struct
import time

from ckpt.errors import RestoreError
from ckpt.files.base import TreeObjects
from ckpt.kernel import procfs, sysno
from ckpt.kernel.ptrace import Tracee, _call, find_syscall_insn
from ckpt.restore.build import Builder, _spawn, pid_taken
from ckpt.kernel.native import PAGE_SIZE
from ckpt.restore.remote import Remote

PTRACE_SETOPTIONS = 0x4200
PTRACE_O_TRACEFORK = 2
PR_SET_PDEATHSIG = 1
CLONE_FILES = 0x400
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
SYS_exit_group = 231
WALL = 0x40000000


class TreeRestore:
    def __init__(self, plan, opts):
        self.plan = plan
        self.opts = opts
        self.remotes = {}       # pid -> Remote, in creation order (zombies too)
        self.tree = TreeObjects(several=len(plan.members) > 1, tables={pp.pid: pp.fds for pp in plan.members})
        self.links = {pp.pid: pp.proc for pp in plan.members}
        for z in plan.zombies:
            self.links[z["pid"]] = z

    def run(self):
        t0 = time.perf_counter()
        builders = []
        try:
            self.plan.shared_memory()
            for key, fd in self.plan.shm.items():       # for the memfd fds (ckpt/files/memfd.py)
                self.tree.objects[("shm",) + key] = (os.dup(fd),)
            root = self.plan.members[0]
            r = self.remotes[root.pid] = Remote(_spawn(root.pid))
            r.insn = find_syscall_insn(root.pid, procfs.read_maps(root.pid))
            self._own_session(self.remotes[root.pid], root.proc)
            t1 = time.perf_counter()
            by_pid = {pp.pid: pp for pp in self.plan.members}
            for pp in self.plan.members:
                parent = by_pid.get(pp.proc["ppid"]) if pp is not root else None
                b = Builder(self.plan, pp, self.opts, self.remotes[pp.pid], self.tree, parent)
                builders.append(b)
                b.build_memory()
                # its children are forked now, from its rebuilt memory: the pages they still
                # share with it (copy-on-write) stay shared
                for child in self.plan.members:
                    if child.proc["ppid"] == pp.pid and child is not root:
                        self._fork(child.pid, pp.pid, child.proc.get("exit_signal", signal.SIGCHLD),
                                   shared_fds=child.proc.get("fd_table_of") == pp.pid)
                        self._own_session(self.remotes[child.pid], child.proc)
                for z in self.plan.zombies:
                    if z["ppid"] == pp.pid:
                        self._fork(z["pid"], pp.pid, signal.SIGCHLD)
                        self._own_session(self.remotes[z["pid"]], z)
                b.build_state()
            self._groups()
            self._zombies_exit()
            for b in builders:
                b.prepare_release(root=b.pid == self.plan.pid)
            t2 = time.perf_counter()
            for b in reversed(builders):
                b.release()
            t3 = time.perf_counter()
        except BaseException:
            self._kill()
            raise
        finally:
            for r in self.remotes.values():
                r.close()
            self.tree.close()
        timings = {"spawn": round((t1 - t0) * 1000, 3)}
        for b in builders:
            for k, v in b.timings.items():
                timings[k] = round(timings.get(k, 0) + v, 3)
        timings["release"] = round((t3 - t2) * 1000, 3)
        timings["total"] = round((t3 - t0) * 1000, 3)
        root = self.plan.members[0]
        return {"pid": root.pid, "threads": [t["tid"] for t in root.threads],
                "processes": [pp.pid for pp in self.plan.members],
                "zombies": [z["pid"] for z in self.plan.zombies],
                "pages_written": sum(b.pages_written for b in builders),
                "bytes_written": sum(b.bytes_written for b in builders),
                "pages_shared": sum((e - s) // PAGE_SIZE for pp in self.plan.members for s, e in pp.cow),
                "restore_ms": timings["total"], "timings_ms": timings,
                "injected_syscalls": sum(r.calls for r in self.remotes.values())}

    # -- creation -------------------------------------------------------------------------
    def _fork(self, pid, ppid, exit_signal, shared_fds=False):
        """Create process pid in its parent, by fork (clone3 with set_tid); shared_fds: with one
        fd table shared with the parent (CLONE_FILES), which the parent's rebuild then fills."""
        parent = self.remotes[ppid]
        _call(PTRACE_SETOPTIONS, ppid, 0, PTRACE_O_TRACEFORK)
        parent.reset()
        tids = parent.put(struct.pack("<i", pid))
        args = parent.put(struct.pack("<11Q", CLONE_FILES if shared_fds else 0, 0, 0, 0, exit_signal, 0, 0, 0,
                                      tids, 1, 0))
        got = parent.call(sysno.clone3, args, 88, what="creating process %d in process %d (clone3 set_tid)"
                          % (pid, ppid), ok_errors=(errno.EEXIST,))
        if got == -errno.EEXIST:
            raise RestoreError(pid_taken(pid))
        t = Tracee(pid)
        if not t.wait_stop():
            raise RestoreError("process %d vanished right after its creation" % pid)
        r = self.remotes[pid] = Remote(pid)
        r.insn = parent.insn
        r.set_scratch(parent.scratch)
        # dies with its parent while it is built (and so, down the tree, with ckpt)
        r.call(sysno.prctl, PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0, what="prctl(PR_SET_PDEATHSIG)")
        return r

    @staticmethod
    def _own_session(r, info):
        if info["sid"] == info["pid"]:
            r.call(sysno.setsid, what="setsid in process %d" % info["pid"])

    def _groups(self):
        """Process groups, once every process exists: leaders make theirs, then the others
        join (a group outside the tree is the target's: ckpt's, inherited)."""
        for pid, info in self.links.items():
            if info["pgid"] == pid and info["sid"] != pid:
                self.remotes[pid].call(sysno.setpgid, 0, 0, what="setpgid in process %d" % pid)
        for pid, info in self.links.items():
            g = info["pgid"]
            if g != pid and g in self.remotes and info["sid"] != pid:
                self.remotes[pid].call(sysno.setpgid, 0, g, what="process %d joining process group %d" % (pid, g))

    def _zombies_exit(self):
        """Each zombie exits with its status; its parent's SIGCHLD for it is taken back."""
        if not self.plan.zombies:
            return
        for z in self.plan.zombies:
            r = self.remotes[z["pid"]]
            status = z["exit_code"]
            sig = status & 0x7F
            t = r.main
            if sig == 0:
                regs = t.get_regs()
                regs.rip, regs.rax, regs.rdi = r.insn, SYS_exit_group, (status >> 8) & 0xFF
                regs.orig_rax = 0xFFFFFFFFFFFFFFFF
                t.set_regs(regs)
            else:
                r.reset()
                r.many([(sysno.prctl, (PR_SET_PDEATHSIG, 0, 0, 0, 0)),
                        (sysno.rt_sigaction, (sig, r.put(bytes(32)), 0, 8)),
                        (sysno.setrlimit, (4, r.put(struct.pack("<QQ", 0, 0)))),     # RLIMIT_CORE: no core file
                        (sysno.kill, (z["pid"], sig))], what="making process %d a zombie" % z["pid"])
                t.set_sigmask(0)
            t.detach()
        deadline = time.monotonic() + 5
        for z in self.plan.zombies:
            while procfs.links(z["pid"]) and procfs.links(z["pid"])["state"] not in ("Z", "X"):
                if time.monotonic() > deadline:
                    raise RestoreError("process %d did not exit to become a zombie again" % z["pid"])
                time.sleep(0.001)
            del self.remotes[z["pid"]]
        for ppid in {z["ppid"] for z in self.plan.zombies}:
            proc = self.links[ppid]
            if any(struct.unpack_from("<i", base64.b64decode(x))[0] == signal.SIGCHLD
                   for x in proc.get("shared_signals", [])):
                continue    # it had one pending at the dump: that one stays (they do not queue)
            # the parent is rebuilt (its scratch area gone): a page for the arguments, for now
            r = self.remotes[ppid]
            page = r.call(sysno.mmap, 0, PAGE_SIZE, 3, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, what="mmap of a page")
            r.set_scratch(page)
            mask = r.put(struct.pack("<Q", 1 << (signal.SIGCHLD - 1)))
            zero = r.put(struct.pack("<qq", 0, 0))
            for _ in range(len(self.plan.zombies) + 1):
                if r.call(sysno.rt_sigtimedwait, mask, 0, zero, 8, ok_errors=(errno.EAGAIN,),
                          what="taking back SIGCHLD") < 0:
                    break
            r.call(sysno.munmap, page, PAGE_SIZE, what="munmap of that page")
            r.scratch = None

    # -- failure --------------------------------------------------------------------------
    def _kill(self):
        """A failed restore: every process made so far is killed and reaped (children first;
        a thread group's leader after its other threads)."""
        for pid in reversed(list(self.remotes)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid, r in reversed(list(self.remotes.items())):
            for tid in sorted(r.threads, key=lambda t: t == pid):
                try:
                    os.waitpid(tid, WALL)
                except ChildProcessError:
                    pass
