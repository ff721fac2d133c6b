"""Deleted files held open: regular files unlinked after they were opened (or made O_TMPFILE).

No name leads to such a file any more: its content is saved in the image, once per file, as a
memory object of the tree's shared memory (ckpt/dump/tree.SharedMemory, the way memfd fds are:
its data ranges only, holes stay holes, read through the fd in the freeze), so that a deleted
file a process both holds open and maps (ckpt/state/deleted.py) is ONE object, made once and
taken by every mapping and every fd. A file larger than the limit (CKPT_DELETED_FILE_MAX_MB,
256 MiB by default, the same limit as for mapped deleted files) is refused before the target is
touched. A file unlinked from the name it was opened by but still linked under another name is
refused too: restore could only make a copy, which the other name would no longer share.

Restore: the file is made again by the plan, deleted (ckpt/state/deleted.make_file: an O_TMPFILE
file in its original directory if that still exists and the process may create files there,
named for an instant under its old name so that /proc shows "/dir/name (deleted)" again; else a
memfd named after it, which the restore says), with its content, size and mode. Each fd opens
that file again through /proc/self/fd with the process's rights and its own access mode; the
fd table then gives it its status flags, and its position is set here.
"""
import os
import stat

from ckpt.errors import RestoreError
from ckpt.files.base import O_ACCMODE, O_CLOEXEC, FdKind
from ckpt.files.memfd import dev_name
from ckpt.kernel import procfs
from ckpt.state.deleted import _size, limit     # one size limit for deleted files, open or mapped

DELETED = " (deleted)"


def _stat(f):
    try:
        return os.stat(procfs.proc(f.pid, "fd", str(f.fd)))
    except OSError:
        return None


def _name_leads_to(path, st):
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


class DeletedFile(FdKind):
    name = "deleted"
    restorable = True

    @staticmethod
    def match(f):
        if f.st is None or not stat.S_ISREG(f.st.st_mode) or not f.link.endswith(DELETED) \
                or f.link.startswith("/memfd:"):
            return False
        st = _stat(f)
        # a file really named "... (deleted)" that still exists is an ordinary file
        return st is not None and not _name_leads_to(f.link, st)

    @classmethod
    def describe(cls, f):
        st = _stat(f) or f.st
        return {"path": f.link, "dev": dev_name(f.st.st_dev), "inode": f.st.st_ino, "size": st.st_size,
                "mode": stat.S_IMODE(st.st_mode), "nlink": getattr(st, "st_nlink", 0)}

    @classmethod
    def refuse(cls, f, entry):
        if entry.get("nlink"):
            return ("it was unlinked from this name but is still linked elsewhere (%d links): restore could only "
                    "make a copy, which the other names would not share; not supported" % entry["nlink"])
        if entry["size"] > limit():
            return ("a deleted file of %s: the dump would save it in the image, and it is over the limit of %s "
                    "(CKPT_DELETED_FILE_MAX_MB); not dumped" % (_size(entry["size"]), _size(limit())))
        return None

    @classmethod
    def capture(cls, f, entry, ctx):
        # as it is at the freeze (its content is copied by tree.SharedMemory, through this fd)
        st = _stat(f)
        if st is None:
            raise f.error("the deleted file cannot be looked at any more")
        entry["size"], entry["mode"], entry["nlink"] = st.st_size, stat.S_IMODE(st.st_mode), st.st_nlink
        why = cls.refuse(f, entry)
        if why:
            raise f.error(why)

    @classmethod
    def precheck(cls, entry):
        if not isinstance(entry.get("pos"), int) or entry["pos"] < 0:
            raise RestoreError("fd %d (deleted file %s): malformed position %r" % (entry["fd"], entry["path"],
                                                                                  entry.get("pos")))

    @classmethod
    def create(cls, remote, entry, table):
        n = entry["fd"]
        made = table.tree.objects.get(("shm", entry["dev"], entry["inode"]))
        if not made:
            raise RestoreError("fd %d: the image holds no content for the deleted file %s" % (n, entry["path"]))
        try:
            # as the process (restore_fds acts with its rights), with this fd's access mode
            local = os.open("/proc/self/fd/%d" % made[0], (entry["flags"] & O_ACCMODE) | O_CLOEXEC)
        except OSError as e:
            raise RestoreError("fd %d: the deleted file %s, made again, cannot be opened as the process: %s"
                               % (n, entry["path"], e.strerror)) from None
        try:
            if entry["pos"]:
                os.lseek(local, entry["pos"], os.SEEK_SET)
            now = os.readlink("/proc/self/fd/%d" % local)
        except BaseException:
            os.close(local)
            raise
        warned = ("deleted file warned", entry["dev"], entry["inode"])
        if now.startswith("/memfd:") and table.options is not None and warned not in table.tree.objects:
            table.tree.objects[warned] = ()
            table.options.warn("fd %d: the deleted file %s comes back as a memfd (%s): its directory is gone or the "
                               "process may not create files in it" % (n, entry["path"], now))
        return table.adopt(local, "fd %d (deleted file %s)" % (n, entry["path"]))
