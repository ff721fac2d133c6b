"""The process being rebuilt, driven from outside: syscalls injected at a `syscall` instruction
of its vdso, with arguments passed through a scratch area mapped at a free address."""
import os

from ckpt.errors import RestoreError
from ckpt.kernel.memio import MemIO
from ckpt.kernel.ptrace import Tracee

SCRATCH_SIZE = 1 << 20
BLOB_MIN_CALLS = 10         # from this many calls a batch runs as a blob (when one is set up)
SYS_rt_sigaction, SIGTRAP = 13, 5


class Remote:
    def __init__(self, pid):
        self.pid = pid
        self.main = Tracee(pid)
        self.main.stopped = True
        self.threads = {pid: self.main}
        self.insn = None
        self.scratch = None
        self._next = 0
        self.mem = MemIO(pid, write=True)
        self.calls = 0
        self.ckpt_pidfd = None      # the restored process's pidfd of ckpt, for take()
        self.room = SCRATCH_SIZE    # bytes of the scratch area put() may use
        self.blob = None            # a state/blob.Blob at the scratch area's end: long batches run in one go

    def close(self):
        self.mem.close()

    # -- syscalls --------------------------------------------------------------------
    def call(self, nr, *args, tid=None, what=None, ok_errors=()):
        """Run one syscall in thread tid (default: the main thread); raise RestoreError on failure
        unless the error is in ok_errors."""
        return self.many([(nr, args)], tid=tid, what=what, ok_errors=ok_errors)[0]

    def many(self, calls, tid=None, what=None, ok_errors=()):
        t = self.threads[tid or self.pid]
        if self.blob is not None and len(calls) >= BLOB_MIN_CALLS:
            results = self._many_blob(t, calls)
        else:
            results = t.inject_many(self.insn, calls)
        self.calls += len(calls)
        for (nr, args), r in zip(calls, results):
            if r < 0 and -r not in ok_errors:
                label = what if isinstance(what, str) else (what(nr, args) if what else "syscall %d" % nr)
                raise RestoreError("%s failed in the restored process: %s" % (label, os.strerror(-r)))
        return results

    def _many_blob(self, t, calls):
        """A long batch run as one piece of code (ckpt/state/blob.py), but for the calls that
        change SIGTRAP's disposition (the blob ends on int3): those after, one by one."""
        trap = [i for i, (nr, a) in enumerate(calls) if nr == SYS_rt_sigaction and a and a[0] == SIGTRAP]
        rest = [c for i, c in enumerate(calls) if i not in trap]
        got = iter(self.blob.run_all([(t, rest)])[0])
        late = iter(t.inject_many(self.insn, [calls[i] for i in trap]) if trap else [])
        return [next(late) if i in trap else next(got) for i in range(len(calls))]

    def take(self, local_fd, what="an fd"):
        """The restored process takes ckpt's open file local_fd (pidfd_getfd): the very object
        ckpt opened or made, not something found again by name. Returns its fd number there."""
        from ckpt.kernel import sysno
        if self.ckpt_pidfd is None:
            self.ckpt_pidfd = self.call(sysno.pidfd_open, os.getpid(), 0, what="pidfd_open of the restorer")
        return self.call(sysno.pidfd_getfd, self.ckpt_pidfd, local_fd, 0,
                         what="taking %s from the restorer (pidfd_getfd)" % what)

    def forget_fds(self):
        """The restored process's fds above 2 were closed (close_range): its pidfd of ckpt too."""
        self.ckpt_pidfd = None

    # -- scratch -----------------------------------------------------------------------
    def set_scratch(self, addr):
        self.scratch = addr
        self._next = 0

    def reset(self):
        self._next = 0

    def put(self, data):
        """Copy bytes into the scratch area; return their address in the process."""
        size = (len(data) + 15) & ~15
        if self._next + size > self.room:
            raise RestoreError("scratch area exhausted (%d bytes wanted)" % len(data))
        addr = self.scratch + self._next
        self._next += size
        if data:
            self.write(addr, bytes(data))
        return addr

    def put_str(self, s):
        return self.put(os.fsencode(s) + b"\0")

    def alloc(self, size):
        return self.put(bytes(size))

    def write(self, addr, data):
        st = self.mem.write_runs([(addr, len(data))], data)
        if st[0]:
            raise RestoreError("cannot write %d bytes at %#x of the restored process: %s"
                               % (len(data), addr, os.strerror(st[0])))

    def read(self, addr, n):
        buf = bytearray(n)
        st = self.mem.read_runs([(addr, n)], buf)
        if st[0]:
            raise RestoreError("cannot read %#x of the restored process: %s" % (addr, os.strerror(st[0])))
        return bytes(buf)
