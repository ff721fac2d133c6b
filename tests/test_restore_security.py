"""What restore trusts, tried as the owner of a dumped process would attack it (issue 7).

The target runs as nobody, root dumps and restores it. Between the two, "nobody" changes what
it can change: the paths of its own files, the image if it owns the image file. Each attack
must fail closed: refused in one line naming the path or the reason, no process created, no
file changed. And what is legitimate still restores, with nobody's rights and no more.
"""
import os
import re
import shutil
import signal
import subprocess

import pytest

from conftest import NOBODY, one_line_error
from restore_support import (alive, dump, exists, image_meta, kill_and_reap, read_lines, reap_killed,  # noqa: F401
                             procs, restore, restore_ok, rewrite_image, rs_built, subreaper, wait_file_line)

SECRET = "root's secret\n"


def _root_file(tmp_path):
    """A file only root may read or write (in pytest's root-only directory)."""
    f = tmp_path / "root-only"
    f.write_text(SECRET)
    os.chmod(f, 0o600)
    return f


def _holder(procs, d):
    """holder files FILE MAPFILE as nobody, its files and output in d (nobody's)."""
    data, mapped = d / "data", d / "mapped"
    data.write_text("start\n")
    mapped.write_bytes(bytes(4096))
    for f in (data, mapped):
        os.chown(f, NOBODY, NOBODY)
    out = d / "out"
    p, _ = procs.start("holder", "files", data, mapped, stdout=out, user="nobody", cwd=d)
    return p, out, data, mapped


def _poke(pid, out, n):
    """SIGUSR2 to the holder; its n-th "wrote" line."""
    os.kill(pid, signal.SIGUSR2)
    wrote = lambda: [x for x in read_lines(out) if x.startswith("wrote")]  # noqa: E731
    wait_file_line(out, lambda s: len(wrote()) >= n)
    return wrote()[n - 1]


def _dumped_holder(procs, tmp_path, d):
    p, out, data, mapped = _holder(procs, d)
    assert _poke(p.pid, out, 1) == "wrote 8 1 1"
    img = tmp_path / "image"
    dump(p.pid, img, "--verify")
    reap_killed(p)
    return p.pid, img, out, data, mapped


def _refused(procs, img, pid, pattern, *extra):
    rc, so, se = restore(procs, img, *extra)
    if rc == 0 and exists(pid):
        kill_and_reap(pid)
    assert rc != 0, "restore succeeded: %s" % so
    line = one_line_error(se)
    assert re.search(pattern, line), "refusal does not say why (%s): %s" % (pattern, line)
    assert not exists(pid), "refused, yet process %d exists" % pid
    return line


# ------------------------------------------------------------------ swapped paths
@pytest.mark.parametrize("which", ["open file", "mapped file", "working directory"])
def test_path_swapped_for_a_symlink_to_a_root_file_is_refused(procs, tmp_path, nobody_dir, which):
    secret = _root_file(tmp_path)
    work = nobody_dir / "work"
    work.mkdir()
    os.chown(work, NOBODY, NOBODY)
    pid, img, out, data, mapped = _dumped_holder(procs, tmp_path, work)
    victim = {"open file": data, "mapped file": mapped, "working directory": work}[which]
    if which == "working directory":
        shutil.move(str(work), str(nobody_dir / "moved"))
        os.symlink(tmp_path, victim)
    else:
        victim.unlink()
        os.symlink(secret, victim)
    _refused(procs, img, pid, "symbolic link is now on the way to %s" % re.escape(str(victim)))
    assert secret.read_text() == SECRET and os.stat(secret).st_mode & 0o777 == 0o600


def test_path_replaced_by_another_file_is_refused(procs, tmp_path, nobody_dir):
    pid, img, out, data, mapped = _dumped_holder(procs, tmp_path, nobody_dir)
    new = data.with_name("data.new")    # made while the old one exists: another inode for sure
    new.write_text("start\nw\n")        # the same size and owner
    os.chown(new, NOBODY, NOBODY)
    os.rename(new, data)
    _refused(procs, img, pid, "fd 3: file %s is another file than at the dump" % re.escape(str(data)))


def test_a_file_the_process_may_no_longer_open_is_refused(procs, tmp_path, nobody_dir):
    """Restore opens with the process's rights: root's CAP_DAC_OVERRIDE does not carry over."""
    pid, img, out, data, mapped = _dumped_holder(procs, tmp_path, nobody_dir)
    os.chmod(data, 0)
    _refused(procs, img, pid, "own user and groups may not open %s" % re.escape(str(data)))


def test_file_mapped_read_only_and_read_write_restores_with_nobodys_rights(procs, tmp_path, nobody_dir):
    """The control of the attacks above, and one file mapped shared in two access modes (opened
    once per mode): restored as nobody, it writes through both fd and map."""
    pid, img, out, data, mapped = _dumped_holder(procs, tmp_path, nobody_dir)
    restore_ok(procs, img)
    assert _poke(pid, out, 2) == "wrote 10 2 2"
    st = open("/proc/%d/status" % pid).read()
    assert re.search(r"^Uid:\s+%d\s+%d\s+%d\s+%d$" % ((NOBODY,) * 4), st, re.M), st
    assert re.search(r"^CapEff:\s+0+$", st, re.M)
    assert mapped.read_bytes()[0] == 2 and data.read_text() == "start\nw\nw\n"


# ------------------------------------------------------------------ who may restore what
def _own(img, uid, mode=0o600):
    os.chown(img, uid, uid)
    os.chmod(img, mode)


def test_image_of_its_owner_restores_with_the_owners_rights(procs, tmp_path, nobody_dir):
    pid, img, out, data, mapped = _dumped_holder(procs, tmp_path, nobody_dir)
    _own(img, NOBODY)
    restore_ok(procs, img)
    assert _poke(pid, out, 2) == "wrote 10 2 2"


@pytest.mark.parametrize("edit,pattern", [
    (lambda m: m["process"]["creds"].update(uid=[0, 0, 0, 0]), r"asks for uids 0/0/0/0, its owner is uid %d" % NOBODY),
    (lambda m: m["process"]["creds"].update(gid=[0, 0, 0, 0]), r"asks for gids 0/0/0/0"),
    (lambda m: m["process"]["creds"].update(cap_eff="00000000000000ff", cap_prm="00000000000000ff"),
     r"asks for capabilities"),
    (lambda m: m["process"].update(root="/root"), r"asks for a root directory of its own \(/root\)"),
], ids=["uid-0", "gid-0", "capabilities", "chroot"])
def test_edited_image_of_a_user_is_refused(procs, tmp_path, nobody_dir, edit, pattern):
    pid, img, out, data, mapped = _dumped_holder(procs, tmp_path, nobody_dir)
    edited = nobody_dir / "edited"
    rewrite_image(img, edited, edit)
    _own(edited, NOBODY)
    _refused(procs, edited, pid, "not root's own private file .* and it " + pattern)


def test_root_image_writable_by_others_is_not_trusted(procs, tmp_path, nobody_dir):
    pid, img, out, data, mapped = _dumped_holder(procs, tmp_path, nobody_dir)
    _own(img, 0, 0o666)
    _refused(procs, img, pid, "not root's own private file .* writable by group and others")


# ------------------------------------------------------------------ root directory
def test_chrooted_process_comes_back_in_its_root(procs, tmp_path):
    jail = tmp_path / "jail"
    jail.mkdir()
    (jail / "marker").write_text("in the jail\n")
    out = tmp_path / "out"
    p, _ = procs.start("holder", "chroot", jail, stdout=out)
    os.kill(p.pid, signal.SIGUSR2)
    assert wait_file_line(out, lambda s: s.startswith("marker"), proc=p) == "marker yes"
    img = tmp_path / "image"
    dump(p.pid, img, "--verify")
    reap_killed(p)
    assert image_meta(img)["process"]["root"] == str(jail)
    pid, _, _ = restore_ok(procs, img)
    assert os.readlink("/proc/%d/root" % pid) == str(jail)
    os.kill(pid, signal.SIGUSR2)
    assert wait_file_line(out, lambda s: s.startswith("marker") and read_lines(out).count("marker yes") == 2) \
        == "marker yes"


# ------------------------------------------------------------------ terminals and streams
def test_stream_leading_out_is_not_given_ckpts_terminal(procs, tmp_path):
    """stdout a pipe to the test (gone with the dump): without --shell-job it comes back on
    /dev/null with a warning, not on the terminal ckpt runs in."""
    p, reader = procs.start("holder", "idle", stdout=subprocess.PIPE)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    master, slave = os.openpty()
    try:
        procs.adopt(p.pid)
        res = subprocess.run(["python3", "-m", "ckpt", "restore", str(img)], stdin=slave, stdout=slave,
                             stderr=subprocess.PIPE, text=True, timeout=120, cwd="/")
    finally:
        os.close(slave)
        os.close(master)
    assert res.returncode == 0, res.stderr
    assert "fd 1 (pipe, leading out of the process) comes back on /dev/null" in res.stderr
    for fd in (0, 1):
        assert os.readlink("/proc/%d/fd/%d" % (p.pid, fd)) == "/dev/null"
    assert alive(p.pid)


def test_terminal_gone_is_refused_without_shell_job(procs, tmp_path):
    master, slave = os.openpty()
    tty = os.ttyname(slave)
    try:
        p, _ = procs.start("holder", "idle", stdout=slave)
    finally:
        os.close(slave)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    os.close(master)        # the terminal is gone
    assert not os.path.exists(tty)
    _refused(procs, img, p.pid, "fd 1: terminal %s: %s no longer exists; restore with --shell-job" % (tty, tty))
    procs.adopt(p.pid)
    # with --shell-job: ckpt's own stdout (here a file) becomes the process's
    ckout = tmp_path / "ckpt-out"
    with open(ckout, "w") as f:
        res = subprocess.run(["python3", "-m", "ckpt", "restore", str(img), "--shell-job"], stdin=subprocess.DEVNULL,
                             stdout=f, stderr=subprocess.PIPE, text=True, timeout=120, cwd="/")
    assert res.returncode == 0, res.stderr
    assert os.readlink("/proc/%d/fd/1" % p.pid) == str(ckout)
