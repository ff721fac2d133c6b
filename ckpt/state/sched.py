"""Scheduling of each thread: policy (SCHED_OTHER, BATCH, IDLE, FIFO, RR, DEADLINE) with its
priority or runtime/deadline/period, nice value, reset-on-fork, utilization clamps, CPU affinity
and I/O priority.

Dump half: read from outside, for every thread (sched_getattr, getpriority, sched_getaffinity,
ioprio_get of the thread ID): no injection.

Restore half, each thread setting its own (injected): in stage "threads" (still with the rights
every process has by default) what needs no privilege -- a fair policy with nice >= 0, a
non-real-time I/O class, reset-on-fork; the restored process starts with ckpt's own scheduling,
which may be niced. In stage "last", with the process's own credentials and resource limits
(restored by then, and after its cgroups, whose cpuset a move resets the affinity to): the CPU
affinity, a negative nice, a real-time or deadline policy, a real-time I/O class and the
clamps -- so that the kernel checks them as it would the process's own calls: an image gives no
scheduling privilege its process did not have.

Refused up front: a thread whose scheduling its own credentials could not set (a real-time
policy above RLIMIT_RTPRIO, SCHED_DEADLINE or a real-time I/O class without CAP_SYS_NICE, a
nice below what RLIMIT_NICE allows): another, privileged process set it, and restore would not
have the right to.
"""
import ctypes
import errno
import os
import struct

from ckpt.errors import RestoreError
from ckpt.kernel import procfs

SYS_setpriority = 141
SYS_sched_setaffinity = 203
SYS_ioprio_set, SYS_ioprio_get = 251, 252
SYS_sched_setattr, SYS_sched_getattr = 314, 315
SCHED_OTHER, SCHED_FIFO, SCHED_RR, SCHED_BATCH, SCHED_IDLE, SCHED_DEADLINE = 0, 1, 2, 3, 5, 6
POLICIES = {SCHED_OTHER: "SCHED_OTHER", SCHED_FIFO: "SCHED_FIFO", SCHED_RR: "SCHED_RR", SCHED_BATCH: "SCHED_BATCH",
            SCHED_IDLE: "SCHED_IDLE", SCHED_DEADLINE: "SCHED_DEADLINE"}
FAIR = (SCHED_OTHER, SCHED_BATCH, SCHED_IDLE)
SCHED_FLAG_RESET_ON_FORK, SCHED_FLAG_RECLAIM, SCHED_FLAG_DL_OVERRUN = 0x01, 0x02, 0x04
SCHED_FLAG_UTIL_CLAMP_MIN, SCHED_FLAG_UTIL_CLAMP_MAX = 0x20, 0x40
ATTR = struct.Struct("<IIQiIQQQII")     # struct sched_attr, SCHED_ATTR_SIZE_VER1 (56 bytes)
PRIO_PROCESS = 0
IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_RT = 1
CAP_SYS_ADMIN, CAP_SYS_NICE = 21, 23
CAPACITY = 1024                          # SCHED_CAPACITY_SCALE: util_max by default

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _sys(nr, *args):
    r = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def read_thread(tid):
    buf = ctypes.create_string_buffer(ATTR.size)
    _sys(SYS_sched_getattr, tid, buf, ATTR.size, 0)
    _, policy, flags, _, prio, runtime, deadline, period, umin, umax = ATTR.unpack(buf.raw)
    return {"policy": policy, "flags": flags & (SCHED_FLAG_RESET_ON_FORK | SCHED_FLAG_RECLAIM | SCHED_FLAG_DL_OVERRUN),
            "nice": os.getpriority(os.PRIO_PROCESS, tid), "priority": prio,
            "runtime": runtime, "deadline": deadline, "period": period, "util_min": umin, "util_max": umax,
            "cpus": sorted(os.sched_getaffinity(tid)), "ioprio": _sys(SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid)}


def _rt_default():
    try:
        with open("/proc/sys/kernel/sched_util_clamp_min_rt_default") as f:
            return int(f.read())
    except (OSError, ValueError):
        return CAPACITY


def _clamped(s):
    """Whether the thread has utilization clamps of its own (not the defaults of its policy)."""
    if not s["util_max"]:           # a kernel without CONFIG_UCLAMP_TASK reports zeros
        return False
    default_min = _rt_default() if s["policy"] in (SCHED_FIFO, SCHED_RR) else 0
    return (s["util_min"], s["util_max"]) != (default_min, CAPACITY)


def _limit(rlimits, name):
    v = (rlimits or {}).get(name, [0, 0])[0]
    return float("inf") if v < 0 else v


def why_not(tid, s, cap_eff, rlimits):
    """Why the thread's own rights could not set its scheduling s (None: they could). cap_eff:
    its effective capabilities (int); rlimits: {RLIMIT_NAME: [soft, hard]}, -1 = unlimited."""
    nice_cap = cap_eff >> CAP_SYS_NICE & 1
    policy = s["policy"]
    name = POLICIES.get(policy, "policy %d" % policy)
    if nice_cap:
        return None
    if policy in (SCHED_FIFO, SCHED_RR) and _limit(rlimits, "RLIMIT_RTPRIO") < s["priority"]:
        return ("thread %d runs %s priority %d, above its RLIMIT_RTPRIO (%s) and without CAP_SYS_NICE"
                % (tid, name, s["priority"], (rlimits or {}).get("RLIMIT_RTPRIO", [0])[0]))
    if policy == SCHED_DEADLINE:
        return "thread %d runs SCHED_DEADLINE without CAP_SYS_NICE" % tid
    if s["nice"] < 0 and 20 - s["nice"] > _limit(rlimits, "RLIMIT_NICE"):
        return ("thread %d runs at nice %d, below what its RLIMIT_NICE (%s) allows, without CAP_SYS_NICE"
                % (tid, s["nice"], (rlimits or {}).get("RLIMIT_NICE", [0])[0]))
    if s["ioprio"] >> 13 == IOPRIO_CLASS_RT and not cap_eff >> CAP_SYS_ADMIN & 1:
        return "thread %d has a real-time I/O priority without CAP_SYS_NICE or CAP_SYS_ADMIN" % tid
    return None


def refuse(pid):
    st = procfs.status(pid)
    cap_eff = int(st.get("CapEff", "0"), 16)
    rlimits = procfs.limits(pid)
    for tid in procfs.tasks(pid):
        try:
            s = read_thread(tid)
        except OSError as e:
            if e.errno == errno.ESRCH:
                continue
            raise
        why = why_not(tid, s, cap_eff, rlimits)
        if why:
            return why + ": another process set it, and restore would not have the right to"
    return None


def dump(ctx):
    for t, d in zip(ctx.tracees, ctx.threads):
        d["sched"] = read_thread(t.tid)


# ---------------------------------------------------------------------------- restore half
KEYS = ("policy", "flags", "nice", "priority", "runtime", "deadline", "period", "util_min", "util_max", "ioprio")


def _records(proc, threads):
    out = []
    for d in threads:
        s = d.get("sched")
        if s is None:
            continue
        if not isinstance(s, dict) or any(not isinstance(s.get(k), int) for k in KEYS) \
                or not isinstance(s.get("cpus"), list) or not all(isinstance(c, int) and 0 <= c < 1 << 16 for c in s["cpus"]) \
                or s["policy"] not in POLICIES or not -20 <= s["nice"] <= 19:
            raise RestoreError("image: scheduling record of thread %s is malformed" % d.get("tid"))
        out.append((d["tid"], s))
    return out


def check(proc, threads):
    records = _records(proc, threads)
    if not records:
        return
    creds = proc.get("creds") or {}
    try:
        cap_eff = int(creds.get("cap_eff") or "0", 16)
    except (TypeError, ValueError):
        raise RestoreError("image: effective capabilities %r are not a hexadecimal mask" % creds.get("cap_eff")) from None
    here = set(range(os.cpu_count() or 1))
    for tid, s in records:
        why = why_not(tid, s, cap_eff, proc.get("rlimits"))
        if why:
            raise RestoreError("process %d: %s: restore has no right to bring that back" % (proc["pid"], why))
        if s["cpus"] and not here & set(s["cpus"]):
            raise RestoreError("process %d: thread %d ran only on CPUs %s, which this machine does not have"
                               % (proc["pid"], tid, ",".join(map(str, s["cpus"]))))


def _attr(policy, flags, nice, s, clamps=False):
    if clamps:
        flags |= SCHED_FLAG_UTIL_CLAMP_MIN | SCHED_FLAG_UTIL_CLAMP_MAX
    return ATTR.pack(ATTR.size, policy, flags, nice, s["priority"] if policy in (SCHED_FIFO, SCHED_RR) else 0,
                     s["runtime"], s["deadline"], s["period"], s["util_min"] if clamps else 0,
                     s["util_max"] if clamps else 0)


def _privileged_io(s):
    return s["ioprio"] >> 13 == IOPRIO_CLASS_RT


def _own():
    """ckpt's own scheduling, which the restored process starts with."""
    try:
        return read_thread(0)
    except OSError:
        return None


def restore(remote, proc, threads, stage):
    if stage not in ("threads", "last"):
        return
    records = _records(proc, threads)
    own = _own() if records else None
    for tid, s in records:
        remote.reset()
        calls = []
        if stage == "threads":
            # what any process may set: a fair policy, nice >= 0, reset-on-fork, a non-RT I/O class
            policy = s["policy"] if s["policy"] in FAIR else SCHED_OTHER
            flags, nice = s["flags"] & SCHED_FLAG_RESET_ON_FORK, max(s["nice"], 0)
            if own is None or (own["policy"], own["flags"] & SCHED_FLAG_RESET_ON_FORK, own["nice"]) != (policy, flags, nice):
                calls.append((SYS_sched_setattr, (0, remote.put(_attr(policy, flags, nice, s)), 0)))
            if not _privileged_io(s) and (own is None or own["ioprio"] != s["ioprio"]):
                calls.append((SYS_ioprio_set, (IOPRIO_WHO_PROCESS, 0, s["ioprio"])))
        else:
            if s["cpus"]:     # always: a cgroup move (cpuset) may have reset it
                mask = bytearray(max(8, (max(s["cpus"]) // 64 + 1) * 8))
                for c in s["cpus"]:
                    mask[c // 8] |= 1 << (c % 8)
                calls.append((SYS_sched_setaffinity, (0, len(mask), remote.put(bytes(mask)))))
            if s["nice"] < 0 and s["policy"] not in FAIR:      # kept by a real-time thread for later
                calls.append((SYS_setpriority, (PRIO_PROCESS, 0, s["nice"])))
            clamps = _clamped(s)
            if s["policy"] not in FAIR or clamps or s["nice"] < 0:
                calls.append((SYS_sched_setattr, (0, remote.put(_attr(s["policy"], s["flags"], s["nice"], s, clamps)), 0)))
            if _privileged_io(s):
                calls.append((SYS_ioprio_set, (IOPRIO_WHO_PROCESS, 0, s["ioprio"])))
        if not calls:
            continue
        names = {SYS_sched_setattr: "sched_setattr (%s)" % POLICIES[s["policy"]], SYS_ioprio_set: "ioprio_set",
                 SYS_sched_setaffinity: "sched_setaffinity", SYS_setpriority: "setpriority (nice %d)" % s["nice"]}
        remote.many(calls, tid=tid, what=lambda nr, a: "%s of thread %d" % (names[nr], tid))
