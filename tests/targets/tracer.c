/*
 * Test helper: trace another process the way a debugger would, without stopping it.
 * PTRACE_SEIZEs PID, prints "ready PID" (its own PID) and sleeps until killed; the kernel
 * detaches the tracee when the tracer dies.
 *
 * usage: tracer PID
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	pid_t pid = (pid_t)atoi(argv[1]);
	if (ptrace(PTRACE_SEIZE, pid, 0, 0)) {
		fprintf(stderr, "PTRACE_SEIZE %d: %s\n", pid, strerror(errno));
		return 1;
	}
	printf("ready %d\n", getpid());
	fflush(stdout);
	for (;;)
		pause();
}
