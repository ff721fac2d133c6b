/*
 * Test target: a thread group whose main thread has exited (pthread_exit) while another thread
 * runs on. /proc/PID shows a zombie leader; the process lives in its other thread.
 */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static void *run(void *arg)
{
	(void)arg;
	for (;;)
		sleep(1);
	return NULL;
}

int main(void)
{
	pthread_t t;
	pthread_create(&t, NULL, run, NULL);
	printf("ready %d\n", getpid());
	fflush(stdout);
	pthread_exit(NULL);
}
