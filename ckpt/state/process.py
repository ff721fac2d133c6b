"""Process-wide state: mm fields and brk, auxv, exe, cwd, umask, rlimits, credentials,
signal handlers, interval timers, session and group; and what confines the process:
personality, securebits, ambient capabilities, no_new_privs, the dumpable flag, cgroup
membership, the stop state (a process in group stop comes back stopped), and the namespaces
(a process in namespaces other than ckpt's is refused, until namespaces are supported).

Dump half: /proc where it tells, injected syscalls where only the process itself can ask.
"""
import base64
import contextlib
import ctypes
import errno
import os
import signal
import struct

from ckpt.errors import RestoreError, TargetError, TargetGone
from ckpt.kernel import procfs
from ckpt.kernel.ptrace import peek_siginfo
from ckpt.state.inject import Out

SYS_rt_sigaction = 13
SYS_brk = 12
SYS_getitimer = 36
SYS_prctl = 157
SYS_personality = 135
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
PR_GET_SECUREBITS, PR_SET_SECUREBITS = 27, 28
PR_GET_PDEATHSIG, PR_SET_PDEATHSIG = 2, 1
PR_GET_CHILD_SUBREAPER, PR_SET_CHILD_SUBREAPER = 37, 36
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
CAP_SETPCAP = 8
NSIG = 64
SIGKILL, SIGSTOP = 9, 19

# /proc/PID/ns/NAME -> the word a refusal uses
NAMESPACES = (("user", "user"), ("pid", "PID"), ("mnt", "mount"), ("net", "network"), ("ipc", "IPC"),
              ("uts", "UTS"), ("cgroup", "cgroup"), ("time", "time"))


def refuse_namespaces(pid):
    """A process in another namespace than ckpt's (user, PID, mount, network, IPC, UTS, cgroup,
    time) cannot be restored faithfully yet: restore would bring it back in ckpt's, with what
    that gives (a user namespace's root would be the machine's root). Refused up front, from
    /proc alone, before the target is touched."""
    own = []
    for name, word in NAMESPACES:
        try:
            mine = os.stat("/proc/self/ns/" + name)
        except OSError:
            continue            # a kind of namespace this kernel does not have
        try:
            theirs = os.stat(procfs.proc(pid, "ns", name))
        except (FileNotFoundError, ProcessLookupError):
            raise TargetGone("process %d exited" % pid) from None
        except PermissionError:
            raise TargetError("not allowed to read the namespaces of process %d; run ckpt as root" % pid) from None
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            own.append(word)
    if own:
        words = own[0] if len(own) == 1 else "%s and %s" % (", ".join(own[:-1]), own[-1])
        raise TargetError("process %d is in its own %s namespace%s (started by unshare or a container): "
                          "namespaces are not supported yet" % (pid, words, "s" if len(own) > 1 else ""))


def cgroups(pid):
    """/proc/PID/cgroup: one entry per hierarchy, {"id", "controllers", "path"} (cgroup v2:
    id 0, controllers "")."""
    out = []
    for line in procfs._read(procfs.proc(pid, "cgroup"), "rb").decode("utf-8", "surrogateescape").splitlines():
        hid, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if sep and sep2 and hid.isdigit():
            out.append({"id": int(hid), "controllers": controllers, "path": path})
    return out


def _mask_bits(hexmask):
    v = int(hexmask, 16)
    return [s for s in range(1, NSIG + 1) if v & (1 << (s - 1))]


def credentials(pid):
    return credentials_from_status(procfs.status(pid))


def process_calls(pid):
    """The syscalls the process record needs injected (in its main thread), and what the
    record is made of with their results (process_record)."""
    st = procfs.status(pid)
    sigs = [s for s in sorted(set(_mask_bits(st["SigCgt"]) + _mask_bits(st["SigIgn"]))) if s not in (SIGKILL, SIGSTOP)]
    calls = [(SYS_brk, (0,))]
    calls += [(SYS_rt_sigaction, (sig, 0, Out(32), 8)) for sig in sigs]
    calls += [(SYS_getitimer, (which, Out(32))) for which in (0, 1, 2)]
    # securebits are per thread, but set alike in every thread by anything but a deliberate
    # per-thread prctl; the dumpable flag belongs to the whole process (its mm)
    calls += [(SYS_prctl, (PR_GET_PDEATHSIG, Out(4), 0, 0, 0)), (SYS_prctl, (PR_GET_CHILD_SUBREAPER, Out(4), 0, 0, 0))]
    calls += [(SYS_prctl, (PR_GET_SECUREBITS, 0, 0, 0, 0)), (SYS_prctl, (PR_GET_DUMPABLE, 0, 0, 0, 0))]
    return calls, (st, sigs)


def process_record(pid, leader, ctx, res):
    """The process record from process_calls' context and the injected calls' results."""
    st, sigs = ctx
    stat = procfs.stat_fields(pid)
    mm = procfs.mm_fields(pid)
    mm["brk"] = res[0][0]
    (r_pd, pdeathsig), (r_sr, subreaper), (securebits, _), (dumpable, _) = res[-4:]
    handlers = {}
    for sig, (r, raw) in zip(sigs, res[1:1 + len(sigs)]):
        if r == 0:
            handler, flags, restorer, mask = struct.unpack("<QQQQ", raw)
            handlers[str(sig)] = {"handler": handler, "flags": flags, "restorer": restorer, "mask": mask}
    timers = {}
    for name, (r, raw) in zip(("real", "virtual", "prof"), res[1 + len(sigs):1 + len(sigs) + 3]):
        if r == 0:
            isec, iusec, vsec, vusec = struct.unpack("<qqqq", raw)
            if isec or iusec or vsec or vusec:
                timers[name] = {"interval": [isec, iusec], "value": [vsec, vusec]}
    try:
        personality = int(open(procfs.proc(pid, "personality")).read(), 16)
    except OSError:
        personality = 0
    creds = credentials_from_status(st)      # read before the injection: no change while frozen
    if securebits >= 0:
        creds["securebits"] = securebits
    return {
        "pid": pid, "comm": stat[2], "ppid": int(stat[4]), "pgid": int(stat[5]), "sid": int(stat[6]),
        "cmdline": [a.decode(errors="replace") for a in open(procfs.proc(pid, "cmdline"), "rb").read().split(b"\0")[:-1]],
        "exe": procfs.readlink(pid, "exe"), "cwd": procfs.readlink(pid, "cwd"),
        "root": procfs.readlink(pid, "root"),
        "umask": int(st.get("Umask", "0022"), 8),
        "mm": mm, "auxv": base64.b64encode(procfs.auxv(pid)).decode(),
        "rlimits": procfs.limits(pid), "creds": creds,
        "sigactions": handlers, "itimers": timers, "personality": personality,
        "dumpable": dumpable if dumpable >= 0 else None, "cgroups": cgroups(pid),
        "shared_signals": [base64.b64encode(x).decode() for x in peek_siginfo(leader.tid, shared=True)],
        "threads_count": int(st.get("Threads", "1")),
        # the signal the process gets when its parent dies (of the main thread: it is per
        # thread), and whether it reaps its orphaned descendants (PR_SET_CHILD_SUBREAPER)
        "pdeathsig": struct.unpack_from("<i", pdeathsig)[0] if r_pd == 0 else 0,
        "exit_signal": int(stat[38]) if len(stat) > 38 else signal.SIGCHLD,
        "subreaper": bool(struct.unpack_from("<i", subreaper)[0]) if r_sr == 0 else False,
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
    """Signal handlers (every signal: dumped or default), interval timers, umask, subreaper."""
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
    if d.get("subreaper"):
        calls.append((sysno.prctl, (PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)))
    # the working directory is set by the builder, from the directory the plan opened and checked
    remote.many(calls, what=lambda nr, a: "syscall %d" % nr)
    # session and process group: set when the process is created (restore/tree.py)
    restore_personality(remote, d)


def restore_personality(remote, d):
    """personality(2) (ADDR_NO_RANDOMIZE, UNAME26, READ_IMPLIES_EXEC ...): per thread and
    inherited by clone, so set in the main thread before the others are created. The new
    process has ckpt's own: nothing to do when the image's is the same."""
    want = d.get("personality")
    if want is None:
        return
    if isinstance(want, bool) or not isinstance(want, int) or not 0 <= want < 1 << 32:
        raise RestoreError("image: process personality %r is not a 32-bit value" % (want,))
    try:
        with open("/proc/self/personality") as f:
            mine = int(f.read(), 16)
    except (OSError, ValueError):
        mine = None
    if want != mine:
        remote.call(SYS_personality, want, what="personality(%#x)" % want)


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
    """uid, gid, groups, capabilities, ambient capabilities, securebits and no_new_privs of one
    thread, exactly as dumped: never more. Credentials are per thread, so every thread gets
    them, last of all.

    Order: groups, gids and the bounding set while still root; setresuid with KEEPCAPS, so the
    permitted set survives the uid change whatever the dumped securebits say; then the exact
    capability sets. Ambient capabilities are raised after them (each must be permitted and
    inheritable; setresuid away from root would have cleared them). Securebits come last but
    one: PR_SET_SECUREBITS needs CAP_SETPCAP, so when the dumped bits are not the plain
    default the capability sets are first set with CAP_SETPCAP on top, then exactly (a locked
    bit or NO_CAP_AMBIENT_RAISE set earlier would refuse the steps before it)."""
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
    amb = _mask(creds, "cap_amb") & prm & inh
    bits = _securebits(creds)

    def capset(e, p, i):
        hdr = remote.put(struct.pack("<Ii", CAP_VERSION_3, 0))
        data = remote.put(struct.pack("<6I", e & 0xFFFFFFFF, p & 0xFFFFFFFF, i & 0xFFFFFFFF, e >> 32, p >> 32, i >> 32))
        return (sysno.capset, (hdr, data))
    raises = [(sysno.prctl, (PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, c, 0, 0)) for c in range(64) if amb >> c & 1]
    if bits & ~SECBIT_KEEP_CAPS:
        setpcap = 1 << CAP_SETPCAP
        calls.append(capset(eff | setpcap, prm | setpcap, inh))
        calls += raises
        calls.append((sysno.prctl, (PR_SET_SECUREBITS, bits, 0, 0, 0)))
        calls.append(capset(eff, prm, inh))
    else:
        calls.append(capset(eff, prm, inh))
        calls += raises
        calls.append((sysno.prctl, (PR_SET_KEEPCAPS, 1 if bits & SECBIT_KEEP_CAPS else 0, 0, 0, 0)))
    if creds.get("no_new_privs"):
        calls.append((sysno.prctl, (PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)))

    def what(nr, a):
        if nr == sysno.prctl:
            return {PR_CAP_AMBIENT: "raising ambient capability %d" % a[2],
                    PR_SET_SECUREBITS: "setting securebits %#x" % a[1],
                    PR_CAPBSET_DROP: "dropping capability %d from the bounding set" % a[1],
                    PR_SET_NO_NEW_PRIVS: "setting no_new_privs"}.get(a[0], "prctl %d" % a[0]) + " of thread %d" % tid
        return "%s of thread %d" % (names.get(nr, nr), tid)
    names = {sysno.setgroups: "setgroups", sysno.setresgid: "setresgid", sysno.setresuid: "setresuid",
             sysno.capset: "capset"}
    remote.many(calls, tid=tid, what=what)


SECBIT_KEEP_CAPS = 1 << 4


def _mask(creds, key):
    v = creds.get(key)
    if v is None:
        return 0
    if not isinstance(v, str):
        raise RestoreError("image: credentials field %s %r is not a hexadecimal mask" % (key, v))
    try:
        return int(v, 16)
    except ValueError:
        raise RestoreError("image: credentials field %s %r is not a hexadecimal mask" % (key, v)) from None


def _securebits(creds):
    v = creds.get("securebits", 0)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 32:
        raise RestoreError("image: securebits %r is not a 32-bit value" % (v,))
    return v


def restore_after_credentials(remote, d, warn, trusted=False):
    """What the credentials reset or what needs them in place, once every thread has its own:
    the dumpable flag (setresuid away from root made the process non-dumpable, so its owner
    could no longer read its /proc files or trace it), and cgroup membership."""
    dumpable = d.get("dumpable")
    if dumpable in (0, 1):
        # 2 (SUID_DUMP_ROOT) cannot be asked for: it is what fs.suid_dumpable gave on a change of
        # credentials, which the restore's own setresuid just applied alike
        remote.call(SYS_prctl, PR_SET_DUMPABLE, dumpable, 0, 0, 0, what="prctl(PR_SET_DUMPABLE, %d)" % dumpable)
    elif dumpable is not None and dumpable != 2:
        raise RestoreError("image: dumpable flag %r is not 0, 1 or 2" % (dumpable,))
    try:
        restore_cgroups(remote.pid, d, warn, trusted)
    except BaseException:
        _kill_other_threads(remote)
        raise


def _kill_other_threads(remote):
    """A failure once the threads exist: the process is killed and its other threads reaped
    here, so that whoever reaps the main thread next does not wait for them (the kernel reports
    a thread group leader's exit only after its traced threads are reaped)."""
    try:
        os.kill(remote.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for tid in list(remote.threads):
        if tid != remote.pid:
            try:
                os.waitpid(tid, 0x40000000)      # __WALL
            except ChildProcessError:
                pass


def restore_stop_state(pid, thread_records):
    """A process that was in a group stop (SIGSTOP, SIGTSTP ...) at the dump is stopped again:
    SIGSTOP is queued while every thread is still held by ckpt, so that each, once released,
    takes it before running a single instruction of its own, and the process is in a group
    stop as before (a SIGCONT goes on from there)."""
    if any(t.get("group_stop") for t in thread_records):
        os.kill(pid, signal.SIGSTOP)


# ---------------------------------------------------------------------------- cgroups
# A process goes back into the cgroup it was in, in every hierarchy mounted here, by writing its
# PID to that cgroup's cgroup.procs (which moves all its threads). The write is made with the
# restored process's own credentials (the kernel checks them on the open file): an image cannot
# put its process where its owner could not. An image restore trusts whole (root's own) may put
# it back where root had put it (CAP_DAC_OVERRIDE on top, as for a service's cgroup).
CAP_DAC_OVERRIDE = 1
SYS_openat2 = 437
RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x01, 0x02, 0x04, 0x08
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def cgroup_mounts():
    """The cgroup mounts of ckpt's mount namespace: [(version, super options, root, mountpoint)]."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, sep, right = line.rstrip("\n").partition(" - ")
            a, b = left.split(), right.split()
            if not sep or len(a) < 5 or len(b) < 3 or b[0] not in ("cgroup", "cgroup2"):
                continue
            out.append((2 if b[0] == "cgroup2" else 1, set(b[2].split(",")), procfs.unescape_mountinfo(a[3]), procfs.unescape_mountinfo(a[4])))
    return out


def _hierarchy(e):
    """The name of a hierarchy for messages."""
    return "cgroup v2" if e["id"] == 0 and not e["controllers"] else "%s cgroup" % e["controllers"]


def _valid_path(e):
    p = e.get("path")
    if not isinstance(p, str) or not p.startswith("/") or "\0" in p:
        return False
    parts = p.split("/")[1:]
    return p == "/" or all(x not in ("", ".", "..") for x in parts)


def _where(e, mounts):
    """(mountpoint, path below it) where the dumped cgroup e lies here, or None when its
    hierarchy is not mounted (or only a part of it that does not hold the cgroup)."""
    v2 = e["id"] == 0 and not e["controllers"]
    want = set(e["controllers"].split(",")) if not v2 else set()
    for version, opts, root, mountpoint in mounts:
        if (version == 2) != v2 or (not v2 and not want <= opts):
            continue
        p = e["path"]
        if root == "/":
            rel = p
        elif p == root or p.startswith(root.rstrip("/") + "/"):
            rel = p[len(root.rstrip("/")):] or "/"
        else:
            continue
        return mountpoint, rel.lstrip("/")
    return None


def _moves(records, now, mounts, pid, warn):
    """[(record, mountpoint, relative path)] for the hierarchies where the process is not in its
    dumped cgroup now (`now`: /proc/PID/cgroup of the process as it is)."""
    if not isinstance(records, list):
        raise RestoreError("image: the process's cgroups are not a list")
    current = {(c["id"] == 0 and not c["controllers"], c["controllers"]): c["path"] for c in now}
    moves = []
    for e in records:
        if (not isinstance(e, dict) or not isinstance(e.get("id"), int) or not isinstance(e.get("controllers"), str)
                or not _valid_path(e)):
            raise RestoreError("image: cgroup entry %r of process %d is malformed" % (e, pid))
        key = (e["id"] == 0 and not e["controllers"], e["controllers"])
        if current.get(key) == e["path"]:
            continue
        if key not in current and not key[0]:
            if warn:
                warn("the %s hierarchy process %d was in (%s) does not exist here; "
                     "it is not restored" % (_hierarchy(e), pid, e["path"]))
            continue
        where = _where(e, mounts)
        if where is None:
            if warn:
                warn("the %s hierarchy is not mounted here: process %d stays in ckpt's "
                     "cgroup of it, not in %s" % (_hierarchy(e), pid, e["path"]))
            continue
        moves.append((e, where[0], where[1]))
    return moves


def _open_procs(mountpoint, rel):
    """cgroup.procs of the cgroup at rel below mountpoint, opened for writing without following
    a link or leaving the mount (the path comes from the image); OSError if it cannot be."""
    path = os.path.join(rel, "cgroup.procs") if rel else "cgroup.procs"
    base = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = ctypes.create_string_buffer(struct.pack("<QQQ", os.O_WRONLY | os.O_CLOEXEC, 0,
                                                      RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
                                                      RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV), 24)
        fd = _libc.syscall(SYS_openat2, ctypes.c_long(base), ctypes.c_char_p(os.fsencode(path)), how,
                           ctypes.c_long(24))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.path.join(mountpoint, path))
        return fd
    finally:
        os.close(base)


def _refusal(e, pid, err, ancestor=None):
    name = "%s %s" % (_hierarchy(e), e["path"])
    if err.errno == errno.ENOENT and ancestor is None:
        return RestoreError("process %d was in %s at the dump, which no longer exists" % (pid, name))
    if err.errno in (errno.EACCES, errno.EPERM):
        if ancestor is not None:
            return RestoreError("process %d was in %s at the dump, but its owner may not move a process there "
                                "from ckpt's cgroup (cgroup v2 asks for write access to %s, their common ancestor)"
                                % (pid, name, err.filename))
        return RestoreError("process %d was in %s at the dump, but its owner may not put a process there "
                            "(%s is not writable for it)" % (pid, name, err.filename))
    return RestoreError("process %d: cannot open %s (%s): %s" % (pid, name, err.filename, err.strerror))


def _acting(creds, trusted):
    from ckpt.restore.creds import acting_as
    return acting_as(creds, extra_caps=(CAP_DAC_OVERRIDE,) if trusted else ())


def check_cgroups(d, trusted=False):
    """For the plan, before anything is created: every cgroup the process is to go back into
    exists, and its owner may put a process there (with these credentials, as the restore will).
    The new process starts in ckpt's own cgroups: those that are the image's need no move."""
    pid = d.get("pid")
    records = d.get("cgroups")
    if not records:
        return
    mine = cgroups("self")
    for e, mountpoint, rel in _moves(records, mine, cgroup_mounts(), pid, None):
        checks = []
        if e["id"] == 0 and not e["controllers"]:
            # cgroup v2 also asks for write access to the nearest common ancestor of the cgroup
            # the process leaves (ckpt's) and the one it enters
            here = next((c["path"] for c in mine if c["id"] == 0 and not c["controllers"]), "/")
            a, b = [x for x in here.split("/") if x], [x for x in e["path"].split("/") if x]
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            up = len(b) - n         # the ancestor is that many levels above the cgroup
            parts = [x for x in rel.split("/") if x]
            if up <= len(parts):
                checks.append(("/".join(parts[:len(parts) - up]), "/" + "/".join(b[:n])))
        checks.append((rel, None))
        for where, ancestor in checks:
            try:
                with _acting(d["creds"], trusted):
                    os.close(_open_procs(mountpoint, where))
            except OSError as err:
                raise _refusal(e, pid, err, ancestor) from None


def restore_cgroups(pid, d, warn, trusted=False, checked=False):
    """Put process pid (every thread) into the cgroups of the image, with its own credentials.

    checked: the plan's check_cgroups has verified, with the process's credentials, that it may
    go there; the move is then made with ckpt's own, so that it can be made right after the
    process is created, while it is still root's (cgroup v1 lets only root, or a writer of the
    task's own uid, move it): memory the restore then writes is charged to the process's
    memory cgroup, not to ckpt's (charges never follow a process that moves). Once the process
    is where it belongs, a later call (after its credentials) has nothing to do."""
    records = d.get("cgroups")
    if not records:
        return
    for e, mountpoint, rel in _moves(records, cgroups(pid), cgroup_mounts(), pid, warn):
        with contextlib.nullcontext() if checked else _acting(d["creds"], trusted):
            try:
                fd = _open_procs(mountpoint, rel)
            except OSError as err:
                raise _refusal(e, pid, err) from None
            try:
                os.write(fd, b"%d" % pid)
            except OSError as err:
                raise RestoreError("process %d cannot be put back into %s %s: %s"
                                   % (pid, _hierarchy(e), e["path"], err.strerror)) from None
            finally:
                os.close(fd)


def check_no_more_privilege(pid, tid, creds):
    """Compare the restored thread's credentials with the dumped ones."""
    st = procfs.status(pid, tid)
    now = credentials_from_status(st)
    problems = []
    for k in ("uid", "gid"):
        if now[k] != creds[k]:
            problems.append("%s %s, dumped %s" % (k, now[k], creds[k]))
    for k in ("cap_eff", "cap_prm", "cap_inh", "cap_bnd", "cap_amb"):
        if int(now[k] or "0", 16) & ~_mask(creds, k):
            problems.append("%s %s exceeds dumped %s" % (k, now[k], creds[k]))
    return problems


def credentials_from_status(st):
    ints = lambda k: [int(x) for x in st.get(k, "").split()]  # noqa: E731
    return {"uid": ints("Uid"), "gid": ints("Gid"), "groups": ints("Groups"),
            "cap_inh": st.get("CapInh"), "cap_prm": st.get("CapPrm"), "cap_eff": st.get("CapEff"),
            "cap_bnd": st.get("CapBnd"), "cap_amb": st.get("CapAmb"),
            "no_new_privs": int(st.get("NoNewPrivs", "0")), "seccomp": int(st.get("Seccomp", "0"))}
