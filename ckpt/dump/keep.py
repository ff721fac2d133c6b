"""Tracking kept between dumps: the write-protect tracking of a dump left armed afterwards.

`ckpt dump PID --leave-running --keep-tracking` hands the dump's userfaultfd (async uffd-wp,
its final scan re-armed in the freeze) to a small process of ckpt's, the *holder*: forked
from ckpt (double fork, setsid), it runs a few lines of Python (exec'd, so that it does not
keep ckpt's memory), named "ckpt-track" (prctl PR_SET_NAME), with nothing open but the
uffd and a pidfd of the target. It exits when the target exits (its pidfd polls readable)
or on SIGTERM (`ckpt untrack PID`, which first unregisters every mapping: the protection is
lifted); the uffd closes with it, and the kernel drops the registration.

The pages the kernel flags as written since are exactly those written since the freeze of
the image the tracking counts from, the *base*: an incremental dump (`--parent`) copies only
those, a rollback (`restore --into`) compares only those.

State: /run/ckpt/tracking/PID.json (directory 0700, file 0600, written atomically): the
holder's PID and start time, the uffd's fd number in the holder, the target's start time (a
PID used again is no confusion), the base image's id, the registered ranges.

API: find(pid) -> Held or None; hold(pid, uffd_fd, base, ranges) -> Held; untrack(pid).
"""
import fcntl
import json
import os
import secrets
import select
import signal
import sys
import time

from ckpt.errors import CkptError, TargetError
from ckpt.kernel import procfs
from ckpt.kernel.native import lib

STATE_DIR = "/run/ckpt/tracking"
HOLDER_NAME = "ckpt-track"

# what the holder runs (python3 -I -S -c): argv uffd pidfd ready-fd state-path
_HOLDER = r"""
import ctypes, json, os, select, signal, sys
uffd, pidfd, ready, state = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ctypes.CDLL(None, use_errno=True).prctl(15, b"ckpt-track", 0, 0, 0)
def bye(*_):
    try:
        with open(state) as f:
            mine = json.load(f).get("holder") == os.getpid()
        if mine:
            os.unlink(state)
            os.unlink(state[:-len(".json")] + ".lock")
    except Exception:
        pass
    os._exit(0)
signal.signal(signal.SIGTERM, bye)
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_SETMASK, [])
os.write(ready, b"ok")
os.close(ready)
p = select.poll()
p.register(pidfd, select.POLLIN)
while not p.poll():
    pass
bye()
"""


_locks = {}     # pid -> this ckpt's fd of the tracking's lock file, flock'ed


class TrackingBusy(TargetError):
    pass


def lock(pid):
    """Take the lock of process pid's kept tracking for as long as this ckpt runs: two dumps or
    rollbacks scanning one tracking at once would each take the other's written pages for
    their own (a scan re-arms them). Refused, naming it, when another ckpt holds it."""
    if pid in _locks:
        return
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(STATE_DIR, "%d.lock" % pid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TrackingBusy("process %d: another ckpt is using its kept tracking (a dump or a rollback); "
                           "try again once it is done" % pid) from None
    _locks[pid] = fd


def unlock(pid):
    """Let go of the lock of process pid's kept tracking (see lock), if this ckpt holds it."""
    fd = _locks.pop(pid, None)
    if fd is not None:
        os.close(fd)


def state_path(pid):
    return os.path.join(STATE_DIR, "%d.json" % pid)


def _start_time(pid):
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), or None if gone."""
    try:
        return int(procfs.stat_fields(pid)[22])
    except (CkptError, OSError, IndexError, ValueError):
        return None


def _comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return None


def _write_state(pid, state):
    """The state file, replaced atomically (0600 temporary beside it, fsync, rename)."""
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    os.chmod(STATE_DIR, 0o700)
    path = state_path(pid)
    tmp = "%s.tmp-%s" % (path, secrets.token_hex(4))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, json.dumps(state).encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)


def _remove_state(pid, holder=None):
    """Remove the state file (only if it still names `holder`, when given)."""
    path = state_path(pid)
    try:
        if holder is not None:
            with open(path) as f:
                if json.load(f).get("holder") != holder:
                    return
        os.unlink(path)
    except (OSError, ValueError):
        pass


class Held:
    """Tracking held for process `pid` by process `holder`, counting from image `base`."""

    def __init__(self, state):
        self.state = state
        self.pid = state["pid"]
        self.holder = state["holder"]
        self.base = state.get("base")
        self.ranges = [tuple(r) for r in state.get("ranges", [])]
        self.uffd_fd = state["uffd_fd"]

    def __repr__(self):
        return "Held(pid=%d, holder=%d, base=%r, %d ranges)" % (self.pid, self.holder, self.base, len(self.ranges))

    def _holder_pidfd(self):
        try:
            pidfd = os.pidfd_open(self.holder)
        except ProcessLookupError:
            raise TargetError("the tracking of process %d is gone (its holder %d exited)" % (self.pid, self.holder)) from None
        if _start_time(self.holder) != self.state["holder_start"]:
            os.close(pidfd)
            raise TargetError("the tracking of process %d is gone (its holder %d exited)" % (self.pid, self.holder))
        return pidfd

    def take_uffd(self):
        """A new fd of ckpt's own on the held userfaultfd (pidfd_getfd from the holder); the
        caller closes it (closing it lifts nothing: the holder keeps its own). One ckpt at a
        time: the tracking's lock is taken first (see lock)."""
        lock(self.pid)
        pidfd = self._holder_pidfd()
        try:
            fd = lib.ck_pidfd_getfd(pidfd, self.uffd_fd)
        finally:
            os.close(pidfd)
        if fd < 0:
            raise TargetError("cannot take the tracking of process %d from its holder %d: %s"
                              % (self.pid, self.holder, os.strerror(-fd)))
        return fd

    def rebase(self, image_id, ranges=None):
        """The written bits count from image `image_id`'s freeze from now on (None: from no
        image; an incremental dump or a rollback is then refused); ranges: the registered
        ranges now, if they changed."""
        self.base = image_id
        if ranges is not None:
            self.ranges = [tuple(r) for r in ranges]
        self.state = dict(self.state, base=image_id, ranges=[list(r) for r in self.ranges],
                          rebased=time.time())
        _write_state(self.pid, self.state)

    def end(self, timeout=5.0):
        """End the tracking: every mapping of the target unregistered (the protection lifted),
        then the holder stopped (its uffd closed) and the state file removed."""
        try:
            fd = self.take_uffd()
        except TrackingBusy:
            raise
        except TargetError:
            fd = None
        if fd is not None:
            from ckpt.dump.tracker import AsyncTracker
            try:
                tr = AsyncTracker.adopt(fd, self.pid, self.ranges)
            except Exception:
                tr = None       # the target is gone: nothing to unregister
                os.close(fd)
            if tr is not None:
                try:
                    tr.unregister_all()
                finally:
                    tr.release()
        try:
            pidfd = self._holder_pidfd()
        except TargetError:
            pidfd = None
        if pidfd is not None:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
                p = select.poll()
                p.register(pidfd, select.POLLIN)
                if not p.poll(int(timeout * 1000)):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    p.poll(int(timeout * 1000))
            except ProcessLookupError:
                pass
            finally:
                os.close(pidfd)
        _remove_state(self.pid, self.holder)
        if self.pid in _locks:      # ours: the lock file goes with the tracking
            try:
                os.unlink(os.path.join(STATE_DIR, "%d.lock" % self.pid))
            except OSError:
                pass
            unlock(self.pid)


def find(pid):
    """The tracking held for process pid, checked (its holder alive and the same process, the
    target the same process as when it was armed), or None; a stale state file is removed."""
    path = state_path(pid)
    try:
        with open(path) as f:
            state = json.load(f)
        ok = (isinstance(state, dict) and state.get("pid") == pid
              and all(isinstance(state.get(k), int) for k in ("holder", "holder_start", "start", "uffd_fd")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        ok = False
    if ok:
        ok = (_start_time(pid) == state["start"] and _start_time(state["holder"]) == state["holder_start"]
              and _comm(state["holder"]) == HOLDER_NAME)
    if not ok:
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    return Held(state)


def hold(pid, uffd_fd, base, ranges):
    """Hand the userfaultfd uffd_fd (ckpt's own fd on it, registered on `ranges` of process
    pid) to a new holder process; returns the Held. ckpt's fd stays open: the caller closes it
    (tracker.release()), the holder's keeps the tracking alive."""
    start = _start_time(pid)
    if start is None:
        raise TargetError("process %d exited: no tracking to keep" % pid)
    pidfd = os.pidfd_open(pid)
    r, w = os.pipe()
    holder = None
    try:
        child = os.fork()
        if child == 0:      # the first child: a new session, the holder forked from it, then gone
            code = 1
            try:
                os.setsid()
                if os.fork() == 0:
                    _exec_holder(uffd_fd, pidfd, w, state_path(pid))
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        w = None
        os.waitpid(child, 0)
        # "ok PID " from the holder before its exec, "ok" once it runs (named, fds closed)
        got = b""
        p = select.poll()
        p.register(r, select.POLLIN)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and p.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            chunk = os.read(r, 64)
            if not chunk:
                break
            got += chunk
        words = got.split()
        if len(words) >= 2 and words[1].isdigit():
            holder = int(words[1])
        if words[:1] != [b"ok"] or words[2:] != [b"ok"]:
            raise CkptError("the process that keeps the tracking of %d did not start" % pid)
        state = {"pid": pid, "start": start, "holder": holder, "holder_start": _start_time(holder),
                 "uffd_fd": uffd_fd, "base": base, "ranges": [list(x) for x in ranges], "created": time.time()}
        _write_state(pid, state)
        return Held(state)
    except BaseException:
        if holder is not None:
            try:
                os.kill(holder, signal.SIGKILL)
            except OSError:
                pass
        raise
    finally:
        os.close(pidfd)
        os.close(r)
        if w is not None:
            os.close(w)


def _exec_holder(uffd_fd, pidfd, ready, state):
    """In the holder (the second child): report its PID, keep the uffd, the pidfd and the
    ready pipe, stdio on /dev/null, nothing else open; exec the holder's few lines."""
    try:
        os.write(ready, b"ok %d " % os.getpid())
        keep = {uffd_fd, pidfd, ready}
        null = os.open("/dev/null", os.O_RDWR)
        for n in (0, 1, 2):
            if n != null:
                os.dup2(null, n, inheritable=True)
        if null > 2 and null not in keep:
            os.close(null)
        for name in os.listdir("/proc/self/fd"):
            n = int(name)
            if n > 2 and n not in keep:
                try:
                    os.close(n)
                except OSError:
                    pass
        for n in keep:
            os.set_inheritable(n, True)
        os.execve(sys.executable, [sys.executable, "-I", "-S", "-c", _HOLDER,
                                   str(uffd_fd), str(pidfd), str(ready), state],
                  {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    finally:
        os._exit(1)


def untrack(pid):
    """End the tracking kept for process pid; False when none was held."""
    held = find(pid)
    if held is None:
        return False
    held.end()
    return True
