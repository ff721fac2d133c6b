"""Attach, inject, freeze and thaw: everything that stops the target's threads.

The target is traced only when it must be stopped: for the few injected syscalls that create
the uffd (one thread, well under a millisecond) and for the freeze. In between it runs untraced,
so its signals, clones and timing are its own.
"""
import errno
import os
import signal
import time

from ptrace.error import PtraceError

from ckpt.errors import TargetError, TargetGone
from ckpt.kernel import procfs
from ckpt.kernel.native import lib
from ckpt.kernel.ptrace import Tracee, find_syscall_insn

SYS_close = 3
SYS_userfaultfd = 323
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000


def check_target(pid):
    """Refuse targets that cannot be dumped, with the reason."""
    if pid == os.getpid():
        raise TargetError("process %d is ckpt itself" % pid)
    if not procfs.exists(pid):
        raise TargetError("no process with PID %d" % pid)
    st = procfs.status(pid)
    if st.get("Tgid") != str(pid):
        raise TargetError("%d is a thread of process %s; give the process ID" % (pid, st.get("Tgid")))
    tracer = int(st.get("TracerPid", "0"))
    if tracer:
        raise TargetError("process %d is already traced by process %d (a debugger?); detach it first" % (pid, tracer))
    if st.get("State", "").startswith(("Z", "X")):
        raise TargetError("process %d is a zombie" % pid)
    try:
        maps = procfs.read_maps(pid)
    except PermissionError:
        raise TargetError("not allowed to read the memory map of process %d; run ckpt as its owner or root" % pid) from None
    if not maps:
        raise TargetError("process %d has no user memory (a kernel thread?)" % pid)
    return maps


def _seize(pid, tid):
    t = Tracee(tid)
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


def steal_uffd(pid, maps, flags):
    """Create a userfaultfd inside the target and take it: inject userfaultfd(), pidfd_getfd()
    it, inject close(). Only one thread is stopped, for well under a millisecond."""
    insn = find_syscall_insn(pid, maps)
    pidfd = lib.ck_pidfd_open(pid)
    if pidfd < 0:
        raise TargetGone("process %d is gone" % pid)
    t = None
    try:
        for tid in procfs.tasks(pid):
            t = _seize(pid, tid)
            if t is not None:
                break
        if t is None:
            raise TargetGone("process %d is gone" % pid)
        t.interrupt()
        if not t.wait_stop():
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
            t.release()
        os.close(pidfd)


class Freezer:
    """All threads of the target held in ptrace-stops. Threads created while freezing are
    caught by listing the tasks again until a listing finds nothing new."""

    def __init__(self, pid):
        self.pid = pid
        self.threads = {}       # tid -> Tracee, stopped
        self.t_first_interrupt = None
        self.t_release = None

    def preseize(self):
        """Attach without stopping, so that the freeze itself only interrupts."""
        for tid in procfs.tasks(self.pid):
            if tid not in self.threads:
                t = _seize(self.pid, tid)
                if t is not None:
                    self.threads[tid] = t

    def freeze(self):
        self.preseize()
        self.t_first_interrupt = time.perf_counter()
        pending = list(self.threads.values())
        while True:
            for t in pending:
                try:
                    t.interrupt()
                except PtraceError as e:
                    if e.errno != errno.ESRCH:
                        raise
            for t in pending:
                if not t.wait_stop():
                    self.threads.pop(t.tid, None)
            new = []
            for tid in procfs.tasks(self.pid):
                if tid not in self.threads:
                    t = _seize(self.pid, tid)
                    if t is not None:
                        self.threads[tid] = t
                        new.append(t)
            if not new:
                break
            pending = new
        if not self.threads:
            raise TargetGone("process %d exited" % self.pid)
        return self.threads

    @property
    def leader(self):
        """A stopped thread to inject into: the main thread if it is still alive."""
        return self.threads.get(self.pid) or next(iter(self.threads.values()))

    def thaw(self):
        """Release every thread (passing on signals the stops took). Idempotent."""
        for t in self.threads.values():
            t.release()
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
        for tid in sorted(self.threads, key=lambda tid: tid == self.pid):
            try:
                os.waitpid(tid, 0x40000000)
            except ChildProcessError:
                pass
        self.threads.clear()

    @property
    def freeze_ms(self):
        if self.t_first_interrupt is None:
            return 0.0
        end = self.t_release if self.t_release is not None else time.perf_counter()
        return (end - self.t_first_interrupt) * 1000.0
