"""Sleeping system calls interrupted by the dump, which the kernel restarts through the thread's
restart block (-ERESTART_RESTARTBLOCK): poll, nanosleep, clock_nanosleep, futex waits with a
timeout. (Calls restarted from their own arguments -- ppoll, pselect, select, whose timeout the
kernel updates in place, and waits without a timeout -- are restarted by fixup_restart as they
are; epoll_wait returns EINTR at any stop, with or without ckpt.)

The restart block lives in the kernel, out of ckpt's reach: it holds the call's end time, which
a new thread does not have. Without this part such a call came back with EINTR, which a program
that has no signal handler never sees from it.

Dump half, for a thread stopped with -ERESTART_RESTARTBLOCK: which call it is (its syscall
number; for restart_syscall, the call ckpt saw the thread blocked in, in /proc/PID/task/TID/
syscall, before the dump stopped it the first time, or the `mov $nr, %eax` before its `syscall`
instruction), and the time it had left:
  exactly, where the kernel left it in the arguments: an absolute end (clock_nanosleep with
    TIMER_ABSTIME, FUTEX_WAIT_BITSET), the remaining time written to nanosleep's and
    clock_nanosleep's `rem` at the interruption, or no timeout (poll with -1);
  otherwise (poll, nanosleep without `rem`, FUTEX_WAIT: a relative timeout, and nothing tells
    when the call began) only a bound: the timeout less the time ckpt saw the thread blocked in
    that very call. Such a call is restarted with that bound: it never wakes early, nor with an
    error, but late by as long as it had already slept when the dump began -- unless the thread
    has a signal handler it does not block (a fault's or the C library's aside): such a program
    may get EINTR from the call any time, and gets EINTR (one that keeps its own deadline then
    waits exactly what it had left).

Restore half, in stage "last": the thread's restart block is made again by running the same call
(same pointers, the time left as its timeout) in the thread with a signal already pending (a
SIGSTOP sent at its syscall-entry stop, taken back at its delivery stop): it returns
-ERESTART_RESTARTBLOCK with the block set up as the kernel sets it up. Its registers then stay
as dumped (fixup_restart, "kept"), and once released the thread restarts the call through
restart_syscall as after any stop, the clock of a relative timeout running from the release. A
call that completes when made again (a poll whose fd is ready, a futex whose word changed, no
time left) resumes with that result; one that cannot be made again comes back with EINTR.
"""
import errno
import math
import os
import signal
import struct
import time

from ptrace.binding import func as pt

from ckpt.errors import RestoreError
from ckpt.kernel import procfs
from ckpt.kernel.ptrace import ERESTART_RESTARTBLOCK, _call, regs_from_dict, to_signed, wait_status

SYS_poll, SYS_nanosleep, SYS_futex, SYS_restart_syscall, SYS_clock_nanosleep = 7, 35, 202, 219, 230
KNOWN = (SYS_poll, SYS_nanosleep, SYS_futex, SYS_clock_nanosleep)
NAMES = {SYS_poll: "poll", SYS_nanosleep: "nanosleep", SYS_futex: "futex", SYS_clock_nanosleep: "clock_nanosleep"}
TIMER_ABSTIME = 1
COMPLETIONS = {SYS_futex: (-errno.EAGAIN, -errno.ETIMEDOUT)}    # errors a call made again may end with
FUTEX_WAIT, FUTEX_WAIT_BITSET, FUTEX_CMD_MASK = 0, 9, 0x7f
NSEC = 1000000000
ARGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
MOV_EAX = 0xb8
PTRACE_SYSCALL = 24
SYS_tgkill = 234
STEP_TIMEOUT = 5.0

_seen = {}      # pid -> {tid: (monotonic time, nr, args, pc)}: blocked calls seen before the dump stopped them


def refuse(pid):
    """Not a refusal: notes, before the dump stops the target for the first time, which call
    each thread is blocked in (the first stop turns it into restart_syscall)."""
    now = time.monotonic()
    seen = {}
    for tid in procfs.tasks(pid):
        try:
            with open(procfs.proc(pid, "task", str(tid), "syscall")) as f:
                fields = f.read().split()
        except OSError:
            continue
        if len(fields) == 9 and fields[0].isdigit():
            nr = int(fields[0])
            if nr in KNOWN:
                seen[tid] = (now, nr, [int(x, 16) for x in fields[1:7]], int(fields[8], 16))
    _seen[pid] = seen
    return None


def _mem(pid, addr, n):
    fd = os.open(procfs.proc(pid, "mem"), os.O_RDONLY)
    try:
        return os.pread(fd, n, addr)
    finally:
        os.close(fd)


def _timespec(pid, addr):
    sec, nsec = struct.unpack("<qq", _mem(pid, addr, 16))
    return sec * NSEC + nsec


def _seen_here(pid, tid, regs, nr=None):
    """What was seen of the thread before the first stop, if it was this call: at the same place,
    with the same arguments (and the same number, when known)."""
    seen = _seen.get(pid, {}).get(tid)
    if seen and seen[3] == regs["rip"] and seen[2][:4] == [regs[a] for a in ARGS[:4]] and nr in (None, seen[1]):
        return seen
    return None


def _which(pid, tid, regs):
    """The call behind restart_syscall: the one seen before the first stop at the same place
    with the same arguments, else the number loaded into eax right before the instruction."""
    seen = _seen_here(pid, tid, regs)
    if seen:
        return seen[1], seen[0]
    try:
        code = _mem(pid, regs["rip"] - 7, 7)
    except OSError:
        return None, None
    if len(code) == 7 and code[0] == MOV_EAX and code[5:] == b"\x0f\x05":
        return struct.unpack_from("<I", code, 1)[0], None
    return None, None


# faults, whose handlers are crash handlers, and the C library's own signals (glibc's SIGCANCEL
# and SIGSETXID, 32 and 33): no program expects EINTR from them
NOT_EINTR = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGTRAP, signal.SIGSYS, 32, 33)


def _handles_signals(record, d):
    """Whether the thread has a handler for a signal it does not block (other than the above):
    such a signal may interrupt the call with EINTR any time."""
    mask = d.get("sigmask", 0)
    for sig, h in (record.get("sigactions") or {}).items():
        sig = int(sig)
        if h["handler"] not in (0, 1) and not mask >> (sig - 1) & 1 and sig not in NOT_EINTR:
            return True
    return False


def _plan(pid, tid, regs, record, d, now):
    """(record for the restore, or None to leave it to EINTR)."""
    nr = to_signed(regs["orig_rax"])
    seen = _seen_here(pid, tid, regs, nr)
    t_seen = seen[0] if seen else None
    if nr == SYS_restart_syscall:
        nr, t_seen = _which(pid, tid, regs)
    if nr not in KNOWN:
        return None
    a = [regs[x] for x in ARGS]
    exact, timeout = None, None     # exact: remaining ns (-1: none, None: absolute); timeout: for a bound
    if nr == SYS_poll:
        ms = to_signed(a[2]) & 0xFFFFFFFF
        ms = ms - (1 << 32) if ms >= 1 << 31 else ms
        if ms < 0:
            exact = -1
        else:
            timeout = ms * 1000000
    elif nr == SYS_nanosleep:
        if a[1]:
            exact = _timespec(pid, a[1])
        else:
            timeout = _timespec(pid, a[0])
    elif nr == SYS_clock_nanosleep:
        if a[1] & TIMER_ABSTIME:
            exact = None
        elif a[3]:
            exact = _timespec(pid, a[3])
        else:
            timeout = _timespec(pid, a[2])
    elif nr == SYS_futex:
        cmd = a[1] & FUTEX_CMD_MASK
        if cmd == FUTEX_WAIT_BITSET:
            exact = None
        elif cmd == FUTEX_WAIT and a[3]:
            timeout = _timespec(pid, a[3])
        else:
            return None
    rec = {"nr": nr, "args": a}
    if timeout is None:
        rec["remaining_ns"] = exact
        rec["how"] = "absolute" if exact is None else "exact"
        return rec
    if _handles_signals(record, d):
        return None
    rec["remaining_ns"] = max(0, timeout - (int((now - t_seen) * NSEC) if t_seen is not None else 0))
    rec["how"] = "bound"
    return rec


def dump(ctx):
    now = time.monotonic()
    for t, d in zip(ctx.tracees, ctx.threads):
        regs = d["regs"]
        if to_signed(regs["rax"]) != -ERESTART_RESTARTBLOCK or to_signed(regs["orig_rax"]) < 0:
            continue
        rec = _plan(ctx.pid, t.tid, regs, ctx.record, d, now)
        if rec is not None:
            d["restart"] = rec
    _seen.pop(ctx.pid, None)


# ---------------------------------------------------------------------------- restore half
def _valid(rec):
    return (isinstance(rec, dict) and rec.get("nr") in KNOWN and isinstance(rec.get("args"), list)
            and len(rec["args"]) == 6 and all(isinstance(x, int) and 0 <= x < 1 << 64 for x in rec["args"])
            and rec.get("how") in ("exact", "absolute", "bound")
            and (rec.get("remaining_ns") is None or isinstance(rec["remaining_ns"], int)))


def check(proc, threads):
    for d in threads:
        rec = d.get("restart")
        if rec is not None and not _valid(rec):
            raise RestoreError("image: the interrupted call of thread %s is malformed" % d.get("tid"))


def _call_again(remote, rec):
    """The call that sets the restart block up again: same pointers, the time left."""
    nr, a, left = rec["nr"], list(rec["args"]), rec["remaining_ns"]

    def ts(ns):
        return remote.put(struct.pack("<qq", ns // NSEC, ns % NSEC))
    if nr == SYS_poll:
        a[2] = (-1 if left == -1 else math.ceil(left / 1000000)) & 0xFFFFFFFFFFFFFFFF
    elif nr == SYS_nanosleep:
        a[0] = ts(left)
    elif nr == SYS_clock_nanosleep and left is not None:
        a[2] = ts(left)
    elif nr == SYS_futex and left is not None:
        a[3] = ts(left)
    return nr, a


def restore(remote, proc, threads, stage):
    if stage != "last":
        return
    for d in threads:
        rec = d.get("restart")
        if not rec:
            continue
        remote.reset()
        nr, args = _call_again(remote, rec)
        result = _set_up(remote, d["tid"], nr, args)
        if result == -ERESTART_RESTARTBLOCK:
            d["restart_done"] = "kept"
        elif result >= 0 or result in COMPLETIONS.get(nr, ()):
            d["restart_done"] = result      # it completed at once: that is its result
        # else (the call cannot be made again here): EINTR, as without this part


def _tgkill(pid, tid, sig):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_tgkill, pid, tid, sig) < 0:
        e = ctypes.get_errno()
        raise RestoreError("tgkill of thread %d: %s" % (tid, os.strerror(e)))


def _wait(tid, what):
    """The thread's next stop: (signal, event); bounded, interrupting a call that blocks."""
    try:
        st = wait_status(tid, STEP_TIMEOUT)
    except Exception:
        raise RestoreError("thread %d did not stop %s" % (tid, what)) from None
    if not os.WIFSTOPPED(st):
        raise RestoreError("thread %d ended %s" % (tid, what))
    return os.WSTOPSIG(st), st >> 16


def _set_up(remote, tid, nr, args):
    """Run call nr in thread tid with an interruption pending, so that it returns at once
    having set up its restart block; returns its result (-ERESTART_RESTARTBLOCK, or what it
    returned when it completed at once). The thread is left in a ptrace-stop (the interruption's)
    with its registers and signal mask as they were."""
    t = remote.threads[tid]
    saved, mask = t.get_regs(), t.get_sigmask()
    what = "while its interrupted %s was set up again" % NAMES[nr]
    try:
        t.set_sigmask(0xFFFFFFFFFFFFFFFF)
        regs = {name: getattr(saved, name) for name, _ in saved._fields_}
        regs.update(rip=remote.insn, rax=nr, orig_rax=0xFFFFFFFFFFFFFFFF, **dict(zip(ARGS, args)))
        t.set_regs(regs_from_dict(regs))
        t.stopped = False
        _call(PTRACE_SYSCALL, tid, 0, 0)
        _wait(tid, what)
        now = t.get_regs()
        if to_signed(now.orig_rax) != nr or to_signed(now.rax) != -errno.ENOSYS:
            raise RestoreError("thread %d: %s stopped elsewhere than at its entry" % (tid, NAMES[nr]))
        # a signal pending when the call starts (SIGSTOP: the one every blocked signal lets
        # through, and ckpt takes it back at its delivery stop) makes it return at once
        _tgkill(remote.pid, tid, signal.SIGSTOP)
        _call(PTRACE_SYSCALL, tid, 0, 0)
        _wait(tid, what)
        now = t.get_regs()
        if to_signed(now.orig_rax) != nr:
            raise RestoreError("thread %d: %s did not return as expected" % (tid, NAMES[nr]))
        result = to_signed(now.rax)
        _call(pt.PTRACE_CONT, tid, 0, 0)        # on to the SIGSTOP's delivery stop, where it stays
        sig, event = _wait(tid, what)
        if sig != signal.SIGSTOP or event:
            raise RestoreError("thread %d: stopped by signal %d %s" % (tid, sig, what))
        t.stopped = True                        # the SIGSTOP is dropped when it is resumed (signal 0)
        return result
    finally:
        try:
            t.set_regs(saved)
            t.set_sigmask(mask)
        except Exception:
            pass     # the thread is gone: the restore fails on it anyway
