"""Kinds ckpt recognises but cannot restore yet: refused at dump, before the target is touched,
naming the fd and its kind. (Sockets leading out as fd 0-2 are attached to ckpt's own stdio.)"""
from ckpt.files.base import FdKind


class OtherSocket(FdKind):
    """A socket of a family no module handles."""
    name = "socket"
    inherit_stdio = True

    @staticmethod
    def match(f):
        return f.link.startswith("socket:")


class AnonInode(FdKind):
    """An anon_inode fd of a kind no module handles (io_uring, userfaultfd, pidfd, ...)."""
    name = "anon_inode"

    @staticmethod
    def match(f):
        return f.link.startswith("anon_inode:")

    @classmethod
    def describe(cls, f):
        return {"path": f.link, "what": f.link[len("anon_inode:"):].strip("[]")}
