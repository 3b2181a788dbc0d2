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
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

SPANK_PLUGIN(hpcc, 1);

#define DEFAULT_PYTHON "/opt/hpcc/venv/bin/python3"
#define MAX_REPLY (4 << 20)

struct argv_b { char **v; int n, cap; };

/*
 * Settings: each is an option (--container-X; flags also as --no-container-X) and the
 * environment variables HPCC_CONTAINER_<X> and PYXIS_CONTAINER_<X> (pyxis' names), read from
 * the job's environment when the option is not given. The helper gets them as key=value.
 */
enum { OPT_IMAGE, OPT_MOUNTS, OPT_WORKDIR, OPT_ENV, OPT_WRITABLE, OPT_MPI, OPT_GPUS,
       OPT_NAME, OPT_REMAP_ROOT, OPT_UNSHARE, OPT_MOUNT_HOME, OPT_ENTRYPOINT,
       OPT_ENTRYPOINT_LOG, OPT_READONLY, OPT_SAVE, OPT_N };
#define OPT_NEG 64                  /* callback value of --no-container-X */

enum { K_STR, K_BOOL };

struct setting {
	const char *opt;            /* option name without "--" */
	const char *env;            /* suffix of HPCC_CONTAINER_ / PYXIS_CONTAINER_ */
	const char *key;            /* key=value for the helper */
	int kind;
};

static const struct setting settings[OPT_N] = {
	[OPT_IMAGE] = { "container-image", "IMAGE", "image", K_STR },
	[OPT_MOUNTS] = { "container-mounts", "MOUNTS", "mounts", K_STR },
	[OPT_WORKDIR] = { "container-workdir", "WORKDIR", "workdir", K_STR },
	[OPT_ENV] = { "container-env", "ENV", "env", K_STR },
	[OPT_WRITABLE] = { "container-writable", "WRITABLE", "writable", K_BOOL },
	[OPT_MPI] = { "container-mpi", "MPI", "mpi", K_BOOL },
	[OPT_GPUS] = { "container-gpus", "GPUS", "gpus", K_STR },
	[OPT_NAME] = { "container-name", "NAME", "name", K_STR },
	[OPT_REMAP_ROOT] = { "container-remap-root", "REMAP_ROOT", "remap_root", K_BOOL },
	[OPT_UNSHARE] = { "container-unshare", "UNSHARE", "unshare", K_STR },
	[OPT_MOUNT_HOME] = { "container-mount-home", "MOUNT_HOME", "mount_home", K_BOOL },
	[OPT_ENTRYPOINT] = { "container-entrypoint", "ENTRYPOINT", "entrypoint", K_BOOL },
	[OPT_ENTRYPOINT_LOG] = { "container-entrypoint-log", "ENTRYPOINT_LOG", "entrypoint_log",
				 K_BOOL },
	[OPT_READONLY] = { "container-readonly", "READONLY", "readonly", K_BOOL },
	[OPT_SAVE] = { "container-save", "SAVE", "save", K_STR },
};

static char *opt_val[OPT_N];        /* option values seen by the callbacks */
static char *arg_python, *arg_config;
static int arg_server = 1;          /* server=no: always a one-shot helper */
static int arg_pull = 1;            /* pull=no: no first-use pulls on the submit host */
static char *inherited_container;   /* srun: SLURM_CONTAINER found in srun's own environment */

/* Remote (slurmstepd) state for this step. */
static int ns_fd = -1;
/* Namespaces each task joins besides the mount namespace (remap-root: a user namespace;
 * unshare: network, IPC, UTS), sent after ns_fd and named by the reply's "nsfds=" record. */
#define MAX_EXTRA_FDS 8
static int extra_fds[MAX_EXTRA_FDS];
static int n_extra_fds;
static char *reply_buf;             /* NUL-separated records from the helper */
static size_t reply_len;
static char *keep_env;              /* comma list: --container-env names the job has set */
static int keep_sock = -1;
static int setup_failed;            /* the helper failed: tasks exit 125 before exec */
static pid_t helper_pid;            /* started in init_post_opt, reaped in user_init */
static struct argv_b helper_args;   /* kept for a fallback when a server vanished */
static char *start_error;          /* held until slurmstepd exits: a FUSE keeper waits on it */

static int parse_bool(const char *v)
{
	if (!strcmp(v, "1") || !strcasecmp(v, "true") || !strcasecmp(v, "yes"))
		return 1;
	if (!strcmp(v, "0") || !strcasecmp(v, "false") || !strcasecmp(v, "no"))
		return 0;
	return -1;
}

static int valid_name_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       c == '_' || c == '-' || c == '.';
}

/* A comma list without empty items; each item passes `ok` when given. NULL when fine. */
static const char *check_list(const char *v, int (*ok)(const char *, size_t))
{
	const char *p = v;

	for (;;) {
		const char *e = strchr(p, ',');
		size_t l = e ? (size_t)(e - p) : strlen(p);
		if (!l)
			return "an empty item (a stray comma)";
		if (ok && !ok(p, l))
			return "an item that is not allowed";
		if (!e)
			return NULL;
		p = e + 1;
	}
}

static int unshare_item_ok(const char *p, size_t l)
{
	return (l == 3 && (!strncmp(p, "net", 3) || !strncmp(p, "ipc", 3) ||
			   !strncmp(p, "uts", 3)));
}

static int env_name_ok(const char *p, size_t l)
{
	for (size_t i = 0; i < l; i++)
		if (p[i] == '=' || p[i] == ' ' || p[i] == '\t')
			return 0;
	return 1;
}

/*
 * Check one value; `from` is what the user typed (--container-X or the variable's name).
 * Returns NULL when fine, else a malloc'd message (one line, without the "hpcc: " prefix).
 */
static char *check_setting(int which, const char *v, const char *from)
{
	const struct setting *s = &settings[which];
	char *msg = NULL;
	const char *why;

	if (s->kind == K_BOOL) {
		if (parse_bool(v) < 0 && asprintf(&msg, "%s=%s: expected 1 or 0 (true/false, "
						  "yes/no)", from, v) < 0)
			msg = strdup(from);
		return msg;
	}
	if (!*v) {
		if (asprintf(&msg, "%s: the value is empty (give one, or leave the %s out)",
			     from, from[0] == '-' ? "option" : "variable") < 0)
			msg = strdup(from);
		return msg;
	}
	switch (which) {
	case OPT_ENV:
		why = check_list(v, NULL);
		if (!why) {
			const char *p = v;
			for (;;) {
				const char *e = strchr(p, ',');
				size_t l = e ? (size_t)(e - p) : strlen(p);
				if (!env_name_ok(p, l)) {
					if (asprintf(&msg, "%s=%s: '%.*s' is not a variable name "
						     "(give names only: NAME,NAME...)", from, v,
						     (int)l, p) < 0)
						msg = NULL;
					return msg ? msg : strdup(from);
				}
				if (!e)
					break;
				p = e + 1;
			}
			return NULL;
		}
		if (asprintf(&msg, "%s=%s: %s; give NAME,NAME... without empty items",
			     from, v, why) < 0)
			msg = strdup(from);
		return msg;
	case OPT_MOUNTS:
		if (check_list(v, NULL) && asprintf(&msg, "%s=%s: an empty item (a stray comma); "
						   "give SRC:DST[:FLAGS],...", from, v) < 0)
			msg = strdup(from);
		return msg;
	case OPT_UNSHARE:
		if (check_list(v, unshare_item_ok) &&
		    asprintf(&msg, "%s=%s: expected a comma list of net, ipc, uts", from, v) < 0)
			msg = strdup(from);
		return msg;
	case OPT_NAME: {
		const char *colon = strchr(v, ':');
		size_t l = colon ? (size_t)(colon - v) : strlen(v);
		int bad = l == 0 || l > 128 || !valid_name_char(v[0]) || v[0] == '.' ||
			  v[0] == '-';
		for (size_t i = 0; i < l && !bad; i++)
			bad = !valid_name_char(v[i]);
		if (bad) {
			if (asprintf(&msg, "%s=%s: a name is 1 to 128 letters, digits, '_', '-' "
				     "or '.', starting with a letter or digit", from, v) < 0)
				msg = strdup(from);
			return msg;
		}
		if (colon && strcmp(colon + 1, "exec") && strcmp(colon + 1, "no_exec") &&
		    strcmp(colon + 1, "create")) {
			if (asprintf(&msg, "%s=%s: the mode after ':' is exec, no_exec or create",
				     from, v) < 0)
				msg = strdup(from);
			return msg;
		}
		return NULL;
	}
	default:
		return NULL;
	}
}

static int opt_cb(int val, const char *optarg, int remote)
{
	int which = val & (OPT_NEG - 1);
	char *msg;

	if (which < 0 || which >= OPT_N)
		return -1;
	free(opt_val[which]);        /* callbacks run more than once in slurmstepd */
	opt_val[which] = NULL;
	/* flags arrive with no argument locally and an empty one in slurmstepd */
	if (settings[which].kind == K_BOOL)
		optarg = (val & OPT_NEG) ? "0" : "1";
	opt_val[which] = strdup(optarg ? optarg : "");
	if (!remote) {
		/* locally (srun, salloc, sbatch): refuse before anything is submitted */
		char opt[64];
		snprintf(opt, sizeof(opt), "--%s", settings[which].opt);
		if ((msg = check_setting(which, opt_val[which], opt)) != NULL) {
			/* one line and the usage status (2), before anything was submitted,
			 * rather than Slurm's second "Invalid argument" line and 255 */
			fprintf(stderr, "hpcc: %s\n", msg);
			free(msg);
			exit(2);
		}
	}
	return 0;
}

#define FLAG(i, name, help) { name, NULL, help, 0, i, opt_cb }
#define NOFLAG(i, name, help) { name, NULL, help, 0, (i) | OPT_NEG, opt_cb }

static struct spank_option options[] = {
	{ "container-image", "IMAGE",
	  "[hpcc] run the step in image IMAGE: a reference (nvcr.io#nvidia/pytorch:24.01-py3, "
	  "docker://...), a digest or a .sqfs/.sqsh path; same as Slurm's --container=IMAGE "
	  "without oci.conf (env HPCC_CONTAINER_IMAGE, PYXIS_CONTAINER_IMAGE)", 1, OPT_IMAGE,
	  opt_cb },
	{ "container-mounts", "SRC[:DST[:FLAGS]],...",
	  "[hpcc] bind host paths; FLAGS joined by '+': ro, rw, noexec, rbind, bind, private, "
	  "rprivate; also tmpfs:DST and umount:DST (env HPCC_CONTAINER_MOUNTS, "
	  "PYXIS_CONTAINER_MOUNTS)", 1, OPT_MOUNTS, opt_cb },
	{ "container-workdir", "DIR",
	  "[hpcc] working directory inside the container (default: the image's WorkingDir; env "
	  "HPCC_CONTAINER_WORKDIR, PYXIS_CONTAINER_WORKDIR)", 1, OPT_WORKDIR, opt_cb },
	{ "container-env", "NAME,...",
	  "[hpcc] these variables keep the job's value, not the image's (env HPCC_CONTAINER_ENV, "
	  "PYXIS_CONTAINER_ENV)", 1, OPT_ENV, opt_cb },
	FLAG(OPT_WRITABLE, "container-writable",
	     "[hpcc] writable container root, discarded at the end of the step unless named "
	     "(env HPCC_CONTAINER_WRITABLE=1, PYXIS_CONTAINER_WRITABLE=1)"),
	FLAG(OPT_READONLY, "container-readonly",
	     "[hpcc] read-only container root (the default; env HPCC_CONTAINER_READONLY=1, "
	     "PYXIS_CONTAINER_READONLY=1)"),
	FLAG(OPT_MPI, "container-mpi",
	     "[hpcc] inject the host's MPI (MPICH ABI) into the container "
	     "(env HPCC_CONTAINER_MPI=1)"),
	{ "container-gpus", "all|N,...",
	  "[hpcc] NVIDIA GPUs in the container (default: the GPUs Slurm bound to the step; "
	  "env HPCC_CONTAINER_GPUS)", 1, OPT_GPUS, opt_cb },
	{ "container-name", "NAME[:exec|no_exec|create]",
	  "[hpcc] keep the container's state under NAME for later steps of the job (env "
	  "HPCC_CONTAINER_NAME, PYXIS_CONTAINER_NAME)", 1, OPT_NAME, opt_cb },
	FLAG(OPT_REMAP_ROOT, "container-remap-root",
	     "[hpcc] be uid 0 inside (a user namespace mapping your uid; env "
	     "HPCC_CONTAINER_REMAP_ROOT=1, PYXIS_CONTAINER_REMAP_ROOT=1)"),
	NOFLAG(OPT_REMAP_ROOT, "no-container-remap-root",
	       "[hpcc] keep your own uid inside (env HPCC_CONTAINER_REMAP_ROOT=0)"),
	{ "container-unshare", "net,ipc,uts",
	  "[hpcc] give the container its own network, IPC or UTS namespace (env "
	  "HPCC_CONTAINER_UNSHARE, PYXIS_CONTAINER_UNSHARE)", 1, OPT_UNSHARE, opt_cb },
	FLAG(OPT_MOUNT_HOME, "container-mount-home",
	     "[hpcc] bind your home directory (env HPCC_CONTAINER_MOUNT_HOME=1, "
	     "PYXIS_CONTAINER_MOUNT_HOME=1)"),
	NOFLAG(OPT_MOUNT_HOME, "no-container-mount-home",
	       "[hpcc] do not bind your home directory (env HPCC_CONTAINER_MOUNT_HOME=0)"),
	FLAG(OPT_ENTRYPOINT, "container-entrypoint",
	     "[hpcc] run the image's ENTRYPOINT before the command (env "
	     "HPCC_CONTAINER_ENTRYPOINT=1, PYXIS_CONTAINER_ENTRYPOINT=1)"),
	NOFLAG(OPT_ENTRYPOINT, "no-container-entrypoint",
	       "[hpcc] do not run the image's ENTRYPOINT (the default; env "
	       "HPCC_CONTAINER_ENTRYPOINT=0)"),
	FLAG(OPT_ENTRYPOINT_LOG, "container-entrypoint-log",
	     "[hpcc] show the ENTRYPOINT's output (env HPCC_CONTAINER_ENTRYPOINT_LOG=1, "
	     "PYXIS_CONTAINER_ENTRYPOINT_LOG=1)"),
	{ "container-save", "PATH",
	  "[hpcc] at the end of the step, save the container (image and changes) as a squashfs "
	  "image at PATH (env HPCC_CONTAINER_SAVE, PYXIS_CONTAINER_SAVE)", 1, OPT_SAVE, opt_cb },
	SPANK_OPTIONS_TABLE_END
};

static int is_true(const char *v)
{
	return v && *v && strcmp(v, "0") && strcasecmp(v, "no") && strcasecmp(v, "false");
}

static void parse_args(int ac, char **av)
{
	for (int i = 0; i < ac; i++) {
		if (!strncmp(av[i], "python=", 7)) {
			free(arg_python);
			arg_python = strdup(av[i] + 7);
		} else if (!strncmp(av[i], "config=", 7)) {
			free(arg_config);
			arg_config = strdup(av[i] + 7);
		} else if (!strncmp(av[i], "server=", 7)) {
			arg_server = is_true(av[i] + 7);
		} else if (!strncmp(av[i], "pull=", 5)) {
			arg_pull = is_true(av[i] + 5);
		} else {
			slurm_error("hpcc: unknown plugstack.conf argument '%s' "
				    "(known: python=, config=, server=, pull=)", av[i]);
		}
	}
}

int slurm_spank_init(spank_t sp, int ac, char **av)
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
	for (struct spank_option *o = options; o->name; o++) {
		if (spank_option_register(sp, o) != ESPANK_SUCCESS) {
			slurm_error("hpcc: cannot register option --%s", o->name);
			return -1;
		}
	}
	return 0;
}

static int oci_conf_present(void)
{
	char path[4096];
	const char *conf = getenv("SLURM_CONF");
	const char *slash;

	if (!conf || !*conf)
		conf = "/etc/slurm/slurm.conf";
	slash = strrchr(conf, '/');
	if (!slash)
		return access("oci.conf", F_OK) == 0;
	snprintf(path, sizeof(path), "%.*s/oci.conf", (int)(slash - conf), conf);
	return access(path, F_OK) == 0;
}

/*
 * srun inside a job started with --container=A: srun only sets SLURM_CONTAINER when it is not
 * set already, so `srun --container=B` would still show A to the nodes. The controller has the
 * step's real value; export it (a setenv here reaches the remote side). Only paid by sruns
 * that inherited a container.
 */
int slurm_spank_local_user_init(spank_t sp, int ac, char **av)
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
 * A variable of the job's environment, whatever its length (malloc'd; NULL when unset).
 * *toolong is set when it could not be read at all.
 */
static char *job_getenv(spank_t sp, const char *name, int *toolong)
{
	size_t cap = 8192;

	*toolong = 0;
	for (;;) {
		char *buf = malloc(cap);
		spank_err_t rc;

		if (!buf)
			return NULL;
		rc = spank_getenv(sp, name, buf, (int)cap);
		if (rc == ESPANK_SUCCESS)
			return buf;
		free(buf);
		if (rc != ESPANK_NOSPACE)
			return NULL;
		if (cap >= (64u << 20)) {
			*toolong = 1;
			return NULL;
		}
		cap *= 2;
	}
}

/* The job has a value for `name` (of any length). */
static int job_has_env(spank_t sp, const char *name)
{
	char c;
	spank_err_t rc = spank_getenv(sp, name, &c, 1);

	return rc == ESPANK_SUCCESS || rc == ESPANK_NOSPACE;
}

/*
 * Option value, else HPCC_CONTAINER_<X>, else PYXIS_CONTAINER_<X> from the job's environment
 * (malloc'd; NULL when none is set). *from: what the user typed (static buffer). A value that
 * is not valid sets *err (malloc'd message) and returns NULL.
 */
static char *get_setting(spank_t sp, int which, const char **from, char **err)
{
	static char names[OPT_N][96];
	const struct setting *st = &settings[which];
	char *v = NULL;
	int toolong = 0;

	*err = NULL;
	*from = names[which];
	if (opt_val[which]) {
		snprintf(names[which], sizeof(names[which]), "--%s", st->opt);
		v = strdup(opt_val[which]);
	} else {
		static const char *prefixes[] = { "HPCC_CONTAINER_", "PYXIS_CONTAINER_" };
		for (int i = 0; i < 2 && !v; i++) {
			snprintf(names[which], sizeof(names[which]), "%s%s", prefixes[i], st->env);
			v = job_getenv(sp, names[which], &toolong);
			if (toolong) {
				if (asprintf(err, "%s is too long to read", names[which]) < 0)
					*err = NULL;
				return NULL;
			}
		}
		if (!v)
			return NULL;
	}
	if ((*err = check_setting(which, v, *from)) != NULL) {
		free(v);
		return NULL;
	}
	return v;
}

/* A setting that could not be used: the step fails with this line (tasks exit 125). */
static void setting_failed(char *msg)
{
	if (!start_error) {
		if (asprintf(&start_error, "hpcc: %s", msg ? msg : "bad --container-* setting") < 0)
			start_error = NULL;
	}
	free(msg);
}

static void argv_add(struct argv_b *a, const char *key, const char *val)
{
	char *s;

	if (a->n + 2 > a->cap) {
		a->cap = a->cap ? a->cap * 2 : 32;
		a->v = realloc(a->v, a->cap * sizeof(char *));
	}
	if (key) {
		if (asprintf(&s, "%s=%s", key, val ? val : "") < 0)
			s = NULL;
	} else {
		s = strdup(val);
	}
	a->v[a->n++] = s;
	a->v[a->n] = NULL;
}

static int has_key(const struct argv_b *a, const char *key)
{
	size_t kl = strlen(key);

	for (int i = 0; i < a->n; i++)
		if (!strncmp(a->v[i], key, kl) && a->v[i][kl] == '=')
			return 1;
	return 0;
}

static void argv_addu(struct argv_b *a, const char *key, unsigned long v)
{
	char buf[32];
	snprintf(buf, sizeof(buf), "%lu", v);
	argv_add(a, key, buf);
}

/* "note=LINE" records (e.g. waiting for an image's first pull) and "log=LINE" ones, printed
 * on the step's stderr as they arrive. */
static size_t notes_done;

static void print_notes(void)
{
	while (notes_done < reply_len) {
		char *rec = reply_buf + notes_done;
		size_t l = strnlen(rec, reply_len - notes_done);

		if (l == reply_len - notes_done)
			return;         /* not complete yet */
		if (!strncmp(rec, "note=", 5) || !strncmp(rec, "log=", 4)) {
			/* notes, and the ENTRYPOINT's output with --container-entrypoint-log */
			fprintf(stderr, "%s\n", strchr(rec, '=') + 1);
			fflush(stderr);
		}
		notes_done += l + 1;
	}
}

/* Receive the namespace fd (sent with the first bytes) and the rest of the reply. */
static int read_reply(int sock)
{
	size_t cap = 65536;
	char cbuf[CMSG_SPACE(sizeof(int) * (MAX_EXTRA_FDS + 1))];

	free(reply_buf);                /* a second read (fallback helper) replaces the first */
	reply_len = 0;
	notes_done = 0;
	reply_buf = malloc(cap);
	if (!reply_buf)
		return -1;
	for (;;) {
		struct iovec iov = { reply_buf + reply_len, cap - reply_len };
		struct msghdr msg = { 0 };
		ssize_t n;

		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;
		msg.msg_control = cbuf;
		msg.msg_controllen = sizeof(cbuf);
		n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -1;
		if (n == 0)
			break;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
				size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				for (size_t i = 0; i < nfd; i++) {
					int fd;
					memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
					if (i == 0) {
						if (ns_fd >= 0)
							close(ns_fd);
						ns_fd = fd;
					} else if (n_extra_fds < MAX_EXTRA_FDS) {
						extra_fds[n_extra_fds++] = fd;
					} else {
						close(fd);
					}
				}
			}
		}
		reply_len += n;
		print_notes();
		if (reply_len >= 6 && !memcmp(reply_buf + reply_len - 6, "end=1", 6))
			break;
		if (reply_len == cap) {
			char *bigger;

			if (cap >= MAX_REPLY || !(bigger = realloc(reply_buf, cap * 2)))
				return -1;
			reply_buf = bigger;
			cap *= 2;
		}
	}
	return 0;
}

static const char *reply_get(const char *key)
{
	size_t kl = strlen(key);
	for (size_t off = 0; off < reply_len; off += strnlen(reply_buf + off, reply_len - off) + 1)
		if (!strncmp(reply_buf + off, key, kl) && reply_buf[off + kl] == '=')
			return reply_buf + off + kl + 1;
	return NULL;
}

/* An error record for the plugin, from the helper's child when it cannot exec. */
static void child_error(const char *fmt, const char *a, const char *b)
{
	char buf[1024];
	int n = snprintf(buf, sizeof(buf) - 8, fmt, a, b);

	if (n < 0)
		return;
	if (n > (int)sizeof(buf) - 8)
		n = sizeof(buf) - 8;
	memcpy(buf + n, "\0end=1\0", 7);
	if (write(3, "error=", 6) == 6 && write(3, buf, n + 7) < 0)
		return;
}

/* Start the helper as root, with fd 3 = sock and an environment of our own. */
static pid_t start_helper(int sock, struct argv_b *args)
{
	pid_t pid = fork();

	if (pid != 0)
		return pid;
	if (dup2(sock, 3) < 0)
		_exit(125);
	/* user_init runs with the job user as effective uid; init_post_opt as root */
	if (setresuid(0, 0, 0) || setresgid(0, 0, 0) || setgroups(0, NULL)) {
		child_error("hpcc: the helper cannot regain root: %s%s", strerror(errno), "");
		_exit(125);
	}
	int devnull = open("/dev/null", O_RDWR);
	if (devnull >= 0) {
		dup2(devnull, 0);
		dup2(devnull, 1);
		dup2(devnull, 2);
	}
	/* Everything but stdin/stdout/stderr and the socket is closed. */
#ifdef SYS_close_range
	if (syscall(SYS_close_range, 4, ~0U, 0) < 0)
#endif
		for (long fd = 4, max = sysconf(_SC_OPEN_MAX); fd < (max > 0 ? max : 1024); fd++)
			close(fd);
	sigset_t all;
	sigemptyset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);
	if (chdir("/") < 0)
		_exit(125);
	char *cfg = NULL;
	if (arg_config && asprintf(&cfg, "HPCC_CONFIG=%s", arg_config) < 0)
		cfg = NULL;
	char *envp[] = { "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
			 "PYTHONDONTWRITEBYTECODE=1", cfg, NULL };
	execve(args->v[0], args->v, envp);
	child_error("hpcc: cannot start the helper %s: %s (check python= in plugstack.conf)",
		    args->v[0], strerror(errno));
	_exit(125);
}

/*
 * The per-node helper server (see hpcc/slurm/server.py): its socket is named after the hpcc
 * installation, the config and this node's mount namespace.
 */
static void server_path(char *out, size_t len)
{
	char ns[64] = "";
	uint64_t h = 1469598103934665603ULL;
	const char *parts[3];
	ssize_t n = readlink("/proc/self/ns/mnt", ns, sizeof(ns) - 1);

	if (n > 0)
		ns[n] = '\0';
	parts[0] = arg_python ? arg_python : DEFAULT_PYTHON;
	parts[1] = arg_config ? arg_config : "";
	parts[2] = ns;
	for (int i = 0; i < 3; i++) {
		for (const unsigned char *p = (const unsigned char *)parts[i]; *p; p++)
			h = (h ^ *p) * 1099511628211ULL;
		h = (h ^ 0xff) * 1099511628211ULL;
	}
	snprintf(out, len, "/run/hpcc-stepd/s-%016llx.sock", (unsigned long long)h);
}

/* Send the request (argv minus the interpreter part) to a running server; -1 if none. */
static int server_request(const char *path, struct argv_b *a)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int fd;

	if (strlen(path) >= sizeof(addr.sun_path))
		return -1;
	strcpy(addr.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		close(fd);
		return -1;
	}
	for (int i = 4; i < a->n; i++) {
		size_t l = strlen(a->v[i]) + 1;
		if (send(fd, a->v[i], l, MSG_NOSIGNAL) != (ssize_t)l) {
			close(fd);
			return -1;
		}
	}
	if (send(fd, "", 1, MSG_NOSIGNAL) != 1) {
		close(fd);
		return -1;
	}
	return fd;
}

/* The value of --container=X / --container X on this command's own command line. */
static char *cmdline_container(void)
{
	char *buf = NULL, *out = NULL;
	size_t cap = 0, len = 0;
	FILE *f = fopen("/proc/self/cmdline", "r");

	if (!f)
		return NULL;
	for (;;) {
		if (len == cap) {
			char *nb = realloc(buf, cap = cap ? cap * 2 : 4096);
			if (!nb)
				break;
			buf = nb;
		}
		size_t n = fread(buf + len, 1, cap - len, f);
		if (!n)
			break;
		len += n;
	}
	fclose(f);
	for (size_t off = 0; buf && off < len; off += strnlen(buf + off, len - off) + 1) {
		const char *a = buf + off;
		if (!strcmp(a, "--"))
			break;
		if (!strncmp(a, "--container=", 12)) {
			free(out);
			out = strdup(a + 12);
		} else if (!strcmp(a, "--container")) {
			size_t next = off + strlen(a) + 1;
			if (next < len) {
				free(out);
				out = strdup(buf + next);
			}
		}
	}
	free(buf);
	return out;
}

/* --container=X / --container X in an #SBATCH line of the script `path` (NULL if none). */
static char *script_container(const char *path)
{
	char line[8192], *out = NULL;
	FILE *f = fopen(path, "r");

	if (!f)
		return NULL;
	if (!fgets(line, sizeof(line), f) || strncmp(line, "#!", 2)) {
		fclose(f);
		return NULL;
	}
	while (fgets(line, sizeof(line), f)) {
		char *p = line, *v = NULL;

		line[strcspn(line, "\r\n")] = '\0';
		if (*p == '\0' || (*p == '#' && strncmp(p, "#SBATCH", 7)))
			continue;       /* blank lines and other comments */
		if (*p != '#')
			break;          /* sbatch reads directives up to the first command */
		for (p += 7; *p == ' ' || *p == '\t'; p++)
			;
		if (!strncmp(p, "--container=", 12))
			v = p + 12;
		else if (!strncmp(p, "--container ", 12))
			for (v = p + 12; *v == ' '; v++)
				;
		if (v) {
			v[strcspn(v, " \t#")] = '\0';
			free(out);
			out = strdup(v);
		}
	}
	fclose(f);
	return out;
}

/* sbatch's script: the first argument after the options that is a file starting "#!". */
static char *sbatch_script_container(void)
{
	char *buf = NULL, *out = NULL;
	size_t cap = 0, len = 0;
	FILE *f = fopen("/proc/self/cmdline", "r");

	if (!f)
		return NULL;
	for (;;) {
		if (len == cap) {
			char *nb = realloc(buf, cap = cap ? cap * 2 : 4096);
			if (!nb)
				break;
			buf = nb;
		}
		size_t n = fread(buf + len, 1, cap - len, f);
		if (!n)
			break;
		len += n;
	}
	fclose(f);
	for (size_t off = buf ? strnlen(buf, len) + 1 : len; off < len;
	     off += strnlen(buf + off, len - off) + 1) {
		const char *a = buf + off;
		struct stat st;

		if (a[0] == '-' || stat(a, &st) < 0 || !S_ISREG(st.st_mode))
			continue;
		if ((out = script_container(a)) != NULL)
			break;
	}
	free(buf);
	return out;
}

/*
 * hpcc.slurm.firstuse found IMAGE (as typed) in a store less than an hour ago: its marker
 * ($XDG_CACHE_HOME or ~/.cache, hpcc/seen/<FNV-1a of IMAGE>) saves starting Python on every
 * srun. An image removed since then fails the step with "not found" (the usual message).
 */
static int seen_recently(const char *image)
{
	uint64_t h = 1469598103934665603ULL;
	const char *base = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
	char path[4096];
	struct stat st;

	for (const unsigned char *p = (const unsigned char *)image; *p; p++)
		h = (h ^ *p) * 1099511628211ULL;
	if (base && *base)
		snprintf(path, sizeof(path), "%s/hpcc/seen/%016llx", base, (unsigned long long)h);
	else if (home && *home)
		snprintf(path, sizeof(path), "%s/.cache/hpcc/seen/%016llx", home,
			 (unsigned long long)h);
	else
		return 0;
	if (stat(path, &st) < 0 || st.st_uid != getuid())
		return 0;
	return time(NULL) - st.st_mtime < 3600;
}

/*
 * Images on first use (srun, salloc, sbatch on the submit host, as the user): an image in
 * no store is pulled now, with its progress on the user's terminal (sbatch: in the
 * background, the job's first step waits for it). See hpcc/slurm/firstuse.py. Not in steps
 * on compute nodes (SLURMD_NODENAME set): compute nodes never pull.
 */
static int first_use(spank_t sp)
{
	spank_context_t ctx = spank_context();
	const char *mode;
	char *image = NULL;
	pid_t pid;
	int st;

	(void)sp;
	if (!arg_pull || (ctx != S_CTX_LOCAL && ctx != S_CTX_ALLOCATOR))
		return 0;
	if (getenv("SLURMD_NODENAME"))
		return 0;
	if (opt_val[OPT_IMAGE])
		image = strdup(opt_val[OPT_IMAGE]);
	else if (getenv("HPCC_CONTAINER_IMAGE") && *getenv("HPCC_CONTAINER_IMAGE"))
		image = strdup(getenv("HPCC_CONTAINER_IMAGE"));
	else if (getenv("PYXIS_CONTAINER_IMAGE") && *getenv("PYXIS_CONTAINER_IMAGE"))
		image = strdup(getenv("PYXIS_CONTAINER_IMAGE"));
	else
		image = cmdline_container();
	if (!image && ctx == S_CTX_ALLOCATOR && !strcmp(program_invocation_short_name, "sbatch"))
		image = sbatch_script_container();  /* #SBATCH --container=IMAGE in the script */
	if (!image || !*image || seen_recently(image)) {
		free(image);
		return 0;
	}
	mode = (ctx == S_CTX_ALLOCATOR && !strcmp(program_invocation_short_name, "sbatch"))
		? "detach" : "wait";
	fflush(stdout);
	fflush(stderr);
	pid = fork();
	if (pid == 0) {
		const char *py = arg_python ? arg_python : DEFAULT_PYTHON;
		if (arg_config)
			setenv("HPCC_CONFIG", arg_config, 1);
		execl(py, py, "-I", "-m", "hpcc.slurm.firstuse", mode, image, (char *)NULL);
		_exit(127);     /* no hpcc here: the step says what is wrong */
	}
	free(image);
	if (pid < 0)
		return 0;               /* the step says what is missing */
	while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
		;
	if (WIFEXITED(st) && (WEXITSTATUS(st) == 0 || WEXITSTATUS(st) == 127))
		return 0;
	/* The reason is on the terminal already; nothing was submitted: stop here rather than
	 * add Slurm's two lines about a failed plugin. */
	exit(WIFEXITED(st) && WEXITSTATUS(st) ? WEXITSTATUS(st) : 1);
}

/*
 * Phase 1, init_post_opt (slurmstepd, root, early): start the helper now, so that Python's
 * start-up, the config and the image lookup overlap with Slurm's own step set-up.
 */
int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
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

/* Start the one-shot helper with the saved arguments; 0 on success. */
static int start_oneshot(void)
{
	int sv[2];

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		return -1;
	helper_pid = start_helper(sv[1], &helper_args);
	close(sv[1]);
	if (helper_pid < 0) {
		helper_pid = 0;
		close(sv[0]);
		return -1;
	}
	keep_sock = sv[0];
	return 0;
}

static void print_errors(void)
{
	for (size_t off = 0; off < reply_len; off += strnlen(reply_buf + off, reply_len - off) + 1)
		if (!strncmp(reply_buf + off, "error=", 6))
			fprintf(stderr, "%s\n", reply_buf + off + 6);
}

/*
 * Phase 2, user_init (slurmstepd, once per node and step, after srun's I/O is connected and
 * slurmstepd has changed to the job's working directory): give the helper that directory,
 * wait for the namespace. Messages printed here reach the user's srun output.
 */
int slurm_spank_user_init(spank_t sp, int ac, char **av)
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

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	static const struct { const char *kind; int type; } shared[] = {
		{ "net", CLONE_NEWNET }, { "ipc", CLONE_NEWIPC }, { "uts", CLONE_NEWUTS } };

	(void)ac; (void)av;
	if (!spank_remote(sp) || ns_fd < 0)
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

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	const char *cwd;
	int userns, remapped;

	(void)ac; (void)av;
	if (!spank_remote(sp))
		return 0;
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

int slurm_spank_exit(spank_t sp, int ac, char **av)
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

int slurm_spank_job_prolog(spank_t sp, int ac, char **av)
{
	return remove_job_containers(sp, ac, av);
}

int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
	return remove_job_containers(sp, ac, av);
}
