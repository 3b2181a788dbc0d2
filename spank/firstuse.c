/*
 * Images on first use, on the submit host (srun, salloc, sbatch): find the image the job
 * names and let hpcc.slurm.firstuse pull it before anything is submitted.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/spank.h>

#include "hpcc_spank.h"

/* This process's command line, NUL-separated, malloc'd (NULL when unreadable); its length
 * in *len. */
static char *read_cmdline(size_t *len)
{
	char *buf = NULL;
	size_t cap = 0;
	FILE *f = fopen("/proc/self/cmdline", "r");

	*len = 0;
	if (!f)
		return NULL;
	for (;;) {
		if (*len == cap) {
			char *nb = realloc(buf, cap = cap ? cap * 2 : 4096);
			if (!nb)
				break;
			buf = nb;
		}
		size_t n = fread(buf + *len, 1, cap - *len, f);
		if (!n)
			break;
		*len += n;
	}
	fclose(f);
	return buf;
}

/* The value of --container=X / --container X on this command's own command line. */
static char *cmdline_container(void)
{
	char *out = NULL;
	size_t len = 0;
	char *buf = read_cmdline(&len);

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
	char *out = NULL;
	size_t len = 0;
	char *buf = read_cmdline(&len);

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
int first_use(spank_t sp)
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
