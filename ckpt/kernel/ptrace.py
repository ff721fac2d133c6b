"""ptrace of one thread: seize, interrupt, wait, registers, xstate, syscall injection.

python-ptrace supplies the raw call and the register structure; the requests it has no
helper for (SEIZE, INTERRUPT, GETREGSET, SIGMASK, rseq) are issued through its generic call.
"""
import ctypes
import errno
import os
import signal
import time

from ptrace.binding import func as pt
from ptrace.binding.linux_struct import user_regs_struct
from ptrace.error import PtraceError

PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420a
PTRACE_SETSIGMASK = 0x420b
PTRACE_GET_RSEQ_CONFIGURATION = 0x420f
PTRACE_SETOPTIONS = 0x4200
PTRACE_O_SUSPEND_SECCOMP = 1 << 21
PTRACE_EVENT_STOP = 128
PTRACE_O_TRACESYSGOOD = 1
NT_PRSTATUS = 1
NT_X86_XSTATE = 0x202
WALL = 0x40000000

REGS_FIELDS = [name for name, _ in user_regs_struct._fields_]
XSTATE_MAX = 8192

ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516


POLL_S = 0.05            # how often a bounded wait looks at its check()


class WaitTimeout(Exception):
    """A thread did not report the stop (or exit) waited for in time."""

    def __init__(self, tid, timeout):
        super().__init__("thread %d did not stop within %g s" % (tid, timeout))
        self.tid = tid
        self.timeout = timeout


_sigchld_depth = [0]


class sigchld_blocked:
    """SIGCHLD blocked in this thread for a stretch of bounded waits (re-entrant): each wait
    then costs no sigprocmask calls of its own."""

    def __enter__(self):
        if _sigchld_depth[0] == 0:
            self.was = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGCHLD,))
        _sigchld_depth[0] += 1
        return self

    def __exit__(self, *exc):
        _sigchld_depth[0] -= 1
        if _sigchld_depth[0] == 0 and signal.SIGCHLD not in self.was:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGCHLD,))


def wait_status(tid, timeout=None, check=None):
    """waitpid(tid, __WALL): the next status of a traced thread. With a timeout (seconds) it
    raises WaitTimeout when nothing comes in time; check() is called every POLL_S while
    waiting (it raises to abandon the wait: ckpt's own SIGINT/SIGTERM). Raises
    ChildProcessError when tid is not (or no longer) ours to wait for.

    The bounded wait sleeps in sigtimedwait(SIGCHLD) with SIGCHLD blocked: every ptrace-stop
    and exit of a tracee sends the tracer a SIGCHLD; one that came before the signal was
    blocked is found by the WNOHANG waitpid that follows, one that came after stays pending
    until sigtimedwait takes it, so no stop is missed and none costs a poll interval. (Every
    other thread of ckpt blocks all signals, so the SIGCHLD cannot be taken elsewhere.)"""
    if timeout is None and check is None:
        return os.waitpid(tid, WALL)[1]
    deadline = None if timeout is None else time.monotonic() + timeout
    with sigchld_blocked():
        while True:
            got, st = os.waitpid(tid, WALL | os.WNOHANG)
            if got:
                return st
            slice_s = POLL_S
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(tid, timeout)
                slice_s = min(slice_s, left)
            if check is not None:
                check()
            signal.sigtimedwait((signal.SIGCHLD,), slice_s)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _RseqConf(ctypes.Structure):
    _fields_ = [("rseq_abi_pointer", ctypes.c_uint64), ("rseq_abi_size", ctypes.c_uint32),
                ("signature", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def _call(req, tid, addr=0, data=0):
    return pt.ptrace(req, tid, addr, data)


def to_signed(v):
    return v - (1 << 64) if v >= (1 << 63) else v


def regs_to_dict(regs):
    return {name: getattr(regs, name) for name in REGS_FIELDS}


def regs_from_dict(d):
    regs = user_regs_struct()
    for name in REGS_FIELDS:
        setattr(regs, name, d[name] & 0xFFFFFFFFFFFFFFFF)
    return regs


_suspend_seccomp = [True]    # whether PTRACE_O_SUSPEND_SECCOMP is worth trying (see Tracee._held)


class Tracee:
    """One thread under PTRACE_SEIZE. `stopped` tells whether we hold it in a ptrace-stop.

    `timeout` (seconds) and `check` bound every wait on the thread (see wait_status); None
    waits as long as it takes (restore, whose threads are its own fresh ones)."""

    def __init__(self, tid, timeout=None, check=None):
        self.tid = tid
        self.stopped = False
        self.pending_signal = 0  # a signal dequeued by a signal-delivery-stop, to pass on at detach
        self.timeout = timeout
        self.check = check

    # -- attach / stop / release ------------------------------------------------
    def seize(self):
        _call(PTRACE_SEIZE, self.tid, 0, 0)

    def interrupt(self):
        _call(PTRACE_INTERRUPT, self.tid)

    def wait_stop(self, timeout=False, check=False):
        """Wait until the thread is in a ptrace-stop. Returns False if it exited instead; raises
        WaitTimeout past the timeout (by default the thread's own; see wait_status)."""
        timeout = self.timeout if timeout is False else timeout
        check = self.check if check is False else check
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                st = wait_status(self.tid, left, check)
            except ChildProcessError:
                return False
            except WaitTimeout:
                raise WaitTimeout(self.tid, timeout) from None
            if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                return False
            if not os.WIFSTOPPED(st):
                continue
            sig = os.WSTOPSIG(st)
            event = st >> 16
            if event == PTRACE_EVENT_STOP:
                return self._held()
            if event == 0 and sig not in (signal.SIGTRAP,):
                # signal-delivery-stop: the thread is stopped; keep the signal to pass on later
                self.pending_signal = sig
                return self._held()
            if event == 0 and sig == signal.SIGTRAP:
                return self._held()
            # some other event stop: let it go on and keep waiting
            _call(pt.PTRACE_CONT, self.tid, 0, 0)

    def _held(self):
        """The thread is in a ptrace-stop ckpt holds. Its seccomp filters (or strict mode) are
        suspended while it is held (PTRACE_O_SUSPEND_SECCOMP), so that no syscall ckpt injects
        is filtered (killed, or failed in silence); the detach lifts it with the other ptrace
        options. A held thread never runs its own code. Needs CAP_SYS_ADMIN: without it nothing
        is suspended (a target under seccomp is then refused, ckpt/state/seccomp.py)."""
        self.stopped = True
        if _suspend_seccomp[0]:
            try:
                _call(PTRACE_SETOPTIONS, self.tid, 0, PTRACE_O_SUSPEND_SECCOMP)
            except PtraceError as e:
                if e.errno in (errno.EPERM, errno.EINVAL):
                    _suspend_seccomp[0] = False     # the tracer's rights or the kernel: for good
        return True

    def detach(self):
        sig = self.pending_signal
        self.pending_signal = 0
        try:
            _call(pt.PTRACE_DETACH, self.tid, 0, sig)
        except PtraceError as e:
            if e.errno != errno.ESRCH:
                raise
        self.stopped = False

    def release(self, timeout=False):
        """Detach whatever state the thread is in: a seized thread that was never stopped needs
        a stop before it can be detached. Best effort: a thread gone meanwhile is released. A
        thread that does not stop in time (blocked in the kernel) stays seized until ckpt
        exits, which detaches it; it is never waited for without bound. Returns whether the
        thread is let go."""
        try:
            if not self.stopped:
                self.interrupt()
                if not self.wait_stop(timeout=self.timeout if timeout is False else timeout, check=None):
                    return True
            self.detach()
        except WaitTimeout:
            return False
        except (PtraceError, OSError):
            pass
        return True

    def cont(self, sig=0):
        _call(pt.PTRACE_CONT, self.tid, 0, sig)
        self.stopped = False

    # -- state -------------------------------------------------------------------
    def get_regs(self):
        return pt.ptrace_getregs(self.tid)

    def set_regs(self, regs):
        pt.ptrace_setregs(self.tid, regs)

    def get_xstate(self):
        buf = ctypes.create_string_buffer(XSTATE_MAX)
        iov = _IoVec(ctypes.cast(buf, ctypes.c_void_p), XSTATE_MAX)
        _call(PTRACE_GETREGSET, self.tid, NT_X86_XSTATE, ctypes.addressof(iov))
        return buf.raw[:iov.len]

    def set_xstate(self, data):
        buf = ctypes.create_string_buffer(data, len(data))
        iov = _IoVec(ctypes.cast(buf, ctypes.c_void_p), len(data))
        _call(PTRACE_SETREGSET, self.tid, NT_X86_XSTATE, ctypes.addressof(iov))

    def get_sigmask(self):
        mask = ctypes.c_uint64()
        _call(PTRACE_GETSIGMASK, self.tid, 8, ctypes.addressof(mask))
        return mask.value

    def set_sigmask(self, value):
        mask = ctypes.c_uint64(value)
        _call(PTRACE_SETSIGMASK, self.tid, 8, ctypes.addressof(mask))

    def get_rseq(self):
        conf = _RseqConf()
        try:
            n = _call(PTRACE_GET_RSEQ_CONFIGURATION, self.tid, ctypes.sizeof(conf), ctypes.addressof(conf))
        except PtraceError as e:
            if e.errno in (errno.EIO, errno.EINVAL):
                return None
            raise
        if n == 0 or conf.rseq_abi_pointer == 0:
            return None
        return {"ptr": conf.rseq_abi_pointer, "size": conf.rseq_abi_size, "sig": conf.signature,
                "flags": conf.flags}

    # -- syscall injection -----------------------------------------------------------
    def inject(self, syscall_insn, nr, *args):
        """Run one syscall in this stopped thread; see inject_many."""
        return self.inject_many(syscall_insn, [(nr, args)])[0]

    def inject_many(self, syscall_insn, calls):
        """Run syscalls [(nr, args), ...] in this stopped thread; see inject_parallel."""
        return inject_parallel(syscall_insn, [(self, calls)])[0]

    def _wait_step(self):
        """Wait for the single-step trap; other signals arriving meanwhile are kept for later.
        Bounded by the thread's timeout (an injected syscall that blocks), never abandoned for
        ckpt's own signals: the thread runs our syscall and must be waited for to get its
        registers back."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                st = wait_status(self.tid, left)
            except WaitTimeout:
                raise WaitTimeout(self.tid, self.timeout) from None
            except ChildProcessError:
                raise ProcessLookupError(errno.ESRCH, "thread %d exited during an injected syscall" % self.tid) from None
            if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                raise ProcessLookupError(errno.ESRCH, "thread %d exited during an injected syscall" % self.tid)
            if os.WIFSTOPPED(st) and (st >> 16) == 0:
                if os.WSTOPSIG(st) == signal.SIGTRAP:
                    return
                self.pending_signal = os.WSTOPSIG(st)
            _call(pt.PTRACE_SINGLESTEP, self.tid, 0, 0)


def _syscall_regs(saved, syscall_insn, nr, args):
    regs = user_regs_struct()
    ctypes.pointer(regs)[0] = saved
    regs.rip = syscall_insn
    regs.rax = nr
    regs.orig_rax = 0xFFFFFFFFFFFFFFFF
    for name, val in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        setattr(regs, name, val & 0xFFFFFFFFFFFFFFFF)
    return regs


def inject_parallel(syscall_insn, jobs):
    """Run each job's syscalls [(nr, args), ...] in its stopped thread (jobs: [(tracee, calls)]),
    at a `syscall` instruction; return the results per job.

    All threads are single-stepped before any is waited for, so the scheduling latency of each
    step (most of its ~45 us) overlaps across threads. Registers and signal mask are restored
    afterwards, so an interrupted system call restarts as if nothing happened (orig_rax = -1
    during the injection keeps the kernel's restart logic away from our fake rip); signals are
    blocked meanwhile.
    """
    with sigchld_blocked():
        return _inject_parallel(syscall_insn, jobs)


def _inject_parallel(syscall_insn, jobs):
    states = []
    try:
        for t, calls in jobs:
            saved, mask = t.get_regs(), t.get_sigmask()
            states.append((t, list(calls), saved, mask, []))
            t.set_sigmask(0xFFFFFFFFFFFFFFFF)
        pending = [st for st in states if st[1]]
        while pending:
            for t, calls, saved, _, res in pending:
                nr, args = calls[len(res)]
                t.set_regs(_syscall_regs(saved, syscall_insn, nr, args))
                _call(pt.PTRACE_SINGLESTEP, t.tid, 0, 0)
            for t, _, _, _, res in pending:
                t._wait_step()
                res.append(to_signed(t.get_regs().rax))
            pending = [st for st in pending if len(st[4]) < len(st[1])]
    finally:
        for t, _, saved, mask, _ in states:
            try:
                t.set_regs(saved)
                t.set_sigmask(mask)
            except (PtraceError, OSError):
                pass   # the thread is gone; nothing to give back
    return [st[4] for st in states]


def fixup_restart(regs_dict, restart=None):
    """Registers as the thread must resume them when its syscall will not be restarted by a
    signal return: the kernel's own restart rules applied by hand (used for dumped images).

    restart: what ckpt/state/restart.py made of a -ERESTART_RESTARTBLOCK in the restored thread:
    "kept" (the thread's restart block is set up again: the registers stay as dumped and the
    kernel restarts the call itself when the thread is released, as after any stop), or the
    result the call returned when it was set up again; None: -EINTR."""
    rax = to_signed(regs_dict["rax"])
    orig = to_signed(regs_dict["orig_rax"])
    if orig >= 0 and rax in (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND):
        regs_dict["rax"] = regs_dict["orig_rax"]
        regs_dict["rip"] -= 2
    elif orig >= 0 and rax == -ERESTART_RESTARTBLOCK:
        if restart == "kept":
            return regs_dict
        regs_dict["rax"] = (-errno.EINTR if restart is None else restart) & 0xFFFFFFFFFFFFFFFF
    regs_dict["orig_rax"] = 0xFFFFFFFFFFFFFFFF
    return regs_dict


def find_syscall_insn(pid, maps):
    """Address of a `syscall` (0f 05) instruction in the target's vdso."""
    for vma in maps:
        if vma.path == "[vdso]":
            with open("/proc/%d/mem" % pid, "rb", buffering=0) as f:
                f.seek(vma.start)
                code = f.read(vma.size)
            i = code.find(b"\x0f\x05")
            if i >= 0:
                return vma.start + i
    raise OSError(errno.ENOENT, "no syscall instruction found in the vdso of %d" % pid)


class _PeekArgs(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


PEEKSIGINFO_SHARED = 1
SIGINFO_SIZE = 128


def peek_siginfo(tid, shared=False, limit=256):
    """Queued signals (raw 128-byte siginfo each) without dequeuing them."""
    out = []
    buf = ctypes.create_string_buffer(SIGINFO_SIZE * 32)
    while len(out) < limit:
        args = _PeekArgs(len(out), PEEKSIGINFO_SHARED if shared else 0, 32)
        n = _call(PTRACE_PEEKSIGINFO, tid, ctypes.addressof(args), ctypes.addressof(buf))
        if n <= 0:
            break
        out += [buf.raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE] for i in range(n)]
        if n < 32:
            break
    return out
