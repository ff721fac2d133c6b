#!/usr/bin/env python3
"""Roll a live redis-server back to a snapshot after each round of a test, and compare.

Steps:
  1. start redis-server on 127.0.0.1 (a free port, no persistence, in a temporary directory);
     build a fixture data set (--keys keys of mixed types: strings, hashes, lists, sets, sorted
     sets, counters; deterministic from --seed) as one file of redis protocol and load it with
     `redis-cli --pipe`; DEBUG DIGEST and DBSIZE of the fixture
  2. open one connection and keep it idle (it must survive every rollback on the same socket)
  3. snapshot once: `ckpt dump PID -o IMG --leave-running` (with --keep-tracking where this ckpt
     offers it: then a rollback compares only the pages written since the snapshot)
  4. --rounds times: a "test" changes the data (SET, DEL, INCR, HSET, LPUSH, SADD, ZINCRBY on
     --change-percent of the keys, new keys; FLUSHDB in the middle round) through a connection
     opened after the snapshot; then `ckpt restore IMG --into PID --json` rolls redis back while
     it runs (same PID); reconnect; DEBUG DIGEST and DBSIZE equal the fixture's; the connection
     opened after the snapshot was closed by the rollback, the one opened before still answers.
     With kept tracking, one more round after `ckpt untrack PID`: a rollback comparing all pages
  5. the same data put back two other ways, in the same run: redis's own FLUSHALL and reload of
     the fixture (`redis-cli --pipe`), then a full restore (redis killed, `ckpt restore IMG`);
     each checked with DEBUG DIGEST
  6. a table: method | freeze/unavailable ms | total ms | digest ok

usage: python3 demos/rollback_redis.py [--keys 200000] [--rounds 5] [--change-percent 3]
       [--seed 1] [--small] [--keep]
Exits 0 when every check passed, 1 otherwise (130 when interrupted). Leaves no process and no
file behind, also when interrupted (SIGINT, SIGTERM, SIGHUP).
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Checks, DemoError, Run, alive, fmt_ms, free_port, log, main_wrapper,  # noqa: E402
                     table, wait_for)

try:
    import redis
except ImportError:     # pragma: no cover - the demos extra
    sys.exit("this demo needs the redis client library: pip install redis (or pip install -e '.[demos]')")

from checkpoint_redis import RedisServer  # noqa: E402

TRACKING_DIR = "/run/ckpt/tracking"
KINDS = ("string",) * 10 + ("hash",) * 4 + ("list",) * 2 + ("set",) * 2 + ("zset", "counter")
PREFIX = {"string": "s", "hash": "h", "list": "l", "set": "S", "zset": "z", "counter": "c"}


# ---------------------------------------------------------------------- the fixture
def kind_of(i):
    return KINDS[i % len(KINDS)]


def key_of(i):
    return "%s:%d" % (PREFIX[kind_of(i)], i)


def _resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, bytes):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def _text(rng, n):
    return rng.randbytes(n).hex()[:n].encode()


def write_fixture(path, keys, seed):
    """The fixture as redis protocol (one command a key), deterministic from seed. Returns bytes."""
    rng = random.Random(seed)
    size = 0
    with open(path, "wb") as f:
        for i in range(keys):
            k, kind = key_of(i), kind_of(i)
            if kind == "string":
                cmd = _resp("SET", k, rng.randbytes(rng.randrange(300, 1300)))
            elif kind == "hash":
                args = ["HSET", k]
                for j in range(8):
                    args += ["f%d" % j, _text(rng, 40)]
                cmd = _resp(*args)
            elif kind == "list":
                cmd = _resp("RPUSH", k, *[_text(rng, 30) for _ in range(8)])
            elif kind == "set":
                cmd = _resp("SADD", k, *[_text(rng, 30) for _ in range(8)])
            elif kind == "zset":
                args = ["ZADD", k]
                for _ in range(8):
                    args += ["%.3f" % (rng.random() * 1000), _text(rng, 24)]
                cmd = _resp(*args)
            else:
                cmd = _resp("SET", k, rng.randrange(1, 1 << 40))
            f.write(cmd)
            size += len(cmd)
    return size


def pipe_load(run, port, path, tag):
    """`redis-cli --pipe < path`: redis's own mass insertion. Returns seconds."""
    out_path = run.path(tag + ".out")
    t0 = time.monotonic()
    with open(path, "rb") as inp, open(out_path, "wb") as out:
        p = subprocess.Popen(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "--pipe"], stdin=inp, stdout=out,
                             stderr=subprocess.STDOUT, cwd=run.workdir, close_fds=True)
        run.popens.append((tag, p))
        rc = p.wait(timeout=600)
    secs = time.monotonic() - t0
    with open(out_path, errors="replace") as f:
        said = f.read()
    if rc != 0 or "errors: 0," not in said:
        raise DemoError("redis-cli --pipe failed (exit %d): %s" % (rc, said.strip()[-500:]))
    return secs


# ---------------------------------------------------------------------- a test round
def change_data(c, keys, seed, rnd, percent, flush):
    """One round of the "test": changes percent % of the fixture's keys (and FLUSHDB when flush),
    adds new keys. Returns the number of commands sent."""
    rng = random.Random(seed * 1000003 + rnd)
    p = c.pipeline(transaction=False)
    n = 0
    if flush:
        p.flushdb()
        n += 1
    for _ in range(max(10, keys * percent // 100)):
        i = rng.randrange(keys)
        k, kind = key_of(i), kind_of(i)
        if kind == "string":
            if rng.random() < 0.2:
                p.delete(k)
            else:
                p.set(k, rng.randbytes(rng.randrange(100, 2000)))
        elif kind == "hash":
            p.hset(k, "f%d" % rng.randrange(12), _text(rng, 40))
        elif kind == "list":
            p.lpush(k, _text(rng, 30))
        elif kind == "set":
            p.sadd(k, _text(rng, 30))
        elif kind == "zset":
            p.zincrby(k, 1.5, _text(rng, 24))
        else:
            p.incr(k)
        n += 1
        if n % 1000 == 0:
            p.execute()
    for j in range(max(5, keys // 100)):
        p.set("new:%d:%d" % (rnd, j), _text(rng, 64))
        n += 1
        if n % 1000 == 0:
            p.execute()
    p.execute()
    return n


def state(srv):
    """(DEBUG DIGEST, DBSIZE) through a new connection."""
    c = srv.client()
    try:
        return _s(c.execute_command("DEBUG", "DIGEST")), c.dbsize()
    finally:
        c.close()


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


def answers(conn):
    """PING on a raw connection: True (PONG), or the error that says why not."""
    try:
        conn.send_command("PING")
        got = conn.read_response()
        return True if got in (b"PONG", "PONG", True) else "answered %r" % (got,)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
        return "%s: %s" % (type(e).__name__, e)


def ckpt_offers(run, command, option):
    rc, out, err, _ = run.ckpt(command, "--help", tag="ckpt-help-" + command)
    return rc == 0 and option in out


def holder_of(pid):
    """The PID of the ckpt-track process keeping pid's tracking (its state file), or None."""
    try:
        with open(os.path.join(TRACKING_DIR, "%d.json" % pid)) as f:
            return int(json.load(f)["holder"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def rollback(run, image, pid, k):
    """`ckpt restore IMAGE --into PID --json`. Returns (result dict, wall seconds)."""
    rc, out, err, secs = run.ckpt("restore", image, "--into", pid, "--json", tag="restore-into-%d" % k)
    if rc != 0:
        raise DemoError("`ckpt restore %s --into %d` failed (exit %d): %s"
                        % (os.path.basename(image), pid, rc, err.strip() or out.strip()))
    res = json.loads(out)
    if err.strip():
        log("  ckpt restore --into said: %s" % err.strip())
    return res, secs


def full_restore(run, image):
    """`ckpt restore IMAGE --json --tcp-close --pidfile F`: the restored process is adopted.
    --tcp-close: the connections of the snapshot, gone by now, come back closed."""
    return run.restore(image, tag="restore-full", extra=("--tcp-close",))


# ---------------------------------------------------------------------- the demo
def run_demo(args):
    checks = Checks()
    rows = []
    with Run("rollback-redis", keep=args.keep) as run:
        srv = RedisServer(run, free_port()).start()
        log("redis-server %d on 127.0.0.1:%d (work directory %s)" % (srv.pid, srv.port, run.workdir))
        tracking = None
        try:
            if not ckpt_offers(run, "restore", "--into"):
                raise DemoError("this ckpt has no `ckpt restore IMAGE --into PID` (rollback of a live process)")
            tracking = ckpt_offers(run, "dump", "--keep-tracking")
            _body(args, run, srv, checks, rows, tracking)
        finally:
            # kept tracking ends with redis's exit: when redis still runs (a failed check, an
            # interruption), it is killed here, and the holder left to see it and remove its
            # state itself before the run's cleanup kills what is left
            holder = holder_of(srv.pid) if tracking else None
            if holder:
                if srv.proc.poll() is None:
                    run.stop(srv.proc)
                try:
                    wait_for(lambda: not alive(holder), "the tracking holder %d to exit" % holder, timeout=30)
                except DemoError as e:
                    log("warning: %s" % e)
    return checks.summary()


def _body(args, run, srv, checks, rows, tracking):
    fixture = run.path("fixture.resp")
    t = time.monotonic()
    nbytes = write_fixture(fixture, args.keys, args.seed)
    log("fixture: %d keys (strings, hashes, lists, sets, sorted sets, counters; seed %d), %.0f MiB of redis "
        "protocol, made in %.1f s" % (args.keys, args.seed, nbytes / 2**20, time.monotonic() - t))
    secs = pipe_load(run, srv.port, fixture, "load")
    digest0, size0 = state(srv)
    mem = srv.used_memory()
    log("loaded with redis-cli --pipe in %.2f s: DBSIZE %d, DEBUG DIGEST %s, used_memory %.0f MiB"
        % (secs, size0, digest0, mem / 2**20))
    checks("fixture loaded", size0 == args.keys, "DBSIZE %d, wanted %d" % (size0, args.keys))

    # one connection opened before the snapshot, idle at it: a rollback keeps it
    held = srv.connection()
    held_sock = held._sock
    held.send_command("CLIENT", "ID")
    held_id = held.read_response()
    # no other client at the snapshot (the load's connection is closed on redis's side too)
    wait_for(lambda: srv.info("clients")["connected_clients"] <= 2, "the loader's connection to close")
    time.sleep(0.2)

    img = run.path("snapshot.img")
    extra = ("--keep-tracking",) if tracking else ()
    res, secs, _, _ = run.dump(srv.pid, img, "--leave-running", *extra, tag="dump-snapshot")
    holder = holder_of(srv.pid) if tracking else None
    log("snapshot: ckpt dump %d --leave-running%s: freeze %.2f ms, image %.0f MiB, %.2f s%s"
        % (srv.pid, " --keep-tracking" if tracking else "", res["freeze_ms"], res["image_bytes"] / 2**20, secs,
           "; tracking held by ckpt-track %d" % holder if holder else ""))
    if tracking:
        checks("write tracking kept after the snapshot", holder is not None and alive(holder),
               "holder %s" % holder)
    else:
        log("  (this ckpt has no dump --keep-tracking: each rollback compares all of redis's memory)")

    flush_round = (args.rounds + 1) // 2
    rounds = [(k, k == flush_round, bool(tracking)) for k in range(1, args.rounds + 1)]
    if tracking:
        rounds.append((args.rounds + 1, False, False))     # the same once the tracking is ended
    for k, flush, tracked in rounds:
        if tracking and not tracked:
            rc, out, err, _ = run.ckpt("untrack", srv.pid, tag="ckpt-untrack")
            checks("ckpt untrack: the kept tracking ended", rc == 0 and not holder_of(srv.pid),
                   (err or out).strip())
            log("round %d: tracking ended (ckpt untrack): this rollback compares all of redis's memory" % k)
        late = srv.connection()         # opened after the snapshot: the rollback closes it
        c = srv.client()
        n = change_data(c, args.keys, args.seed, k, args.change_percent, flush=flush)
        changed, size1 = _s(c.execute_command("DEBUG", "DIGEST")), c.dbsize()
        c.close()
        checks("round %d: the test changed the data" % k, changed != digest0,
               "%d commands%s, DBSIZE %d" % (n, " with FLUSHDB" if flush else "", size1))
        late_ok = answers(late)
        res, wall = rollback(run, img, srv.pid, k)
        d, size = state(srv)        # a new connection: the round's ones are gone
        ok = d == digest0 and size == size0 and res.get("pid") == srv.pid and alive(srv.pid)
        log("rollback %d: freeze %.2f ms, total %.0f ms (ckpt %.0f ms); pages compared %s, identical %s, "
            "written %s, dropped %s; tracking %s"
            % (k, res["freeze_ms"], wall * 1000, res["elapsed_s"] * 1000, res.get("pages_compared"),
               res.get("pages_identical"), res.get("pages_written"), res.get("pages_dropped"), res.get("tracking")))
        checks("round %d: rolled back, DEBUG DIGEST and DBSIZE equal the fixture's" % k, ok,
               "digest %s, DBSIZE %d, pid %s" % (d, size, res.get("pid")))
        gone = answers(late)
        checks("round %d: the connection opened after the snapshot was closed by the rollback" % k,
               late_ok is True and gone is not True, "before: %s; after: %s" % (late_ok, gone))
        late.disconnect()
        back = answers(held)
        checks("round %d: the connection opened before the snapshot still answers on its socket" % k,
               back is True and held._sock is held_sock, str(back))
        if tracked:
            checks("round %d: the rollback compared only what was written since the snapshot" % k,
                   res.get("tracking") is True, "tracking %s, %s pages compared"
                   % (res.get("tracking"), res.get("pages_compared")))
        rows.append(["rollback %d (restore --into%s%s)" % (k, ", FLUSHDB" if flush else "",
                                                         "" if tracked else ", all pages compared"),
                     fmt_ms(res["freeze_ms"], 2), fmt_ms(wall * 1000, 0), "yes" if ok else "NO"])

    held.send_command("CLIENT", "ID")
    checks("the connection opened before the snapshot kept its CLIENT ID", held.read_response() == held_id)
    held.disconnect()

    # ---- redis's own way: FLUSHALL and load the fixture again
    c = srv.client()
    t0 = time.monotonic()
    c.flushall()
    c.close()
    pipe_load(run, srv.port, fixture, "reload")
    reload_s = time.monotonic() - t0
    d, size = state(srv)
    ok = d == digest0 and size == size0
    checks("FLUSHALL + reload: DEBUG DIGEST and DBSIZE equal the fixture's", ok, "digest %s, DBSIZE %d" % (d, size))
    log("FLUSHALL + redis-cli --pipe: %.0f ms" % (reload_s * 1000))
    rows.append(["FLUSHALL + reload (redis-cli --pipe)", fmt_ms(reload_s * 1000, 0), fmt_ms(reload_s * 1000, 0),
                 "yes" if ok else "NO"])

    # ---- a full restore: redis killed, a fresh process from the same image
    t0 = time.monotonic()
    rc = run.stop(srv.proc)
    res_r, secs_r = full_restore(run, img)
    wait_for(lambda: srv.client(timeout=10).ping(), "the restored redis to answer")
    full_s = time.monotonic() - t0
    d, size = state(srv)
    ok = d == digest0 and size == size0 and res_r["pid"] == srv.pid
    checks("full restore (killed, ckpt restore): DEBUG DIGEST and DBSIZE equal the fixture's", ok,
           "digest %s, DBSIZE %d, pid %d, exit status of the killed one %s" % (d, size, res_r["pid"], rc))
    log("full restore: kill + ckpt restore + first answer %.0f ms (ckpt restore %.2f s, restore_ms %.0f)"
        % (full_s * 1000, secs_r, res_r.get("restore_ms", 0)))
    rows.append(["full restore (kill, ckpt restore)", fmt_ms(full_s * 1000, 0), fmt_ms(full_s * 1000, 0),
                 "yes" if ok else "NO"])
    if holder:
        wait_for(lambda: not alive(holder), "the tracking holder to exit with the killed redis", timeout=30)

    freezes = [float(r[1]) for r in rows if r[0].startswith("rollback") and "all pages" not in r[0]]
    table(["method", "freeze/unavailable ms", "total ms", "digest ok"], rows,
          title="Putting the fixture back (%d keys, used_memory %.0f MiB). Rollback: redis stopped for the freeze "
                "only (median %.2f ms%s), total = `ckpt restore --into` run by the demo, process start included; "
                "reload and full restore: the data is unavailable throughout"
                % (args.keys, srv.used_memory() / 2**20, statistics.median(freezes),
                   " with kept tracking" if tracking else ""))


def main():
    ap = argparse.ArgumentParser(description="Roll a live redis-server back to a snapshot after each test round.")
    ap.add_argument("--keys", type=int, default=None, help="keys in the fixture (default 200000; 20000 with --small)")
    ap.add_argument("--rounds", type=int, default=None, help="test rounds, each rolled back (default 5; 3 with --small)")
    ap.add_argument("--change-percent", type=int, default=3, help="keys each round changes (percent)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the fixture and of the rounds' changes")
    ap.add_argument("--small", action="store_true", help="a small run (for tests): 20000 keys, 3 rounds")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, images)")
    args = ap.parse_args()
    if args.keys is None:
        args.keys = 20000 if args.small else 200000
    if args.rounds is None:
        args.rounds = 3 if args.small else 5
    if args.keys < 100 or args.rounds < 1:
        ap.error("--keys must be at least 100 and --rounds at least 1")
    main_wrapper(lambda: run_demo(args))


if __name__ == "__main__":
    main()
