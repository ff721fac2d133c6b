"""membarrier(2) registrations of the process (its mm): private expedited, private expedited
sync-core, private expedited rseq, global expedited. A process that registered gets EPERM from
the matching barrier command if it is restored without them.

Dump half: membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS) injected into the stopped process
(Linux 6.3; it rides in the main thread's batch, see parts.calls) returns the REGISTER_* commands it issued. On an older kernel the private kinds are
probed: their barrier command returns EPERM when not registered and, registered, only interrupts
the process's running threads -- none runs in the freeze; a global expedited registration cannot
be seen there and is not kept.

Restore half, in stage "process" (every thread exists): each registration issued again.
"""
from ckpt.errors import RestoreError

SYS_membarrier = 324
CMD_QUERY = 0
CMD_GLOBAL_EXPEDITED, CMD_REGISTER_GLOBAL_EXPEDITED = 1 << 1, 1 << 2
CMD_PRIVATE_EXPEDITED, CMD_REGISTER_PRIVATE_EXPEDITED = 1 << 3, 1 << 4
CMD_PRIVATE_EXPEDITED_SYNC_CORE, CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE = 1 << 5, 1 << 6
CMD_PRIVATE_EXPEDITED_RSEQ, CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ = 1 << 7, 1 << 8
CMD_GET_REGISTRATIONS = 1 << 9
EPERM, EINVAL = 1, 22

# REGISTER_* command -> (its name, the barrier command it allows)
REGISTRATIONS = {
    CMD_REGISTER_GLOBAL_EXPEDITED: ("global expedited", CMD_GLOBAL_EXPEDITED),
    CMD_REGISTER_PRIVATE_EXPEDITED: ("private expedited", CMD_PRIVATE_EXPEDITED),
    CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: ("private expedited sync-core", CMD_PRIVATE_EXPEDITED_SYNC_CORE),
    CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ: ("private expedited rseq", CMD_PRIVATE_EXPEDITED_RSEQ),
}


def calls(pid):
    return [(SYS_membarrier, (CMD_GET_REGISTRATIONS, 0, 0))]


def dump(ctx):
    got = ctx.batched.get(__name__)
    if got is None:
        got = ctx.injector.run(ctx.leader, calls(ctx.pid))
    (mask, _), = got
    if mask == -EINVAL:         # before Linux 6.3: probe the private kinds
        probes = [reg for reg, (_, cmd) in REGISTRATIONS.items() if cmd != CMD_GLOBAL_EXPEDITED]
        res = ctx.injector.run(ctx.leader, [(SYS_membarrier, (REGISTRATIONS[reg][1], 0, 0)) for reg in probes])
        mask = sum(reg for reg, (r, _) in zip(probes, res) if r == 0)
    elif mask < 0:
        mask = 0                # no membarrier here (ENOSYS): nothing registered
    if mask:
        ctx.record["membarrier"] = mask


def _mask(proc):
    mask = proc.get("membarrier", 0)
    if not isinstance(mask, int) or mask < 0 or mask & ~sum(REGISTRATIONS):
        raise RestoreError("image: membarrier registrations %r of process %s are not known" % (mask, proc.get("pid")))
    return mask


def check(proc, threads):
    mask = _mask(proc)
    if not mask:
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    supported = libc.syscall(SYS_membarrier, CMD_QUERY, 0, 0)
    missing = [name for reg, (name, _) in REGISTRATIONS.items() if mask & reg and not (supported > 0 and supported & reg)]
    if missing:
        raise RestoreError("process %d registered for %s membarrier, which this kernel does not offer"
                           % (proc["pid"], " and ".join(missing)))


def restore(remote, proc, threads, stage):
    if stage != "process":
        return
    mask = _mask(proc)
    calls = [(SYS_membarrier, (reg, 0, 0)) for reg in REGISTRATIONS if mask & reg]
    if calls:
        remote.many(calls, what=lambda nr, a: "membarrier registration for %s" % REGISTRATIONS[a[0]][0])
