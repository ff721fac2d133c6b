"""Every path restore opens, opened once, up front, with the process's own rights, and checked.

The image names paths: mapped files, the executable, the working and root directories, the
files, directories and devices of the fd table. Between the dump and the restore anyone who
could write to a directory on the way may have replaced what a path leads to. So a path is:

  opened by ckpt itself, in the plan (before the process exists), with the file credentials
    of the dumped process (creds.acting_as): what the process could not open, restore cannot
    either, whatever ckpt's own rights;
  resolved without following any symbolic link (openat2 RESOLVE_NO_SYMLINKS): the paths the
    kernel reported at the dump are canonical, so a link met on the way is a change;
  checked on the open fd (fstat, never by name again): device and inode, the file type, for
    devices the device number, for files size and modification time;
  then handed to the restored process as that very open file (pidfd_getfd).
"""
import ctypes
import errno
import os
import stat
import struct

from ckpt.errors import RestoreError
from ckpt.restore.creds import acting_as

SYS_openat2 = 437
AT_FDCWD = -100
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS = 0x02, 0x04
O_PATH, O_NOFOLLOW, O_CLOEXEC, O_NOCTTY, O_DIRECTORY = 0o10000000, 0o400000, 0o2000000, 0o400, 0o200000
O_NONBLOCK = 0o4000
VALID_OPEN_FLAGS = 0o37777777     # what openat2 accepts (it refuses unknown bits)
O_PATH_ALLOWS = O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
_DROP = 0o100 | 0o200 | 0o1000 | O_NOCTTY | O_CLOEXEC     # O_CREAT, O_EXCL, O_TRUNC: never on a restore

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

TYPES = {"file": stat.S_ISREG, "dir": stat.S_ISDIR, "chardev": stat.S_ISCHR}
TYPE_WORDS = {"file": "a regular file", "dir": "a directory", "chardev": "a character device"}


def openat2(path, flags):
    """open(path) without following any symbolic link on the way; returns an fd or raises OSError."""
    how = ctypes.create_string_buffer(struct.pack("<QQQ", flags, 0, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS), 24)
    raw = ctypes.create_string_buffer(os.fsencode(path))
    fd = _libc.syscall(SYS_openat2, ctypes.c_long(AT_FDCWD), raw, how, ctypes.c_long(24))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return fd


def _why(e, path):
    if e.errno == errno.ELOOP:
        return "a symbolic link is now on the way to %s (it was not at the dump)" % path
    if e.errno == errno.ENOENT:
        return "%s no longer exists" % path
    if e.errno in (errno.EACCES, errno.EPERM):
        return "the process's own user and groups may not open %s" % path
    if e.errno == errno.EXDEV:
        return "%s now leads across a mount point (it did not at the dump)" % path
    return "%s: %s" % (path, e.strerror)


class PathOpener:
    """Opens, checks and holds (until handed over) the files of one restore.

    creds: the image's credentials record; the opens are done with them.
    check_content: compare size and mtime of regular files (always done for mapped files)."""

    def __init__(self, creds, check_content=True):
        self.creds = creds
        self.check_content = check_content
        self.held = {}          # key -> local fd

    def open(self, key, path, flags, ident, what, kind="file", content=None):
        """Open path (flags without create/truncate) as the process, check it against ident
        (dev, inode; rdev; size, mtime_ns) and hold the fd under key. Returns the fd."""
        if key in self.held:
            return self.held[key]
        flags = (flags & ~_DROP & VALID_OPEN_FLAGS) | O_CLOEXEC   # RESOLVE_NO_SYMLINKS: no trailing link either
        if kind == "dir":
            flags |= O_DIRECTORY
        flags = flags & O_PATH_ALLOWS if flags & O_PATH else flags | O_NOCTTY
        try:
            with acting_as(self.creds):
                fd = openat2(path, flags)
        except OSError as e:
            raise RestoreError("%s %s: %s" % (what, path, _why(e, path))) from None
        try:
            self._check(fd, path, ident, what, kind, self.check_content if content is None else content)
        except BaseException:
            os.close(fd)
            raise
        self.held[key] = fd
        return fd

    @staticmethod
    def _check(fd, path, ident, what, kind, content):
        st = os.fstat(fd)
        test = TYPES.get(kind)
        if test is not None and not test(st.st_mode):
            raise RestoreError("%s %s is no longer %s" % (what, path, TYPE_WORDS[kind]))
        if kind == "chardev":
            if "rdev" in ident and st.st_rdev != ident["rdev"]:
                raise RestoreError("%s %s is now another device (%d:%d, was %d:%d)"
                                   % (what, path, os.major(st.st_rdev), os.minor(st.st_rdev),
                                      os.major(ident["rdev"]), os.minor(ident["rdev"])))
            return
        if "inode" in ident and (st.st_ino != ident["inode"] or ("dev" in ident and st.st_dev != ident["dev"])):
            raise RestoreError("%s %s is another file than at the dump (device/inode %d/%d, was %d/%d)"
                               % (what, path, st.st_dev, st.st_ino, ident.get("dev", -1), ident["inode"]))
        if content and kind == "file":
            if "size" in ident and st.st_size != ident["size"]:
                raise RestoreError("%s %s changed since the dump (size %d, was %d)"
                                   % (what, path, st.st_size, ident["size"]))
            if "mtime_ns" in ident and st.st_mtime_ns != ident["mtime_ns"]:
                raise RestoreError("%s %s changed since the dump (modified after it)" % (what, path))

    def take(self, key):
        """The held fd for key, now owned by the caller."""
        return self.held.pop(key)

    def get(self, key):
        return self.held[key]

    def close(self):
        for fd in self.held.values():
            os.close(fd)
        self.held = {}


__all__ = ["PathOpener", "openat2"]
