"""x86_64 system call numbers used by injected calls (dump and restore)."""
read, write, close, lseek, mmap, mprotect, munmap, brk = 0, 1, 3, 8, 9, 10, 11, 12
rt_sigaction, mremap, dup2, getpid = 13, 25, 33, 39
getitimer, setitimer = 36, 38
fcntl, ftruncate, chdir, umask = 72, 77, 80, 95
setpgid, setsid, setresuid, setresgid, setgroups = 109, 112, 117, 119, 116
capset, rt_sigqueueinfo, sigaltstack, prctl = 126, 129, 131, 157
set_tid_address, set_robust_list, openat, pipe2 = 218, 273, 257, 293
rt_tgsigqueueinfo, memfd_create, userfaultfd, rseq = 297, 319, 323, 334
clone3, close_range = 435, 436
socket, connect, sendto, recvfrom, sendmsg, recvmsg = 41, 42, 44, 45, 46, 47
bind, listen, setsockopt, getsockopt, ioctl = 49, 50, 54, 55, 16
epoll_ctl, epoll_create1, eventfd2, timerfd_create, timerfd_settime = 233, 291, 290, 283, 286
signalfd4, pidfd_open, pidfd_getfd = 289, 434, 438
ppoll, epoll_wait = 271, 232
shutdown, socketpair, accept4, fchownat, unlinkat, fchmodat = 48, 53, 288, 260, 263, 268
fchdir, chroot, setfsuid, setfsgid = 81, 161, 122, 123
kill, rt_sigtimedwait, setrlimit = 62, 128, 160
