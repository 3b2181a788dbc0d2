/*
 * The helper protocol of spank_hpcc.so, in slurmstepd: the request (key=value arguments), the
 * per-node helper server or a one-shot helper started as root, and the reply (NUL-separated
 * records, the namespace fds by SCM_RIGHTS).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include <slurm/spank.h>

#include "hpcc_spank.h"

int ns_fd = -1;
int extra_fds[MAX_EXTRA_FDS];
int n_extra_fds;
char *reply_buf;
size_t reply_len;
char *keep_env;
int keep_sock = -1;
int setup_failed;
pid_t helper_pid;
struct argv_b helper_args;
char *start_error;

void argv_add(struct argv_b *a, const char *key, const char *val)
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

int has_key(const struct argv_b *a, const char *key)
{
	size_t kl = strlen(key);

	for (int i = 0; i < a->n; i++)
		if (!strncmp(a->v[i], key, kl) && a->v[i][kl] == '=')
			return 1;
	return 0;
}

void argv_addu(struct argv_b *a, const char *key, unsigned long v)
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
int read_reply(int sock)
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

const char *reply_get(const char *key)
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
pid_t start_helper(int sock, struct argv_b *args)
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
void server_path(char *out, size_t len)
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
int server_request(const char *path, struct argv_b *a)
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

/* Start the one-shot helper with the saved arguments; 0 on success. */
int start_oneshot(void)
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

void print_errors(void)
{
	for (size_t off = 0; off < reply_len; off += strnlen(reply_buf + off, reply_len - off) + 1)
		if (!strncmp(reply_buf + off, "error=", 6))
			fprintf(stderr, "%s\n", reply_buf + off + 6);
}
