"""seccomp: strict mode and filters, per thread.

While ckpt holds a thread in a ptrace-stop, its seccomp protection is suspended
(PTRACE_O_SUSPEND_SECCOMP, set by Tracee._held in ckpt/kernel/ptrace.py; the detach lifts it):
the syscalls ckpt injects into the target to dump it, and into the restored process to rebuild
it, are never filtered, and the thread never runs its own code meanwhile. That needs
CAP_SYS_ADMIN (and no seccomp filter on ckpt itself): without it a target under seccomp is
refused before it is touched.

Dump half: each thread's filters, oldest first, with PTRACE_SECCOMP_GET_FILTER (the classic BPF
program as installed) and their flags (PTRACE_SECCOMP_GET_METADATA: SECCOMP_FILTER_FLAG_LOG);
strict mode from /proc/PID/task/TID/status.

Restore half, in stage "threads", every thread of the restored process suspended from seccomp
until it is released: the filters every thread has in common (the same programs in the same
order from the first: installed before the threads were made, or synchronized) are installed
once for all with SECCOMP_FILTER_FLAG_TSYNC, so that the threads share them again, and a later
TSYNC of the program finds them its ancestors; the rest of each thread's chain is installed by the
thread itself; strict mode last. The process is still privileged then (its credentials come
after), so installing needs neither no_new_privs nor the CAP_SYS_ADMIN the process may have
dropped since; TSYNC would otherwise hand the caller's no_new_privs to every thread. Nothing ckpt
injects after is filtered (the suspension), so a filter that forbids munmap, prctl or setpgid
(ckpt's last calls) is no obstacle.

Refused: a filter that hands syscalls to a user-space supervisor (SECCOMP_RET_USER_NOTIF): its
listener cannot be reconnected. Not kept: filters shared by some threads but not all beyond
their common part are installed as copies in each (their behaviour is the same, but a later
TSYNC from one of them fails); SECCOMP_FILTER_FLAG_SPEC_ALLOW (the kernel does not report it).
"""
import base64
import ctypes
import errno
import os
import struct
import subprocess

from ptrace.error import PtraceError

from ckpt.errors import RestoreError, TargetError
from ckpt.kernel import procfs
from ckpt.kernel.ptrace import _call

SYS_seccomp = 317
SECCOMP_SET_MODE_STRICT, SECCOMP_SET_MODE_FILTER = 0, 1
FLAG_TSYNC, FLAG_LOG = 1, 2
PTRACE_SETOPTIONS = 0x4200
PTRACE_O_TRACECLONE = 8
PTRACE_O_SUSPEND_SECCOMP = 1 << 21
PTRACE_SECCOMP_GET_FILTER, PTRACE_SECCOMP_GET_METADATA = 0x420c, 0x420d
RET_ACTION_FULL = 0xffff0000
RET_USER_NOTIF = 0x7fc00000
BPF_RET, BPF_K = 0x06, 0x00
MAX_INSNS = 4096
CAP_SYS_ADMIN = 21
MODE_STRICT, MODE_FILTER = 1, 2


def _mode(pid, tid):
    """The thread's seccomp mode (0, 1 strict, 2 filter), from its status (read raw: this runs
    in the freeze, for every thread)."""
    try:
        fd = os.open(procfs.proc(pid, "task", str(tid), "status"), os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError):
        return 0
    try:
        data = os.read(fd, 16384)
    finally:
        os.close(fd)
    i = data.find(b"\nSeccomp:")
    return int(data[i + 9:data.index(b"\n", i + 1)]) if i >= 0 else 0


_can_suspend = []


def can_suspend():
    """Whether ckpt may suspend a tracee's seccomp (CAP_SYS_ADMIN, no filter of its own, a kernel
    with CONFIG_CHECKPOINT_RESTORE): tried once on a throwaway child."""
    if _can_suspend:
        return _can_suspend[0]
    own = procfs.status("self")
    ok = int(own.get("CapEff", "0"), 16) >> CAP_SYS_ADMIN & 1 and own.get("Seccomp", "0") == "0"
    if ok:
        from ckpt.kernel import ptrace
        child = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            t = ptrace.Tracee(child.pid, timeout=5.0)
            t.seize()
            t.interrupt()
            t.wait_stop()
            try:
                _call(PTRACE_SETOPTIONS, child.pid, 0, PTRACE_O_SUSPEND_SECCOMP)
            except PtraceError:
                ok = False
        except (PtraceError, OSError):
            ok = False
        finally:
            child.kill()
            child.wait()
    _can_suspend.append(bool(ok))
    return bool(ok)


def refuse(pid):
    modes = {tid: _mode(pid, tid) for tid in procfs.tasks(pid)}
    if not any(modes.values()):
        return None
    if not can_suspend():
        tid = next(t for t, m in modes.items() if m)
        return ("thread %d runs under seccomp (%s): ckpt needs CAP_SYS_ADMIN, and no seccomp filter of its own, to "
                "suspend it for the syscalls it injects (PTRACE_O_SUSPEND_SECCOMP)"
                % (tid, "strict mode" if modes[tid] == MODE_STRICT else "filter"))
    return None


def read_filters(tid):
    """The thread's filters, oldest first (the kernel's index 0): [(program bytes, flags)]."""
    chain = []
    index = 0
    while True:
        try:
            n = _call(PTRACE_SECCOMP_GET_FILTER, tid, index, 0)
        except PtraceError as e:
            if e.errno == errno.ENOENT:
                break
            raise TargetError("thread %d: cannot read its seccomp filter %d (PTRACE_SECCOMP_GET_FILTER: %s)"
                              % (tid, index, errno.errorcode.get(e.errno, e.errno))) from None
        buf = ctypes.create_string_buffer(8 * n)
        _call(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buf))
        md = ctypes.create_string_buffer(struct.pack("<QQ", index, 0), 16)
        try:
            _call(PTRACE_SECCOMP_GET_METADATA, tid, 16, ctypes.addressof(md))
            flags = struct.unpack_from("<QQ", md.raw)[1]
        except PtraceError:
            flags = 0
        chain.append((buf.raw, flags & FLAG_LOG))
        index += 1
    return chain


def notifies(prog):
    """Whether a filter program can return SECCOMP_RET_USER_NOTIF."""
    for i in range(0, len(prog), 8):
        code, _, _, k = struct.unpack_from("<HBBI", prog, i)
        if code == BPF_RET | BPF_K and k & RET_ACTION_FULL == RET_USER_NOTIF:
            return True
    return False


def dump(ctx):
    for t, d in zip(ctx.tracees, ctx.threads):
        mode = _mode(ctx.pid, t.tid)
        if not mode:
            continue
        rec = {"mode": mode}
        if mode == MODE_FILTER:
            chain = read_filters(t.tid)
            if any(notifies(prog) for prog, _ in chain):
                raise TargetError("thread %d of process %d has a seccomp filter that hands syscalls to a supervisor "
                                  "(SECCOMP_RET_USER_NOTIF): its listener cannot be reconnected; not supported"
                                  % (t.tid, ctx.pid))
            rec["filters"] = [{"prog": base64.b64encode(prog).decode(), "flags": flags} for prog, flags in chain]
        d["seccomp"] = rec


# ---------------------------------------------------------------------------- restore half
def _records(threads):
    out = {}
    for d in threads:
        rec = d.get("seccomp")
        if not rec:
            continue
        tid = d["tid"]
        if not isinstance(rec, dict) or rec.get("mode") not in (MODE_STRICT, MODE_FILTER):
            raise RestoreError("image: seccomp record of thread %s is malformed" % tid)
        chain = []
        for f in rec.get("filters", []) if rec["mode"] == MODE_FILTER else []:
            try:
                prog = base64.b64decode(f["prog"], validate=True)
                flags = int(f.get("flags", 0))
            except (TypeError, ValueError, KeyError):
                raise RestoreError("image: a seccomp filter of thread %s is malformed" % tid) from None
            if not prog or len(prog) % 8 or len(prog) // 8 > MAX_INSNS or flags & ~FLAG_LOG:
                raise RestoreError("image: a seccomp filter of thread %s is malformed" % tid)
            chain.append((prog, flags))
        if rec["mode"] == MODE_FILTER and not chain:
            raise RestoreError("image: thread %s is in seccomp filter mode without a filter" % tid)
        out[tid] = (rec["mode"], chain)
    return out


def check(proc, threads):
    if _records(threads) and not can_suspend():
        raise RestoreError("process %d runs under seccomp: restoring it needs CAP_SYS_ADMIN, and no seccomp filter on "
                           "ckpt itself (its filters are installed before ckpt's last injected calls)" % proc["pid"])


def restore(remote, proc, threads, stage):
    if stage != "threads":
        return
    records = _records(threads)
    if not records:
        return
    for tid in remote.threads:
        try:
            _call(PTRACE_SETOPTIONS, tid, 0, PTRACE_O_SUSPEND_SECCOMP | PTRACE_O_TRACECLONE)
        except PtraceError as e:
            raise RestoreError("cannot suspend seccomp in thread %d of the restored process (PTRACE_O_SUSPEND_SECCOMP: "
                               "%s)" % (tid, errno.errorcode.get(e.errno, e.errno))) from None
    tids = [d["tid"] for d in threads]
    chains = {tid: records.get(tid, (0, []))[1] for tid in tids}
    common = 0
    if all(records.get(tid, (0,))[0] == MODE_FILTER for tid in tids):
        first = chains[tids[0]]
        while common < len(first) and all(len(c) > common and c[common] == first[common] for c in chains.values()):
            common += 1
    main = remote.pid
    for prog, flags in chains[main if main in chains else tids[0]][:common]:
        _install(remote, main, prog, flags | FLAG_TSYNC)
    for tid in tids:
        for prog, flags in chains[tid][common:]:
            _install(remote, tid, prog, flags)
        if records.get(tid, (0,))[0] == MODE_STRICT:
            remote.call(SYS_seccomp, SECCOMP_SET_MODE_STRICT, 0, 0, tid=tid, what="seccomp strict mode of thread %d" % tid)


def _install(remote, tid, prog, flags):
    remote.reset()
    code = remote.put(prog)
    fprog = remote.put(struct.pack("<HxxxxxxQ", len(prog) // 8, code))
    r = remote.call(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, fprog, tid=tid,
                    what="installing a seccomp filter in thread %d" % tid)
    if r:
        raise RestoreError("installing a seccomp filter for every thread from thread %d: thread %d cannot take it"
                           % (tid, r))
