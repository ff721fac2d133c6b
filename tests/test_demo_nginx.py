"""demos/checkpoint_nginx.py end to end: nginx from Debian's package, a master and two workers
(one process tree), under wrk, dumped live with --verify, then dumped (killed), restored with the
same PIDs and serving again on the same port; then reloaded and stopped by nginx's own commands.

The demo's exit status is 0 only when every check passed (files served with their sha256, the
clients' connections and a half-sent request served after the restore, the shared stub_status
counter, the restored master reaping its workers on reload, ...). This module checks that, the
PIDs the demo reports before and after the restore, and that nothing is left behind: the master,
its workers and every wrk are gone and the work directory removed, also when the demo is
interrupted. No timing is asserted.
"""
import os
import re
import shutil

import pytest

from restore_support import exists
from test_demos import DEMOS, _interrupt_during_load, assert_gone, _run_demo, reaper  # noqa: F401 (reaper is a fixture)

SCRIPT = "checkpoint_nginx.py"


def _need():
    for binary in ("nginx", "wrk"):
        if not shutil.which(binary):
            pytest.skip("%s is not installed (apt-get install nginx wrk)" % binary)


def _named(out):
    """(master, workers, every PID the demo started, work directories) from its output."""
    m = re.search(r"^nginx master (\d+) workers ([\d ]+) on 127\.0\.0\.1:\d+ \(work directory (/\S+?)\)", out, re.M)
    assert m, "the demo did not name its nginx processes:\n%s" % out[-3000:]
    master, workers = int(m.group(1)), [int(x) for x in m.group(2).split()]
    pids = [master] + workers + [int(x) for x in re.findall(r"^load: wrk (\d+)", out, re.M)]
    return master, workers, pids, [m.group(3)]


def _assert_clean(out):
    _, _, pids, work = _named(out)
    assert_gone(pids, work)


def test_nginx_tree_full_cycle(reaper):  # noqa: F811
    _need()
    rc, out = _run_demo(SCRIPT, "--phase-seconds", 0.5, "--big-file-kib", 256)
    assert rc == 0, "%s exited with %d; output:\n%s" % (SCRIPT, rc, out[-8000:])
    assert re.search(r"^all \d+ checks passed$", out, re.M), out[-3000:]
    assert "FAIL" not in out, out[-8000:]
    master, workers, _, _ = _named(out)
    assert len(workers) == 2, out[-3000:]
    # the restored tree is the dumped one, PID for PID
    m = re.search(r"^restored: master (\d+) workers ([\d ]+)$", out, re.M)
    assert m and int(m.group(1)) == master and sorted(map(int, m.group(2).split())) == sorted(workers), out[-3000:]
    for row in ("  load only ", "  ckpt dump --leave-running --verify ", "  ckpt dump (kill) ", "  ckpt restore ",
                "  clients' view: dump + restore ", "  new wrk run after the restore "):
        assert row in out, "no %r row in the demo's tables:\n%s" % (row, out[-6000:])
    for check in ("the dump took the master and its 2 workers", "restored with the same PIDs",
                  "request half sent before the dump completes after the restore",
                  "stub_status counter went on and is shared by the restored workers",
                  "wrk running through the kill and restore: no error",
                  "nginx -s reload: new workers, the restored ones exited and were reaped by the restored master",
                  "nginx -s quit: the restored master exits 0 after its workers"):
        assert re.search(r"^  \[ok\] (.*: )?%s" % re.escape(check), out, re.M), \
            "no passed check %r:\n%s" % (check, out[-6000:])
    _assert_clean(out)


def test_nginx_demo_interrupted_cleans_up(reaper):  # noqa: F811
    """SIGTERM while nginx (master and workers), wrk and the probe run: the demo exits non-zero
    and leaves no nginx process, no wrk and no work directory behind."""
    _need()
    def running(out):
        master, workers, _, _ = _named(out)
        assert all(exists(x) for x in [master] + workers), out
    _interrupt_during_load([os.path.join(DEMOS, SCRIPT), "--phase-seconds", "60"], "load: wrk ", _assert_clean,
                           running)
