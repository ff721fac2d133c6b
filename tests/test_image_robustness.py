"""Images whose every checksum is right but whose content is wrong -- as anyone who can write
the file could make them -- and the files ckpt writes.

- An lz4 frame that decompresses to more than its record declares is refused in bounded
  memory (measured: the maximum RSS of the ckpt process), by `verify` and by `restore`;
  `ImageReader.verify(decompress=False)` does not decompress.
- Malformed metadata (a missing field, a wrong type, a negative or huge address, JSON nested
  200,000 deep, a number of 5,000 digits, a list where an object belongs) is one line naming
  the record and the field from `ckpt verify`, `ckpt info` and `ckpt restore`, and restore
  creates nothing; a kind of fd given bad entry data is refused naming the fd and its kind.
- `ckpt info` escapes control characters of the strings it prints from the image.
- Output files (the image, --pidfile) never follow a symlink and are never half-written.

Images are rewritten here record by record, every checksum recomputed (record crc32s, index,
chain), so that only what a test changes is wrong.
"""
import json
import os
import re
import signal
import stat
import subprocess
import time
import zlib

import lz4.frame
import pytest

from conftest import one_line_error
from restore_support import (Procs, ckpt_argv, dump, exists, kill_and_reap, read_lines, reap_killed,  # noqa: F401
                             module_procs, rs_built, run_ckpt, subreaper, wait_file_line)
from ckpt.errors import CkptError, ImageError
from ckpt.image import format as fmt
from ckpt.image.reader import ImageReader

PS = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
# a ckpt command on a bad image stays far below this (the 256 MiB lz4 bomb took 545 MB before)
RSS_LIMIT_KB = 160 * 1024


# ------------------------------------------------------------------ rewriting images
def read_image(path):
    """(header dict, [record dict]) of an image, payloads raw (as stored)."""
    with ImageReader(str(path)) as r:
        recs = []
        for rec in r.iter_records():
            recs.append({"type": rec.rtype, "comp": rec.comp, "npages": rec.npages, "addr": rec.addr,
                         "align": rec.pad > 0, "payload": r._pread(rec.payload_offset, rec.length)})
        return dict(r.header), recs


def write_image(path, header, recs):
    """An image of these records, every checksum right (header, records, index, chain)."""
    hj = json.dumps(header).encode()
    out = bytearray(fmt.HEADER_FIXED.pack(fmt.MAGIC, fmt.VERSION, len(hj)) + hj)
    out += fmt.REC_CRC.pack(zlib.crc32(out))
    chain = zlib.crc32(out)
    index = []

    def record(rtype, comp, npages, addr, payload, align=False):
        nonlocal chain
        pad = (-(len(out) + fmt.REC_SIZE)) % PS if align else 0
        start = len(out)
        head = fmt.REC.pack(rtype, comp, pad, npages, addr, len(payload), zlib.crc32(payload) if payload else 0)
        head += fmt.REC_CRC.pack(zlib.crc32(head))
        out.extend(head + bytes(pad) + payload)
        chain = zlib.crc32(head, chain)
        index.append((start, addr, npages, rtype, comp))
        return start

    for x in recs:
        record(x["type"], x["comp"], x["npages"], x["addr"], x["payload"], x["align"])
    entries = b"".join(fmt.INDEX_ENTRY.pack(o, a, n, t, c, 0) for o, a, n, t, c in index)
    trailer = record(fmt.TRAILER, fmt.NONE, 0, 0, entries)
    out += fmt.FOOTER.pack(fmt.END_MAGIC, trailer, chain, 0)
    with open(path, "wb") as f:
        f.write(out)
    return path


def meta_record(recs, name):
    """The (last) META record of that name, and its decoded data."""
    for x in reversed(recs):
        if x["type"] == fmt.META:
            doc = json.loads(x["payload"])
            if doc["name"] == name:
                return x, doc["data"]
    raise AssertionError("no %s record" % name)


def set_meta(recs, name, data=None, raw=None):
    x, _ = meta_record(recs, name)
    x["payload"] = raw if raw is not None else json.dumps({"name": name, "data": data}).encode()


def _xxh32(data, seed=0):
    """xxHash32 of a few bytes: the lz4 frame descriptor's checksum (byte 2 of 32..8 bits)."""
    p1, p2, p3, p4, p5, m = 2654435761, 2246822519, 3266489917, 668265263, 374761393, 0xFFFFFFFF

    def rotl(x, r):
        return ((x << r) | (x >> (32 - r))) & m

    assert len(data) < 16
    h = (seed + p5 + len(data)) & m
    i = 0
    while i + 4 <= len(data):
        h = (rotl((h + int.from_bytes(data[i:i + 4], "little") * p3) & m, 17) * p4) & m
        i += 4
    for b in data[i:]:
        h = (rotl((h + b * p5) & m, 11) * p1) & m
    h ^= h >> 15
    h = (h * p2) & m
    h ^= h >> 13
    h = (h * p3) & m
    return h ^ (h >> 16)


def lz4_frame(data, claim=None):
    """An lz4 frame of data; with claim, its header states that size instead (a valid header
    otherwise: its checksum is recomputed)."""
    fr = bytearray(lz4.frame.compress(data, store_size=True, content_checksum=False, block_linked=False))
    if claim is not None:
        assert fr[4] & 0x08, "no content size in the frame"
        fr[6:14] = claim.to_bytes(8, "little")
        fr[14] = (_xxh32(bytes(fr[4:14])) >> 8) & 0xFF
        assert lz4.frame.get_frame_info(bytes(fr))["content_size"] == claim
    return bytes(fr)


def used_pages_record(path, recs):
    """Index of an lz4 PAGES record whose pages restore writes (no later record supersedes it)."""
    with ImageReader(str(path)) as r:
        live = {x[2] for x in r.extents()}
    for i, x in enumerate(recs):
        if x["type"] == fmt.PAGES and x["comp"] == fmt.LZ4 and i in live and x["npages"] <= 16:
            return i
    raise AssertionError("no lz4 page record in use")


# ------------------------------------------------------------------ running ckpt, measured
def ckpt_measured(tmp_path, *args):
    """`ckpt ARGS` -> (rc, stdout, stderr, max RSS in KiB of that ckpt process alone)."""
    out, err = tmp_path / "ckpt.out", tmp_path / "ckpt.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        p = subprocess.Popen(ckpt_argv(*args), stdin=subprocess.DEVNULL, stdout=o, stderr=e, cwd="/")
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"), usage.ru_maxrss


# ------------------------------------------------------------------ a restorable image
@pytest.fixture(scope="module")
def fd_image(module_procs, tmp_path_factory):
    """An lz4 image of fdcheck (files, a directory, /dev/null, pipes with data), killed by the
    dump and reaped: its PID is free for restores. Returns (image, pid, its output file)."""
    d = tmp_path_factory.mktemp("robust")
    files = d / "files"
    files.mkdir()
    (files / "data.bin").write_bytes(bytes(((i * 7 + 3) & 0xFF) for i in range(8192)))
    out = d / "out"
    p, _ = module_procs.start("fdcheck", files, stdout=out)
    wait_file_line(out, lambda s: s.startswith("fds "), proc=p)
    img = d / "image"
    dump(p.pid, img)
    reap_killed(p)
    return img, p.pid, out


def assert_restore_refused(img, pid, pattern, tmp_path, measure=False):
    """ckpt restore IMG --pidfile F fails with one line matching pattern; afterwards no process
    has the image's PID and no PID file exists. Returns the max RSS (KiB) with measure."""
    assert not exists(pid), "PID %d is taken before the restore" % pid
    pidfile = tmp_path / "restored.pid"
    if measure:
        rc, out, err, rss = ckpt_measured(tmp_path, "restore", img, "--pidfile", pidfile)
    else:
        (rc, out, err), rss = run_ckpt("restore", img, "--pidfile", pidfile), None
    if exists(pid):
        kill_and_reap(pid)
        raise AssertionError("restore left a process with PID %d (rc %d): %s" % (pid, rc, err))
    assert rc != 0, "restore of a bad image succeeded: %s" % out
    line = one_line_error(err)
    assert re.search(pattern, line), "refusal does not say %r: %s" % (pattern, line)
    assert not pidfile.exists(), "refused, yet the PID file was written"
    return rss


# ================================================================== 1. lz4
LZ4_BAD = {
    # 256 MiB of zeros, about 1 MB compressed, in a frame that does not state its size
    "bomb-without-size": lambda n: lz4.frame.compress(bytes(256 * MIB), store_size=False),
    # a frame whose header claims 2^40 bytes (before: a MemoryError traceback)
    "claims-2^40-bytes": lambda n: lz4_frame(bytes(n * PS), claim=1 << 40),
    # a header that claims the declared size, a frame that holds 256 MiB
    "claims-right-size-holds-256MiB": lambda n: lz4_frame(bytes(256 * MIB), claim=n * PS),
}


@pytest.mark.parametrize("bad", list(LZ4_BAD))
def test_lz4_frame_larger_than_declared_is_refused(fd_image, tmp_path, bad):
    img, pid, _ = fd_image
    header, recs = read_image(img)
    i = used_pages_record(img, recs)
    recs[i]["payload"] = LZ4_BAD[bad](recs[i]["npages"])
    path = write_image(tmp_path / "image", header, recs)

    rc, out, err, rss = ckpt_measured(tmp_path, "verify", path)
    assert rc != 0, "verify passed an lz4 frame larger than its record: %s" % out
    line = one_line_error(err)
    assert re.search(r"corrupt pages record at offset \d+ \(.*lz4 frame", line), line
    assert rss < RSS_LIMIT_KB, "verify used %d MiB on a %d-byte image" % (rss // 1024, path.stat().st_size)

    rss = assert_restore_refused(path, pid, r"corrupt pages record at offset \d+ \(.*lz4 frame", tmp_path,
                                 measure=True)
    assert rss < RSS_LIMIT_KB, "restore used %d MiB on a %d-byte image" % (rss // 1024, path.stat().st_size)


def test_verify_without_decompress_honours_its_flag(fd_image, tmp_path):
    """An lz4 frame cut short (its header intact, its checksum recomputed): verify() decodes
    it and refuses, verify(decompress=False) checks only the frame header and passes."""
    img, _, _ = fd_image
    header, recs = read_image(img)
    i = used_pages_record(img, recs)
    frame = lz4_frame(bytes(range(256)) * (recs[i]["npages"] * PS // 256))
    recs[i]["payload"] = frame[:len(frame) // 2]
    path = write_image(tmp_path / "image", header, recs)
    with ImageReader(str(path)) as r:
        assert r.verify(decompress=False)["records"] == len(recs)
        with pytest.raises(ImageError, match=r"corrupt pages record .*(cut short|incomplete)"):
            r.verify()
    rc, _, err = run_ckpt("verify", path)
    assert rc != 0 and "cut short" in one_line_error(err)


def test_page_record_claiming_other_size_is_refused_without_decompressing(fd_image, tmp_path):
    """A frame whose header states a size other than its record's is refused by the header
    alone, as is an uncompressed page record whose payload is shorter than it declares."""
    img, _, _ = fd_image
    header, recs = read_image(img)
    i = used_pages_record(img, recs)
    recs[i]["payload"] = lz4_frame(bytes(recs[i]["npages"] * PS + PS))
    path = write_image(tmp_path / "image", header, recs)
    with ImageReader(str(path)) as r:
        with pytest.raises(ImageError, match=r"claims %d bytes, the record declares %d"
                           % ((recs[i]["npages"] + 1) * PS, recs[i]["npages"] * PS)):
            r.verify(decompress=False)
    header, recs = read_image(img)
    recs[i]["comp"], recs[i]["payload"] = fmt.NONE, bytes(recs[i]["npages"] * PS - PS)
    path = write_image(tmp_path / "image2", header, recs)
    with ImageReader(str(path)) as r:
        with pytest.raises(ImageError, match=r"bytes of pages, its header declares"):
            r.verify(decompress=False)


def test_image_that_is_no_regular_file(tmp_path):
    """A FIFO or a device given as the image: refused at once (the open must not block)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        for cmd in ("verify", "info"):
            rc, _, err = run_ckpt(cmd, path, timeout=60)
            assert rc != 0 and "not a regular file" in one_line_error(err), err


# ================================================================== 2. malformed metadata
DEL = object()


def _edit(data, keys, value):
    obj = data
    for k in keys[:-1]:
        obj = obj[k]
    if value is DEL:
        del obj[keys[-1]]
    else:
        obj[keys[-1]] = value(obj[keys[-1]]) if callable(value) else value


def _pipe_fd(fds):
    return next(i for i, e in enumerate(fds) if e["kind"] == "pipe" and not e.get("inherit"))


def _nested(depth):
    v = []
    for _ in range(depth):
        v = [v]
    return v


# (id, record, keys to the field (None: the record itself), new value (a callable: of the old)
# or DEL, what the error says after 'record "NAME", field ')
FIELD_CASES = [
    ("process-pid-missing", "process", ["pid"], DEL, r"pid: missing"),
    ("process-pid-string", "process", ["pid"], "1234", r'pid: expected a PID .*found "1234"'),
    ("process-pid-negative", "process", ["pid"], -5, r"pid: expected a PID"),
    ("process-cwd-number", "process", ["cwd"], 7, r"cwd: expected a string, found 7"),
    ("process-creds-string", "process", ["creds"], "root", r'creds: expected an object, found "root"'),
    ("process-uid-short", "process", ["creds", "uid"], [0, 0], r"creds.uid: expected a list of 4"),
    ("process-brk-huge", "process", ["mm", "brk"], 1 << 70, r"mm.brk: expected an integer in 0..2\^64-1"),
    ("process-a-list", "process", None, [1, 2], r"\(the record itself\): expected an object"),
    ("process-sigaction-handler", "process", ["sigactions"],
     {"10": {"handler": "x", "flags": 0, "restorer": 0, "mask": 0}},
     r"sigactions.*10.*handler: expected an integer"),
    ("threads-empty", "threads", None, [], r"\(the record itself\): expected a list of 1\.\."),
    ("threads-not-objects", "threads", [0], 5, r"\[0\]: expected an object, found 5"),
    ("thread-rip-string", "threads", [0, "regs", "rip"], "0x401000", r"\[0\].regs.rip: expected an integer"),
    ("thread-xstate-missing", "threads", [0, "xstate"], DEL, r"\[0\].xstate: missing"),
    ("thread-tid-zero", "threads", [0, "tid"], 0, r"\[0\].tid: expected a thread ID"),
    ("mapping-start-negative", "mappings", [0, "start"], -4096, r"\[0\].start: expected an integer in 0\.\."),
    ("mapping-end-2^64", "mappings", [0, "end"], 1 << 64, r"\[0\].end: expected an integer in 0\.\.2\^64-1"),
    ("mapping-kind-missing", "mappings", [2, "kind"], DEL, r"\[2\].kind: missing"),
    ("mapping-end-below-start", "mappings", [1, "end"], 4096, r"\[1\]\.end: 0x1000 is not above start"),
    ("mapping-unaligned", "mappings", [1, "start"], lambda v: v + 12, r"\[1\]: .*page-aligned"),
    ("mappings-an-object", "mappings", None, {"start": 0}, r"\(the record itself\): expected a list"),
    ("fd-number-huge", "fds", [0, "fd"], 1 << 40, r"\[0\].fd: expected an fd number"),
    ("fd-kind-number", "fds", [1, "kind"], 5, r"\[1\].kind: expected a string, found 5"),
    ("fd-flags-missing", "fds", [2, "flags"], DEL, r"\[2\].flags: missing"),
    ("fd-entry-a-string", "fds", [0], "x", r'\[0\]: expected an object, found "x"'),
]
FIELD_CASES = [(cid, name, keys, value, r'record "%s", field %s' % (name, what))
               for cid, name, keys, value, what in FIELD_CASES]
FIELD_CASES.append(("thread-of-another-process", "threads", [0, "tid"], lambda tid: tid + 1,
                    r'record "threads" has no thread \d+, the process\'s main thread'))
FIELD_CASES.append(("fd-deep-inside", "fds", [0, "extra"], _nested(100),
                    r'record "fds" \(at offset \d+\), field \[0\].extra\[0\].*nested more than 64'))


def _apply(data, keys, value):
    if keys is None:
        return value
    _edit(data, keys, value)
    return data


def _raw_cases():
    """Records whose JSON cannot even be parsed as it should."""
    deep = b"[" * 200000 + b"]" * 200000
    return [
        ("json-nested-200000-deep", "process",
         lambda raw: b'{"name":"process","data":' + deep + b"}",
         r'record "process" \(at offset \d+\): JSON nested too deeply'),
        ("json-number-5000-digits", "process",
         lambda raw: re.sub(rb'"pid":\s*\d+', b'"pid":' + b"7" * 5000, raw),
         r'record "process" \(at offset \d+\) is not valid JSON \(Exceeds the limit'),
        ("json-not-json", "threads", lambda raw: raw[:len(raw) // 2],
         r'record "threads" \(at offset \d+\) is not valid JSON'),
        ("json-not-a-record", "fds", lambda raw: b'["fds", []]',
         r'metadata record at offset \d+ is not \{"name": \.\.\., "data": \.\.\.\}'),
    ]


def _bad_image(fd_image, tmp_path, case):
    img = fd_image[0]
    header, recs = read_image(img)
    cid, name, how, value, pattern = case if len(case) == 5 else (case[0], case[1], case[2], None, case[3])
    x, data = meta_record(recs, name)
    if len(case) == 5:
        set_meta(recs, name, _apply(data, how, value))
    else:
        x["payload"] = how(x["payload"])
    return write_image(tmp_path / "image", header, recs), pattern


ALL_CASES = FIELD_CASES + _raw_cases() + [
    ("record-missing", "fds", "drop", None, r"incomplete image: no fds record"),
]


@pytest.mark.parametrize("case", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_malformed_metadata_is_one_line_from_every_command(fd_image, tmp_path, case):
    img, pid, _ = fd_image
    if case[2] == "drop":
        header, recs = read_image(img)
        x, _ = meta_record(recs, case[1])
        recs.remove(x)
        path, pattern = write_image(tmp_path / "image", header, recs), case[4]
    else:
        path, pattern = _bad_image(fd_image, tmp_path, case)
    for cmd in (["verify"], ["info"], ["info", "--json"]):
        if case[2] == "drop" and cmd[0] == "info":
            continue        # info shows an incomplete image for what it is
        rc, out, err = run_ckpt(*cmd, path)
        assert rc != 0, "ckpt %s accepted it: %s" % (" ".join(cmd), out[:300])
        line = one_line_error(err)
        assert re.search(pattern, line), "ckpt %s: %s" % (" ".join(cmd), line)
        assert str(path) in line
    assert_restore_refused(path, pid, pattern, tmp_path)


def test_header_that_is_not_as_written_is_one_line(fd_image, tmp_path):
    img = fd_image[0]
    for change, pattern in (({"page_size": "4096"}, r"header, field page_size: expected a page size"),
                            ({"page_size": 12288}, r"header, field page_size: 12288 is not a power of two"),
                            ({"format": "one"}, r"header, field format: expected an integer")):
        header, recs = read_image(img)
        header.update(change)
        path = write_image(tmp_path / "image", header, recs)
        for cmd in ("verify", "info"):
            rc, out, err = run_ckpt(cmd, path)
            assert rc != 0, out
            assert re.search(pattern, one_line_error(err)), one_line_error(err)
    header, recs = read_image(img)
    path = write_image(tmp_path / "image", [header], recs)    # a header that is a list
    rc, _, err = run_ckpt("info", path)
    assert rc != 0 and "header, field (itself): expected an object" in one_line_error(err)


PIPE_CASES = [
    ("inode-missing", ["inode"], DEL, r"KeyError: 'inode'"),
    ("data-not-base64", ["data"], "@@@not base64@@@", r"Error"),
    ("size-a-string", ["pipe_size"], "big", r"TypeError"),
]


@pytest.mark.parametrize("case", PIPE_CASES, ids=[c[0] for c in PIPE_CASES])
def test_bad_entry_of_a_kind_names_the_fd_and_kind(fd_image, tmp_path, module_procs, case):
    """Fields only a kind of fd reads (here a pipe's) are its own to check: the wrapper in
    ckpt.files turns what its restore steps raise on them into one line naming fd and kind."""
    img, pid, _ = fd_image
    header, recs = read_image(img)
    _, fds = meta_record(recs, "fds")
    inode = fds[_pipe_fd(fds)]["inode"]
    for e in fds:                       # every end of that pipe
        if e["kind"] == "pipe" and e.get("inode") == inode:
            _edit(e, case[1], case[2])
    set_meta(recs, "fds", fds)
    path = write_image(tmp_path / "image", header, recs)
    module_procs.adopt(pid)
    assert_restore_refused(path, pid, r"fd \d+ \(pipe\): malformed image entry \(.*%s" % case[3], tmp_path)


def test_rewritten_image_restores(fd_image, module_procs, tmp_path):
    """The control: the same rewriting, with nothing changed, gives an image that restores and
    whose process finds every fd as it was (so the tests above change only what they say)."""
    img, pid, out = fd_image
    header, recs = read_image(img)
    for name in ("process", "threads", "mappings", "fds"):
        set_meta(recs, name, meta_record(recs, name)[1])
    path = write_image(tmp_path / "image", header, recs)
    module_procs.adopt(pid)
    rc, so, err = run_ckpt("restore", path)
    assert rc == 0, err
    before = len(read_lines(out))
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while len(read_lines(out)) <= before:
        assert time.monotonic() < deadline, "the restored process did not answer"
        time.sleep(0.01)
    line = read_lines(out)[before]
    assert line.startswith("ok"), line
    kill_and_reap(pid)


# ================================================================== 3. info escapes
EVIL = {
    "comm": "ev\x1b]0;owned\x07il",
    "cmdline": ["prog\x1b[2J", "a\nb", "\x9b31m", "bidi\u202etxt", "lone\udcff"],
    "map": "/tmp/x\rmapped\x1b[1m",
    "fd": "/tmp/fd\x00\x7fpath\u2028",
    "mode": "async\x1bc",
}


def test_info_escapes_control_characters(fd_image, tmp_path):
    img = fd_image[0]
    header, recs = read_image(img)
    _, proc = meta_record(recs, "process")
    proc["comm"], proc["cmdline"] = EVIL["comm"], EVIL["cmdline"]
    set_meta(recs, "process", proc)
    _, maps = meta_record(recs, "mappings")
    maps[0]["path"] = EVIL["map"]
    set_meta(recs, "mappings", maps)
    _, fds = meta_record(recs, "fds")
    fds[0]["path"] = EVIL["fd"]
    set_meta(recs, "fds", fds)
    _, dm = meta_record(recs, "dump")
    dm["mode"] = EVIL["mode"]
    set_meta(recs, "dump", dm)
    path = write_image(tmp_path / "image", header, recs)

    res = subprocess.run(ckpt_argv("info", path), stdin=subprocess.DEVNULL, capture_output=True, cwd="/")
    assert res.returncode == 0, res.stderr
    text = res.stdout.decode("utf-8", errors="surrogateescape")
    bad = sorted({"U+%04X" % ord(c) for c in text if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0
                                                                  or c in "\u2028\u2029\u202e"
                                                                  or 0xD800 <= ord(c) < 0xE000)})
    assert not bad, "raw control characters reached the terminal: %s" % bad
    for shown in (r"ev\x1b]0;owned\x07il", r"prog\x1b[2J", r"a\x0ab", r"\x9b31m", r"bidi\u202etxt",
                  r"lone\udcff", r"/tmp/x\x0dmapped\x1b[1m", r"/tmp/fd\x00\x7fpath\u2028", r"async\x1bc"):
        assert shown in text, "%s not shown escaped in:\n%s" % (shown, text)

    rc, out, err = run_ckpt("info", "--json", path)
    assert rc == 0, err
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in out.rstrip("\n")), "raw control characters in JSON"
    d = json.loads(out)
    assert d["process"]["comm"] == EVIL["comm"] and d["process"]["cmdline"] == EVIL["cmdline"]


# ================================================================== 4. output files
@pytest.fixture
def victims(tmp_path):
    """Two root files with known content in a directory of root's, and a link to each where
    ckpt will be told to write."""
    vdir = tmp_path / "root-only"
    vdir.mkdir(mode=0o700)
    out = {}
    for name in ("image-victim", "pid-victim"):
        v = vdir / name
        v.write_bytes(b"precious %s\n" % name.encode())
        os.chmod(v, 0o600)
        out[name] = v
    return out


def _unchanged(victim):
    st = os.lstat(victim)
    return stat.S_ISREG(st.st_mode) and victim.read_bytes() == b"precious %s\n" % victim.name.encode()


def test_output_paths_that_are_symlinks_are_replaced_never_followed(module_procs, victims, tmp_path):
    """`dump -o LINK` and `restore --pidfile LINK`, LINK a symlink to a root file: the file is
    left as it was, LINK becomes a regular file with what ckpt wrote (0600 image, PID file)."""
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    p, _ = module_procs.start("compute", 1, 100000, 1, 1, 5, 0, stdout=out)
    wait_file_line(out, lambda s: s.startswith("iter "), proc=p)
    img = work / "image"
    os.symlink(victims["image-victim"], img)
    dump(p.pid, img)
    reap_killed(p)
    assert _unchanged(victims["image-victim"]), "dump -o wrote through the symlink"
    st = os.lstat(img)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    rc, _, err = run_ckpt("verify", img)
    assert rc == 0, err
    assert sorted(os.listdir(work)) == ["image", "out", "out.err"], "temporary files left: %s" % os.listdir(work)

    pidfile = work / "restored.pid"
    os.symlink(victims["pid-victim"], pidfile)
    module_procs.adopt(p.pid)
    rc, _, err = run_ckpt("restore", img, "--pidfile", pidfile)
    assert rc == 0, err
    assert _unchanged(victims["pid-victim"]), "--pidfile truncated or wrote the symlink's target"
    st = os.lstat(pidfile)
    assert stat.S_ISREG(st.st_mode), "the PID file is not a regular file"
    assert pidfile.read_text() == "%d\n" % p.pid
    assert stat.S_IMODE(st.st_mode) == 0o644, oct(st.st_mode)
    kill_and_reap(p.pid)


def test_write_file_replaces_links_and_files_whole(tmp_path, victims):
    from ckpt.outfile import write_file
    d = tmp_path / "out"
    d.mkdir()
    link = d / "to-victim"
    os.symlink(victims["pid-victim"], link)
    dangling = d / "dangling"
    os.symlink(tmp_path / "root-only" / "created-through-link", dangling)
    old = d / "old"
    old.write_text("a much longer previous content\n")
    old_umask = os.umask(0o077)
    try:
        for path in (link, dangling, old):
            write_file(path, b"1234\n", mode=0o644)
            st = os.lstat(path)
            assert stat.S_ISREG(st.st_mode) and path.read_bytes() == b"1234\n"
            assert stat.S_IMODE(st.st_mode) == 0o644, "mode %o despite the umask" % stat.S_IMODE(st.st_mode)
    finally:
        os.umask(old_umask)
    assert _unchanged(victims["pid-victim"])
    assert not (tmp_path / "root-only" / "created-through-link").exists(), "a dangling link was followed"
    assert sorted(os.listdir(d)) == ["dangling", "old", "to-victim"], "temporary files left"
    with pytest.raises(CkptError, match=r"cannot write the PID file .*missing-dir"):
        write_file(tmp_path / "missing-dir" / "pid", b"1\n", what="PID file")


def test_outfile_syncs_file_then_renames_then_syncs_directory(tmp_path, monkeypatch):
    from ckpt.outfile import write_file
    log = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        log.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return real_fsync(fd)

    def rename(*a, **kw):
        log.append(("rename",))
        return real_rename(*a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    write_file(tmp_path / "pid", b"1\n")
    assert log == [("fsync", "file"), ("rename",), ("fsync", "dir")], log


def test_outfile_refuses_a_temporary_replaced_meanwhile(tmp_path):
    """Someone renames their own file over the temporary's name: the rename into place is
    refused (their file would have been published under ckpt's name), and abort leaves
    their file alone."""
    from ckpt.outfile import OutFile
    out = OutFile(tmp_path / "final")
    out.write(b"ours")
    theirs = tmp_path / "theirs"
    theirs.write_bytes(b"theirs")
    os.rename(theirs, out.tmp_path)
    with pytest.raises(CkptError, match="removed or replaced"):
        out.commit()
    out.abort()
    assert not (tmp_path / "final").exists()
    assert open(out.tmp_path, "rb").read() == b"theirs"


def test_image_writer_leaves_nothing_on_abort_and_reads_through_its_fd(tmp_path):
    from ckpt.image.writer import ImageWriter
    d = tmp_path / "imgs"
    d.mkdir()
    w = ImageWriter(str(d / "image"), compress="lz4")
    w.add_meta("x", {"a": 1})
    assert stat.S_IMODE(os.stat(w.tmp_path).st_mode) == 0o600
    w.abort()
    assert os.listdir(d) == [], "abort left %s" % os.listdir(d)

    old_umask = os.umask(0)
    try:
        w = ImageWriter(str(d / "image"), compress="lz4")
    finally:
        os.umask(old_umask)
    w.add_pages(0x10000, bytes(range(256)) * 64)
    w.add_meta("x", {"a": 1})
    w.finish()
    tmp = w.tmp_path
    os.rename(tmp, d / "moved-away")            # the name no longer leads to it
    with w.reader() as r:                       # the check reads the open file all the same
        assert r.verify()["records"] == 2
        assert r.meta("x") == {"a": 1}
    with pytest.raises(CkptError, match="removed or replaced"):
        w.commit()
    w.abort()
    assert sorted(os.listdir(d)) == ["moved-away"], os.listdir(d)
    assert stat.S_IMODE(os.stat(d / "moved-away").st_mode) == 0o600
