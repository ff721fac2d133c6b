"""A deterministic Python program whose layout, threads and fds change as it runs: the target
for rollback (`ckpt restore IMAGE --into PID`).

usage: pyroll.py STEPS EVERY CREDIT

Step s (all computed from s and the state before it, never from time):
  - rewrites 1/8 of a 8 MiB bytearray and mixes it into a blake2b digest;
  - s % 10 == 2: maps a new anonymous region ((1 + s % 5) MiB, mmap module) filled from the
    digest, unmaps the oldest when more than 3 exist, and resizes (mremap) the newest by one
    MiB when s % 20 == 12;
  - s % 10 == 4: opens this script again (an fd kept), closes the oldest when more than 2;
    every step reads 64 bytes from each kept fd at an offset from the digest (pread: the
    files must be the same ones);
  - s % 10 == 6: changes its working directory (/, /tmp, /usr in turn), which every step mixes in;
  - s % 10 == 7: starts a helper thread (it waits for an event); s % 10 == 3: the helper
    started last is given work (a sha256 chain of the digest), joined, its result mixed in.
Every EVERY steps prints "iter S hash H"; after STEPS steps "done H". The main thread starts step
s only when s < (1 + SIGUSR2s taken) * CREDIT, so a test lets it advance in bounded stretches
(SIGUSR1 lifts the limit). Prints "ready PID" first; stdout is flushed per line.
"""
import hashlib
import mmap
import os
import signal
import sys
import threading
import time

MIB = 1 << 20


def main():
    steps, every, credit = (int(a) for a in sys.argv[1:4])
    usr2 = [0]
    unlimited = [False]
    signal.signal(signal.SIGUSR2, lambda *_: usr2.__setitem__(0, usr2[0] + 1))
    signal.signal(signal.SIGUSR1, lambda *_: unlimited.__setitem__(0, True))
    print("ready %d" % os.getpid(), flush=True)
    data = bytearray(8 * MIB)
    total = hashlib.blake2b(b"start")
    regions = []
    fds = []
    helper = None
    for s in range(steps):
        while not unlimited[0] and s >= (1 + usr2[0]) * credit:
            time.sleep(0.002)
        d = total.digest()
        part = s % 8
        chunk = (d * (MIB // len(d) + 1))[:MIB]
        data[part * MIB:(part + 1) * MIB] = bytes(a ^ b for a, b in zip(chunk[:4096], data[part * MIB:part * MIB + 4096])) \
            + chunk[4096:]
        total.update(hashlib.sha256(data[part * MIB:(part + 1) * MIB]).digest())
        if s % 10 == 2:
            size = (1 + s % 5) * MIB
            m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            m[:len(d)] = d
            m[size - len(d):] = d
            regions.append(m)
            if len(regions) > 3:
                regions.pop(0).close()
            if s % 20 == 12:
                m.resize(size + MIB)
                m[size:size + len(d)] = d
        for m in regions:
            total.update(m[:len(d)])
            total.update(m[len(m) - len(d):] if len(m) % MIB == 0 else b"")
        if s % 10 == 4:
            fds.append(os.open(__file__, os.O_RDONLY))
            if len(fds) > 2:
                os.close(fds.pop(0))
        size = os.fstat(fds[0]).st_size if fds else 0
        for fd in fds:
            total.update(os.pread(fd, 64, d[0] * 7 % max(1, size - 64)))
        if s % 10 == 6:
            os.chdir(("/", "/tmp", "/usr")[(s // 10) % 3])
        total.update(os.getcwd().encode())
        if s % 10 == 7:
            ev = threading.Event()
            box = {}

            def work(ev=ev, box=box):
                ev.wait()
                h = box["seed"]
                for _ in range(200):
                    h = hashlib.sha256(h).digest()
                box["out"] = h
            helper = (threading.Thread(target=work, name="helper-%d" % s, daemon=True), ev, box)
            helper[0].start()
        if s % 10 == 3 and helper is not None:
            t, ev, box = helper
            box["seed"] = d
            ev.set()
            t.join()
            total.update(box["out"])
            helper = None
        if (s + 1) % every == 0:
            print("iter %d hash %s" % (s + 1, total.hexdigest()[:16]), flush=True)
    print("done %s" % total.hexdigest()[:16], flush=True)


if __name__ == "__main__":
    main()
