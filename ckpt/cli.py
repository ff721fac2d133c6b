"""ckpt command line: dump, restore, info, verify, check, demo."""
import json
import os
import signal
import sys

import click

from ckpt.errors import CkptError


class _Signals:
    """SIGINT/SIGTERM during a dump are remembered and acted on at the next safe point, so that
    the target is always released and the partial image removed."""

    def __init__(self):
        self.sig = None
        self.old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.old[s] = signal.signal(s, self._handler)
        return self

    def _handler(self, signum, frame):
        self.sig = signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def __call__(self):
        return self.sig


def _fail(e):
    click.echo("ckpt: error: %s" % e, err=True)
    sys.exit(1)


class _Progress:
    def __init__(self, enabled):
        self.enabled = enabled

    def __call__(self, info):
        if not self.enabled:
            return
        ev = info.get("event")
        if ev == "arm":
            click.echo("armed: %d pages to stream" % info["pages"], err=True)
        elif ev == "round":
            click.echo("\rround %d: %d pages in %.1f ms        " % (info["round"], info["pages"], info["ms"]),
                       err=True, nl=False)
        elif ev == "frozen":
            click.echo("\nfrozen", err=True)


@click.group()
@click.version_option(package_name="ckpt")
def main():
    """Live process checkpointer: dump a running process while it runs, freezing it only briefly."""


@main.command()
@click.argument("pid", type=int)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="image file to write")
@click.option("--leave-running", is_flag=True, help="resume the process after the dump instead of killing it")
@click.option("--max-pause", "max_pause", default=10.0, show_default=True, type=float,
              help="pause budget in ms: freeze once the predicted final copy fits")
@click.option("--rounds", default=8, show_default=True, type=click.IntRange(0, 1000),
              help="most copy rounds after round 0")
@click.option("--mode", default="auto", show_default=True,
              type=click.Choice(["auto", "async", "sync", "stop-the-world"]))
@click.option("--verify", is_flag=True, help="re-read all memory while frozen and compare it with the image")
@click.option("--compress", default="lz4", show_default=True, type=click.Choice(["lz4", "none"]))
@click.option("--single", is_flag=True,
              help="dump the process alone, not its descendants (refused where that would cut it from them)")
@click.option("--keep-tracking", is_flag=True,
              help="with --leave-running: keep write tracking armed after the dump (held by a ckpt process until "
                   "`ckpt untrack PID` or the process exits), for --parent and restore --into")
@click.option("--parent", type=click.Path(dir_okay=False),
              help="write an incremental image: only the pages written since this image (tracking kept since it)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object with the results")
def dump(pid, output, leave_running, max_pause, rounds, mode, verify, compress, single, keep_tracking, parent,
         as_json):
    """Dump process PID into an image while it keeps running."""
    from ckpt.dump.session import DumpOptions
    from ckpt.dump.session import dump as do_dump
    with _Signals() as sigs:
        opts = DumpOptions(output=output, leave_running=leave_running, max_pause_ms=max_pause, rounds=rounds,
                           mode=mode, verify=verify, compress=compress, single=single,
                           keep_tracking=keep_tracking, parent=parent,
                           progress=_Progress(sys.stderr.isatty() and not as_json), interrupted=sigs)
        try:
            res = do_dump(pid, opts)
        except CkptError as e:
            _fail(e)
    if as_json:
        click.echo(json.dumps(res))
        return
    click.echo("dumped process %d (%s mode) to %s" % (pid, res["mode"], res["image"]))
    if len(res["processes"]) > 1 or res["zombies"]:
        click.echo("  processes: %s%s" % (" ".join(map(str, res["processes"])),
                                          ("; zombies: %s" % " ".join(map(str, res["zombies"]))) if res["zombies"] else ""))
    click.echo("  rounds (pages): %s" % ", ".join(str(r) for r in res["rounds"]))
    click.echo("  freeze window: %.3f ms" % res["freeze_ms"])
    click.echo("  every stop of the target: %d, longest %.3f ms, %.3f ms in all"
               % (len(res["stops_ms"]), res["max_stop_ms"], res["stopped_total_ms"]))
    click.echo("  pages written: %d (%.1f MiB), image %.1f MiB, live copy %s GB/s, total %.2f s"
               % (res["pages_written"], res["bytes_written"] / 2**20, res["image_bytes"] / 2**20,
                  res["live_copy_gbps"], res["elapsed_s"]))
    if res.get("parent"):
        click.echo("  incremental: parent %s" % res["parent"]["path"])
    if res["verified"]:
        click.echo("  verified: %d pages equal the frozen process" % res["pages_verified"])
    click.echo("  process %s" % ("left running" if res["left_running"] else "killed"))
    if res.get("tracking"):
        click.echo("  tracking kept (holder process %d): `ckpt untrack %d` ends it" % (res["tracking"]["holder"], pid))


@main.command()
@click.argument("image", type=click.Path())
@click.option("--pidfile", type=click.Path(dir_okay=False), help="write the restored PID here")
@click.option("--foreground", is_flag=True, help="stay the parent, wait, and exit with the process's status")
@click.option("--tcp-close", is_flag=True,
              help="restore established TCP connections closed (the peer sees a reset) instead of live")
@click.option("--shell-job", is_flag=True,
              help="give the process ckpt's own terminal and standard streams where its own led out")
@click.option("--allow-file-change", is_flag=True,
              help="reopen files whose size or mtime changed since the dump (same inode; mapped files never)")
@click.option("--into", "into", type=int, default=None, metavar="PID",
              help="roll the running process PID back to the image instead of making a new one")
@click.option("--verify", is_flag=True, help="with --into: re-read all memory while frozen and compare it with the image")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object with the results")
def restore(image, pidfile, foreground, tcp_close, shell_job, allow_file_change, into, verify, as_json):
    """Bring a dumped process back: same PID and thread IDs, same memory, all threads.

    With --into PID: roll the running process PID (the image's, since changed) back to the
    image, comparing while it runs and writing only what differs in a short freeze."""
    from ckpt.restore.build import RestoreOptions
    from ckpt.restore.build import restore as do_restore
    opts = RestoreOptions(pidfile=pidfile, foreground=foreground, tcp_close=tcp_close, shell_job=shell_job,
                          allow_file_change=allow_file_change,
                          warn=lambda m: click.echo("ckpt: warning: %s" % m, err=True))
    if into is not None:
        _rollback(image, into, opts, verify, as_json)
        return
    if verify:
        _fail("--verify needs --into (a dump's --verify checks the image it writes)")
    try:
        res = do_restore(image, opts)
    except CkptError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo("restored process %d (%d threads): %d pages written in %.1f ms"
                   % (res["pid"], len(res["threads"]), res["pages_written"], res["restore_ms"]))
    sys.stdout.flush()
    if foreground:
        status = _wait_foreground(res["pid"])
        sys.exit(status)


def _rollback(image, pid, opts, verify, as_json):
    from ckpt.restore.into import rollback
    with _Signals() as sigs:
        try:
            res = rollback(image, pid, opts, interrupted=sigs, verify=verify)
        except CkptError as e:
            _fail(e)
    if as_json:
        click.echo(json.dumps(res))
        return
    click.echo("rolled process %d back to %s%s" % (pid, res["image"], " (tracking kept since its dump)"
                                                    if res["tracking"] else ""))
    click.echo("  pages compared %d, identical %d, written %d, dropped %d"
               % (res["pages_compared"], res["pages_identical"], res["pages_written"], res["pages_dropped"]))
    click.echo("  mappings unmapped %d, mapped again %d; threads ended %d, made %d; fds kept %d, made %d, closed %d"
               % (res["mappings_unmapped"], res["mappings_mapped"], len(res["threads_ended"]), len(res["threads_made"]),
                  len(res["fds_kept"]), len(res["fds_made"]), len(res["fds_closed"])))
    click.echo("  freeze window: %.3f ms, total %.2f s" % (res["freeze_ms"], res["elapsed_s"]))
    if res["verified"]:
        click.echo("  verified: %d pages equal the image" % res["pages_verified"])


def _wait_foreground(pid):
    """Wait for the restored child; its exit status, or 128 + the signal that killed it."""
    while True:
        try:
            _, st = os.waitpid(pid, 0)
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if os.WIFEXITED(st):
            return os.WEXITSTATUS(st)
        if os.WIFSIGNALED(st):
            return 128 + os.WTERMSIG(st)


@main.command()
@click.argument("image", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
def info(image, as_json):
    """Show what an image holds."""
    from ckpt.image.info import describe, printable as P
    try:
        d = describe(image)
    except CkptError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(d))      # JSON escapes control characters itself
        return
    # every string from the image is escaped: no control character reaches the terminal
    p = d["process"]
    click.echo("image %s: %d bytes, format %s, made on %s (%s)"
               % (P(image), d["bytes"], P(d["format"]), P(d["kernel"]), P(d["arch"])))
    click.echo("process %s (%s) %s" % (p.get("pid"), P(p.get("comm")), " ".join(P(a) for a in p.get("cmdline", []))))
    click.echo("  threads: %s" % ", ".join(str(t) for t in d["threads"]))
    tr = d.get("tree") or {}
    if len(tr.get("processes", [])) > 1 or tr.get("zombies"):
        click.echo("  process tree: %s%s (the mappings and fds below are process %s's)"
                   % (" ".join(str(x) for x in tr["processes"]),
                      "; zombies %s" % " ".join(str(x) for x in tr["zombies"]) if tr.get("zombies") else "",
                      p.get("pid")))
    dm = d.get("dump", {})
    click.echo("  dump mode %s, rounds (pages) %s" % (P(dm.get("mode")), [r["pages"] for r in dm.get("rounds", [])]))
    if dm.get("image_id"):
        click.echo("  image id %s" % P(dm["image_id"]))
    if dm.get("parent"):
        click.echo("  incremental: parent %s (image id %s)%s" % (P(dm["parent"]["path"]), P(dm["parent"]["image_id"]),
                                                              "; %d pages with its chain" % d["chain_pages"]
                                                              if "chain_pages" in d else ""))
        if d.get("chain_error"):
            click.echo("  chain: %s" % P(d["chain_error"]))
    click.echo("  pages held: %d (%d zero), payload %d bytes" % (d["pages"], d["zero_pages"], d["payload_bytes"]))
    click.echo("  mappings:")
    for m in d["mappings"]:
        click.echo("    %016x-%016x %s %-12s %6d pages  %s" % (m["start"], m["end"], P(m["perms"]), P(m["kind"]),
                                                             m["pages_in_image"], P(m["path"])))
    click.echo("  fds:")
    for f in d["fds"]:
        click.echo("    %3d %-10s %s" % (f["fd"], P(f["kind"]), P(f.get("path", ""))))


@main.command()
@click.argument("pid", type=int, required=False)
def unlock(pid):
    """Lift the network lock that holds a dumped process's TCP connections (all of ckpt's locks
    without PID): for when the process will not be restored."""
    from ckpt.kernel import netlock
    try:
        lifted = netlock.lift_locks(pid)
    except CkptError as e:
        _fail(e)
    for name in lifted:
        click.echo("lifted %s" % name)
    if not lifted:
        click.echo("no network lock held%s" % ("" if pid is None else " for process %d" % pid))


@main.command()
@click.argument("pid", type=int)
def untrack(pid):
    """End the write tracking kept on process PID (dump --keep-tracking): protection lifted."""
    from ckpt.dump import keep
    try:
        ended = keep.untrack(pid)
    except CkptError as e:
        _fail(e)
    if not ended:
        _fail("no tracking kept for process %d" % pid)
    click.echo("tracking of process %d ended" % pid)


@main.command()
@click.argument("image", type=click.Path())
def verify(image):
    """Check every checksum of an image, and its metadata; exit non-zero on damage."""
    from ckpt.errors import ImageError
    from ckpt.image.reader import open_chain
    try:
        with open_chain(image) as r:     # an incremental image: every image of its chain
            res = r.verify()
            missing = [k for k in ("process", "threads", "mappings", "fds") if k not in r.metas()]
        if missing:
            raise ImageError("%s: incomplete image: no %s record" % (image, ", ".join(missing)))
    except CkptError as e:
        _fail(e)
    click.echo("%s: ok (%d records, %d bytes%s)" % (image, res["records"], res["bytes"],
                                                  ", chain of %d images" % res["chain"] if res.get("chain") else ""))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def check(as_json):
    """Report what this kernel offers and which dump modes follow."""
    from ckpt.kernel.features import probe
    f = probe()
    if as_json:
        click.echo(json.dumps(f))
    else:
        click.echo("kernel %s" % f["kernel"])
        for name, c in f["checks"].items():
            click.echo("  %-22s %s%s" % (name, "yes" if c["ok"] else "no", "" if c["ok"] else "  (%s)" % c["why"]))
        click.echo("dump modes available: %s" % ", ".join(f["modes"]))
        click.echo("live mode: %s" % ("async (WP_ASYNC + PAGEMAP_SCAN)" if f["async"] else
                                       "sync (uffd-wp)" if f["sync"] else "none: stop-the-world only"))
    sys.exit(0 if (f["async"] or f["sync"]) else 1)


@main.command()
@click.option("--size-mb", default=256, show_default=True, help="memory of the built-in target")
@click.option("--workdir", default=None, type=click.Path(file_okay=False), help="where images go")
def demo(size_mb, workdir):
    """Dump a built-in target that writes memory hard, live and stop-the-world, side by side."""
    from ckpt.demo import run_demo
    try:
        ok = run_demo(size_mb=size_mb, workdir=workdir, echo=click.echo)
    except CkptError as e:
        _fail(e)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
