"""A blob: a small area of code and data the dump maps in the target in the freeze, so that each
thread runs its whole batch of state-reading syscalls in one go -- its own code, written for
that batch: load the arguments, `syscall`, store the result, ..., `int3` -- instead of one
single-step round trip (about 45 us here) per syscall. It is mapped (one injected mmap) and
unmapped again (one injected munmap) inside the freeze, before the process's mappings are
read: the running process never sees it (a mapping made before the freeze can sit where the
process moves its own mappings: MREMAP_FIXED would replace it), the image never holds it.

The code is plain x86-64, generated here:
    mov rdi/rsi/rdx/r10/r8/r9, imm64     (each argument; an Out buffer is an address in the data half)
    mov rax, imm64; syscall              (the call)
    movabs [imm64], rax                  (its result, into the data half)
    ... int3                             (the end: a SIGTRAP stop the dump takes back)

While it runs, every signal but SIGTRAP is blocked (the thread's mask is put back after): the
kernel resets the handler of a signal it forces while blocked (as int3's SIGTRAP is), so the
blob is not used when the target ignores SIGTRAP (see usable()).
"""
import ctypes
import os
import signal
import struct
import time

from ptrace.binding import func as pt

from ckpt.errors import TargetError
from ckpt.kernel import procfs
from ckpt.kernel.ptrace import _call, sigchld_blocked, to_signed, wait_status

SIZE = 1 << 16           # code in the first half, results and output buffers in the second
HALF = SIZE // 2
PROT_RWX = 7
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
SYS_mmap, SYS_munmap = 9, 11
ARG_REGS = (b"\x48\xbf", b"\x48\xbe", b"\x48\xba", b"\x49\xba", b"\x49\xb8", b"\x49\xb9")  # rdi rsi rdx r10 r8 r9
MOV_RAX = b"\x48\xb8"
SYSCALL = b"\x0f\x05"
STORE_RAX = b"\x48\xa3"    # movabs [imm64], rax
INT3 = b"\xcc"
RUN_TIMEOUT = 5.0
PTRACE_PEEKUSER = 3
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


RIP_OFFSET = 16 * 8      # rip in struct user_regs_struct (x86-64)


def _rip(tid):
    return _libc.ptrace(PTRACE_PEEKUSER, tid, ctypes.c_void_p(RIP_OFFSET), None) & 0xFFFFFFFFFFFFFFFF


def usable(pid):
    """The blob's int3 would reset an ignored SIGTRAP's disposition: not used then."""
    try:
        ign = int(procfs.status(pid).get("SigIgn", "0"), 16)
    except Exception:
        return False
    return not ign & (1 << (signal.SIGTRAP - 1))


class Blob:
    def __init__(self, pid, addr, mem):
        self.pid = pid
        self.addr = addr
        self.mem = mem          # MemIO of the process, writable

    @classmethod
    def create(cls, pid, tracee, insn, mem):
        """Map the blob with one injected mmap in a stopped thread; None if it cannot be."""
        r = tracee.inject(insn, SYS_mmap, 0, SIZE, PROT_RWX, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if r < 0:
            return None
        return cls(pid, r, mem)

    def remove(self, tracee, insn):
        """Unmap it (a stopped thread, single-step injection: the blob cannot unmap itself)."""
        if self.addr is None:
            return
        r = tracee.inject(insn, SYS_munmap, self.addr, SIZE)
        if r == -3:     # ESRCH-like: the thread is gone (the process is exiting)
            self.addr = None
            return
        if r < 0:
            raise TargetError("process %d: the dump's code area at %#x could not be unmapped: %s"
                              % (self.pid, self.addr, os.strerror(-r)))
        self.addr = None

    def run_all(self, jobs):
        """jobs: [(tracee, [(nr, args)])] with args ints or (offset, size) output slots already
        placed (see Injector.run_all); returns per job the list of results (signed). Every
        thread runs its own code at once; each is waited for."""
        code_room = HALF // max(1, len(jobs))
        res_room = HALF // 2 // max(1, len(jobs))
        plans = []
        code = bytearray(HALF)
        for i, (t, calls) in enumerate(jobs):
            at = i * code_room
            results = self.addr + HALF + i * res_room
            piece = bytearray()
            for k, (nr, args) in enumerate(calls):
                for reg, a in zip(ARG_REGS, args):
                    piece += reg + struct.pack("<Q", a & 0xFFFFFFFFFFFFFFFF)
                piece += MOV_RAX + struct.pack("<Q", nr) + SYSCALL + STORE_RAX + struct.pack("<Q", results + 8 * k)
            piece += INT3
            if len(piece) > code_room or 8 * len(calls) > res_room:
                raise ValueError("blob too small for %d calls" % len(calls))
            code[at:at + len(piece)] = piece
            plans.append((t, self.addr + at, self.addr + at + len(piece), results, len(calls)))
        self._write(0, bytes(code[:max(p[2] for p in plans) - self.addr]))
        with sigchld_blocked():
            saved = []
            try:
                for t, start, _, _, _ in plans:
                    regs, mask = t.get_regs(), t.get_sigmask()
                    saved.append((t, regs, mask))
                    t.set_sigmask(0xFFFFFFFFFFFFFFFF & ~(1 << (signal.SIGTRAP - 1)))
                    run = type(regs).from_buffer_copy(regs)
                    run.rip = start
                    run.orig_rax = 0xFFFFFFFFFFFFFFFF    # no syscall restart logic on our rip
                    t.set_regs(run)
                for t, _, _, _, _ in plans:
                    _call(pt.PTRACE_CONT, t.tid, 0, 0)
                for t, _, end, _, _ in plans:
                    self._await_end(t, end)
            finally:
                for t, regs, mask in saved:
                    try:
                        t.set_regs(regs)
                        t.set_sigmask(mask)
                    except OSError:
                        pass
        out = []
        for t, _, _, results, n in plans:
            raw = self._read(results - self.addr, 8 * n)
            out.append([to_signed(v) for v in struct.unpack("<%dQ" % n, raw)])
        return out

    def _await_end(self, t, end):
        deadline = time.monotonic() + RUN_TIMEOUT
        while True:
            st = wait_status(t.tid, max(0.0, deadline - time.monotonic()))
            if os.WIFEXITED(st) or os.WIFSIGNALED(st):
                raise ProcessLookupError(3, "thread %d exited while reading its state" % t.tid)
            if not os.WIFSTOPPED(st):
                continue
            sig = os.WSTOPSIG(st)
            if sig == signal.SIGTRAP and (st >> 16) == 0 and _rip(t.tid) == end:
                return
            if (st >> 16) == 0 and sig != signal.SIGTRAP:
                # a signal that came meanwhile (one that cannot be blocked, or a fault): kept
                # to be passed on at release if it is not ours to drop
                if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL):
                    raise TargetError("thread %d: the dump's state-reading code faulted (signal %d)" % (t.tid, sig))
                t.pending_signal = sig
            _call(pt.PTRACE_CONT, t.tid, 0, 0)

    def _write(self, off, data):
        st = self.mem.write_runs([(self.addr + off, len(data))], data)
        if st[0]:
            raise TargetError("process %d: cannot write the dump's code: %s" % (self.pid, os.strerror(st[0])))

    def _read(self, off, n):
        buf = bytearray(n)
        st = self.mem.read_runs([(self.addr + off, n)], buf)
        if st[0]:
            raise TargetError("process %d: cannot read the dump's results: %s" % (self.pid, os.strerror(st[0])))
        return bytes(buf)

    def read(self, off, n):
        return self._read(off, n)

    def data_room(self, njobs):
        return HALF // 2 // max(1, njobs)

    def data_addr(self, job, slot_off, njobs):
        """The address of output slot `slot_off` of job `job` in the data half (after results)."""
        return self.addr + HALF + HALF // 2 + job * (HALF // 2 // max(1, njobs)) + slot_off
