"""Per-thread state: registers (with fs_base/gs_base), xstate, signal mask, queued signals,
rseq, robust list, clear-child-tid address, alternate signal stack.

Dump half: read from a thread in a ptrace-stop. Restore half: see ckpt.restore.
"""
import base64
import ctypes
import os
import struct

from ptrace.error import PtraceError

from ckpt.kernel import procfs
from ckpt.kernel.native import PAGE_SIZE, ffi, lib
from ckpt.kernel.ptrace import _call, regs_to_dict, user_regs_struct
from ckpt.state.inject import Out, u64

SYS_sigaltstack = 131
SYS_prctl = 157
PR_GET_TID_ADDRESS = 40
PTRACE_GETSIGINFO = 0x4202
PTRACE_EVENT_STOP = 128
STOP_SIGNALS = (19, 20, 21, 22)     # SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU


def group_stop(tid):
    """The stop signal if the thread's process is in a group stop (stopped by SIGSTOP & co.),
    else 0. Read in the ptrace-stop the freeze put the thread in, before anything is injected
    into it: that stop is a PTRACE_EVENT_STOP whose siginfo carries the group stop's signal, or
    SIGTRAP when the process was running (a plain PTRACE_INTERRUPT)."""
    buf = ctypes.create_string_buffer(128)
    try:
        _call(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf))
    except PtraceError:
        return 0
    signo, _, code = struct.unpack_from("<iii", buf.raw)
    return signo if code >> 8 == PTRACE_EVENT_STOP and signo in STOP_SIGNALS else 0


XSTATE_MAX = 8192
SIGS_MAX = 256


def _stop_signal(siginfo):
    """group_stop's answer from the stop's siginfo (see group_stop)."""
    signo, _, code = struct.unpack_from("<iii", siginfo)
    return signo if code >> 8 == PTRACE_EVENT_STOP and signo in STOP_SIGNALS else 0


def _read_thread(t, st, xstate, sigs):
    """Everything ptrace tells of one stopped thread, in one native call (ck_thread_state)."""
    r = lib.ck_thread_state(t.tid, st, xstate, XSTATE_MAX, sigs, SIGS_MAX)
    if r < 0:
        raise ProcessLookupError(-r, "thread %d: its registers cannot be read: %s" % (t.tid, os.strerror(-r)))
    d = {
        "tid": t.tid,
        "regs": regs_to_dict(user_regs_struct.from_buffer_copy(bytes(ffi.buffer(st.regs)))),
        "xstate": base64.b64encode(bytes(ffi.buffer(xstate, st.xstate_len))).decode(),
        "sigmask": st.sigmask,
        "rseq": ({"ptr": st.rseq_ptr, "size": st.rseq_size, "sig": st.rseq_sig, "flags": 0}
                 if st.have & 2 else None),
        "signals": [base64.b64encode(bytes(ffi.buffer(sigs + i * 128, 128))).decode() for i in range(st.nsigs)],
        "stop_signal": t.pending_signal,   # taken off the queue by a signal-delivery-stop
        "comm": procfs.comm(t.tid),
        "group_stop": _stop_signal(bytes(ffi.buffer(st.stop_siginfo))) if st.have & 8 else 0,
    }
    if st.have & 4:
        d["robust_list"] = {"head": st.robust_head, "len": st.robust_len}
    return d


def dump_threads(tracees, injector, extra=None):
    """State of every stopped thread. The two per-thread injected calls (clear-child-tid address,
    alternate signal stack) run in all threads at once. extra: (tracee, calls) run in that
    thread after its own, in the same batch (the process record's: one batch in all, which a
    blob runs in one go); returns (thread records, extra's results) then."""
    st = ffi.new("struct ck_thread *")
    xstate = ffi.new("uint8_t[]", XSTATE_MAX)
    sigs = ffi.new("uint8_t[]", SIGS_MAX * 128)
    out = [_read_thread(t, st, xstate, sigs) for t in tracees]
    calls = [(SYS_prctl, (PR_GET_TID_ADDRESS, Out(8))), (SYS_sigaltstack, (0, Out(24)))]
    results = injector.run_all([(t, calls + (extra[1] if extra and t is extra[0] else [])) for t in tracees])
    more = None
    if extra:
        more = next(r[len(calls):] for t, r in zip(tracees, results) if t is extra[0])
    for d, ((r1, tidaddr), (r2, alt), *_rest) in zip(out, results):
        d["tid_address"] = u64(tidaddr) if r1 == 0 else None
        if r2 == 0:
            sp, flags, _, size = struct.unpack_from("<QiiQ", alt)
            d["altstack"] = {"sp": sp, "flags": flags, "size": size}
    return (out, more) if extra else out


def rseq_pages(thread_records):
    """The pages holding the threads' rseq areas, which the kernel rewrites (cpu_id ...) on every
    return to user space, injected calls' too: what ckpt copies or compares last."""
    pages = set()
    for t in thread_records:
        rs = t.get("rseq")
        if rs and rs.get("ptr"):
            first = rs["ptr"] & ~(PAGE_SIZE - 1)
            pages.update(range(first, rs["ptr"] + max(rs.get("size") or 32, 32), PAGE_SIZE))
    return sorted(pages)


# ---------------------------------------------------------------------------- restore half
CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000  # VM FS FILES SIGHAND THREAD SYSVSEM
PR_SET_NAME = 15
RSEQ_FLAG_UNREGISTER = 1


def create_thread(remote, tid):
    """clone3(CLONE_THREAD, set_tid={tid}) in the main thread; the new thread is traced from its
    first instruction (PTRACE_O_TRACECLONE) and never runs before its registers are set."""
    from ckpt.kernel import sysno
    from ckpt.kernel.ptrace import Tracee
    remote.reset()
    tids = remote.put(struct.pack("<i", tid))
    args = remote.put(struct.pack("<11Q", CLONE_THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, tids, 1, 0))
    remote.call(sysno.clone3, args, 88, what="creating thread %d (clone3 set_tid)" % tid)
    t = Tracee(tid)
    if not t.wait_stop():
        from ckpt.errors import RestoreError
        raise RestoreError("thread %d vanished right after its creation" % tid)
    t.pending_signal = 0   # the SIGSTOP every auto-attached clone starts with is ours, not the process's
    remote.threads[tid] = t
    return t


def restore_thread_state(remote, d):
    """Kernel state of one thread that only the thread itself can set: rseq, robust list,
    clear-child-tid address, alternate signal stack, name."""
    from ckpt.kernel import sysno
    tid = d["tid"]
    remote.reset()
    calls = []
    if d.get("robust_list"):
        calls.append((sysno.set_robust_list, (d["robust_list"]["head"], d["robust_list"]["len"])))
    if d.get("tid_address") is not None:
        calls.append((sysno.set_tid_address, (d["tid_address"],)))
    alt = d.get("altstack")
    if alt and not alt["flags"] & 2:   # SS_DISABLE
        calls.append((sysno.sigaltstack, (remote.put(struct.pack("<QiiQ", alt["sp"], alt["flags"] & ~1, 0, alt["size"])), 0)))
    if d.get("comm"):
        calls.append((sysno.prctl, (PR_SET_NAME, remote.put_str(d["comm"][:15]), 0, 0, 0)))
    rs = d.get("rseq")
    if rs:
        calls.append((sysno.rseq, (rs["ptr"], rs["size"], 0, rs["sig"])))
    names = {sysno.set_robust_list: "set_robust_list", sysno.set_tid_address: "set_tid_address",
             sysno.sigaltstack: "sigaltstack", sysno.prctl: "prctl(PR_SET_NAME)", sysno.rseq: "rseq registration"}
    remote.many(calls, tid=tid, what=lambda nr, a: "%s of thread %d" % (names.get(nr, nr), tid))


def restore_thread_regs(remote, d):
    """Signal mask, xstate and registers, with interrupted system calls set up to restart the
    way the kernel would have restarted them."""
    from ckpt.kernel.ptrace import fixup_restart, regs_from_dict
    t = remote.threads[d["tid"]]
    t.set_sigmask(d["sigmask"])
    t.set_xstate(base64.b64decode(d["xstate"]))
    t.set_regs(regs_from_dict(fixup_restart(dict(d["regs"]), d.get("restart_done"))))


def requeue_signals(remote, d, pid):
    """Signals that were queued for the thread at the freeze, queued again."""
    from ckpt.kernel import sysno
    remote.reset()
    calls = []
    for raw in d.get("signals", []):
        info = base64.b64decode(raw)
        sig = struct.unpack_from("<i", info)[0]
        calls.append((sysno.rt_tgsigqueueinfo, (pid, d["tid"], sig, remote.put(info))))
    if d.get("stop_signal"):
        info = struct.pack("<iii", d["stop_signal"], 0, -6) + bytes(116)   # SI_TKILL
        calls.append((sysno.rt_tgsigqueueinfo, (pid, d["tid"], d["stop_signal"], remote.put(info))))
    remote.many(calls, tid=d["tid"], what="queueing a pending signal")
