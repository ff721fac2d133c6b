"""Regular files, directories and character devices: reopened by path at restore."""
import os
import stat

from ckpt.errors import RestoreError
from ckpt.files.base import O_DIRECTORY, O_NOCTTY, FdKind, open_remote


class RegularFile(FdKind):
    name = "file"
    restorable = True

    @staticmethod
    def match(f):
        return f.st is not None and stat.S_ISREG(f.st.st_mode) and not f.link.startswith("/memfd:")

    @classmethod
    def describe(cls, f):
        st = f.st
        return {"path": f.link, "dev": st.st_dev, "inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    @classmethod
    def refuse(cls, f, entry):
        if f.link.endswith(" (deleted)"):
            return "a deleted file: not supported yet"
        return None

    @classmethod
    def create(cls, remote, entry, table):
        if not os.path.exists(entry["path"]):
            raise RestoreError("fd %d: file %s no longer exists" % (entry["fd"], entry["path"]))
        return open_remote(remote, entry["path"], entry["flags"])


class Directory(FdKind):
    name = "dir"
    restorable = True

    @staticmethod
    def match(f):
        return f.st is not None and stat.S_ISDIR(f.st.st_mode)

    @classmethod
    def create(cls, remote, entry, table):
        return open_remote(remote, entry["path"], entry["flags"] | O_DIRECTORY)


class CharDevice(FdKind):
    name = "chardev"
    restorable = True

    @staticmethod
    def match(f):
        return f.st is not None and stat.S_ISCHR(f.st.st_mode)

    @classmethod
    def describe(cls, f):
        return {"path": f.link, "rdev": f.st.st_rdev, "tty": os.major(f.st.st_rdev) in (4, 5, 136)}

    @classmethod
    def create(cls, remote, entry, table):
        if entry.get("tty"):
            # a terminal other than the standard streams: ckpt's terminal, if it has one
            for std in (0, 1, 2):
                if os.isatty(std):
                    return open_remote(remote, os.ttyname(std), entry["flags"] | O_NOCTTY)
            return open_remote(remote, "/dev/null", entry["flags"])
        return open_remote(remote, entry["path"], entry["flags"])
