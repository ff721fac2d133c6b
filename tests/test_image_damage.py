"""A damaged image is refused by `ckpt verify`, with one line on stderr saying what is wrong:
one flipped byte anywhere (header, record header, payload, padding, trailer, footer), a file
cut at any length, bytes appended, and files that are no image at all."""
import os
import re
import shutil
import signal
import subprocess
import tempfile

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt.cli import main as ckpt_main
from ckpt.image import format as fmt
from ckpt.image.reader import ImageReader
from conftest import BIN, one_line_error, run_ckpt

DAMAGE = re.compile(r"corrupt|truncated")
# a flip in the first bytes can also make the file foreign or of another format version
ANY_REFUSAL = re.compile(r"corrupt|truncated|not a ckpt image|not supported")


@pytest.fixture(scope="module")
def images(targets_built, tmp_path_factory):
    """Two real images of a small writer: lz4 (the default) and --compress none (page-aligned
    payloads, with padding before them)."""
    d = tmp_path_factory.mktemp("images")
    proc = subprocess.Popen([str(BIN / "writer"), "4", "1", "1000"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        line = proc.stdout.readline().decode()
        assert line == "ready %d\n" % proc.pid, line
        out = {}
        for comp in ("lz4", "none"):
            img = d / ("writer-%s.img" % comp)
            rc, so, se = run_ckpt("dump", proc.pid, "-o", img, "--leave-running", "--compress", comp)
            assert rc == 0, se
            out[comp] = img
        return out
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def layout(path):
    """Offsets of the parts of an image, read from the intact file."""
    with ImageReader(str(path)) as r:
        recs = list(r.iter_records())
        pages = [x for x in recs if x.rtype == fmt.PAGES and x.length]
        padded = [x for x in recs if x.pad]
        return {
            "size": r.size,
            "records_start": r.records_start,
            "first_record": recs[0].offset,
            "pages": pages[0],
            "padded": padded[0] if padded else None,
            "trailer": r.trailer,
        }


def damaged_copy(src, dst, flip_at=None, truncate_to=None, append=b""):
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        if flip_at is not None:
            f.seek(flip_at)
            b = f.read(1)
            f.seek(flip_at)
            f.write(bytes([b[0] ^ 0x5A]))
        if truncate_to is not None:
            f.truncate(truncate_to)
        if append:
            f.seek(0, os.SEEK_END)
            f.write(append)
    return dst


def test_intact_images_verify(images):
    for img in images.values():
        rc, so, se = run_ckpt("verify", img)
        assert rc == 0, se
        assert so.startswith("%s: ok" % img)


def _flip_offsets(lay):
    size, pages, trailer = lay["size"], lay["pages"], lay["trailer"]
    offs = {
        "header-json": fmt.HEADER_FIXED.size + 5,
        "header-crc": lay["records_start"] - 2,
        "record-header-addr": lay["first_record"] + 10,
        "record-header-crc": lay["first_record"] + fmt.REC_SIZE - 1,
        "page-record-header": pages.offset + 4,
        "page-payload": pages.payload_offset + min(100, pages.length - 1),
        "page-payload-last-byte": pages.payload_offset + pages.length - 1,
        "trailer-header": trailer.offset + 2,
        "trailer-index": trailer.payload_offset + 9,
        "footer-magic": size - fmt.FOOTER.size,
        "footer-trailer-offset": size - fmt.FOOTER.size + 8,
        "footer-chain": size - fmt.FOOTER.size + 17,
        "footer-reserved": size - 1,
    }
    if lay["padded"] is not None:
        offs["padding"] = lay["padded"].offset + fmt.REC_SIZE + 7
    return offs


@pytest.mark.parametrize("comp", ["lz4", "none"])
def test_flipped_byte_in_each_part_is_refused(images, tmp_path, comp):
    lay = layout(images[comp])
    offsets = _flip_offsets(lay)
    if comp == "none":
        assert "padding" in offsets          # this image has padding: it must be covered too
    for part, off in offsets.items():
        bad = damaged_copy(images[comp], tmp_path / ("flip-%s" % part), flip_at=off)
        rc, so, se = run_ckpt("verify", bad)
        assert rc != 0, "a flipped byte in the %s (offset %d) went unnoticed: %s" % (part, off, so)
        line = one_line_error(se)
        assert DAMAGE.search(line), "%s: %s" % (part, line)


@pytest.mark.parametrize("comp", ["lz4", "none"])
def test_truncated_image_is_refused(images, tmp_path, comp):
    lay = layout(images[comp])
    size = lay["size"]
    lengths = {
        "header-only-part": fmt.HEADER_FIXED.size + 3,
        "header-without-crc": lay["records_start"] - 1,
        "after-header": lay["records_start"],
        "mid-record-header": lay["first_record"] + 5,
        "mid-payload": lay["pages"].payload_offset + lay["pages"].length // 2,
        "before-trailer": lay["trailer"].offset,
        "no-footer": size - fmt.FOOTER.size,
        "one-byte-short": size - 1,
    }
    for what, n in lengths.items():
        bad = damaged_copy(images[comp], tmp_path / ("cut-%s" % what), truncate_to=n)
        rc, so, se = run_ckpt("verify", bad)
        assert rc != 0, "an image cut at %d bytes (%s) passed verify" % (n, what)
        line = one_line_error(se)
        assert DAMAGE.search(line), "%s: %s" % (what, line)
    # an image cut inside its magic is simply no image
    bad = damaged_copy(images[comp], tmp_path / "cut-magic", truncate_to=5)
    rc, so, se = run_ckpt("verify", bad)
    assert rc != 0 and ANY_REFUSAL.search(one_line_error(se))


def test_bytes_appended_are_refused(images, tmp_path):
    bad = damaged_copy(images["lz4"], tmp_path / "appended", append=b"\0" * 100)
    rc, so, se = run_ckpt("verify", bad)
    assert rc != 0
    assert DAMAGE.search(one_line_error(se))


def test_not_an_image(tmp_path):
    passwd = tmp_path / "passwd"
    shutil.copyfile("/etc/passwd", passwd)
    for cmd in ("verify", "info"):
        rc, so, se = run_ckpt(cmd, passwd)
        assert rc != 0
        assert "not a ckpt image" in one_line_error(se)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    rc, so, se = run_ckpt("verify", empty)
    assert rc != 0 and "not a ckpt image" in one_line_error(se)
    rc, so, se = run_ckpt("verify", tmp_path / "missing")
    assert rc != 0 and "no such file" in one_line_error(se)
    rc, so, se = run_ckpt("verify", tmp_path)
    assert rc != 0 and "directory" in one_line_error(se)


# ------------------------------------------------------------------ property-based
# In-process through the same click command (no interpreter start per example).

def _verify_cli(path):
    res = CliRunner().invoke(ckpt_main, ["verify", str(path)])
    return res.exit_code, res.stdout, res.stderr


@pytest.mark.parametrize("comp", ["lz4", "none"])
def test_any_flipped_byte_is_detected(images, comp):
    src = images[comp]
    size = os.path.getsize(src)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(pos=st.integers(0, size - 1), mask=st.integers(1, 255))
    def check(pos, mask):
        with tempfile.TemporaryDirectory() as d:
            bad = os.path.join(d, "img")
            shutil.copyfile(src, bad)
            with open(bad, "r+b") as f:
                f.seek(pos)
                b = f.read(1)[0]
                f.seek(pos)
                f.write(bytes([b ^ mask]))
            rc, out, err = _verify_cli(bad)
            assert rc != 0, "flip of byte %d (mask %#x) not detected: %s" % (pos, mask, out)
            assert ANY_REFUSAL.search(err), err

    check()


def test_any_truncation_is_detected(images):
    src = images["lz4"]
    size = os.path.getsize(src)

    @settings(max_examples=40, deadline=None)
    @given(n=st.integers(0, size - 1))
    def check(n):
        with tempfile.TemporaryDirectory() as d:
            bad = os.path.join(d, "img")
            shutil.copyfile(src, bad)
            os.truncate(bad, n)
            rc, out, err = _verify_cli(bad)
            assert rc != 0, "image cut to %d of %d bytes passed verify" % (n, size)
            assert ANY_REFUSAL.search(err), err

    check()
