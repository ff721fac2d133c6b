"""Kinds of process and thread state beyond the core ones (ckpt/state/process.py, threads.py):
one module each, with its dump half and its restore half side by side, listed once in PARTS.

A part is a class (or module) with any of:

  refuse(pid)                    before the dump touches the target: None, or why this process
                                 cannot be dumped (a one-line reason naming what it is)
  calls(pid)                     in the freeze, first: syscalls to inject in the main thread, in the
                                 one batch that reads the process record (one round trip for all);
                                 their results reach dump as ctx.batched[the part's __name__]
  dump(ctx)                      in the freeze; ctx: .pid, .leader (a stopped Tracee to inject
                                 into), .tracees (every thread, stopped), .injector (Injector.run /
                                 run_all), .record (the process record: add your keys there),
                                 .threads (the thread records, in .tracees order), .batched
  restore(remote, proc, threads, stage)
                                 at restore, in the restored process (remote: ckpt.restore.remote
                                 .Remote, every thread created and held); stage is one of
                                   "process"  after the fds and the other threads exist, before
                                              per-thread state and credentials
                                   "threads"  after per-thread state, before credentials
                                   "last"     after the credentials (what needs them or must come
                                              last: seccomp filters), before the registers
  check(proc, threads)           at restore, before anything is created: raise RestoreError naming
                                 what cannot be brought back here

Adding a kind of state: one module in ckpt/state/ and one entry in PARTS.
"""
from ckpt.state import deleted, vmflags  # noqa: E402
from ckpt.state import membarrier, restart, sched, seccomp, timers  # noqa: E402

PARTS = [vmflags, deleted,
         timers, membarrier, seccomp, sched, restart]


class Capture:
    """What a part's dump half gets (see the module docstring)."""

    def __init__(self, pid, leader, tracees, injector, record, threads, batched=None):
        self.pid, self.leader, self.tracees, self.injector = pid, leader, tracees, injector
        self.record, self.threads = record, threads
        self.batched = batched or {}     # part's module name -> the results of its calls(pid)


def calls(pid):
    """[(part, its calls)] of the parts that have calls to ride in the main thread's batch."""
    return [(p, p.calls(pid)) for p in PARTS if hasattr(p, "calls")]


def split(batched, results):
    """The results of a batch made of calls(pid)'s lists, back to each part: {its name: results}."""
    out, i = {}, 0
    for p, c in batched:
        out[p.__name__] = results[i:i + len(c)]
        i += len(c)
    return out


def refuse(pid):
    for p in PARTS:
        why = getattr(p, "refuse", None) and p.refuse(pid)
        if why:
            return why
    return None


def dump(ctx):
    for p in PARTS:
        if hasattr(p, "dump"):
            p.dump(ctx)


def check(proc, threads):
    for p in PARTS:
        if hasattr(p, "check"):
            p.check(proc, threads)


def restore(remote, proc, threads, stage):
    for p in PARTS:
        if hasattr(p, "restore"):
            p.restore(remote, proc, threads, stage)
