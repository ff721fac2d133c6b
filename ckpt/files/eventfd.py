"""eventfd: its 64-bit counter (read in the freeze: other processes and the kernel may add to it)
and its semaphore flag.

Dump: /proc/PID/fdinfo/FD shows `eventfd-count` (hex) and `eventfd-semaphore`.
Restore: made in ckpt (eventfd(0, EFD_SEMAPHORE as it was), the counter written into it: a
write adds any value up to 2^64-2, eventfd2's initial value is only 32 bits) and handed over;
the fd's own status flags (O_NONBLOCK) are set by the fd table like any fd's.
"""
import os

from ckpt.errors import RestoreError
from ckpt.files.base import FdKind

EVENTFD_MAX = (1 << 64) - 2


def _parse(info):
    """(count, semaphore) from an fdinfo dict; None where a field is missing or garbled."""
    try:
        count = int(info["eventfd-count"], 16)
        sem = int(info["eventfd-semaphore"])
    except (KeyError, ValueError):
        return None
    return count, bool(sem)


class EventFd(FdKind):
    name = "eventfd"
    restorable = True

    @staticmethod
    def match(f):
        return f.link == "anon_inode:[eventfd]"

    @classmethod
    def refuse(cls, f, entry):
        if _parse(f.info) is None:
            return "its counter is not shown in /proc/%d/fdinfo/%d (kernel without eventfd-count)" % (f.pid, f.fd)
        return None

    @classmethod
    def capture(cls, f, entry, ctx):
        # f.info is read in the freeze: the counter as it is now
        entry["count"], entry["semaphore"] = _parse(f.info)

    @classmethod
    def precheck(cls, entry):
        count = entry.get("count")
        if not isinstance(count, int) or not 0 <= count <= EVENTFD_MAX:
            raise RestoreError("fd %d (eventfd): counter %r is out of range" % (entry["fd"], count))

    @classmethod
    def create(cls, remote, entry, table):
        flags = os.EFD_CLOEXEC | (os.EFD_SEMAPHORE if entry.get("semaphore") else 0)
        try:
            fd = os.eventfd(0, flags)
        except OSError as e:
            raise RestoreError("fd %d (eventfd): eventfd(): %s" % (entry["fd"], e.strerror)) from None
        try:
            if entry["count"]:
                os.eventfd_write(fd, entry["count"])
        except OSError as e:
            os.close(fd)
            raise RestoreError("fd %d (eventfd): putting back its counter %d: %s"
                               % (entry["fd"], entry["count"], e.strerror)) from None
        return table.adopt(fd, what="eventfd %d" % entry["fd"])
