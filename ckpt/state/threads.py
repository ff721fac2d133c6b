"""Per-thread state: registers (with fs_base/gs_base), xstate, signal mask, queued signals,
rseq, robust list, clear-child-tid address, alternate signal stack.

Dump half: read from a thread in a ptrace-stop. Restore half: see ckpt.restore.
"""
import base64
import struct

from ckpt.kernel.native import ffi, lib
from ckpt.kernel.ptrace import peek_siginfo, regs_to_dict
from ckpt.state.inject import OUT, Injector

SYS_sigaltstack = 131
SYS_prctl = 157
PR_GET_TID_ADDRESS = 40


def dump_thread(pid, tracee, syscall_insn):
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
    inj = Injector(pid, t, syscall_insn)
    try:
        res, addr = inj.u64_out(SYS_prctl, PR_GET_TID_ADDRESS, OUT)
        d["tid_address"] = addr if res == 0 else None
        res, raw = inj.call_out(SYS_sigaltstack, 24, lambda s: [0, s])
        if res == 0:
            sp, flags, _, size = struct.unpack("<QiiQ", raw)
            d["altstack"] = {"sp": sp, "flags": flags, "size": size}
    finally:
        inj.close()
    return d
