"""Files ckpt writes (the image, the PID file): never through a symlink, never half-written.

ckpt runs as root. A name given for output may be, or become, a symlink planted by someone
else to a file of root's; opening that name with O_TRUNC would truncate the link's target.
So nothing is ever opened under the final name: a new temporary file is created beside it
(O_CREAT|O_EXCL|O_NOFOLLOW: never an existing file, never through a link), written and
fsynced through its own fd, then renamed over the final name. rename() replaces whatever the
name is, a symlink included, and never follows it. The directory is fsynced afterwards so
that the rename itself survives a crash. Until then the final name is untouched: a failed
or interrupted write leaves no file behind and the old one as it was.

Every step works on the directory's fd and the temporary's own name, and the rename checks
that this name is still the file ckpt wrote (the same device and inode as its open fd).
"""
import os
import secrets

from ckpt.errors import CkptError


class OutFile:
    """A file being written to `path`: .fd is open read-write on the temporary; commit() puts
    it in place, abort() removes it."""

    def __init__(self, path, mode=0o600):
        self.path = os.path.abspath(path)
        self.dir, self.name = os.path.split(self.path)
        if not self.name:
            raise IsADirectoryError(21, "Is a directory", path)
        self.mode = mode
        self.fd = self.dirfd = None
        self.committed = self.aborted = False
        self.dir_syncable = True
        try:
            self.dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except PermissionError:     # writable but not readable (mode -wx): no fsync of it then
            self.dirfd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self.dir_syncable = False
        try:
            for _ in range(100):
                self.tmp_name = ".%s.tmp-%s" % (self.name[:200], secrets.token_hex(4))
                try:
                    self.fd = os.open(self.tmp_name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                      mode, dir_fd=self.dirfd)
                    break
                except FileExistsError:
                    continue
            else:
                raise FileExistsError(17, "no free temporary name", os.path.join(self.dir, self.tmp_name))
            os.fchmod(self.fd, mode)         # whatever the umask
            st = os.fstat(self.fd)
            self.ident = (st.st_dev, st.st_ino)
        except BaseException:
            self._close()
            raise

    @property
    def tmp_path(self):
        return os.path.join(self.dir, self.tmp_name)

    def _ours(self):
        """Whether the temporary's name still leads to the file ckpt created (no link)."""
        try:
            st = os.stat(self.tmp_name, dir_fd=self.dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self.ident

    def write(self, data):
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def commit(self):
        """Make the content durable and put the file in place under its final name."""
        os.fsync(self.fd)
        if not self._ours():
            raise CkptError("%s: the temporary file %s was removed or replaced while ckpt wrote it; "
                            "nothing was written" % (self.path, self.tmp_path))
        os.rename(self.tmp_name, self.name, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
        self.committed = True
        try:
            if self.dir_syncable:
                os.fsync(self.dirfd)
        finally:
            self._close()

    def abort(self):
        """Drop the temporary file (only it: a name that no longer leads to it is left alone)."""
        if self.committed or self.aborted:
            return
        self.aborted = True
        try:
            if self.dirfd is not None and self._ours():
                os.unlink(self.tmp_name, dir_fd=self.dirfd)
        except FileNotFoundError:
            pass
        finally:
            self._close()

    def _close(self):
        for attr in ("fd", "dirfd"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                try:
                    os.close(fd)
                except OSError:
                    pass


def write_file(path, data, mode=0o644, what="file"):
    """Write `data` (bytes) to path as a whole, through OutFile. CkptError names the file."""
    out = None
    try:
        out = OutFile(path, mode)
        out.write(data)
        out.commit()
    except OSError as e:
        if out is not None:
            out.abort()
        raise CkptError("cannot write the %s %s: %s" % (what, path, e.strerror or e)) from None
    except BaseException:
        if out is not None:
            out.abort()
        raise
