"""timerfd: its clock, interval, time left, TFD_TIMER_ABSTIME / TFD_TIMER_CANCEL_ON_SET, and the
expirations not yet read.

Dump, in the freeze: timerfd_gettime() on the target's timer (through a duplicate of it) first.
A periodic timer that expired is not rearmed by the kernel until it is read or asked for its
time; gettime then rearms it and adds the intervals that passed to its unread ticks -- exactly
what the target's next read would do itself, so the target cannot tell. fdinfo then shows the
unread ticks and the time left of an armed timer (a periodic one that fired meanwhile is asked
again). The clock is read right after, so that an absolute expiry is known.

Restore: made in ckpt and handed over. A relative timer gets the time it had left at the
freeze (time stands still for the dumped process, as for a stopped one); an absolute one keeps
its expiry instant on its clock (on the same boot; after a reboot the monotonic clocks restarted,
so it gets the time it had left). The unread ticks are put back with TFD_IOC_SET_TICKS (a kernel
with CONFIG_CHECKPOINT_RESTORE), after settime, which clears them.

Not seen by the dump: whether a CANCEL_ON_SET timer was already cancelled by a clock change
that its owner has not read yet (the restored timer is armed, not cancelled).
"""
import ctypes
import fcntl
import os
import re
import struct
import time

from ckpt.errors import RestoreError
from ckpt.files.base import O_CLOEXEC, FdKind
from ckpt.kernel import procfs

TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET = 1, 2
TFD_IOC_SET_TICKS = 0x40085400      # _IOW('T', 0, __u64)
CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME, CLOCK_REALTIME_ALARM, CLOCK_BOOTTIME_ALARM = 0, 1, 7, 8, 9
# the clock an expiry is measured on (clock_gettime of the alarm clocks needs an RTC)
BASE_CLOCK = {CLOCK_REALTIME: CLOCK_REALTIME, CLOCK_MONOTONIC: CLOCK_MONOTONIC, CLOCK_BOOTTIME: CLOCK_BOOTTIME,
              CLOCK_REALTIME_ALARM: CLOCK_REALTIME, CLOCK_BOOTTIME_ALARM: CLOCK_BOOTTIME}
NS = 1000000000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                                  ctypes.POINTER(_Itimerspec)]
_libc.timerfd_gettime.argtypes = [ctypes.c_int, ctypes.POINTER(_Itimerspec)]


def _ts(ns):
    return _Timespec(ns // NS, ns % NS)


def gettime(fd):
    """timerfd_gettime(fd) -> (value_ns, interval_ns); rearms a periodic timer that expired."""
    its = _Itimerspec()
    if _libc.timerfd_gettime(fd, ctypes.byref(its)) < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return (its.it_value.tv_sec * NS + its.it_value.tv_nsec, its.it_interval.tv_sec * NS + its.it_interval.tv_nsec)


_PAIR = re.compile(r"^\(\s*(\d+),\s*(\d+)\)$")


def parse(info):
    """The timer as fdinfo shows it: dict(clockid, ticks, flags, value_ns, interval_ns), or None."""
    try:
        v = _PAIR.match(info["it_value"])
        i = _PAIR.match(info["it_interval"])
        if not v or not i:
            return None
        return {"clockid": int(info["clockid"]), "ticks": int(info["ticks"]),
                "settime_flags": int(info["settime flags"], 8),
                "value_ns": int(v.group(1)) * NS + int(v.group(2)),
                "interval_ns": int(i.group(1)) * NS + int(i.group(2))}
    except (KeyError, ValueError):
        return None


def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


class TimerFd(FdKind):
    name = "timerfd"
    restorable = True

    @staticmethod
    def match(f):
        return f.link == "anon_inode:[timerfd]"

    @classmethod
    def refuse(cls, f, entry):
        t = parse(f.info)
        if t is None:
            return "its timer is not shown in /proc/%d/fdinfo/%d" % (f.pid, f.fd)
        if t["clockid"] not in BASE_CLOCK:
            return "its clock %d is not one timerfd restore knows" % t["clockid"]
        return None

    @classmethod
    def capture(cls, f, entry, ctx):
        dup = f.dup()
        for _ in range(10):
            try:
                gettime(dup)        # rearms an expired periodic timer, its overruns into ticks
            except OSError as e:
                raise f.error("timerfd_gettime: %s" % e.strerror) from None
            t = parse(procfs.fdinfo(f.pid, f.fd))
            if t is None:
                raise f.error("its timer is no longer shown in fdinfo")
            now = time.clock_gettime_ns(BASE_CLOCK[t["clockid"]])
            if not (t["interval_ns"] and t["value_ns"] == 0):
                break               # else it fired again between the two: ask again
        entry.update(t)
        armed = t["value_ns"] or t["interval_ns"]
        entry["expires_ns"] = now + t["value_ns"] if armed else 0    # on the timer's clock
        entry["boot_id"] = boot_id()

    @classmethod
    def precheck(cls, entry):
        for k in ("clockid", "ticks", "settime_flags", "value_ns", "interval_ns", "expires_ns"):
            if not isinstance(entry.get(k), int) or entry[k] < 0:
                raise RestoreError("fd %d (timerfd): %s is missing or invalid in the image" % (entry["fd"], k))
        if entry["clockid"] not in BASE_CLOCK:
            raise RestoreError("fd %d (timerfd): unknown clock %d" % (entry["fd"], entry["clockid"]))

    @classmethod
    def create(cls, remote, entry, table):
        n = entry["fd"]
        fd = _libc.timerfd_create(entry["clockid"], O_CLOEXEC)
        if fd < 0:
            raise RestoreError("fd %d (timerfd): timerfd_create(clock %d): %s"
                               % (n, entry["clockid"], os.strerror(ctypes.get_errno())))
        try:
            cls._arm(fd, entry)
        except BaseException:
            os.close(fd)
            raise
        return table.adopt(fd, what="timerfd %d" % n)

    @classmethod
    def _arm(cls, fd, entry):
        n = entry["fd"]
        flags, value, interval = entry["settime_flags"], entry["value_ns"], entry["interval_ns"]
        if value or interval:
            if flags & TFD_TIMER_ABSTIME:
                if entry.get("boot_id") == boot_id() or entry["clockid"] in (CLOCK_REALTIME, CLOCK_REALTIME_ALARM):
                    value = entry["expires_ns"]
                else:   # the monotonic clocks restarted with the machine: the time left, from now
                    value = time.clock_gettime_ns(BASE_CLOCK[entry["clockid"]]) + value
            value = max(value, 1)    # 0 would disarm a periodic timer that is due right now
        if value or interval or flags:
            its = _Itimerspec(_ts(interval), _ts(value))
            if _libc.timerfd_settime(fd, flags, ctypes.byref(its), None) < 0:
                raise RestoreError("fd %d (timerfd): timerfd_settime(flags %#o, value %d ns, interval %d ns): %s"
                                   % (n, flags, value, interval, os.strerror(ctypes.get_errno())))
        if entry["ticks"]:
            # an absolute expiry that passed meanwhile has fired already: keep those ticks too
            gettime(fd)
            extra = parse(procfs.fdinfo(os.getpid(), fd)) or {"ticks": 0}
            ticks = entry["ticks"] + extra["ticks"]
            try:
                fcntl.ioctl(fd, TFD_IOC_SET_TICKS, struct.pack("=Q", ticks))
            except OSError as e:
                why = "the kernel lacks CONFIG_CHECKPOINT_RESTORE" if e.errno == 25 else e.strerror
                raise RestoreError("fd %d (timerfd): putting back %d unread expirations (TFD_IOC_SET_TICKS): %s"
                                   % (n, ticks, why)) from None
