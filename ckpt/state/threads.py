"""Per-thread state: registers (with fs_base/gs_base), xstate, signal mask, queued signals,
rseq, robust list, clear-child-tid address, alternate signal stack.

Dump half: read from a thread in a ptrace-stop. Restore half: see ckpt.restore.
"""
import base64
import struct

from ckpt.kernel.native import ffi, lib
from ckpt.kernel.ptrace import peek_siginfo, regs_to_dict
from ckpt.state.inject import Out, u64

SYS_sigaltstack = 131
SYS_prctl = 157
PR_GET_TID_ADDRESS = 40


def dump_thread(tracee, injector):
    t = tracee
    d = {
        "tid": t.tid,
        "regs": regs_to_dict(t.get_regs()),
        "xstate": base64.b64encode(t.get_xstate()).decode(),
        "sigmask": t.get_sigmask(),
        "rseq": t.get_rseq(),
        "signals": [base64.b64encode(s).decode() for s in peek_siginfo(t.tid)],
        "stop_signal": t.pending_signal,   # taken off the queue by a signal-delivery-stop
    }
    head, length = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    if lib.ck_get_robust_list(t.tid, head, length) == 0:
        d["robust_list"] = {"head": head[0], "len": length[0]}
    (r1, tidaddr), (r2, alt) = injector.run(t, [(SYS_prctl, (PR_GET_TID_ADDRESS, Out(8))),
                                                (SYS_sigaltstack, (0, Out(24)))])
    d["tid_address"] = u64(tidaddr) if r1 == 0 else None
    if r2 == 0:
        sp, flags, _, size = struct.unpack_from("<QiiQ", alt)
        d["altstack"] = {"sp": sp, "flags": flags, "size": size}
    return d
