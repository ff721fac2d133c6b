"""Syscalls run inside a stopped thread of the target, with a scratch area on its own stack.

The scratch area lies below the thread's red zone; its bytes are saved before and written back
after each batch, so the target's memory is left exactly as it was.
"""
import struct

from ckpt.kernel.memio import MemIO
from ckpt.kernel.ptrace import inject_parallel
from ckpt.state import blob as blob_mod     # imported now: an import inside the freeze costs milliseconds

RED_ZONE = 128
SCRATCH = 1024


class Out:
    """An output buffer argument of `size` bytes in the scratch area."""

    def __init__(self, size):
        self.size = (size + 15) & ~15


class BlobTooSmall(Exception):
    pass


# a batch of at least this many syscalls in one thread runs as a blob (ckpt/state/blob.py): below
# it, mapping and unmapping the blob (two injected calls) costs more than single-stepping saves
BLOB_MIN_CALLS = 10


class Injector:
    """Syscalls run in stopped threads of one process. use_blob: a long batch runs as one piece
    of code in the thread (a blob mapped for it, unmapped at close(), which must come while the
    thread is still stopped) instead of one single-step per syscall."""

    def __init__(self, pid, syscall_insn, mem=None, use_blob=False):
        self.pid = pid
        self.insn = syscall_insn
        self.use_blob = use_blob
        self.blob = None
        self._blob_tracee = None
        self._own_mem = mem is None
        self.mem = mem or MemIO(pid, write=True)

    def close(self):
        try:
            if self.blob is not None:
                self.blob.remove(self._blob_tracee, self.insn)
        finally:
            self.blob = None
            if self._own_mem:
                self.mem.close()

    def _want_blob(self, jobs):
        if self.blob is None and self.use_blob and max(len(c) for _, c in jobs) >= BLOB_MIN_CALLS:
            if blob_mod.usable(self.pid):
                self.blob = blob_mod.Blob.create(self.pid, jobs[0][0], self.insn, self.mem)
                self._blob_tracee = jobs[0][0]
        return self.blob is not None

    def run(self, tracee, calls):
        """Run [(nr, args)] in one stopped thread; see run_all."""
        return self.run_all([(tracee, calls)])[0]

    def run_all(self, jobs):
        """Run [(nr, args)] in each of several stopped threads (jobs: [(tracee, calls)]), all at
        once. An Out(size) among args is replaced by an address in that thread's scratch area;
        returns per job [(result, bytes of that Out or None)]."""
        if jobs and self._want_blob(jobs):
            try:
                return self._run_blob(jobs)
            except BlobTooSmall:
                pass        # many threads: one single-step per syscall, as without a blob
        prepared, scratches = [], []
        try:
            for tracee, calls in jobs:
                need = sum(a.size for _, args in calls for a in args if isinstance(a, Out))
                assert need <= SCRATCH, "scratch area too small"
                scratch = saved = None
                if need:
                    scratch = (tracee.get_regs().rsp - RED_ZONE - SCRATCH) & ~0xF
                    saved = bytearray(SCRATCH)
                    self._io(self.mem.read_runs, scratch, saved)
                    scratches.append((scratch, saved))
                placed, slots, _ = _place(calls, lambda off, scratch=scratch: scratch + off)
                prepared.append((tracee, placed, slots, scratch))
            results = inject_parallel(self.insn, [(t, placed) for t, placed, _, _ in prepared])
            out = []
            for (tracee, _, slots, scratch), res in zip(prepared, results):
                data = bytearray(SCRATCH)
                if scratch is not None:
                    self._io(self.mem.read_runs, scratch, data)
                out.append([(r, bytes(data[s[0]:s[0] + s[1]]) if s else None) for r, s in zip(res, slots)])
            return out
        finally:
            for scratch, saved in scratches:
                self._io(self.mem.write_runs, scratch, saved)

    def _run_blob(self, jobs):
        """run_all with the blob: Out buffers in its data half, one run per thread."""
        n = len(jobs)
        prepared, slots_of = [], []
        for j, (tracee, calls) in enumerate(jobs):
            placed, slots, off = _place(calls, lambda o, j=j: self.blob.data_addr(j, o, n))
            prepared.append((tracee, placed))
            slots_of.append((slots, off))
        if max(size for _, size in slots_of) > self.blob.data_room(n):
            raise BlobTooSmall()
        try:
            results = self.blob.run_all(prepared)
        except ValueError:
            raise BlobTooSmall() from None
        out = []
        for j, (res, (slots, size)) in enumerate(zip(results, slots_of)):
            base = self.blob.data_addr(j, 0, n) - self.blob.addr
            data = self.blob.read(base, size) if size else b""
            out.append([(r, bytes(data[s[0]:s[0] + s[1]]) if s else None) for r, s in zip(res, slots)])
        return out

    @staticmethod
    def _io(op, addr, buf):
        st = op([(addr, len(buf))], buf)
        if st[0]:
            raise OSError(st[0], "scratch area at %#x of the target's stack" % addr)


def _place(calls, addr_of):
    """Calls with their Out arguments given room: the n-th byte of room is at addr_of(n).
    Returns (the calls with addresses, per call its (offset, size) output slot or None, the
    room used)."""
    placed, slots, off = [], [], 0
    for nr, args in calls:
        real, slot = [], None
        for a in args:
            if isinstance(a, Out):
                slot = (off, a.size)
                real.append(addr_of(off))
                off += a.size
            else:
                real.append(a)
        placed.append((nr, real))
        slots.append(slot)
    return placed, slots, off


def u64(data):
    return struct.unpack_from("<Q", data)[0]
