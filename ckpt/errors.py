"""Exceptions that name the process and say what to do."""


class CkptError(Exception):
    """Base of every error ckpt reports to the user as one line."""


class TargetError(CkptError):
    """The target process cannot be dumped (gone, not traceable, unsupported state)."""


class TargetGone(TargetError):
    """The target exited while we worked on it."""


class DumpInterrupted(CkptError):
    """ckpt itself received SIGINT or SIGTERM during a dump."""


class ImageError(CkptError):
    """An image is corrupt, truncated, foreign or from an unsupported version."""


class KernelFeatureError(CkptError):
    """The running kernel lacks what the requested mode needs."""


class VerifyError(CkptError):
    """The image does not equal the frozen process memory."""


class RestoreError(CkptError):
    """A restore cannot proceed; nothing was left behind."""
