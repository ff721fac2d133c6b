"""Process-wide state: mm fields and brk, auxv, exe, cwd, umask, rlimits, credentials,
signal handlers, interval timers, session and group.

Dump half: /proc where it tells, injected syscalls where only the process itself can ask.
"""
import base64
import os
import struct

from ckpt.kernel import procfs
from ckpt.kernel.ptrace import peek_siginfo
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
    return credentials_from_status(procfs.status(pid))


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
        "shared_signals": [base64.b64encode(x).decode() for x in peek_siginfo(leader.tid, shared=True)],
        "threads_count": int(st.get("Threads", "1")),
    }


def exe_identity(pid):
    s = os.stat(procfs.proc(pid, "exe"))
    return {"dev": s.st_dev, "inode": s.st_ino, "size": s.st_size, "mtime_ns": s.st_mtime_ns}


# ---------------------------------------------------------------------------- restore half
SA_RESTORER = 0x04000000
PR_CAPBSET_DROP = 24
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_SET_MM, PR_SET_MM_MAP = 35, 14
CAP_VERSION_3 = 0x20080522


def restore_mm(remote, d, exe_fd):
    """PR_SET_MM_MAP: code/data/brk/stack/arg/env boundaries, auxv and /proc/PID/exe at once."""
    from ckpt.kernel import sysno
    mm = d["mm"]
    remote.reset()
    auxv = base64.b64decode(d["auxv"])
    auxv_addr = remote.put(auxv)
    mm_map = struct.pack("<11QQIi", mm["start_code"], mm["end_code"], mm["start_data"], mm["end_data"],
                         mm["start_brk"], mm["brk"], mm["start_stack"], mm["arg_start"], mm["arg_end"],
                         mm["env_start"], mm["env_end"], auxv_addr, len(auxv), exe_fd)
    remote.call(sysno.prctl, PR_SET_MM, PR_SET_MM_MAP, remote.put(mm_map), len(mm_map), 0,
                what="prctl(PR_SET_MM_MAP)")


def restore_process(remote, d):
    """Signal handlers (every signal: dumped or default), interval timers, umask, group."""
    from ckpt.kernel import sysno
    remote.reset()
    calls = []
    for sig in range(1, NSIG + 1):
        if sig in (SIGKILL, SIGSTOP):
            continue
        h = d["sigactions"].get(str(sig))
        act = struct.pack("<QQQQ", h["handler"], h["flags"], h["restorer"], h["mask"]) if h else bytes(32)
        calls.append((sysno.rt_sigaction, (sig, remote.put(act), 0, 8)))
    remote.many(calls, what=lambda nr, a: "restoring the handler of signal %d" % a[0])
    remote.reset()
    calls = []
    for which, name in ((0, "real"), (1, "virtual"), (2, "prof")):
        tm = d["itimers"].get(name)
        if tm:
            calls.append((sysno.setitimer, (which, remote.put(struct.pack("<qqqq", *tm["interval"], *tm["value"])), 0)))
    calls.append((sysno.umask, (d["umask"],)))
    # the working directory is set by the builder, from the directory the plan opened and checked
    remote.many(calls, what=lambda nr, a: "syscall %d" % nr)
    if d["sid"] == d["pid"]:
        remote.call(sysno.setsid, what="setsid")
    elif d["pgid"] == d["pid"]:
        remote.call(sysno.setpgid, 0, 0, what="setpgid")


def restore_rlimits(pid, d, warn):
    import resource
    for name, (soft, hard) in d["rlimits"].items():
        res = getattr(resource, name, None)
        if res is None:
            continue
        lim = (resource.RLIM_INFINITY if soft < 0 else soft, resource.RLIM_INFINITY if hard < 0 else hard)
        try:
            resource.prlimit(pid, res, lim)
        except (OSError, ValueError) as e:
            warn("could not restore %s=%s: %s" % (name, lim, e))


def restore_credentials(remote, tid, creds):
    """uid, gid, groups and capabilities of one thread, exactly as dumped: never more.
    Credentials are per thread, so every thread gets them, last of all."""
    from ckpt.kernel import sysno
    remote.reset()
    uid, gid = creds["uid"], creds["gid"]
    groups = creds["groups"]
    bnd = int(creds["cap_bnd"], 16)
    calls = [(sysno.setgroups, (len(groups), remote.put(struct.pack("<%di" % len(groups), *groups)) if groups else 0)),
             (sysno.setresgid, tuple(gid[:3]))]
    last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
    calls += [(sysno.prctl, (PR_CAPBSET_DROP, c, 0, 0, 0)) for c in range(last_cap + 1) if not bnd & (1 << c)]
    calls.append((sysno.prctl, (PR_SET_KEEPCAPS, 1, 0, 0, 0)))
    calls.append((sysno.setresuid, tuple(uid[:3])))
    eff, prm, inh = (int(creds[k], 16) for k in ("cap_eff", "cap_prm", "cap_inh"))
    hdr = remote.put(struct.pack("<Ii", CAP_VERSION_3, 0))
    data = remote.put(struct.pack("<6I", eff & 0xFFFFFFFF, prm & 0xFFFFFFFF, inh & 0xFFFFFFFF,
                                  eff >> 32, prm >> 32, inh >> 32))
    calls.append((sysno.capset, (hdr, data)))
    calls.append((sysno.prctl, (PR_SET_KEEPCAPS, 0, 0, 0, 0)))
    if creds.get("no_new_privs"):
        calls.append((sysno.prctl, (PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)))
    names = {sysno.setgroups: "setgroups", sysno.setresgid: "setresgid", sysno.setresuid: "setresuid",
             sysno.capset: "capset", sysno.prctl: "prctl"}
    remote.many(calls, tid=tid, what=lambda nr, a: "%s of thread %d" % (names.get(nr, nr), tid))


def check_no_more_privilege(pid, tid, creds):
    """Compare the restored thread's credentials with the dumped ones."""
    st = procfs.status(pid, tid)
    now = credentials_from_status(st)
    problems = []
    for k in ("uid", "gid"):
        if now[k] != creds[k]:
            problems.append("%s %s, dumped %s" % (k, now[k], creds[k]))
    for k in ("cap_eff", "cap_prm", "cap_inh", "cap_bnd"):
        if int(now[k], 16) & ~int(creds[k], 16):
            problems.append("%s %s exceeds dumped %s" % (k, now[k], creds[k]))
    return problems


def credentials_from_status(st):
    ints = lambda k: [int(x) for x in st.get(k, "").split()]  # noqa: E731
    return {"uid": ints("Uid"), "gid": ints("Gid"), "groups": ints("Groups"),
            "cap_inh": st.get("CapInh"), "cap_prm": st.get("CapPrm"), "cap_eff": st.get("CapEff"),
            "cap_bnd": st.get("CapBnd"), "cap_amb": st.get("CapAmb"),
            "no_new_privs": int(st.get("NoNewPrivs", "0")), "seccomp": int(st.get("Seccomp", "0"))}
