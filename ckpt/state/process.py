"""Process-wide state: mm fields and brk, auxv, exe, cwd, umask, rlimits, credentials,
signal handlers, interval timers, session and group.

Dump half: /proc where it tells, injected syscalls where only the process itself can ask.
"""
import base64
import os
import struct

from ckpt.kernel import procfs
from ckpt.state.inject import Out

SYS_rt_sigaction = 13
SYS_brk = 12
SYS_getitimer = 36
NSIG = 64
SIGKILL, SIGSTOP = 9, 19


def _mask_bits(hexmask):
    v = int(hexmask, 16)
    return [s for s in range(1, NSIG + 1) if v & (1 << (s - 1))]


def credentials(pid):
    st = procfs.status(pid)
    ints = lambda k: [int(x) for x in st.get(k, "").split()]  # noqa: E731
    return {
        "uid": ints("Uid"), "gid": ints("Gid"), "groups": ints("Groups"),
        "cap_inh": st.get("CapInh"), "cap_prm": st.get("CapPrm"), "cap_eff": st.get("CapEff"),
        "cap_bnd": st.get("CapBnd"), "cap_amb": st.get("CapAmb"),
        "no_new_privs": int(st.get("NoNewPrivs", "0")), "seccomp": int(st.get("Seccomp", "0")),
    }


def dump_process(pid, leader, injector):
    st = procfs.status(pid)
    stat = procfs.stat_fields(pid)
    mm = procfs.mm_fields(pid)
    sigs = [s for s in sorted(set(_mask_bits(st["SigCgt"]) + _mask_bits(st["SigIgn"]))) if s not in (SIGKILL, SIGSTOP)]
    calls = [(SYS_brk, (0,))]
    calls += [(SYS_rt_sigaction, (sig, 0, Out(32), 8)) for sig in sigs]
    calls += [(SYS_getitimer, (which, Out(32))) for which in (0, 1, 2)]
    res = injector.run(leader, calls)
    mm["brk"] = res[0][0]
    handlers = {}
    for sig, (r, raw) in zip(sigs, res[1:1 + len(sigs)]):
        if r == 0:
            handler, flags, restorer, mask = struct.unpack("<QQQQ", raw)
            handlers[str(sig)] = {"handler": handler, "flags": flags, "restorer": restorer, "mask": mask}
    timers = {}
    for name, (r, raw) in zip(("real", "virtual", "prof"), res[1 + len(sigs):]):
        if r == 0:
            isec, iusec, vsec, vusec = struct.unpack("<qqqq", raw)
            if isec or iusec or vsec or vusec:
                timers[name] = {"interval": [isec, iusec], "value": [vsec, vusec]}
    try:
        personality = int(open(procfs.proc(pid, "personality")).read(), 16)
    except OSError:
        personality = 0
    return {
        "pid": pid, "comm": stat[2], "ppid": int(stat[4]), "pgid": int(stat[5]), "sid": int(stat[6]),
        "cmdline": [a.decode(errors="replace") for a in open(procfs.proc(pid, "cmdline"), "rb").read().split(b"\0")[:-1]],
        "exe": procfs.readlink(pid, "exe"), "cwd": procfs.readlink(pid, "cwd"),
        "root": procfs.readlink(pid, "root"),
        "umask": int(st.get("Umask", "0022"), 8),
        "mm": mm, "auxv": base64.b64encode(procfs.auxv(pid)).decode(),
        "rlimits": procfs.limits(pid), "creds": credentials(pid),
        "sigactions": handlers, "itimers": timers, "personality": personality,
        "shared_signals": [], "threads_count": int(st.get("Threads", "1")),
    }


def exe_identity(pid):
    s = os.stat(procfs.proc(pid, "exe"))
    return {"dev": s.st_dev, "inode": s.st_ino, "size": s.st_size, "mtime_ns": s.st_mtime_ns}
