"""POSIX timers (timer_create): their IDs, clocks, signals (notification, signal number, value,
target thread), time left, interval and overrun count; per-thread and per-process CPU-time
timers too.

Dump half: /proc/PID/timers lists every timer (ID, signal and value, notification and its
target, clock); the time left and the interval come from timer_gettime and the overrun count of
the last expiry delivered from timer_getoverrun, both injected (only the process itself may ask).
A timer of CLOCK_THREAD_CPUTIME_ID measures the thread that made it, which /proc does not tell:
in a process of several threads, timer_gettime is asked twice in one thread after the other --
the time left moves only in the thread whose CPU time the timer counts (the others are stopped).
A timer signal still pending at the freeze (its siginfo is SI_TIMER with the timer's ID) is not
queued again as a copy: the restored timer queues its own, so that its delivery rearms it as the
kernel would.

Restore half, in stage "process" (every thread exists): each timer is made with its own ID
(PR_TIMER_CREATE_RESTORE_IDS; without it, by creating timers in ID order and deleting the spare
ones), in the thread that made it for a thread CPU-time clock, then armed with the time it had
left and its interval. An overrun count N is made again by arming the timer at an absolute time
N+1 intervals before its next expiry, so that it expires at once, and taking that signal back
(rt_sigtimedwait): its delivery counts the N missed intervals, as timer_getoverrun then reports,
and rearms it at the right time. A timer whose signal was pending is armed in the past so that it
queues it again at once.

Refused up front: a timer on the CPU clock of another process, on a clock device (CLOCKFD), or
that signals or measures a thread which has exited. Not kept: the overrun counted by a timer
whose signal was still pending at the freeze (it counts again from the restore), nor one whose
time left is shorter than a few injected calls (armed plainly); and whether a timer was armed
with TIMER_ABSTIME (it is armed with the time it had left).
"""
import base64
import errno
import os
import struct

from ckpt.errors import RestoreError, TargetError
from ckpt.kernel import procfs
from ckpt.state.inject import Out

SYS_prctl = 157
SYS_timer_create, SYS_timer_settime, SYS_timer_gettime, SYS_timer_getoverrun, SYS_timer_delete = 222, 223, 224, 225, 226
SYS_clock_gettime = 228
SYS_rt_sigtimedwait = 128
PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, RESTORE_IDS_ON, RESTORE_IDS_GET = 77, 0, 1, 2
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, SIGEV_THREAD_ID = 0, 1, 2, 4
NOTIFY = {"signal": SIGEV_SIGNAL, "none": SIGEV_NONE, "thread": SIGEV_THREAD}
SI_TIMER = -2
TIMER_ABSTIME = 1
CPUCLOCK_PERTHREAD, CLOCKFD = 4, 3
NSEC = 1000000000
MAX_SEQUENTIAL_ID = 4096        # without PR_TIMER_CREATE_RESTORE_IDS, IDs are reached one by one
OVERRUN_TRIES = 3
ALARM_CLOCKS = (8, 9)           # CLOCK_REALTIME_ALARM, CLOCK_BOOTTIME_ALARM
CAP_WAKE_ALARM = 35


def parse(text):
    """/proc/PID/timers -> [{"id", "signo", "value", "notify", "target": (kind, pid), "clock"}]."""
    out, cur = [], None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        val = val.strip()
        if key == "ID":
            cur = {"id": int(val)}
            out.append(cur)
        elif cur is None:
            continue
        elif key == "signal":
            signo, _, value = val.partition("/")
            cur["signo"], cur["value"] = int(signo), int(value, 16)
        elif key == "notify":
            how, _, target = val.partition("/")
            kind, _, pid = target.partition(".")
            cur["notify"] = NOTIFY.get(how, -1) | (SIGEV_THREAD_ID if kind == "tid" else 0)
            cur["target"] = (kind, int(pid))
        elif key == "ClockID":
            cur["clock"] = int(val)
    return out


def read(pid):
    try:
        with open(procfs.proc(pid, "timers")) as f:
            return parse(f.read())
    except FileNotFoundError:
        return []


def cpu_clock(clock):
    """A CPU-time clock ID -> (pid or tid it names, 0 for the caller; per thread); None for
    any other clock."""
    if clock >= 0 or clock & 3 == CLOCKFD:
        return None
    return ~(clock >> 3), bool(clock & CPUCLOCK_PERTHREAD)


def _why_not(pid, t, tids):
    c = t["clock"]
    if c < 0 and c & 3 == CLOCKFD:
        return "POSIX timer %d runs on a clock device (fd %d): not supported" % (t["id"], ~(c >> 3))
    cpu = cpu_clock(c)
    if cpu:
        who, thread = cpu
        if thread and who and who not in tids:
            return "POSIX timer %d measures the CPU time of thread %d, which has exited" % (t["id"], who)
        if not thread and who and who != pid:
            return "POSIX timer %d measures the CPU time of another process (%d): not supported" % (t["id"], who)
    if t["notify"] & SIGEV_THREAD_ID and t["target"][1] not in tids:
        return "POSIX timer %d signals thread %d, which has exited" % (t["id"], t["target"][1])
    if t["notify"] < 0:
        return "POSIX timer %d has a notification ckpt does not know" % t["id"]
    return None


def refuse(pid):
    tids = set(procfs.tasks(pid))
    for t in read(pid):
        why = _why_not(pid, t, tids)
        if why:
            return why
    return None


def _spec(interval_ns, value_ns):
    return struct.pack("<qqqq", interval_ns // NSEC, interval_ns % NSEC, value_ns // NSEC, value_ns % NSEC)


def _ns(sec, nsec):
    return sec * NSEC + nsec


def dump(ctx):
    timers = read(ctx.pid)
    if not timers:
        return
    tids = {t.tid for t in ctx.tracees}
    for t in timers:
        why = _why_not(ctx.pid, t, tids)
        if why:
            raise TargetError("process %d: %s" % (ctx.pid, why))
    calls = []
    for t in timers:
        calls += [(SYS_timer_gettime, (t["id"], Out(32))), (SYS_timer_getoverrun, (t["id"],))]
    res = ctx.injector.run(ctx.leader, calls)
    for i, t in enumerate(timers):
        (r, spec), (overrun, _) = res[2 * i], res[2 * i + 1]
        if r < 0 or overrun < 0:
            raise TargetError("process %d: timer_gettime of POSIX timer %d failed: %s"
                              % (ctx.pid, t["id"], os.strerror(-min(r, overrun))))
        isec, insec, vsec, vnsec = struct.unpack("<qqqq", spec)
        t["interval_ns"], t["value_ns"], t["overrun"] = _ns(isec, insec), _ns(vsec, vnsec), overrun
        target = t.pop("target")[1]
        t["tid"] = target if t["notify"] & SIGEV_THREAD_ID else 0
        cpu = cpu_clock(t["clock"])
        t["thread"] = _creator(ctx, t) if cpu and cpu[1] and cpu[0] == 0 else 0
    _take_pending(ctx, timers)
    ctx.record["posix_timers"] = timers


def _creator(ctx, t):
    """The thread a CLOCK_THREAD_CPUTIME_ID timer measures (the one that made it)."""
    if len(ctx.tracees) == 1:
        return ctx.tracees[0].tid
    found = []
    for tr in ctx.tracees:         # one thread after the other: only the one running moves its clock
        (r1, a), (r2, b) = ctx.injector.run(tr, [(SYS_timer_gettime, (t["id"], Out(32))),
                                                 (SYS_timer_gettime, (t["id"], Out(32)))])
        if r1 == 0 and r2 == 0 and a != b and a[16:] != bytes(16):
            found.append(tr.tid)
    if len(found) != 1:
        raise TargetError("process %d: POSIX timer %d measures the CPU time of the thread that made it, and it is "
                          "not armed: which thread that is cannot be told; not supported" % (ctx.pid, t["id"]))
    return found[0]


def _take_pending(ctx, timers):
    """A timer's signal pending at the freeze: marked on the timer and taken off the signals
    restore queues again (the restored timer queues its own)."""
    by_id = {t["id"]: t for t in timers}
    for t in timers:
        t["pending"] = False

    def take(queue):
        keep = []
        for raw in queue:
            info = base64.b64decode(raw)
            signo, _, code, tid = struct.unpack_from("<iii4xi", info)     # si_timerid: the union, at 16
            t = by_id.get(tid) if code == SI_TIMER else None
            if t is not None and not t["pending"] and signo == t["signo"]:
                t["pending"] = True
                continue
            keep.append(raw)
        return keep
    ctx.record["shared_signals"] = take(ctx.record.get("shared_signals", []))
    for d in ctx.threads:
        d["signals"] = take(d.get("signals", []))


# ---------------------------------------------------------------------------- restore half
def _timers(proc):
    timers = proc.get("posix_timers") or []
    if not isinstance(timers, list):
        raise RestoreError("image: POSIX timers of process %s are not a list" % proc.get("pid"))
    return timers


def check(proc, threads):
    timers = _timers(proc)
    if not timers:
        return
    tids = {t["tid"] for t in threads}
    keys = ("id", "clock", "notify", "signo", "value", "tid", "thread", "interval_ns", "value_ns", "overrun",
            "pending")
    for t in timers:
        if not isinstance(t, dict) or any(not isinstance(t.get(k), int) for k in keys) \
                or not 0 <= t["id"] <= 0x7FFFFFFF or t["value_ns"] < 0 or t["interval_ns"] < 0:
            raise RestoreError("image: POSIX timer record %r of process %d is malformed" % (t, proc["pid"]))
        for who in (t["tid"], t["thread"]):
            if who and who not in tids:
                raise RestoreError("image: POSIX timer %d of process %d names thread %d, which the image does not have"
                                   % (t["id"], proc["pid"], who))
    alarms = [t["id"] for t in timers if t["clock"] in ALARM_CLOCKS]
    if alarms and not _cap(proc, CAP_WAKE_ALARM):
        raise RestoreError("process %d has POSIX timer %d on an alarm clock (it wakes the machine), but its credentials "
                           "lack CAP_WAKE_ALARM" % (proc["pid"], alarms[0]))
    if max(t["id"] for t in timers) >= MAX_SEQUENTIAL_ID and not _restore_ids_supported():
        raise RestoreError("process %d has POSIX timer %d: this kernel cannot create a timer with a chosen ID "
                           "(PR_TIMER_CREATE_RESTORE_IDS, Linux 6.14) and counting up to it is too long"
                           % (proc["pid"], max(t["id"] for t in timers)))


def _cap(proc, cap):
    try:
        return int((proc.get("creds") or {}).get("cap_eff") or "0", 16) >> cap & 1
    except (TypeError, ValueError):
        return 0


def _restore_ids_supported():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_GET, 0, 0, 0) >= 0


def restore(remote, proc, threads, stage):
    if stage != "process":
        return
    timers = sorted(_timers(proc), key=lambda t: t["id"])
    if not timers:
        return
    pid = proc["pid"]
    _create(remote, pid, timers)
    for t in timers:
        _arm(remote, pid, t)


def _sigevent(t):
    return struct.pack("<QiiI", t["value"], t["signo"], t["notify"], t["tid"]) + bytes(44)


def _create(remote, pid, timers):
    restore_ids = remote.call(SYS_prctl, PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON, 0, 0, 0,
                              ok_errors=(errno.EINVAL,)) == 0
    wanted = {t["id"]: t for t in timers}
    spare = []
    ids = [t["id"] for t in timers] if restore_ids else range(timers[-1]["id"] + 1)
    for i in ids:
        t = wanted.get(i)
        remote.reset()
        idp = remote.put(struct.pack("<i", i))
        if t is None:       # a spare timer, to reach the next wanted ID
            sev = remote.put(struct.pack("<Qii", 0, 0, SIGEV_NONE) + bytes(48))
            remote.call(SYS_timer_create, 1, sev, idp, what="timer_create (to reach timer ID %d)" % (i + 1))
        else:
            remote.call(SYS_timer_create, t["clock"], remote.put(_sigevent(t)), idp, tid=t["thread"] or None,
                        what="timer_create of POSIX timer %d (clock %d)" % (i, t["clock"]))
        got = struct.unpack("<i", remote.read(idp, 4))[0]
        if got != i:
            raise RestoreError("process %d: POSIX timer %d came back as timer %d" % (pid, i, got))
        if t is None:
            spare.append(i)
    if restore_ids:
        remote.call(SYS_prctl, PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, 0, 0, 0,
                    what="prctl(PR_TIMER_CREATE_RESTORE_IDS, off)")
    if spare:
        remote.many([(SYS_timer_delete, (i,)) for i in spare], what="timer_delete of a spare timer")


def _now(remote, t, tid):
    """The timer's clock now, read by the thread that owns it (a thread CPU-time clock is its)."""
    remote.reset()
    out = remote.alloc(16)
    remote.call(SYS_clock_gettime, t["clock"], out, tid=tid, what="clock_gettime(%d)" % t["clock"])
    return _ns(*struct.unpack("<qq", remote.read(out, 16)))


def _arm(remote, pid, t):
    value, interval, n = t["value_ns"], t["interval_ns"], t["overrun"]
    signals = t["notify"] & ~SIGEV_THREAD_ID != SIGEV_NONE
    owner = t["thread"] or None
    name = "POSIX timer %d of process %d" % (t["id"], pid)
    if t["pending"] and signals:
        # its signal was pending: armed in the past, it queues it again at once; its delivery
        # rearms it for the next expiry, `value` from now
        now = _now(remote, t, owner)
        at = max(1, now + value - interval if interval else now - 1)
        remote.reset()
        remote.call(SYS_timer_settime, t["id"], TIMER_ABSTIME, remote.put(_spec(interval, at)), 0, tid=owner,
                    what="timer_settime of %s" % name)
        return
    if not value:
        return
    if n > 0 and interval and signals:
        for _ in range(OVERRUN_TRIES):
            if _arm_with_overrun(remote, t, owner, name):
                return
        # the next expiry came each time before its signal could be taken back (a time left
        # shorter than a few injected calls): armed plainly, the overrun count starts again
    remote.reset()
    remote.call(SYS_timer_settime, t["id"], 0, remote.put(_spec(interval, value)), 0, tid=owner,
                what="timer_settime of %s" % name)


def _arm_with_overrun(remote, t, owner, name):
    """Arm at an absolute time N+1 intervals before the next expiry (now + time left): it
    expires at once; taking its signal back (in the thread it is sent to) makes the kernel count
    N overruns and rearm it for that next expiry. True when timer_getoverrun then says N (the
    take came before the next expiry was due)."""
    value, interval, n = t["value_ns"], t["interval_ns"], t["overrun"]
    receiver = t["tid"] or None
    now = _now(remote, t, owner)
    at = now + value - (n + 1) * interval
    if at <= 0:
        return False
    remote.reset()
    spec = remote.put(_spec(interval, at))
    mask = remote.put(struct.pack("<Q", 1 << (t["signo"] - 1)))
    info = remote.alloc(128)
    zero = remote.put(struct.pack("<qq", 0, 0))
    remote.call(SYS_timer_settime, t["id"], TIMER_ABSTIME, spec, 0, tid=owner, what="timer_settime of %s" % name)
    got = remote.call(SYS_rt_sigtimedwait, mask, info, zero, 8, tid=receiver, ok_errors=(errno.EAGAIN,),
                      what="taking back the signal of %s" % name)
    overrun = remote.call(SYS_timer_getoverrun, t["id"], what="timer_getoverrun of %s" % name)
    if got != t["signo"]:
        raise RestoreError("%s: armed in the past, it queued no signal" % name)
    return overrun == n
