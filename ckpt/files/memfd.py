"""memfd fds: the memory file itself (its content, size, name and seals) is saved once per
object with the tree's shared memory (ckpt/dump/tree.py SharedMemory: whether some process maps
it or not), and restore makes it once (Plan.shared_memory); each fd takes that very object."""
import fcntl
import os

from ckpt.errors import RestoreError
from ckpt.files.base import FdKind

F_GET_SEALS = 1034


def dev_name(st_dev):
    """A device number as /proc/PID/maps writes it (the key shared memory is known by)."""
    return "%02x:%02x" % (os.major(st_dev), os.minor(st_dev))


class Memfd(FdKind):
    name = "memfd"
    restorable = True

    @staticmethod
    def match(f):
        return f.link.startswith("/memfd:")

    @classmethod
    def describe(cls, f):
        return {"path": f.link, "dev": dev_name(f.st.st_dev), "inode": f.st.st_ino}

    @classmethod
    def refuse(cls, f, entry):
        if f.st is None:
            return "its file cannot be looked at (fstat)"
        return None

    @classmethod
    def capture(cls, f, entry, ctx):
        fd = f.dup()
        entry["size"] = os.fstat(fd).st_size
        try:
            entry["seals"] = fcntl.fcntl(fd, F_GET_SEALS)
        except OSError:
            entry["seals"] = 0

    @classmethod
    def create(cls, remote, entry, table):
        fds = table.shared(("shm", entry["dev"], entry["inode"]))
        if fds is None:
            raise RestoreError("fd %d: the image holds no content for memfd %s" % (entry["fd"], entry["path"]))
        return fds[0]
