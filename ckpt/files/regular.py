"""Regular files, directories and character devices: reopened by path at restore.

The plan opens each one up front, with the process's own rights, without following symbolic
links, and checks it is the same file as at the dump (ckpt/restore/paths.py); create() hands
that open file to the restored process.
"""
import os
import stat

from ckpt.files.base import O_ACCMODE, O_WRONLY, FdKind


def _leads_to(path, st):
    """Whether path is the file st (a file may really be named "... (deleted)")."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


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
        if f.link.endswith(" (deleted)") and not _leads_to(f.link, f.st):
            # a deleted file is the kind "deleted" (ckpt/files/deleted.py): this one could not be looked at
            return "a deleted file that cannot be looked at"
        return None

    @classmethod
    def capture(cls, f, entry, ctx):
        # size and mtime as they are at the freeze instant (the description may be older)
        entry["size"], entry["mtime_ns"] = f.st.st_size, f.st.st_mtime_ns

    @classmethod
    def prepare(cls, entry, paths, options):
        # a file the process only writes (a log, its stdout) may have grown since: what the
        # process computes does not depend on it. A file it reads must be as it was, unless
        # the restore is told otherwise (--allow-file-change)
        write_only = entry["flags"] & O_ACCMODE == O_WRONLY
        paths.open(("fd", entry["fd"]), entry["path"], entry["flags"], entry, "fd %d: file" % entry["fd"],
                   content=False if write_only else None)

    @classmethod
    def create(cls, remote, entry, table):
        return table.take_path(entry)


class Directory(FdKind):
    name = "dir"
    restorable = True

    @staticmethod
    def match(f):
        return f.st is not None and stat.S_ISDIR(f.st.st_mode)

    @classmethod
    def describe(cls, f):
        return {"path": f.link, "dev": f.st.st_dev, "inode": f.st.st_ino}

    @classmethod
    def prepare(cls, entry, paths, options):
        paths.open(("fd", entry["fd"]), entry["path"], entry["flags"], entry, "fd %d: directory" % entry["fd"],
                   kind="dir")

    @classmethod
    def create(cls, remote, entry, table):
        return table.take_path(entry)


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
    def prepare(cls, entry, paths, options):
        n = entry["fd"]
        if entry.get("tty") and options is not None and options.shell_job:
            return      # ckpt's own terminal, asked for
        try:
            paths.open(("fd", n), entry["path"], entry["flags"], entry, "fd %d: %s" % (n, "terminal" if entry.get("tty")
                                                                                        else "device"), kind="chardev")
        except Exception as e:
            if entry.get("tty"):
                raise type(e)("%s; restore with --shell-job to give the process ckpt's own terminal instead"
                              % e) from None
            raise

    @classmethod
    def create(cls, remote, entry, table):
        if entry.get("tty") and table.options is not None and table.options.shell_job:
            for std in (0, 1, 2):
                if os.isatty(std):
                    return table.adopt(os.dup(std), what="ckpt's terminal")
            return table.adopt(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC), what="/dev/null")
        return table.take_path(entry)
