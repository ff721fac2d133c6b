"""One end of a shell pipeline `pipeline.py produce | pipeline.py consume OUT`.

produce writes numbered lines forever (a little at a time); consume reads them, checks that
each number follows the last one (else prints "BAD ..."), and appends "got N" to OUT every 200
lines. A dump of the shell takes the whole pipeline; after the restore, the pipe between the
two (with what it held) must still join them.
"""
import sys
import time


def produce():
    n = 0
    while True:
        n += 1
        sys.stdout.write("%d\n" % n)
        if n % 50 == 0:
            sys.stdout.flush()
            time.sleep(0.005)


def consume(out):
    want = 1
    with open(out, "a", buffering=1) as log:
        for line in sys.stdin:
            n = int(line)
            if n != want:
                log.write("BAD got %d, expected %d\n" % (n, want))
                want = n
            if n % 200 == 0:
                log.write("got %d\n" % n)
            want += 1


if __name__ == "__main__":
    produce() if sys.argv[1] == "produce" else consume(sys.argv[2])
