/*
 * Per task, in slurmstepd: join the container's namespaces (as root), then as the job user
 * merge the image's environment, change to the working directory, enter the user namespace
 * of --container-remap-root, set no_new_privs and drop capabilities.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/capability.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <slurm/spank.h>

#include "hpcc_spank.h"

/* The fd of the extra namespace KIND ("user", "net", "ipc", "uts") the helper sent, or -1. */
static int extra_fd(const char *kind)
{
	const char *list = reply_get("nsfds");
	size_t kl = strlen(kind);
	int i = 0;

	for (const char *p = list; p && *p && i < n_extra_fds; i++) {
		const char *e = strchr(p, ',');
		size_t l = e ? (size_t)(e - p) : strlen(p);
		if (l == kl && !strncmp(p, kind, kl))
			return extra_fds[i];
		if (!e)
			break;
		p = e + 1;
	}
	return -1;
}

/* task_init_privileged (root): the mount namespace, then those of --container-unshare. */
int task_join_namespaces(void)
{
	static const struct { const char *kind; int type; } shared[] = {
		{ "net", CLONE_NEWNET }, { "ipc", CLONE_NEWIPC }, { "uts", CLONE_NEWUTS } };

	if (ns_fd < 0)
		return 0;
	if (setns(ns_fd, CLONE_NEWNS) < 0) {
		fprintf(stderr, "hpcc: cannot enter the container: %s\n", strerror(errno));
		return -1;
	}
	close(ns_fd);
	ns_fd = -1;
	/* --container-unshare: the step's own network, IPC and UTS namespaces */
	for (size_t i = 0; i < sizeof(shared) / sizeof(shared[0]); i++) {
		int fd = extra_fd(shared[i].kind);
		if (fd >= 0 && setns(fd, shared[i].type) < 0) {
			fprintf(stderr, "hpcc: cannot enter the container's %s namespace: %s\n",
				shared[i].kind, strerror(errno));
			return -1;
		}
	}
	return 0;
}

static int name_in_list(const char *name, size_t len, const char *list)
{
	if (!list)
		return 0;
	for (const char *p = list; *p;) {
		const char *e = strchr(p, ',');
		size_t l = e ? (size_t)(e - p) : strlen(p);
		if (l == len && !strncmp(p, name, len))
			return 1;
		if (!e)
			break;
		p = e + 1;
	}
	return 0;
}

static int drop_capabilities(void)
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2];

	memset(d, 0, sizeof(d));
	for (int c = 0; c <= 63; c++)
		if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0 && errno != EINVAL && errno != EPERM)
			return -1;
	prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
	return (int)syscall(SYS_capset, &h, d);
}

/* task_init (the job user): environment, working directory, privileges. */
int task_enter(spank_t sp)
{
	const char *cwd;
	int userns, remapped;

	if (setup_failed)
		_exit(125);
	if (!reply_buf || !(cwd = reply_get("cwd")))
		return 0;
	/* Image environment (already filtered by the helper: no SLURM_*, PMI_*, ...). */
	for (size_t off = 0; off < reply_len; off += strnlen(reply_buf + off, reply_len - off) + 1) {
		char *rec = reply_buf + off, *eq;
		if (strncmp(rec, "env=", 4) || !(eq = strchr(rec + 4, '=')))
			continue;
		if (name_in_list(rec + 4, eq - (rec + 4), keep_env))
			continue;
		*eq = '\0';
		spank_setenv(sp, rec + 4, eq + 1, 1);
		*eq = '=';
	}
	for (size_t off = 0; off < reply_len; off += strnlen(reply_buf + off, reply_len - off) + 1) {
		char *rec = reply_buf + off;
		if (!strncmp(rec, "unset=", 6))
			spank_unsetenv(sp, rec + 6);
	}
	if (chdir(cwd) < 0) {
		fprintf(stderr, "hpcc: cannot change to %s inside the container: %s\n", cwd,
			strerror(errno));
		return -1;
	}
	spank_setenv(sp, "PWD", cwd, 1);
	/* --container-remap-root: as the job user (Slurm dropped root), enter the user namespace
	 * the helper made for the user (owned by them, mapping 0 to their uid and gid): the task
	 * is root there, with capabilities that count in that namespace only. */
	remapped = 0;
	if ((userns = extra_fd("user")) >= 0) {
		if (setns(userns, CLONE_NEWUSER) < 0) {
			fprintf(stderr, "hpcc: --container-remap-root: cannot enter the user "
				"namespace: %s\n", strerror(errno));
			return -1;
		}
		remapped = 1;
	}
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 || (!remapped && drop_capabilities() < 0)) {
		fprintf(stderr, "hpcc: cannot drop privileges: %s\n", strerror(errno));
		return -1;
	}
	return 0;
}
