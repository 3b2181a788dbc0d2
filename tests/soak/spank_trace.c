/*
 * spank_trace.so: a SPANK plugin that loads another one and logs every call Slurm makes into
 * it: program, pid, thread id, SPANK context and function. It answers "which of the plugin's
 * code runs inside slurmd, and on which threads" (tests/soak/slurmd_heap.py --trace).
 *
 * plugstack.conf:  required /path/spank_trace.so real=/path/spank_hpcc.so log=/path/file ARGS
 * ARGS go to the real plugin. Only the functions spank_hpcc.so defines are forwarded, so that
 * Slurm sees the same set of entry points.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <slurm/spank.h>

SPANK_PLUGIN(hpcc_trace, 1);

typedef int (*spank_fn)(spank_t, int, char **);

static void *real;
static int log_fd = -1;   /* kept open: task_init runs inside the container's mount namespace */

static const char *ctx_name(void)
{
	switch (spank_context()) {
	case S_CTX_LOCAL: return "local";
	case S_CTX_REMOTE: return "remote";
	case S_CTX_ALLOCATOR: return "allocator";
	case S_CTX_SLURMD: return "slurmd";
	case S_CTX_JOB_SCRIPT: return "job_script";
	default: return "other";
	}
}

static void log_call(const char *fn)
{
	char comm[64] = "?", line[256];
	int fd = open("/proc/self/comm", O_RDONLY | O_CLOEXEC);

	if (fd >= 0) {
		ssize_t n = read(fd, comm, sizeof(comm) - 1);
		comm[n > 0 ? n - 1 : 0] = '\0';
		close(fd);
	}
	int len = snprintf(line, sizeof(line), "%s pid=%d tid=%ld ctx=%s %s\n", comm, (int)getpid(),
			   (long)syscall(SYS_gettid), ctx_name(), fn);
	if (log_fd >= 0 && write(log_fd, line, len) < 0)
		len = 0;
}

/* The real plugin's arguments: ours (real=, log=) removed. */
static int strip_args(int ac, char **av, char **out)
{
	int n = 0;
	for (int i = 0; i < ac; i++) {
		if (!strncmp(av[i], "real=", 5) || !strncmp(av[i], "log=", 4))
			continue;
		out[n++] = av[i];
	}
	out[n] = NULL;
	return n;
}

static int forward(const char *fn, spank_t sp, int ac, char **av)
{
	char *args[64];
	int n;
	spank_fn f;

	if (ac > 63)
		ac = 63;
	for (int i = 0; i < ac; i++) {
		if (log_fd < 0 && !strncmp(av[i], "log=", 4))
			log_fd = open(av[i] + 4, O_WRONLY | O_APPEND | O_CLOEXEC);
		if (!real && !strncmp(av[i], "real=", 5)) {
			real = dlopen(av[i] + 5, RTLD_NOW | RTLD_LOCAL);
			if (!real) {
				slurm_error("spank_trace: %s", dlerror());
				return -1;
			}
		}
	}
	log_call(fn);
	if (!real || !(f = (spank_fn)dlsym(real, fn)))
		return 0;
	n = strip_args(ac, av, args);
	return f(sp, n, args);
}

#define FORWARD(name) \
	int name(spank_t sp, int ac, char **av) { return forward(#name, sp, ac, av); }

FORWARD(slurm_spank_init)
FORWARD(slurm_spank_init_post_opt)
FORWARD(slurm_spank_local_user_init)
FORWARD(slurm_spank_user_init)
FORWARD(slurm_spank_task_init_privileged)
FORWARD(slurm_spank_task_init)
FORWARD(slurm_spank_exit)
