"""Test target in Python: a dict of N keys, each holding a list derived from (key, generation),
and a list of recent entries. A worker thread keeps replacing entries and appending/trimming
the list, checking each entry it replaces. On SIGUSR1 the main thread checks the whole state
(with the worker parked) and prints "ok STEPS" or "BAD ...".

usage: pytarget.py N
"""
import os
import signal
import sys
import threading


def entry(key, gen):
    return [key, gen] + [(key * 31 + gen * 7 + i) & 0xFFFFFFFF for i in range(16)] + ["k%d-g%d" % (key, gen)]


def entry_ok(key, value):
    return isinstance(value, list) and len(value) == 19 and value[0] == key and value == entry(key, value[1])


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})   # inherited by the worker
    state = {k: entry(k, 0) for k in range(n)}
    recent = []
    lock = threading.Lock()
    errors = []
    steps = [0]

    def worker():
        import random
        rng = random.Random(1234)
        while True:
            with lock:
                for _ in range(100):
                    k = rng.randrange(n)
                    old = state[k]
                    if not entry_ok(k, old):
                        errors.append("key %d holds %r" % (k, old[:3]))
                    state[k] = entry(k, old[1] + 1)
                    recent.append((k, old[1] + 1))
                if len(recent) > 5000:
                    del recent[:2500]
                steps[0] += 1

    threading.Thread(target=worker, daemon=True).start()
    print("ready %d" % os.getpid(), flush=True)
    while True:
        signal.sigwait({signal.SIGUSR1})
        with lock:
            if len(state) != n:
                errors.append("state has %d keys, expected %d" % (len(state), n))
            for k, v in state.items():
                if not entry_ok(k, v):
                    errors.append("full check: key %d holds %r" % (k, v[:3]))
                    break
            last = {}
            for k, g in recent:
                if k in last and g <= last[k]:
                    errors.append("recent list out of order at key %d" % k)
                    break
                last[k] = g
            for k, g in last.items():
                if state[k][1] != g:
                    errors.append("key %d is at generation %d, the recent list says %d" % (k, state[k][1], g))
                    break
            done = steps[0]
        if errors:
            print("BAD %s (%d errors)" % (errors[0], len(errors)), flush=True)
        else:
            print("ok %d" % done, flush=True)


if __name__ == "__main__":
    main()
