"""userfaultfd in write-protect mode, as used from the checkpointer on a uffd stolen from the target."""
import os

from ckpt.kernel.native import check, ffi, lib, runs_array

ASYNC_FEATURES = lib.UFFD_FEATURE_WP_ASYNC | lib.UFFD_FEATURE_WP_UNPOPULATED
SYNC_FEATURES = lib.UFFD_FEATURE_WP_UNPOPULATED
USER_MODE_ONLY = lib.UFFD_USER_MODE_ONLY


class Uffd:
    """A userfaultfd whose mm is the target's. Closing it lifts nothing by itself: call
    unregister() on every registered range first (unregistering resolves the protection)."""

    def __init__(self, fd):
        self.fd = fd
        self.features = 0

    def api(self, features):
        box = ffi.new("uint64_t *")
        check(lib.ck_uffd_api(self.fd, features, box), "UFFDIO_API")
        self.features = box[0]
        return self.features

    def register(self, start, length):
        return lib.ck_uffd_register_wp(self.fd, start, length)

    def unregister(self, start, length):
        return lib.ck_uffd_unregister(self.fd, start, length)

    def protect(self, start, length, on=True):
        return lib.ck_uffd_wp(self.fd, start, length, 1 if on else 0)

    def protect_runs(self, runs, on=True):
        if not runs:
            return 0
        return check(lib.ck_uffd_wp_runs(self.fd, runs_array(runs), len(runs), 1 if on else 0),
                     "UFFDIO_WRITEPROTECT")

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
