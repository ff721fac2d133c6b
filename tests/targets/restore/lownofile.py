"""A process with a low RLIMIT_NOFILE and fds near it: restore parks objects above every fd
number, which must not run into the process's own limit. On SIGUSR1 it checks its fds."""
import os
import resource
import signal
import sys

resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
r, w = os.pipe()
os.dup2(r, 38)
os.dup2(w, 39)
os.close(r)
os.close(w)
os.write(39, b"kept")
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(1))
print("ready %d" % os.getpid(), flush=True)
while not got:
    signal.pause()
print("limit %s data %r" % (resource.getrlimit(resource.RLIMIT_NOFILE), os.read(38, 10)), flush=True)
sys.exit(0)
