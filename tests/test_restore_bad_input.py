"""`ckpt restore` refuses what it cannot restore faithfully, before it creates anything: a
damaged or truncated image, an image made on another kernel, architecture or page size, a
mapped file that is gone or changed, a PID or thread ID in use, a file that is no image.
Each refusal is one line on stderr naming the problem, a non-zero exit, and no process with
the image's PID or thread IDs afterwards.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import one_line_error
from restore_support import (Procs, alive, ckpt_argv, describe_status, dump, exe, exists,  # noqa: F401
                             image_meta, kill_and_reap, read_lines, reap_killed, rs_built, run_ckpt,
                             module_procs, start_time, subreaper, wait_file_line, wait_gone)
from ckpt.image import format as fmt
from ckpt.image.reader import ImageReader

# compute THREADS STEPS EVERY MIB GATE EXIT: gated early, so it waits for us at step 40
ARGS = (2, 5000, 20, 4, 40, 0)


def _has_iter(line):
    return line.startswith("iter ")


@pytest.fixture(scope="module")
def good_image(module_procs, tmp_path_factory):
    """An uncompressed image of a 2-thread target (killed by the dump and reaped): its PID and
    thread IDs are free. Returns (path, image bytes, tids)."""
    d = tmp_path_factory.mktemp("bad-input")
    out = d / "out"
    p, _ = module_procs.start("compute", *ARGS, stdout=out)
    wait_file_line(out, _has_iter, proc=p)
    img = d / "image"
    dump(p.pid, img, "--compress", "none")
    reap_killed(p)
    tids = sorted(t["tid"] for t in image_meta(img)["threads"])
    assert len(tids) == 2 and tids[0] == p.pid
    return img, img.read_bytes(), tids


def _regions(img):
    """Byte ranges of the image by what they hold: [(name, start, end)]."""
    with ImageReader(str(img)) as r:
        out = [("header", 0, r.records_start)]
        for rec in r.iter_records():
            out.append(("record-header-%s" % rec.type_name, rec.offset, rec.offset + fmt.REC_SIZE))
            if rec.length:
                out.append(("payload-%s" % rec.type_name, rec.payload_offset, rec.payload_offset + rec.length))
            if rec.pad:
                out.append(("padding", rec.offset + fmt.REC_SIZE, rec.payload_offset))
        trailer = r.trailer
        out.append(("trailer-header", trailer.offset, trailer.offset + fmt.REC_SIZE))
        out.append(("trailer-index", trailer.payload_offset, trailer.payload_offset + trailer.length))
        out.append(("footer", r.size - fmt.FOOTER.size, r.size))
    return out


STRACE = shutil.which("strace")


def _restore_watched(img, pidfile):
    """ckpt restore IMG --pidfile F, under `strace -e trace=clone3` (ckpt's own process only,
    not -f: its child is ptraced by ckpt itself) when strace exists, so that a process created
    and killed again during a refused restore is seen too. Returns (rc, stdout, stderr,
    the clone3 calls that asked for a PID (set_tid) or None without strace)."""
    argv = ckpt_argv("restore", img, "--pidfile", pidfile)
    log = None
    if STRACE:
        log = str(pidfile) + ".strace"
        argv = [STRACE, "-qq", "-e", "trace=clone3", "-o", log] + argv
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, cwd="/")
    calls = None
    if log:
        with open(log) as f:
            calls = [line.strip() for line in f if "clone3(" in line and "set_tid" in line]
        os.unlink(log)
    return res.returncode, res.stdout, res.stderr, calls


def assert_refused(img, tids, pattern):
    """ckpt restore IMG fails with one line matching pattern, and nothing was created: no
    process with the image's IDs, no pidfile, not even a process created and killed again."""
    assert not any(exists(t) for t in tids), "a process holds the image's IDs before the restore"
    pidfile = "%s.pid-%d" % (img, os.getpid())
    if os.path.isdir(img):
        pidfile = os.path.join(img, "restored.pid")
    rc, out, err, clones = _restore_watched(img, pidfile)
    pidfile_written = os.path.exists(pidfile)
    if pidfile_written:
        os.unlink(pidfile)
    if rc == 0 or any(exists(t) for t in tids):
        for t in tids:                      # whatever got created goes, but the test fails
            if exists(t):
                kill_and_reap(t)
    assert rc != 0, "restore of a bad image succeeded: %s" % out
    line = one_line_error(err)
    assert re.search(pattern, line), "refusal does not name the problem (%s): %s" % (pattern, line)
    leftover = [t for t in tids if exists(t)]
    assert not leftover, "refused, yet IDs %s exist now" % leftover
    assert not pidfile_written, "refused, yet the pidfile was written"
    assert not clones, "refused only after creating a process: %s" % clones
    return line


def test_the_undamaged_image_restores(good_image, module_procs):
    """The control: the image the damage tests start from is restorable."""
    img, _, tids = good_image
    module_procs.adopt(tids[0])
    rc, out, err = run_ckpt("restore", img)
    assert rc == 0, err
    assert alive(tids[0])
    kill_and_reap(tids[0])


REGION_KINDS = ["header", "record-header-meta", "payload-meta", "record-header-pages", "payload-pages",
                "padding", "trailer-header", "trailer-index", "footer"]


@pytest.mark.parametrize("kind", REGION_KINDS)
@settings(max_examples=3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_one_damaged_byte_is_refused(good_image, tmp_path_factory, kind, data):
    """One byte flipped anywhere (hypothesis picks which region's byte, which byte, which bits)."""
    img, raw, tids = good_image
    regions = [(s, e) for name, s, e in _regions(img) if name == kind]
    assert regions, "the image has no %s region" % kind
    start, end = data.draw(st.sampled_from(regions), label="region")
    off = data.draw(st.integers(start, end - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor")
    bad = bytearray(raw)
    bad[off] ^= mask
    path = tmp_path_factory.mktemp("damaged") / "image"
    path.write_bytes(bad)
    assert_refused(path, tids, r"corrupt|truncated|not a ckpt image|version \d+ is not supported")


@pytest.mark.parametrize("cut", ["last-byte", "footer", "half", "after-header", "five-bytes", "empty"])
def test_truncated_image_is_refused(good_image, tmp_path, cut):
    img, raw, tids = good_image
    with ImageReader(str(img)) as r:
        records_start = r.records_start
    keep = {"last-byte": len(raw) - 1, "footer": len(raw) - fmt.FOOTER.size, "half": len(raw) // 2,
            "after-header": records_start + 10, "five-bytes": 5, "empty": 0}[cut]
    path = tmp_path / "image"
    path.write_bytes(raw[:keep])
    assert_refused(path, tids, r"truncated|not a ckpt image")


def _rewrite_header(raw, **changes):
    """The image with header fields changed and every checksum made right again: the header's
    own crc32 and the chain crc32 in the footer. The JSON keeps its length (padded with
    spaces), so no offset moves."""
    magic, version, hlen = fmt.HEADER_FIXED.unpack_from(raw, 0)
    end = fmt.HEADER_FIXED.size + hlen
    header = json.loads(raw[fmt.HEADER_FIXED.size:end])
    header.update(changes)
    header["created"] = int(header["created"])
    hj = json.dumps(header, separators=(",", ":")).encode()
    assert len(hj) <= hlen, "the rewritten header does not fit"
    hj += b" " * (hlen - len(hj))
    head = raw[:fmt.HEADER_FIXED.size] + hj
    head += fmt.REC_CRC.pack(zlib.crc32(head))
    out = bytearray(head + raw[len(head):])
    _, trailer_off, _, reserved = fmt.FOOTER.unpack_from(raw, len(raw) - fmt.FOOTER.size)
    chain = zlib.crc32(head)
    # record headers in file order: every record before the trailer, from the trailer's index
    t_pad, t_len = fmt.REC.unpack_from(raw, trailer_off)[2], fmt.REC.unpack_from(raw, trailer_off)[5]
    index = raw[trailer_off + fmt.REC_SIZE + t_pad:trailer_off + fmt.REC_SIZE + t_pad + t_len]
    offsets = [fmt.INDEX_ENTRY.unpack_from(index, i)[0] for i in range(0, len(index), fmt.INDEX_ENTRY.size)]
    for off in offsets + [trailer_off]:
        chain = zlib.crc32(raw[off:off + fmt.REC_SIZE], chain)
    out[len(raw) - fmt.FOOTER.size:] = fmt.FOOTER.pack(fmt.END_MAGIC, trailer_off, chain, reserved)
    return bytes(out)


@pytest.mark.parametrize("changes,pattern", [
    ({"kernel": "5.4.0-other"}, r"kernel 5\.4\.0-other"),
    ({"arch": "aarch64"}, r"aarch64"),
    ({"page_size": 65536}, r"page size 65536"),
], ids=["kernel", "arch", "page-size"])
def test_image_from_another_machine_is_refused(good_image, tmp_path, changes, pattern):
    img, raw, tids = good_image
    path = tmp_path / "image"
    path.write_bytes(_rewrite_header(raw, **changes))
    if "page_size" not in changes:      # (verify checks page records against the page size too)
        rc, _, err = run_ckpt("verify", path)
        assert rc == 0, "the rewritten image should be consistent but for its header's claim: %s" % err
    assert_refused(path, tids, pattern)


def test_not_an_image_is_refused(tmp_path, good_image):
    _, _, tids = good_image
    text = tmp_path / "notes.txt"
    text.write_text("this is not a checkpoint image\n" * 10)
    assert_refused(text, tids, r"not a ckpt image")
    assert_refused("/bin/true", tids, r"not a ckpt image")
    assert_refused(tmp_path, tids, r"is a directory")
    assert_refused(tmp_path / "missing", tids, r"no such file")


# ------------------------------------------------------------------ mapped files
def test_missing_or_changed_mapped_file_is_refused(module_procs, tmp_path):
    """The target runs from a copy of its binary in a temporary directory. Restore refuses while
    the copy is missing, and while its mtime differs; with the file back as it was, the same
    image restores and the process runs on."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    copy = bindir / "compute-copy"
    shutil.copy2(exe("compute"), copy)
    out = tmp_path / "out"
    p, _ = module_procs.start("compute", *ARGS, stdout=out, program=copy)
    wait_file_line(out, _has_iter, proc=p)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    tids = sorted(t["tid"] for t in image_meta(img)["threads"])

    aside = tmp_path / "aside"
    os.rename(copy, aside)
    line = assert_refused(img, tids, re.escape(str(copy)) + r" no longer exists")
    os.rename(aside, copy)

    st = os.stat(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    line = assert_refused(img, tids, re.escape(str(copy)) + r" changed since the dump")
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))

    with open(copy, "ab") as f:            # a different size
        f.write(b"\0")
    line = assert_refused(img, tids, re.escape(str(copy)) + r" changed since the dump")
    os.truncate(copy, st.st_size)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))

    module_procs.adopt(p.pid)
    rc, _, err = run_ckpt("restore", img)
    assert rc == 0, "with the file as it was, restore should work: %s" % err
    os.kill(p.pid, signal.SIGUSR2)
    assert wait_gone(p.pid) in (None, 0)
    assert read_lines(out)[-1].startswith("done "), line


# ------------------------------------------------------------------ IDs in use
def test_pid_in_use_is_refused(module_procs, tmp_path):
    """After dump --leave-running the original still runs: restore must refuse and leave it be."""
    out = tmp_path / "out"
    p, _ = module_procs.start("compute", *ARGS, stdout=out)
    wait_file_line(out, _has_iter, proc=p)
    img = tmp_path / "image"
    dump(p.pid, img, "--leave-running")
    started = start_time(p.pid)
    rc, so, err, clones = _restore_watched(img, tmp_path / "pid")
    assert rc != 0, so
    line = one_line_error(err)
    assert re.search(r"PID %d is in use" % p.pid, line), line
    assert not clones, "refused only after creating a process: %s" % clones
    assert not (tmp_path / "pid").exists()
    assert p.poll() is None and alive(p.pid) and start_time(p.pid) == started, "the original was disturbed"
    os.kill(p.pid, signal.SIGUSR2)            # and it still runs to its end
    assert p.wait(timeout=120) == 0
    assert read_lines(out)[-1].startswith("done ")


def test_unreaped_original_is_refused(module_procs, tmp_path):
    """The original killed by the dump but not reaped yet holds its PID as a zombie: restore
    refuses (after a short grace period for the parent to reap it), naming the PID; once it is
    reaped, the same image restores."""
    out = tmp_path / "out"
    p, _ = module_procs.start("compute", *ARGS, stdout=out)
    wait_file_line(out, _has_iter, proc=p)
    img = tmp_path / "image"
    dump(p.pid, img)
    rc, so, err, clones = _restore_watched(img, tmp_path / "pid")
    assert rc != 0, so
    line = one_line_error(err)
    assert re.search(r"PID %d is in use" % p.pid, line), line
    assert not clones, "refused only after creating a process: %s" % clones
    reap_killed(p)
    module_procs.adopt(p.pid)
    rc, _, err = run_ckpt("restore", img)
    assert rc == 0, err
    kill_and_reap(p.pid)


def _take_pid(want, tries=20):
    """A process (sleep) with PID `want`, through ns_last_pid; None if others kept taking it."""
    for _ in range(tries):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(want - 1))
        p = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        if p.pid == want:
            return p
        p.kill()
        p.wait()
        time.sleep(0.01)
    return None


def test_thread_id_in_use_is_refused(good_image, tmp_path):
    """The image's second thread ID taken by an unrelated process: refused, nothing created."""
    img, _, tids = good_image
    squatter = _take_pid(tids[1])
    if squatter is None:
        pytest.skip("could not get PID %d for a squatter (the machine forks too much)" % tids[1])
    try:
        rc, so, err, clones = _restore_watched(img, tmp_path / "pid")
        if exists(tids[0]):
            kill_and_reap(tids[0])
        assert rc != 0, so
        line = one_line_error(err)
        assert re.search(r"PID %d is in use" % tids[1], line), line
        assert not exists(tids[0]), "refused, yet PID %d exists" % tids[0]
        assert not clones, "refused only after creating a process: %s" % clones
        assert squatter.poll() is None, "the process holding the thread ID was disturbed"
    finally:
        squatter.kill()
        squatter.wait()


# ------------------------------------------------------------------ files open at the dump
def test_missing_open_file_is_refused(module_procs, tmp_path):
    """A regular file the process had open is gone: refused, naming it; nothing left behind.
    With the file back, the same image restores."""
    d = tmp_path / "files"
    d.mkdir()
    (d / "data.bin").write_bytes(bytes(((i * 7 + 3) & 0xFF) for i in range(8192)))
    out = tmp_path / "out"
    p, _ = module_procs.start("fdcheck", d, stdout=out)
    wait_file_line(out, lambda s: s.startswith("fds "), proc=p)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    tids = [p.pid]
    os.rename(d / "data.bin", tmp_path / "aside")
    assert_refused(img, tids, re.escape(str(d / "data.bin")))
    os.rename(tmp_path / "aside", d / "data.bin")
    os.rename(d, tmp_path / "moved")
    assert_refused(img, tids, re.escape(str(d)))
    os.rename(tmp_path / "moved", d)
    module_procs.adopt(p.pid)
    rc, _, err = run_ckpt("restore", img)
    assert rc == 0, "with the files back, restore should work: %s" % err
    kill_and_reap(p.pid)


def test_missing_working_directory_is_refused(module_procs, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    p, _ = module_procs.start("compute", *ARGS, stdout=out, cwd=work)
    wait_file_line(out, _has_iter, proc=p)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    work.rmdir()
    assert_refused(img, [p.pid], r"working directory %s: %s no longer exists" % (re.escape(str(work)), re.escape(str(work))))


# ------------------------------------------------------------------ ckpt dies mid-restore
def test_ckpt_killed_mid_restore_leaves_nothing(module_procs, tmp_path):
    """ckpt restore SIGKILLed while it builds the process: the half-built process must die with
    it rather than linger (stopped, or running half-restored) with the image's PID. ckpt is
    frozen (SIGSTOP) once the new process's address space no longer holds ckpt's interpreter,
    checked to be still building it (it traces the process), then killed."""
    out = tmp_path / "out"
    p, _ = module_procs.start("compute", 1, 100000, 10, 64, 60, 0, stdout=out)     # 64 MiB to write back
    wait_file_line(out, _has_iter, proc=p)
    img = tmp_path / "image"
    dump(p.pid, img)
    reap_killed(p)
    pid = p.pid
    module_procs.adopt(pid)
    ck = module_procs.popen_ckpt("restore", img)
    while True:
        try:
            with open("/proc/%d/maps" % pid) as f:
                maps = f.read()
        except (FileNotFoundError, ProcessLookupError):
            maps = None
        if maps is not None and "python" not in maps:
            break
        assert ck.poll() is None, "ckpt ended before it could be caught building: %s" % (ck.communicate(),)
    os.kill(ck.pid, signal.SIGSTOP)
    with open("/proc/%d/status" % pid) as f:
        tracer = [int(line.split()[1]) for line in f if line.startswith("TracerPid:")][0]
    if tracer != ck.pid:
        os.kill(ck.pid, signal.SIGCONT)
        pytest.skip("ckpt had already released the process when it was caught")
    os.kill(ck.pid, signal.SIGKILL)
    ck.communicate(timeout=60)
    st = wait_gone(pid, timeout=60)
    assert st is not None, "the half-built process was not reparented to us"
    assert os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL, \
        "the half-built process outlived ckpt and ended on its own: %s" % describe_status(st)
