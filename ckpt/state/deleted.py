"""Deleted files a process still maps, and a deleted working directory: the dump half and the
restore half.

A mapped file that was deleted (unlinked, still mapped: MAP_PRIVATE or MAP_SHARED) has no name
restore could open. Its content is saved in the image, whole (its data ranges: holes stay
holes), as one memory object per file whichever processes and mappings of the tree map it
(ckpt/dump/tree.SharedMemory), read through /proc/PID/map_files in the freeze, when nothing can
change it any more (so a large file lengthens the freeze by the time it takes to read it). A file
larger than the limit (CKPT_DELETED_FILE_MAX_MB, 256 MiB by default) is refused before the target
is touched. Private mappings keep only their own (copy-on-write) pages in the process's memory,
as for a file that still exists; shared mappings write to the object.

Restore makes the file again, deleted, before the processes exist, with the credentials of the
process that maps it:
  - in its original directory, if that still exists and the process may create files there,
    as an O_TMPFILE file with the same mode bits (rwx) and size; linked for an instant under its
    old name, if that name is free, and unlinked again, so that /proc/PID/maps shows the very name
    the dump saw ("/dir/name (deleted)"); if the name is taken, it stays an unnamed O_TMPFILE
    ("/dir/#INODE (deleted)");
  - else as a memfd named after the file ("/memfd:name (deleted)").
Every mapping of the file, in every process, maps that one object (shared ones share it).
A deleted memfd mapped only privately (its fd closed) is saved the same way and comes back as a
memfd with its name and seals.

A deleted working directory (rmdir'ed while a process is in it) is empty and can never hold
anything again; restore makes a new empty directory under the old name in the old parent
directory (a fresh name there if the old one is taken; the nearest ancestor that exists if the
parent is gone too), with the old mode, as the process, enters it and removes it: the process
is again in a deleted directory, and /proc/PID/cwd shows "/old/path (deleted)". A process that
could not create that directory is refused at dump. A deleted root directory (chroot) is
refused.
"""
import errno
import os
import stat

from ckpt.errors import RestoreError, TargetError
from ckpt.kernel import procfs

DELETED = " (deleted)"
NOT_FILES = ("/memfd:", "/SYSV", "/dev/zero", "/anon_hugepage")
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)


def limit():
    """The largest deleted file a dump saves, in bytes."""
    try:
        return int(float(os.environ.get("CKPT_DELETED_FILE_MAX_MB", "256")) * (1 << 20))
    except ValueError:
        return 256 << 20


def _size(n):
    return "%d bytes" % n if n < 1 << 20 else "%.1f MiB" % (n / (1 << 20))


def whole_file(v):
    """Whether mapping v (a procfs.Mapping) is of a deleted file saved whole in the image: a
    deleted regular file mapped (privately or shared), or a memfd mapped privately."""
    if not v.deleted or v.inode == 0 or not v.path.startswith("/"):
        return False
    if v.kind == "file-private":
        return not v.path.startswith(NOT_FILES[1:])
    return v.kind == "shmem" and not v.path.startswith(NOT_FILES)


def _map_file(pid, v):
    return procfs.proc(pid, "map_files", "%x-%x" % (v.start, v.end))


def original_name(path):
    return path[:-len(DELETED)] if path.endswith(DELETED) else path


# ------------------------------------------------------------------------ dump half (part)
def refuse(pid):
    """Before the dump touches the process: every deleted file it maps must be readable (through
    /proc/PID/map_files: ckpt needs root for that) and within the limit; a deleted root directory
    cannot be rebuilt."""
    seen = set()
    for v in procfs.read_maps(pid):
        if not whole_file(v) or (v.dev, v.inode) in seen:
            continue
        seen.add((v.dev, v.inode))
        name = original_name(v.path)
        try:
            st = os.stat(_map_file(pid, v))
        except PermissionError:
            return ("it maps the deleted file %s, whose content only /proc/%d/map_files gives, which needs "
                    "root (CAP_SYS_ADMIN); not dumped" % (name, pid))
        except FileNotFoundError:
            continue        # unmapped meanwhile
        if not stat.S_ISREG(st.st_mode):
            return "it maps %s, a deleted file that is not a regular file; not supported" % name
        if st.st_size > limit():
            return ("it maps the deleted file %s, of %s: the dump would save it in the image, and it is over "
                    "the limit of %s (CKPT_DELETED_FILE_MAX_MB); not dumped" % (name, _size(st.st_size), _size(limit())))
    exe = procfs.readlink(pid, "exe")
    if exe.endswith(DELETED):
        try:
            st = os.stat(procfs.proc(pid, "exe"))
        except OSError:
            st = None
        if st is not None and st.st_nlink == 0 and not any(
                v.inode == st.st_ino and v.deleted and v.kind == "file-private" for v in procfs.read_maps(pid)):
            return "its executable %s was deleted and is no longer mapped: restore could not make it again" % exe
    if _deleted_dir(pid, "cwd") is not None:
        cwd = original_name(procfs.readlink(pid, "cwd"))
        where, _ = ghost_place(cwd)
        if not _may_create(where, pid):
            return ("its working directory %s was deleted, and restore would make it again (empty, deleted) in %s, "
                    "where the process may not create a directory; not dumped" % (cwd, where))
    root = procfs.readlink(pid, "root")
    if root != "/" and _deleted_dir(pid, "root"):
        return "its root directory %s was deleted (chroot into a removed directory); not supported" % root
    return None


def exe_object(proc, maps):
    """The (dev, inode) key of the memory object that holds a process's deleted executable
    (one of its deleted mapped files), or None when the executable is not a deleted file."""
    ident = proc.get("exe_file") or {}
    if not str(proc.get("exe", "")).endswith(DELETED) or "inode" not in ident or "dev" not in ident:
        return None
    dev = "%02x:%02x" % (os.major(ident["dev"]), os.minor(ident["dev"]))
    for m in maps:
        if m.get("deleted") and m["inode"] == ident["inode"] and m["dev"] == dev and m["kind"] == "file-private":
            return (m["dev"], m["inode"])
    return None


def _deleted_dir(pid, name):
    try:
        st = os.stat(procfs.proc(pid, name))
    except OSError:
        return None
    return st if stat.S_ISDIR(st.st_mode) and st.st_nlink == 0 else None


def dump(ctx):
    """In the freeze: whether the working directory is a deleted one."""
    st = _deleted_dir(ctx.pid, "cwd")
    if st is not None:
        ctx.record["cwd_deleted"] = {"mode": stat.S_IMODE(st.st_mode)}


def check(proc, threads):
    d = proc.get("cwd_deleted")
    if d is not None and not (isinstance(d, dict) and isinstance(d.get("mode"), int)
                              and not isinstance(d.get("mode"), bool) and 0 <= d["mode"] <= 0o7777):
        raise RestoreError("malformed image: process %s: field cwd_deleted" % proc.get("pid"))


# ------------------------------------------------------------------------ dump half (objects)
def note(obj, pid, v):
    """A mapping of a deleted file saved whole (see whole_file), into its memory object of
    tree.SharedMemory: what to read it from, its size and mode (and a memfd's seals)."""
    if "file" in obj:
        return
    path = _map_file(pid, v)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise TargetError("process %d: the deleted file %s it maps cannot be read: %s"
                          % (pid, original_name(v.path), e.strerror)) from None
    st = os.fstat(fd)
    if st.st_size > limit():
        os.close(fd)
        raise TargetError("process %d: the deleted file %s it maps has grown to %s during the dump, over the "
                          "limit of %s (CKPT_DELETED_FILE_MAX_MB); not dumped"
                          % (pid, original_name(v.path), _size(st.st_size), _size(limit())))
    obj["file"] = fd
    obj["size"] = st.st_size
    obj["mode"] = stat.S_IMODE(st.st_mode)
    if v.path.startswith("/memfd:"):
        import fcntl
        try:
            obj["seals"] = fcntl.fcntl(fd, 1034)     # F_GET_SEALS
        except OSError:
            pass


def copy(writer, obj, emit, ranges, chunk):
    """All the data of the object's file into its space of the image; returns pages."""
    from ckpt.kernel.native import PAGE_SIZE
    f = obj.pop("file")
    try:
        pages = 0
        writer.set_space(obj["space"])
        for lo, hi in ranges(f, obj["size"]):
            for off in range(lo, hi, chunk):
                data = os.pread(f, min(chunk, hi - off), off)
                data += bytes(-len(data) % PAGE_SIZE)
                if data:
                    emit(writer, off, memoryview(data))
                    pages += len(data) // PAGE_SIZE
        return pages
    finally:
        os.close(f)


def record(rec, obj):
    if "mode" in obj and not rec.get("name"):
        rec["deleted_file"] = {"path": original_name(obj["path"]), "mode": obj["mode"]}


def close(obj):
    """A dump that failed before copy(): the file opened by note() is let go."""
    f = obj.pop("file", None)
    if f is not None:
        os.close(f)


# ------------------------------------------------------------------------ restore half
def make_file(rec, creds):
    """The deleted file of shared memory record rec made again (see the module docstring), as
    the process with credentials creds; returns ckpt's fd of it, read-write, sized, empty."""
    from ckpt.restore.creds import acting_as
    from ckpt.restore.paths import O_PATH, openat2
    info = rec["deleted_file"]
    path = info.get("path") if isinstance(info, dict) else None
    if not isinstance(path, str) or not path.startswith("/"):
        raise RestoreError("malformed image: deleted file %r: not an absolute path" % (path,))
    parent, name = os.path.split(path)
    mode = info.get("mode", 0o600)
    mode = mode & 0o777 if isinstance(mode, int) else 0o600
    fd = -1
    with acting_as(creds):
        try:
            dfd = openat2(parent or "/", O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            dfd = -1
        if dfd >= 0:
            try:
                fd = os.open(".", O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dfd)
            except OSError:
                fd = -1
            try:
                if fd >= 0:
                    os.fchmod(fd, mode)
                    if name and _free(dfd, name):
                        fd = _name_and_unlink(fd, dfd, name, path)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                raise
            finally:
                os.close(dfd)
    if fd < 0:
        fd = os.memfd_create(name or "deleted", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.fchmod(fd, mode)
    try:
        os.ftruncate(fd, rec["size"])
    except BaseException:
        os.close(fd)
        raise
    return fd


def _free(dfd, name):
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
        return False
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _name_and_unlink(fd, dfd, name, path):
    """The O_TMPFILE file linked under its old name for an instant, opened by that name (an
    open file keeps the name it was opened by: /proc shows it) and unlinked: a deleted file
    of that name again. Returns that new fd (fd closed), or fd itself when the name was taken
    meanwhile (it stays unnamed)."""
    try:
        os.link("/proc/self/fd/%d" % fd, name, dst_dir_fd=dfd, follow_symlinks=True)
    except OSError:
        return fd
    mine = os.fstat(fd)
    named = -1
    try:
        named = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        st = os.fstat(named)
        if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(named)
            named = -1
    except OSError:
        named = -1
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            os.unlink(name, dir_fd=dfd)
    except OSError:
        pass
    if os.fstat(fd).st_nlink:
        if named >= 0:
            os.close(named)
        raise RestoreError("the deleted file %s, made again for the restore, could not be deleted again "
                           "(its name was replaced meanwhile)" % path)
    if named < 0:
        return fd
    os.close(fd)
    return named


def ghost_place(path):
    """(directory, name) where the deleted directory `path` is made again: its parent, or where
    that is gone too (a whole tree removed), the nearest ancestor that still exists."""
    parent, name = os.path.split(path)
    while parent not in ("", "/") and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    return parent or "/", name or "cwd"


def _may_create(path, pid):
    """Whether process pid (by its uids and gids and the directory's mode bits) may create in
    directory path."""
    try:
        st = os.stat(path)
        status = procfs.status(pid)
        fsuid = int(status["Uid"].split()[3])
        gids = {int(status["Gid"].split()[3])} | {int(g) for g in status.get("Groups", "").split()}
    except (OSError, KeyError, ValueError, IndexError):
        return False
    if fsuid == 0:
        return True
    bits = 0o300 if st.st_uid == fsuid else 0o030 if st.st_gid in gids else 0o003
    return st.st_mode & bits == bits


def ghost_dir(proc):
    """The deleted working directory of process record proc made again, entered and removed
    (see the module docstring): ckpt's O_PATH fd of it."""
    from ckpt.restore.creds import acting_as
    from ckpt.restore.paths import O_PATH, openat2
    path = original_name(proc["cwd"])
    parent, name = ghost_place(path)
    mode = proc["cwd_deleted"]["mode"] & 0o7777
    with acting_as(proc["creds"]):
        try:
            dfd = openat2(parent, O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise RestoreError("the deleted working directory %s cannot be made again: its parent directory %s: %s"
                               % (path, parent, e.strerror)) from None
        try:
            tried = [name] + [".%s.ckpt-%d-%d" % (name, os.getpid(), i) for i in range(8)]
            for n in tried:
                try:
                    os.mkdir(n, 0o700, dir_fd=dfd)
                except FileExistsError:
                    continue
                except OSError as e:
                    raise RestoreError("the deleted working directory %s cannot be made again in %s: %s"
                                       % (path, parent, e.strerror)) from None
                break
            else:
                raise RestoreError("the deleted working directory %s cannot be made again: no free name in %s"
                                   % (path, parent))
            fd = os.open(n, O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                os.chmod("/proc/self/fd/%d" % fd, mode)
                st = os.fstat(fd)
                os.rmdir(n, dir_fd=dfd)
                if os.fstat(fd).st_nlink != 0 or not stat.S_ISDIR(st.st_mode):
                    raise RestoreError("the deleted working directory %s, made again, was replaced meanwhile" % path)
            except OSError as e:
                os.close(fd)
                if e.errno == errno.ENOENT:
                    raise RestoreError("the deleted working directory %s, made again, was removed meanwhile"
                                       % path) from None
                raise
            except BaseException:
                os.close(fd)
                raise
            return fd
        finally:
            os.close(dfd)
