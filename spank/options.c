/*
 * The --container-* options of spank_hpcc.so: their table, the checks that refuse a bad value
 * on the submit host before anything is submitted, the same settings read from the job's
 * environment in slurmstepd, and the plugstack.conf arguments.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <slurm/spank.h>

#include "hpcc_spank.h"

const struct setting settings[OPT_N] = {
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

char *opt_val[OPT_N];
char *arg_python, *arg_config;
int arg_server = 1;
int arg_pull = 1;
int arg_entrypoint = -1, arg_remap_root = -1;
const char *arg_scope;
int arg_sbatch = 1;
char *inherited_container;

int parse_bool(const char *v)
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

#define ARG(i, name, arg, help) { name, arg, help, 1, i, opt_cb }
#define FLAG(i, name, help) { name, NULL, help, 0, i, opt_cb }
#define NOFLAG(i, name, help) { name, NULL, help, 0, (i) | OPT_NEG, opt_cb }

static struct spank_option options[] = {
	ARG(OPT_IMAGE, "container-image", "IMAGE",
	    "[hpcc] run the step in image IMAGE: a reference (nvcr.io#nvidia/pytorch:24.01-py3, "
	    "docker://...), a digest or a .sqfs/.sqsh path; same as Slurm's --container=IMAGE "
	    "without oci.conf (env HPCC_CONTAINER_IMAGE, PYXIS_CONTAINER_IMAGE)"),
	ARG(OPT_MOUNTS, "container-mounts", "SRC[:DST[:FLAGS]],...",
	    "[hpcc] bind host paths; FLAGS joined by '+': ro, rw, noexec, rbind, bind, private, "
	    "rprivate, slave, rslave (the host's later mounts below SRC show inside), unbindable, "
	    "runbindable; also tmpfs:DST and umount:DST (env HPCC_CONTAINER_MOUNTS, "
	    "PYXIS_CONTAINER_MOUNTS)"),
	ARG(OPT_WORKDIR, "container-workdir", "DIR",
	    "[hpcc] working directory inside the container (default: the image's WorkingDir; env "
	    "HPCC_CONTAINER_WORKDIR, PYXIS_CONTAINER_WORKDIR)"),
	ARG(OPT_ENV, "container-env", "NAME,...",
	    "[hpcc] these variables keep the job's value, not the image's (env HPCC_CONTAINER_ENV, "
	    "PYXIS_CONTAINER_ENV)"),
	FLAG(OPT_WRITABLE, "container-writable",
	     "[hpcc] writable container root, discarded at the end of the step unless named "
	     "(env HPCC_CONTAINER_WRITABLE=1, PYXIS_CONTAINER_WRITABLE=1)"),
	FLAG(OPT_READONLY, "container-readonly",
	     "[hpcc] read-only container root (the default; env HPCC_CONTAINER_READONLY=1, "
	     "PYXIS_CONTAINER_READONLY=1)"),
	FLAG(OPT_MPI, "container-mpi",
	     "[hpcc] inject the host's MPI (MPICH ABI) into the container "
	     "(env HPCC_CONTAINER_MPI=1)"),
	ARG(OPT_GPUS, "container-gpus", "all|N,...",
	    "[hpcc] NVIDIA GPUs in the container (default: the GPUs Slurm bound to the step; "
	    "env HPCC_CONTAINER_GPUS)"),
	ARG(OPT_NAME, "container-name", "NAME[:exec|no_exec|create]",
	    "[hpcc] keep the container's state under NAME for later steps of the job (env "
	    "HPCC_CONTAINER_NAME, PYXIS_CONTAINER_NAME)"),
	FLAG(OPT_REMAP_ROOT, "container-remap-root",
	     "[hpcc] be uid 0 inside (a user namespace mapping your uid; env "
	     "HPCC_CONTAINER_REMAP_ROOT=1, PYXIS_CONTAINER_REMAP_ROOT=1)"),
	NOFLAG(OPT_REMAP_ROOT, "no-container-remap-root",
	       "[hpcc] keep your own uid inside (env HPCC_CONTAINER_REMAP_ROOT=0)"),
	ARG(OPT_UNSHARE, "container-unshare", "net,ipc,uts",
	    "[hpcc] give the container its own network, IPC or UTS namespace (env "
	    "HPCC_CONTAINER_UNSHARE, PYXIS_CONTAINER_UNSHARE)"),
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
	ARG(OPT_SAVE, "container-save", "PATH",
	    "[hpcc] at the end of the step, save the container (image and changes) as a squashfs "
	    "image at PATH (env HPCC_CONTAINER_SAVE, PYXIS_CONTAINER_SAVE)"),
	SPANK_OPTIONS_TABLE_END
};

static int is_true(const char *v)
{
	return v && *v && strcmp(v, "0") && strcasecmp(v, "no") && strcasecmp(v, "false");
}

/* "NAME=" of a pyxis plugstack.conf argument hpcc takes as a site default (below), or that
 * means nothing with hpcc (its runtime keeps no per-container state on disk, imports
 * through its own store, never unpacks an image): accepted, so that a pyxis line works. */
static const char *const pyxis_ignored[] = {
	"runtime_path=", "use_enroot_load=", "importer=", "use_squashfuse=", NULL
};

/* A pyxis boolean argument: 0 or 1, or -1 (and one error line) for anything else. */
static int plugstack_bool(const char *arg, size_t keylen)
{
	int v = parse_bool(arg + keylen);
	if (v < 0)
		slurm_error("hpcc: plugstack.conf argument '%s': expected 1 or 0 (ignored)", arg);
	return v;
}

void parse_args(int ac, char **av)
{
	for (int i = 0; i < ac; i++) {
		const char *a = av[i];
		int ignored = 0;

		for (const char *const *k = pyxis_ignored; *k; k++)
			ignored |= !strncmp(a, *k, strlen(*k));
		if (ignored)
			continue;
		if (!strncmp(a, "python=", 7)) {
			free(arg_python);
			arg_python = strdup(a + 7);
		} else if (!strncmp(a, "config=", 7)) {
			free(arg_config);
			arg_config = strdup(a + 7);
		} else if (!strncmp(a, "server=", 7)) {
			arg_server = is_true(a + 7);
		} else if (!strncmp(a, "pull=", 5)) {
			arg_pull = is_true(a + 5);
		} else if (!strncmp(a, "execute_entrypoint=", 19)) {
			arg_entrypoint = plugstack_bool(a, 19);
		} else if (!strncmp(a, "remap_root=", 11)) {
			arg_remap_root = plugstack_bool(a, 11);
		} else if (!strncmp(a, "sbatch_support=", 15)) {
			arg_sbatch = plugstack_bool(a, 15) != 0;
		} else if (!strncmp(a, "container_scope=", 16)) {
			/* pyxis' "global": kept on the node for the user across jobs */
			if (!strcmp(a + 16, "job"))
				arg_scope = "job";
			else if (!strcmp(a + 16, "global"))
				arg_scope = "user";
			else
				slurm_error("hpcc: plugstack.conf argument '%s': expected job or "
					    "global (ignored)", a);
		} else {
			slurm_error("hpcc: unknown plugstack.conf argument '%s' (known: python=, "
				    "config=, server=, pull=, and pyxis' execute_entrypoint=, "
				    "container_scope=, sbatch_support=, remap_root=, runtime_path=, "
				    "use_enroot_load=, importer=, use_squashfuse=)", a);
		}
	}
}

/* Register the options (srun, salloc, sbatch and slurmstepd); -1 when Slurm refuses one. */
int register_options(spank_t sp)
{
	/* sbatch_support=0 (pyxis): the options are srun's only */
	if (!arg_sbatch && spank_context() == S_CTX_ALLOCATOR)
		return 0;
	for (struct spank_option *opt = options; opt->name; opt++) {
		if (spank_option_register(sp, opt) != ESPANK_SUCCESS) {
			slurm_error("hpcc: cannot register option --%s", opt->name);
			return -1;
		}
	}
	return 0;
}

int oci_conf_present(void)
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
 * A variable of the job's environment, whatever its length (malloc'd; NULL when unset).
 * *toolong is set when it could not be read at all.
 */
char *job_getenv(spank_t sp, const char *name, int *toolong)
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
int job_has_env(spank_t sp, const char *name)
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
char *get_setting(spank_t sp, int which, const char **from, char **err)
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
void setting_failed(char *msg)
{
	if (!start_error) {
		if (asprintf(&start_error, "hpcc: %s", msg ? msg : "bad --container-* setting") < 0)
			start_error = NULL;
	}
	free(msg);
}
