"""What this kernel offers, probed once (the `ckpt check` of DESIGN section 6)."""
import ctypes
import os
import platform

from ckpt.kernel.native import ffi, lib

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_userfaultfd = 323
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000

_cache = None


def _uffd(flags):
    fd = _libc.syscall(SYS_userfaultfd, flags)
    return fd if fd >= 0 else -ctypes.get_errno()


def _uffd_features(wanted):
    """Features reported by UFFDIO_API when asking for `wanted`, or an errno string."""
    fd = _uffd(O_CLOEXEC | O_NONBLOCK | lib.UFFD_USER_MODE_ONLY)
    if fd < 0:
        fd = _uffd(O_CLOEXEC | O_NONBLOCK)
    if fd < 0:
        return None, os.strerror(-fd)
    try:
        out = ffi.new("uint64_t *")
        r = lib.ck_uffd_api(fd, wanted, out)
        if r < 0:
            return None, os.strerror(-r)
        return out[0], None
    finally:
        os.close(fd)


def _pagemap_scan():
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError as e:
        return False, e.strerror
    try:
        buf = bytearray(4096)
        start = ffi.cast("uint64_t", ffi.cast("uintptr_t", ffi.from_buffer(buf)))
        rng = ffi.new("uint64_t[]", [int(start) & ~0xFFF, (int(start) & ~0xFFF) + 4096])
        out = ffi.new("uint64_t[]", 3 * 4)
        nr, na = ffi.new("int *", 0), ffi.new("uint64_t *", 0)
        r = lib.ck_scan(fd, rng, 1, 0, 0, lib.PAGE_IS_PRESENT, 0, lib.PAGE_IS_PRESENT, out, 4, nr, na)
        return (r >= 0), (None if r >= 0 else os.strerror(-r))
    finally:
        os.close(fd)


def _pidfd_getfd():
    pidfd = lib.ck_pidfd_open(os.getpid())
    if pidfd < 0:
        return False, os.strerror(-pidfd)
    try:
        fd = lib.ck_pidfd_getfd(pidfd, 0 if _isopen(0) else pidfd)
        if fd < 0:
            return False, os.strerror(-fd)
        os.close(fd)
        return True, None
    finally:
        os.close(pidfd)


def _isopen(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _vdso_movable():
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
    except OSError as e:
        return False, e.strerror
    block = text.split("[vdso]", 1)
    if len(block) < 2:
        return False, "no vdso"
    flags = [ln for ln in block[1].splitlines() if ln.startswith("VmFlags:")]
    if flags and " sl" in flags[0]:
        return False, "the vdso is sealed (CONFIG_MSEAL_SYSTEM_MAPPINGS)"
    return True, None


def _clone3_set_tid():
    rel = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
    if rel < (5, 5):
        return False, "needs Linux 5.5"
    if os.geteuid() != 0:
        return False, "needs CAP_SYS_ADMIN (run as root)"
    return True, None


def probe(refresh=False):
    global _cache
    if _cache is not None and not refresh:
        return _cache
    feats, err = _uffd_features(0)
    wp_async = wp_unpop = wp_sync = False
    if feats is not None:
        wp_sync = bool(feats & lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        wp_async = bool(feats & lib.UFFD_FEATURE_WP_ASYNC)
        wp_unpop = bool(feats & lib.UFFD_FEATURE_WP_UNPOPULATED)
    scan_ok, scan_err = _pagemap_scan()
    getfd_ok, getfd_err = _pidfd_getfd()
    vdso_ok, vdso_err = _vdso_movable()
    clone_ok, clone_err = _clone3_set_tid()
    checks = {
        "userfaultfd": (feats is not None, err),
        "uffd_wp_async": (wp_async, None if wp_async else "UFFD_FEATURE_WP_ASYNC missing (Linux 6.7+)"),
        "uffd_wp_unpopulated": (wp_unpop, None if wp_unpop else "UFFD_FEATURE_WP_UNPOPULATED missing"),
        "uffd_wp_sync": (wp_sync, None if wp_sync else "userfaultfd write-protect missing (Linux 5.7+)"),
        "pagemap_scan": (scan_ok, scan_err),
        "pidfd_getfd": (getfd_ok, getfd_err),
        "clone3_set_tid": (clone_ok, clone_err),
        "vdso_movable": (vdso_ok, vdso_err),
    }
    async_ok = wp_async and wp_unpop and scan_ok and getfd_ok
    sync_ok = wp_sync and getfd_ok
    _cache = {
        "kernel": platform.release(),
        "uffd_features": feats or 0,
        "checks": {k: {"ok": bool(v[0]), "why": v[1]} for k, v in checks.items()},
        "async": async_ok, "sync": sync_ok, "stop-the-world": True,
        "restore": clone_ok and vdso_ok,
        "modes": [m for m, ok in (("async", async_ok), ("sync", sync_ok), ("stop-the-world", True)) if ok],
    }
    return _cache
