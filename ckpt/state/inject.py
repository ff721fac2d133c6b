"""Syscalls run inside a stopped thread of the target, with a scratch area on its own stack.

The scratch area lies below the thread's red zone; its bytes are saved before and written back
after each call, so the target's memory is left exactly as it was.
"""
import struct

from ckpt.kernel.memio import MemIO

RED_ZONE = 128
SCRATCH = 256


class Injector:
    def __init__(self, pid, tracee, syscall_insn):
        self.pid = pid
        self.t = tracee
        self.insn = syscall_insn
        self.mem = MemIO(pid, write=True)

    def close(self):
        self.mem.close()

    def call(self, nr, *args):
        return self.t.inject(self.insn, nr, *args)

    def call_out(self, nr, size, make_args, data_in=b""):
        """Run a syscall that fills `size` bytes at a scratch address; return (result, bytes).

        make_args(scratch) gives the syscall arguments; data_in is placed at scratch first.
        """
        assert size <= SCRATCH and len(data_in) <= SCRATCH
        rsp = self.t.get_regs().rsp
        scratch = (rsp - RED_ZONE - SCRATCH) & ~0xF
        saved = bytearray(SCRATCH)
        self._io(self.mem.read_runs, scratch, saved)
        try:
            if data_in:
                buf = bytearray(SCRATCH)
                buf[:len(data_in)] = data_in
                self._io(self.mem.write_runs, scratch, buf)
            res = self.call(nr, *make_args(scratch))
            out = bytearray(SCRATCH)
            self._io(self.mem.read_runs, scratch, out)
        finally:
            self._io(self.mem.write_runs, scratch, saved)
        return res, bytes(out[:size])

    @staticmethod
    def _io(op, addr, buf):
        st = op([(addr, len(buf))], buf)
        if st[0]:
            raise OSError(st[0], "scratch area at %#x of the target's stack" % addr)

    def u64_out(self, nr, *args):
        """For calls like prctl(PR_GET_TID_ADDRESS, &out): args may contain the marker OUT."""
        res, data = self.call_out(nr, 8, lambda s: [s if a is OUT else a for a in args])
        return res, struct.unpack("<Q", data)[0]


OUT = object()
