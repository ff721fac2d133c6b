"""Attach, inject, freeze and thaw: everything that stops the target's threads.

The target is traced only when it must be stopped: for the few injected syscalls that create
the uffd (one thread, well under a millisecond) and for the freeze. In between it runs untraced,
so its signals, clones and timing are its own.

Every wait on the target is bounded: a thread that does not stop (blocked in the kernel: in
vfork() until its child runs exec or exits, or in an uninterruptible sleep) makes the dump
fail with the reason, and ckpt's own SIGINT/SIGTERM is looked at while it waits (`check`).
A thread that never stopped stays seized until ckpt exits, when the kernel detaches it.
"""
import errno
import os
import signal
import time

from ptrace.error import PtraceError

from ckpt.errors import TargetError, TargetGone
from ckpt.kernel import procfs
from ckpt.kernel.native import lib
from ckpt.kernel.ptrace import Tracee, WaitTimeout, find_syscall_insn, sigchld_blocked, wait_status

SYS_close = 3
SYS_userfaultfd = 323
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000

STOP_TIMEOUT = 5.0      # seconds a thread may take to stop (CKPT_STOP_TIMEOUT overrides)
DIAGNOSE_AFTER = 0.25   # a thread not stopped by then is looked at: one in vfork will not stop
RELEASE_TIMEOUT = 0.5   # releasing a seized thread that never stopped: how long to wait for it


def stop_timeout():
    try:
        return max(0.01, float(os.environ.get("CKPT_STOP_TIMEOUT", STOP_TIMEOUT)))
    except ValueError:
        return STOP_TIMEOUT


def check_target(pid, leave_running=False):
    """Refuse targets that cannot be dumped, with the reason, before touching them."""
    if pid == os.getpid():
        raise TargetError("process %d is ckpt itself" % pid)
    if not procfs.exists(pid):
        raise TargetError("no process with PID %d" % pid)
    st = procfs.status(pid)
    if st.get("Tgid") != str(pid):
        raise TargetError("%d is a thread of process %s; give the process ID" % (pid, st.get("Tgid")))
    if not leave_running:
        _refuse_kill(pid)
    tracer = int(st.get("TracerPid", "0"))
    if tracer:
        raise TargetError("process %d is already traced by process %d (a debugger?); detach it first" % (pid, tracer))
    if st.get("State", "").startswith(("Z", "X")):
        alive = [t for t in _tasks_or_none(pid) if t != pid and procfs.task_state(pid, t) not in (None, "Z", "X")]
        if alive:
            raise TargetError("process %d: its main thread has exited while %d other thread%s still run%s (a thread "
                              "group without its leader: its memory is reachable only through those threads); "
                              "not supported yet" % (pid, len(alive), "s" if len(alive) > 1 else "",
                                                     "" if len(alive) > 1 else "s"))
        raise TargetError("process %d is a zombie" % pid)
    try:
        maps = procfs.read_maps(pid)
    except PermissionError:
        raise TargetError("not allowed to read the memory map of process %d; run ckpt as its owner or root" % pid) from None
    if not maps:
        raise TargetError("process %d has no user memory (a kernel thread?)" % pid)
    for tid in procfs.tasks(pid):
        if procfs.task_state(pid, tid) == "D":
            child = procfs.vfork_child(pid, tid)
            if child is not None:
                raise TargetError("process %d is %s (thread %d waits until the child runs exec or exits, "
                                  "and the child uses the process's memory meanwhile); not dumped"
                                  % (pid, "blocked in vfork for child %d" % child if child else "blocked in vfork",
                                     tid))
    return maps


def _tasks_or_none(pid):
    try:
        return procfs.tasks(pid)
    except TargetGone:
        return []


def _refuse_kill(pid):
    """The default dump kills the target: never PID 1, nor ckpt's own ancestors (the shell
    that runs it, whose death would take ckpt's session along)."""
    name = procfs.comm(pid) or "?"
    if pid == 1:
        raise TargetError("process 1 (%s) is the init process: the dump would kill it; use --leave-running" % name)
    p, depth = os.getppid(), 1
    while p and p > 1 and depth < 4096:
        if p == pid:
            who = "ckpt's own parent" if depth == 1 else "an ancestor of ckpt (%d levels up)" % depth
            raise TargetError("process %d (%s) is %s: the dump would kill it; use --leave-running" % (pid, name, who))
        p, depth = procfs.ppid(p), depth + 1


def _seize(pid, tid, timeout=None, check=None):
    t = Tracee(tid, timeout=timeout, check=check)
    try:
        t.seize()
    except PtraceError as e:
        if e.errno == errno.ESRCH:
            return None
        if e.errno == errno.EPERM:
            # a process that has exited (a zombie, not yet reaped) refuses to be traced too
            if procfs.proc_state(pid) in ("Z", "X"):
                raise TargetGone("process %d exited during the dump" % pid) from None
            raise TargetError("not allowed to trace process %d (ptrace: EPERM); run ckpt as its owner or root, "
                              "or check kernel.yama.ptrace_scope" % pid) from None
        raise
    return t


def await_stop(pid, t, timeout=None, check=None):
    """Wait until thread t (interrupted) is in a ptrace-stop; False if it exited. A thread
    that does not stop within `timeout` fails the dump with the reason; one found blocked in
    vfork fails it at once."""
    timeout = stop_timeout() if timeout is None else timeout
    waited = 0.0
    for step in (min(DIAGNOSE_AFTER, timeout), max(0.0, timeout - DIAGNOSE_AFTER), RELEASE_TIMEOUT):
        try:
            return t.wait_stop(timeout=step, check=check)
        except WaitTimeout:
            waited += step
            reason = procfs.blocked_reason(pid, t.tid)
            if reason is None:
                continue        # exiting: its exit is reported next
            if "vfork" in reason or waited >= timeout:
                raise TargetError("thread %d of process %d did not stop within %.2g s: it is %s; dump abandoned, "
                                  "the process is left as it was" % (t.tid, pid, waited, reason)) from None
    return False    # gone, its exit not reported in time


def steal_uffd(pid, maps, flags, check=None):
    """Create a userfaultfd inside the target and take it: inject userfaultfd(), pidfd_getfd()
    it, inject close(). Only one thread is stopped, for well under a millisecond."""
    insn = find_syscall_insn(pid, maps)
    pidfd = lib.ck_pidfd_open(pid)
    if pidfd < 0:
        raise TargetGone("process %d is gone" % pid)
    t = None
    timeout = stop_timeout()
    try:
        for tid in procfs.tasks(pid):
            t = _seize(pid, tid, timeout, check)
            if t is not None:
                break
        if t is None:
            raise TargetGone("process %d is gone" % pid)
        t.interrupt()
        if not await_stop(pid, t, timeout, check):
            raise TargetGone("process %d exited" % pid)
        remote_fd = t.inject(insn, SYS_userfaultfd, flags)
        if remote_fd < 0:
            raise OSError(-remote_fd, "userfaultfd() in process %d: %s" % (pid, os.strerror(-remote_fd)))
        try:
            fd = lib.ck_pidfd_getfd(pidfd, remote_fd)
        finally:
            t.inject(insn, SYS_close, remote_fd)
        if fd < 0:
            raise OSError(-fd, "pidfd_getfd: %s" % os.strerror(-fd))
        return fd
    finally:
        if t is not None:
            t.release(timeout=RELEASE_TIMEOUT)
        os.close(pidfd)


class Freezer:
    """All threads of the target held in ptrace-stops. Threads created while freezing are
    caught by listing the tasks again until a listing finds nothing new. `check` is called
    while waiting (ckpt's own signals); `timeout` bounds the wait for each thread."""

    def __init__(self, pid, check=None, timeout=None):
        self.pid = pid
        self.check = check
        self.timeout = stop_timeout() if timeout is None else timeout
        self.threads = {}       # tid -> Tracee, stopped
        self.t_first_interrupt = None
        self.t_release = None

    def preseize(self):
        """Attach without stopping, so that the freeze itself only interrupts."""
        for tid in procfs.tasks(self.pid):
            if tid not in self.threads:
                t = _seize(self.pid, tid, self.timeout, self.check)
                if t is not None:
                    self.threads[tid] = t

    def freeze(self):
        with sigchld_blocked():
            return self._freeze()

    def _freeze(self):
        self.preseize()
        self.t_first_interrupt = time.perf_counter()
        self.interrupt_all()
        return self.await_all()

    def interrupt_all(self):
        """Interrupt every seized thread not stopped yet (the first half of a freeze)."""
        for t in self.threads.values():
            if t.stopped:
                continue
            try:
                t.interrupt()
            except PtraceError as e:
                if e.errno != errno.ESRCH:
                    raise

    def await_all(self):
        """Wait until every interrupted thread is stopped; threads created meanwhile are caught
        by listing the tasks again until a listing finds nothing new (the second half)."""
        pending = [t for t in self.threads.values() if not t.stopped]
        while True:
            for t in pending:
                if not await_stop(self.pid, t, self.timeout, self.check):
                    self.threads.pop(t.tid, None)
            new = []
            for tid in procfs.tasks(self.pid):
                if tid not in self.threads:
                    t = _seize(self.pid, tid, self.timeout, self.check)
                    if t is not None:
                        self.threads[tid] = t
                        new.append(t)
            if not new:
                break
            for t in new:
                try:
                    t.interrupt()
                except PtraceError as e:
                    if e.errno != errno.ESRCH:
                        raise
            pending = new
        if not self.threads:
            raise TargetGone("process %d exited" % self.pid)
        return self.threads

    @property
    def leader(self):
        """A stopped thread to inject into: the main thread if it is still alive."""
        return self.threads.get(self.pid) or next(iter(self.threads.values()))

    def thaw(self):
        """Release every thread (passing on signals the stops took). Idempotent. Threads seized
        but never stopped are interrupted together and given RELEASE_TIMEOUT in all to stop
        so that they can be detached; one that does not (blocked in the kernel) stays seized
        until ckpt exits."""
        running = [t for t in self.threads.values() if not t.stopped]
        for t in running:
            try:
                t.interrupt()
            except PtraceError:
                pass
        deadline = time.monotonic() + RELEASE_TIMEOUT
        for t in self.threads.values():
            if t.stopped:
                t.release()
            else:
                try:
                    if t.wait_stop(timeout=max(0.0, deadline - time.monotonic()), check=None):
                        t.detach()
                except (WaitTimeout, PtraceError, OSError):
                    pass
        self.threads.clear()
        if self.t_release is None:
            self.t_release = time.perf_counter()

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.t_release is None:
            self.t_release = time.perf_counter()
        # reap our traced threads, the leader last: its exit is reported only after the others'
        # (bounded: a thread in an uninterruptible sleep dies only when it wakes)
        deadline = time.monotonic() + self.timeout
        for tid in sorted(self.threads, key=lambda tid: tid == self.pid):
            try:
                while True:
                    st = wait_status(tid, max(0.0, deadline - time.monotonic()))
                    if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                        break
            except (ChildProcessError, WaitTimeout):
                pass
        self.threads.clear()

    @property
    def freeze_ms(self):
        if self.t_first_interrupt is None:
            return 0.0
        end = self.t_release if self.t_release is not None else time.perf_counter()
        return (end - self.t_first_interrupt) * 1000.0
