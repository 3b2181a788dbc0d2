/*
 * Private header of spank_hpcc.so: what its parts share. Only the slurm_spank_* entry points
 * and the plugin_* symbols leave the shared object (HPCC_EXPORT; everything else is built
 * with -fvisibility=hidden).
 *
 *   spank_hpcc.c  the SPANK entry points: when each part runs, in which Slurm context
 *   options.c     --container-* options, their variables and checks, plugstack arguments
 *   firstuse.c    images on first use, on the submit host
 *   helper.c      the helper protocol: request, one-shot helper or per-node server, reply
 *   tasks.c       per task: join the namespaces, merge the environment, drop privileges
 */
#ifndef HPCC_SPANK_H
#define HPCC_SPANK_H

#include <stddef.h>
#include <sys/types.h>

#include <slurm/spank.h>

#define HPCC_EXPORT __attribute__((visibility("default")))

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

/* options.c */
extern const struct setting settings[OPT_N];
extern char *opt_val[OPT_N];        /* option values seen by the callbacks */
extern char *arg_python, *arg_config;
extern int arg_server;              /* server=no: always a one-shot helper */
extern int arg_pull;                /* pull=no: no first-use pulls on the submit host */
/* pyxis' plugstack.conf arguments, as site defaults: -1 (or NULL) when not given */
extern int arg_entrypoint;          /* execute_entrypoint= */
extern int arg_remap_root;          /* remap_root= */
extern const char *arg_scope;       /* container_scope=job|global: "job" or "user" */
extern int arg_sbatch;              /* sbatch_support=0: no options for sbatch/salloc */
extern char *inherited_container;   /* srun: SLURM_CONTAINER found in srun's own environment */

int parse_bool(const char *v);
void parse_args(int ac, char **av);
int register_options(spank_t sp);
int oci_conf_present(void);
char *job_getenv(spank_t sp, const char *name, int *toolong);
int job_has_env(spank_t sp, const char *name);
char *get_setting(spank_t sp, int which, const char **from, char **err);
void setting_failed(char *msg);

/* firstuse.c */
int first_use(spank_t sp);

/* helper.c: remote (slurmstepd) state for this step. */
extern int ns_fd;
/* Namespaces each task joins besides the mount namespace (remap-root: a user namespace;
 * unshare: network, IPC, UTS), sent after ns_fd and named by the reply's "nsfds=" record. */
#define MAX_EXTRA_FDS 8
extern int extra_fds[MAX_EXTRA_FDS];
extern int n_extra_fds;
extern char *reply_buf;             /* NUL-separated records from the helper */
extern size_t reply_len;
extern char *keep_env;              /* comma list: --container-env names the job has set */
extern int keep_sock;
extern int setup_failed;            /* the helper failed: tasks exit 125 before exec */
extern pid_t helper_pid;            /* started in init_post_opt, reaped in user_init */
extern struct argv_b helper_args;   /* kept for a fallback when a server vanished */
extern char *start_error;           /* held until slurmstepd exits: a FUSE keeper waits on it */

void argv_add(struct argv_b *a, const char *key, const char *val);
int has_key(const struct argv_b *a, const char *key);
void argv_addu(struct argv_b *a, const char *key, unsigned long v);
int read_reply(int sock);
const char *reply_get(const char *key);
pid_t start_helper(int sock, struct argv_b *args);
void server_path(char *out, size_t len);
int server_request(const char *path, struct argv_b *a);
int start_oneshot(void);
void print_errors(void);

/* tasks.c */
int task_join_namespaces(void);
int task_enter(spank_t sp);

#endif
