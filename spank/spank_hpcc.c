/*
 * spank_hpcc.so: run Slurm job steps inside hpcc container images.
 *
 * The image comes from Slurm's own --container option (inert without oci.conf; its value
 * reaches us as SLURM_CONTAINER) or from --container-image. The rest of the options use
 * names that do not collide with Slurm's.
 *
 * Per step and node, in slurmstepd (user_init), the plugin starts hpcc's Python helper
 * (`python -I -m hpcc.stepd`) as root. The helper resolves the image as the job user, builds
 * the container's mount namespace with hpcc's runtime and sends back an fd of that namespace
 * (SCM_RIGHTS) plus the image's environment and the working directory. Each task joins the
 * namespace in task_init_privileged; in task_init (already the job user) it changes to the
 * working directory, merges the environment, sets no_new_privs and drops capabilities.
 * Slurm then looks the command up and execs it inside the container. The namespace lives as
 * long as slurmstepd holds the fd and its tasks run in it: nothing to clean up afterwards.
 *
 * plugstack.conf:  required /path/spank_hpcc.so [python=/opt/hpcc/venv/bin/python3]
 *                  [config=/etc/hpcc/hpcc.toml] [server=yes|no] [pull=yes|no]
 *
 * This file holds the SPANK entry points; the parts they call are named in hpcc_spank.h.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

#include "hpcc_spank.h"

#pragma GCC visibility push(default)
SPANK_PLUGIN(hpcc, 1);
#pragma GCC visibility pop

HPCC_EXPORT int slurm_spank_init(spank_t sp, int ac, char **av)
{
	spank_context_t ctx = spank_context();

	parse_args(ac, av);
	if (ctx == S_CTX_LOCAL) {
		/* Before srun sets up the step environment: a value here was inherited. */
		const char *c = getenv("SLURM_CONTAINER");
		if (c && *c)
			inherited_container = strdup(c);
	}
	if (ctx != S_CTX_LOCAL && ctx != S_CTX_REMOTE && ctx != S_CTX_ALLOCATOR)
		return 0;
	return register_options(sp);
}

/*
 * srun inside a job started with --container=A: srun only sets SLURM_CONTAINER when it is not
 * set already, so `srun --container=B` would still show A to the nodes. The controller has the
 * step's real value; export it (a setenv here reaches the remote side). Only paid by sruns
 * that inherited a container.
 */
HPCC_EXPORT int slurm_spank_local_user_init(spank_t sp, int ac, char **av)
{
	uint32_t job_id = 0, step_id = 0;
	job_step_info_response_msg_t *resp = NULL;
	int oci = oci_conf_present();

	(void)ac; (void)av;
	if (!inherited_container && !oci)
		return 0;
	if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS)
		return 0;
	if (slurm_get_job_steps((time_t)0, job_id, step_id, &resp, SHOW_ALL) != 0 || !resp)
		return 0;
	if (resp->job_step_count >= 1) {
		const char *c = resp->job_steps[0].container;
		if (oci && c && *c && !opt_val[OPT_IMAGE]) {
			/* Slurm runs OCI bundles itself here: say so instead of failing obscurely. */
			fprintf(stderr, "hpcc: this site configures Slurm's own OCI containers "
				"(oci.conf), so --container=%s is handled by Slurm, not hpcc; use "
				"--container-image=%s for an hpcc image\n", c, c);
		} else if (inherited_container && c && *c && strcmp(c, inherited_container) != 0) {
			setenv("SLURM_CONTAINER", c, 1);
		}
	}
	slurm_free_job_step_info_response_msg(resp);
	return 0;
}

/*
 * Phase 1, init_post_opt (slurmstepd, root, early): start the helper now, so that Python's
 * start-up, the config and the image lookup overlap with Slurm's own step set-up.
 */
HPCC_EXPORT int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	char *image = NULL, *val, *err = NULL;
	const char *from = NULL;
	char buf[256];
	uid_t uid;
	gid_t gid;
	uint32_t job_id = 0, step_id = 0, node_id = 0;
	int argc = 0, sv[2];
	char **argv = NULL;
	struct argv_b a = { 0 };

	(void)ac; (void)av;
	if (!spank_remote(sp))
		return first_use(sp);
	/* the extern step (PrologFlags=contain) runs no user task */
	if (spank_get_item(sp, S_JOB_STEPID, &step_id) == ESPANK_SUCCESS &&
	    step_id == 0xfffffffcU)
		return 0;
	image = get_setting(sp, OPT_IMAGE, &from, &err);
	if (err) {
		setting_failed(err);
		goto out;
	}
	if (!image) {
		int toolong;
		char *c = job_getenv(sp, "SLURM_CONTAINER", &toolong);
		if (!c && !toolong)
			return 0;               /* not a container step */
		if (!c || !*c) {
			setting_failed(strdup(c ? "--container= (SLURM_CONTAINER) is empty: give an "
					      "image (--container=IMAGE) or leave the option out"
					      : "--container (SLURM_CONTAINER) is too long to read"));
			free(c);
			goto out;
		}
		if (oci_conf_present()) {
			/* Slurm runs the bundle itself (srun already explained it to the user). */
			slurm_info("hpcc: oci.conf present: --container=%s left to Slurm", c);
			free(c);
			return 0;
		}
		image = c;
		from = "--container";
	}

	spank_get_item(sp, S_JOB_UID, &uid);
	spank_get_item(sp, S_JOB_GID, &gid);
	spank_get_item(sp, S_JOB_ID, &job_id);
	spank_get_item(sp, S_JOB_STEPID, &step_id);
	spank_get_item(sp, S_JOB_NODEID, &node_id);
	spank_get_item(sp, S_JOB_ARGV, &argc, &argv);

	argv_add(&a, NULL, arg_python ? arg_python : DEFAULT_PYTHON);
	argv_add(&a, NULL, "-I");
	argv_add(&a, NULL, "-m");
	argv_add(&a, NULL, "hpcc.stepd");
	argv_add(&a, "image", image);
	argv_add(&a, "from_image", from);
	argv_addu(&a, "uid", uid);
	argv_addu(&a, "gid", gid);
	argv_addu(&a, "job", job_id);
	argv_addu(&a, "step", step_id);
	argv_addu(&a, "node", node_id);
	{
		Dl_info info;
		if (dladdr((void *)slurm_spank_init_post_opt, &info) && info.dli_fname &&
		    info.dli_fname[0] == '/')
			argv_add(&a, "plugin", info.dli_fname);
	}
	if (argc > 0 && argv && argv[0])
		argv_add(&a, "argv0", argv[0]);
	/* Slurm's configuration as slurmd has it, never the job's SLURM_CONF (issue: root would
	 * read, and bind directories named in, a file the user wrote). */
	if (getenv("SLURM_CONF") && getenv("SLURM_CONF")[0] == '/')
		argv_add(&a, "slurm_conf", getenv("SLURM_CONF"));
	for (int i = 0; i < OPT_N; i++) {
		char fromkey[96];

		if (i == OPT_IMAGE)
			continue;
		val = get_setting(sp, i, &from, &err);
		if (err) {
			setting_failed(err);
			goto out;
		}
		if (!val)
			continue;
		if (settings[i].kind == K_BOOL) {
			argv_add(&a, settings[i].key, parse_bool(val) == 1 ? "1" : "0");
		} else if (i == OPT_NAME) {
			char *colon = strchr(val, ':');
			if (colon)
				*colon = '\0';
			argv_add(&a, "name", val);
			if (colon)
				argv_add(&a, "name_mode", colon + 1);
		} else if (i == OPT_ENV) {
			/* Names the job has a value for keep it: tell the helper which ones. */
			char *save = NULL, *copy = strdup(val);
			size_t kl = 0;
			free(keep_env);
			keep_env = calloc(1, strlen(val) + 2);
			for (char *n = strtok_r(copy, ",", &save); n;
			     n = strtok_r(NULL, ",", &save)) {
				if (job_has_env(sp, n))
					kl += sprintf(keep_env + kl, "%s%s", kl ? "," : "", n);
			}
			free(copy);
			argv_add(&a, "keep_env", keep_env);
			argv_add(&a, "env", val);
		} else {
			argv_add(&a, settings[i].key, val);
		}
		snprintf(fromkey, sizeof(fromkey), "from_%s", settings[i].key);
		argv_add(&a, fromkey, from);
		free(val);
	}
	/* the plugstack line's defaults (pyxis' arguments) where the user chose nothing */
	if (arg_entrypoint >= 0 && !has_key(&a, "entrypoint"))
		argv_add(&a, "entrypoint", arg_entrypoint ? "1" : "0");
	if (arg_remap_root >= 0 && !has_key(&a, "remap_root"))
		argv_add(&a, "remap_root", arg_remap_root ? "1" : "0");
	if (arg_scope)
		argv_add(&a, "scope", arg_scope);
	if (!has_key(&a, "gpus")) {
		int toolong;
		char *g = job_getenv(sp, "SLURM_STEP_GPUS", &toolong);
		if (!g || !*g) {
			free(g);
			g = job_getenv(sp, "CUDA_VISIBLE_DEVICES", &toolong);
		}
		if (g && *g)
			argv_add(&a, "gpus", g);
		free(g);
	}

	if (arg_server && geteuid() == 0) {
		char path[108];
		server_path(path, sizeof(path));
		keep_sock = server_request(path, &a);
		if (keep_sock >= 0) {
			helper_pid = -1;        /* served: no child of ours to wait for */
			goto out;
		}
		argv_add(&a, "serve", path);  /* the one-shot helper leaves a server behind */
	}
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
		snprintf(buf, sizeof(buf), "hpcc: cannot start the container set-up: socketpair: %s",
			 strerror(errno));
		start_error = strdup(buf);
		goto out;
	}
	helper_pid = start_helper(sv[1], &a);
	close(sv[1]);
	if (helper_pid < 0) {
		snprintf(buf, sizeof(buf), "hpcc: cannot start the container set-up: fork: %s",
			 strerror(errno));
		start_error = strdup(buf);
		close(sv[0]);
		helper_pid = 0;
		goto out;
	}
	keep_sock = sv[0];
out:
	helper_args = a;
	free(image);
	if (start_error)
		setup_failed = 1;
	return 0;
}

/*
 * Phase 2, user_init (slurmstepd, once per node and step, after srun's I/O is connected and
 * slurmstepd has changed to the job's working directory): give the helper that directory,
 * wait for the namespace. Messages printed here reach the user's srun output.
 */
HPCC_EXPORT int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	char cwd[4096], *msg;
	const char *msg_cwd;
	int status = 0, len, failed = 1;

	(void)ac; (void)av;
	if (!spank_remote(sp))
		return 0;
	if (start_error) {
		fprintf(stderr, "%s\n", start_error);
		return 0;
	}
	if (!helper_pid)
		return 0;
	if (!getcwd(cwd, sizeof(cwd)))
		strcpy(cwd, "/");
	len = asprintf(&msg, "cwd=%s", cwd);
	if (len < 0)
		msg = NULL;
	msg_cwd = msg ? msg : "cwd=/";
	/* the helper may already have exited with an error: ignore EPIPE */
	if (send(keep_sock, msg_cwd, strlen(msg_cwd) + 1, MSG_NOSIGNAL) < 0 && errno != EPIPE)
		fprintf(stderr, "hpcc: talking to the helper: %s\n", strerror(errno));
	if (read_reply(keep_sock) < 0 && helper_pid > 0)
		fprintf(stderr, "hpcc: reading the helper's reply: %s\n", strerror(errno));
	if (helper_pid < 0 && reply_len == 0) {
		/* the server went away (idle, upgraded) after accepting us: do it ourselves */
		close(keep_sock);
		keep_sock = -1;
		helper_pid = 0;
		if (start_oneshot() == 0) {
			if (send(keep_sock, msg_cwd, strlen(msg_cwd) + 1, MSG_NOSIGNAL) < 0 &&
			    errno != EPIPE)
				fprintf(stderr, "hpcc: talking to the helper: %s\n", strerror(errno));
			if (read_reply(keep_sock) < 0)
				fprintf(stderr, "hpcc: reading the helper's reply: %s\n",
					strerror(errno));
		}
	}
	if (helper_pid > 0) {
		while (waitpid(helper_pid, &status, 0) < 0 && errno == EINTR)
			;
	}
	helper_pid = 0;
	print_errors();
	if (WIFSIGNALED(status))
		fprintf(stderr, "hpcc: the container set-up helper died (signal %d)\n",
			WTERMSIG(status));
	else if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && ns_fd >= 0 && reply_get("cwd"))
		failed = 0;
	else if (!reply_get("error"))
		fprintf(stderr, "hpcc: the container set-up helper failed (exit %d) without a "
			"message\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	if (failed) {
		/*
		 * A failing user_init makes srun report "launch failed" and still exit 0; instead
		 * every task of the step exits with 125 (hpcc failed before the command ran)
		 * without running anything. The reason was printed once, above.
		 */
		setup_failed = 1;
		if (ns_fd >= 0) {
			close(ns_fd);
			ns_fd = -1;
		}
		close(keep_sock);
		keep_sock = -1;
	}
	free(msg);
	return 0;
}

HPCC_EXPORT int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	(void)ac; (void)av;
	if (!spank_remote(sp))
		return 0;
	return task_join_namespaces();
}

HPCC_EXPORT int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	(void)ac; (void)av;
	if (!spank_remote(sp))
		return 0;
	return task_enter(sp);
}

HPCC_EXPORT int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	(void)sp; (void)ac; (void)av;
	if (ns_fd >= 0) {
		close(ns_fd);
		ns_fd = -1;
	}
	while (n_extra_fds > 0)
		close(extra_fds[--n_extra_fds]);
	if (keep_sock >= 0) {
		close(keep_sock);
		keep_sock = -1;
	}
	if (helper_pid > 0) {   /* the step ended before user_init: the helper sees EOF */
		int st;
		waitpid(helper_pid, &st, 0);
		helper_pid = 0;
	}
	return 0;
}

/*
 * Job prolog and epilog (slurmd, as root, on each node of the job when it starts and ends):
 * remove the job's named containers (--container-name, launcher.containers_scope = "job") on
 * this node; at the start, what a node that crashed (or a reused job id) left behind.
 */
static int remove_job_containers(spank_t sp, int ac, char **av)
{
	uint32_t job_id = 0;
	char job[16], *cfg = NULL;
	pid_t pid;
	int st;

	parse_args(ac, av);
	if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS || !job_id)
		return 0;
	snprintf(job, sizeof(job), "%u", job_id);
	if (arg_config && asprintf(&cfg, "HPCC_CONFIG=%s", arg_config) < 0)
		cfg = NULL;
	pid = fork();
	if (pid == 0) {
		char *argv[] = { arg_python ? arg_python : DEFAULT_PYTHON, "-I", "-m",
				 "hpcc.runtime.named", "remove-job", job, NULL };
		char *envp[] = { "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
				 "PYTHONDONTWRITEBYTECODE=1", cfg, NULL };
		int devnull = open("/dev/null", O_RDWR);
		if (devnull >= 0) {
			dup2(devnull, 0);
			dup2(devnull, 1);
		}
		if (chdir("/") < 0)
			_exit(1);
		execve(argv[0], argv, envp);
		_exit(127);
	}
	free(cfg);
	if (pid > 0)
		while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
			;
	return 0;
}

HPCC_EXPORT int slurm_spank_job_prolog(spank_t sp, int ac, char **av)
{
	return remove_job_containers(sp, ac, av);
}

HPCC_EXPORT int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
	return remove_job_containers(sp, ac, av);
}
