"""Deterministic computation in a real interpreter: threads, hashlib, json, collections, zlib.

usage: pycompute.py STEPS EVERY GATE

Three worker threads each carry a sha256 chain; in every step each worker serializes a small
document (json, sorted keys) derived from its chain and the step, hashes it ROUNDS times, and
records its result with a zlib-compressed copy of the document in a dict of deques. The main
thread meets the workers at a threading.Barrier twice per step and folds their results, in
worker order, into a blake2b digest, together with the state of an OrderedDict of the last 100
steps' documents and a Counter (both kept by the main thread only). Every EVERY steps it
prints "iter S hash H"; after STEPS steps "done H". GATE >= 0: the main thread waits for
SIGUSR2 before step GATE. Prints "ready PID" first; stdout is flushed per line.
"""
import collections
import hashlib
import json
import os
import signal
import sys
import threading
import time
import zlib

WORKERS = 3
ROUNDS = 40


def main():
    steps, every, gate = (int(a) for a in sys.argv[1:4])
    go = [False]
    signal.signal(signal.SIGUSR2, lambda *_: go.__setitem__(0, True))
    print("ready %d" % os.getpid(), flush=True)

    barrier = threading.Barrier(WORKERS + 1)
    results = {w: collections.deque(maxlen=4) for w in range(WORKERS)}
    recent = collections.OrderedDict()
    counts = collections.Counter()

    def worker(w):
        h = hashlib.sha256(b"seed %d" % w).digest()
        for s in range(steps):
            barrier.wait()
            doc = {"w": w, "s": s, "prev": h.hex(), "items": [(b * (s + 1)) % 251 for b in h]}
            for k in range(ROUNDS):
                doc["k"] = k
                h = hashlib.sha256(json.dumps(doc, sort_keys=True).encode() + h).digest()
            results[w].append((h, zlib.compress(json.dumps(doc).encode() * 4)))
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(w,), name="worker-%d" % w) for w in range(WORKERS)]
    for t in threads:
        t.start()
    total = hashlib.blake2b(b"start")
    for s in range(steps):
        if s == gate:
            while not go[0]:
                time.sleep(0.002)
        barrier.wait()
        barrier.wait()
        for w in range(WORKERS):
            h, blob = results[w][-1]
            total.update(h)
            recent[(w, s)] = blob
            recent.pop((w, s - 100), None)
            counts[h[0] % 16] += 1
        total.update(json.dumps(sorted(counts.items())).encode())
        total.update(b"%d" % sum(len(b) for b in recent.values()))
        if (s + 1) % every == 0:
            print("iter %d hash %s" % (s + 1, total.hexdigest()[:32]), flush=True)
    for t in threads:
        t.join()
    print("done %s" % total.hexdigest()[:32], flush=True)


if __name__ == "__main__":
    main()
