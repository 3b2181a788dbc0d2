/* hpcc-mount: a kernel mount of one trusted site image, handed to an unprivileged launcher.
 *
 *   hpcc-mount PATH     fd 0: the image, opened for reading by the caller (proof that the
 *                             caller may read it); fd 1: a UNIX socket; fd 2: errors.
 *
 * Installed setuid root. It decides by itself, on file descriptors, whether PATH is a
 * trusted image: a regular file under the site store (the `[store] path` of the root-owned
 * site config HPCC_CONFIG, compiled in), reached from / one component at a time without
 * following a symlink; every directory above the store root owned by root; the store root,
 * the directories below it and the file owned by root or the store root's owner (the
 * store's service account); nothing writable by group or others; fd 0 the same inode. The
 * same rule as root launches (hpcc/runtime/imagemount.py, trusted_for_kernel): keep the
 * two in step. It then attaches the file to a free loop device (read-only, autoclear),
 * creates a squashfs mount with fsopen/fsmount (read-only, nosuid, nodev), id-maps it (the
 * image's uid/gid 0 become the caller's), locks its flags (a copy into a less privileged
 * user namespace's mount namespace), drops every privilege for good and sends the mount fd
 * over fd 1 (SCM_RIGHTS). The caller attaches it with move_mount in its own namespaces.
 *
 * It reads no environment, parses no options, allocates nothing, runs nothing.
 * Exit status: 0 sent, 1 refused (not a trusted image), 2 usage, 4 failed.
 * See docs/launcher.md, "The mount helper".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/loop.h>
#include <linux/mount.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef HPCC_CONFIG
#define HPCC_CONFIG "/etc/hpcc/hpcc.toml"
#endif
#define DEFAULT_STORE "/var/lib/hpcc/images"  /* the site config's default, etc/hpcc.toml */
#define LOOP_MAJOR 7

enum { REFUSED = 1, USAGE = 2, FAILED = 4 };

static char conf[65536], store[4096], walkbuf[4096];

static void __attribute__((noreturn, format(printf, 2, 3))) die(int code, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    dprintf(2, "hpcc-mount: %s\n", msg);
    exit(code);
}

/* Owned by root or `alt`, not writable by group or others. */
static int trusted(const struct stat *st, uid_t alt)
{
    return (st->st_uid == 0 || st->st_uid == alt) && !(st->st_mode & (S_IWGRP | S_IWOTH));
}

/* Walk absolute `path` from / without following symlinks. Directories at depth < `from`
 * must be trusted with alt = 0, the one at depth `from` sets *alt to its owner (unless
 * `alt` is NULL), deeper ones are trusted with *alt. The last component is opened O_RDONLY
 * and must be a trusted regular file. Returns its fd; exits with `code` on a violation. */
static int open_trusted(const char *path, int from, uid_t *alt, int code, struct stat *st)
{
    uid_t owner = 0;
    int depth = 0, fd;
    char *save, *comp, *next;
    if (path[0] != '/' || strlen(path) >= sizeof walkbuf)
        die(code, "%.200s: not an absolute path of at most %zu bytes", path, sizeof walkbuf - 1);
    strcpy(walkbuf, path);
    if ((fd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0 || fstat(fd, st) < 0)
        die(FAILED, "cannot open /: %s", strerror(errno));
    comp = strtok_r(walkbuf, "/", &save);
    while (comp) {
        if (!trusted(st, owner))
            die(code, "%s: a directory on its path is owned by uid %u or writable by others",
                path, (unsigned)st->st_uid);
        if (!strcmp(comp, ".") || !strcmp(comp, ".."))
            die(code, "%s: '.' and '..' are not allowed", path);
        next = strtok_r(NULL, "/", &save);
        int nfd = openat(fd, comp, next ? O_PATH | O_NOFOLLOW | O_CLOEXEC
                                        : O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (nfd < 0 || fstat(nfd, st) < 0)
            die(errno == EMFILE || errno == ENFILE || errno == ENOMEM ? FAILED : code,
                "%s: cannot open %s: %s", path, comp, strerror(errno));
        close(fd);
        fd = nfd;
        if (next && !S_ISDIR(st->st_mode))
            die(code, "%s: %s is not a directory (symlinks are not followed)", path, comp);
        if (++depth == from && alt)
            owner = *alt = st->st_uid;
        comp = next;
    }
    if (!S_ISREG(st->st_mode) || !trusted(st, owner))
        die(code, "%s: not a regular file owned by root or uid %u and writable only by its owner",
            path, (unsigned)owner);
    return fd;
}

/* The value of `path` in the [store] table of the root-owned site config, else the default.
 * Only a basic string without escapes or a literal string is accepted. */
static void read_store_path(void)
{
    struct stat st;
    ssize_t n;
    size_t len = 0, found = 0;
    int in_store = 0, fd = open_trusted(HPCC_CONFIG, 0, NULL, FAILED, &st);
    while ((n = read(fd, conf + len, sizeof conf - 1 - len)) > 0)
        len += (size_t)n;
    if (n < 0 || len == sizeof conf - 1)
        die(FAILED, "%s: unreadable or larger than %zu bytes", HPCC_CONFIG, sizeof conf - 2);
    close(fd);
    strcpy(store, DEFAULT_STORE);
    for (char *line = conf, *nl; line; line = nl) {
        if ((nl = strchr(line, '\n')))
            *nl++ = '\0';
        line += strspn(line, " \t");
        if (*line == '[') {
            char *name = line + 1 + strspn(line + 1, " \t");
            in_store = !strncmp(name, "store", 5) && name[5 + strspn(name + 5, " \t")] == ']';
            continue;
        }
        if (!in_store || strncmp(line, "path", 4))
            continue;
        char *v = line + 4 + strspn(line + 4, " \t"), q, *end;
        if (*v++ != '=')
            continue;  /* another key that starts with "path" */
        v += strspn(v, " \t");
        q = *v;
        if ((q != '"' && q != '\'') || !(end = strchr(v + 1, q)) || found++ ||
            (q == '"' && memchr(v + 1, '\\', (size_t)(end - v - 1))) ||
            (size_t)(end - v - 1) >= sizeof store)
            die(FAILED, "%s: [store] path must be given once, as a plain quoted string",
                HPCC_CONFIG);
        memcpy(store, v + 1, (size_t)(end - v - 1));
        store[end - v - 1] = '\0';
    }
    for (len = strlen(store); len > 1 && store[len - 1] == '/'; len--)
        store[len - 1] = '\0';
}

/* Attach `img` to a free loop device, read-only, cleared when its last user goes. */
static int attach_loop(int img, char *dev, size_t devlen)
{
    struct loop_config lc;
    struct stat st;
    int ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (ctl < 0)
        die(FAILED, "cannot open /dev/loop-control: %s", strerror(errno));
    for (int tries = 0; tries < 8; tries++) {
        int n = ioctl(ctl, LOOP_CTL_GET_FREE), lfd;
        if (n < 0)
            die(FAILED, "no free loop device: %s", strerror(errno));
        snprintf(dev, devlen, "/dev/loop%d", n);
        if ((lfd = open(dev, O_RDONLY | O_CLOEXEC)) < 0 || fstat(lfd, &st) < 0)
            die(FAILED, "cannot open %s: %s", dev, strerror(errno));
        if (!S_ISBLK(st.st_mode) || major(st.st_rdev) != LOOP_MAJOR)
            die(FAILED, "%s is not a loop device", dev);
        memset(&lc, 0, sizeof lc);
        lc.fd = (unsigned)img;
        lc.info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
        if (ioctl(lfd, LOOP_CONFIGURE, &lc) == 0) {
            close(ctl);
            return lfd;
        }
        if (errno != EBUSY)
            die(FAILED, "cannot attach the image to %s: %s", dev, strerror(errno));
        close(lfd);  /* taken by another process meanwhile: ask again */
    }
    die(FAILED, "no free loop device: each one offered was taken by another process");
}

/* A detached squashfs mount of the loop device: read-only, nosuid, nodev. */
static int mount_squashfs(const char *dev)
{
    char err[512];
    int fs = (int)syscall(SYS_fsopen, "squashfs", FSOPEN_CLOEXEC), mnt = -1;
    if (fs < 0)
        die(FAILED, "fsopen(squashfs): %s", strerror(errno));
    if (syscall(SYS_fsconfig, fs, FSCONFIG_SET_STRING, "source", dev, 0) < 0 ||
        syscall(SYS_fsconfig, fs, FSCONFIG_SET_FLAG, "ro", NULL, 0) < 0 ||
        syscall(SYS_fsconfig, fs, FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0 ||
        (mnt = (int)syscall(SYS_fsmount, fs, FSMOUNT_CLOEXEC, MOUNT_ATTR_RDONLY |
                            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)) < 0) {
        int e = errno;
        ssize_t n = read(fs, err, sizeof err - 1);  /* the kernel's own words, if any */
        for (err[n > 2 ? n : 0] = '\0'; n > 2 && err[n - 1] == '\n'; n--)
            err[n - 1] = '\0';
        die(FAILED, "cannot mount the image: %s%s%s", strerror(e), n > 2 ? ": " : "",
            n > 2 ? err + 2 : "");
    }
    close(fs);
    return mnt;
}

/* A user namespace mapping uid 0 and gid 0 to the caller: made by a child that tells us
 * when it has unshared, then waits until we close `hold`. */
static int caller_userns(uid_t uid, gid_t gid)
{
    char path[64], map[32];
    int ready[2], hold[2], ns = -1, ok;
    if (pipe2(ready, O_CLOEXEC) < 0 || pipe2(hold, O_CLOEXEC) < 0)
        die(FAILED, "pipe: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0)
        die(FAILED, "fork: %s", strerror(errno));
    if (pid == 0) {
        close(hold[1]);
        if (unshare(CLONE_NEWUSER) == 0 && write(ready[1], "u", 1) == 1)
            (void)!read(hold[0], map, 1);
        _exit(0);
    }
    close(ready[1]);
    close(hold[0]);
    ok = read(ready[0], map, 1) == 1;
    for (int i = 0; i < 2 && ok; i++) {
        int n = snprintf(map, sizeof map, "0 %u 1\n", i ? (unsigned)gid : (unsigned)uid);
        snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, i ? "gid_map" : "uid_map");
        int fd = open(path, O_WRONLY | O_CLOEXEC);
        ok = fd >= 0 && write(fd, map, (size_t)n) == n;
        if (fd >= 0)
            close(fd);
    }
    snprintf(path, sizeof path, "/proc/%d/ns/user", (int)pid);
    ok = ok && (ns = open(path, O_RDONLY | O_CLOEXEC)) >= 0;
    int e = errno;
    close(hold[1]);
    close(ready[0]);
    waitpid(pid, NULL, 0);
    if (!ok)
        die(FAILED, "cannot make the id-mapping user namespace: %s", strerror(e));
    return ns;
}

/* Become the caller for good: no groups, no capabilities, no way back. */
static void drop_privileges(uid_t uid, gid_t gid)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct caps[2];
    for (int cap = 0; prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0; cap++)
        ;
    memset(caps, 0, sizeof caps);
    if (errno != EINVAL || prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 ||
        setgroups(0, NULL) < 0 || setresgid(gid, gid, gid) < 0 || setresuid(uid, uid, uid) < 0 ||
        syscall(SYS_capset, &hdr, caps) < 0 || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
        (uid != 0 && (setuid(0) == 0 || seteuid(0) == 0)) || prctl(PR_CAPBSET_READ, 0) != 0)
        die(FAILED, "cannot drop privileges: %s", strerror(errno));
}

/* Show the image's uid/gid 0 as the caller's; lock read-only, nosuid and nodev so that the
 * caller cannot clear them in its own namespaces; then drop privileges. The lock is the
 * kernel's: mounts copied into a mount namespace of a less privileged user namespace keep
 * their flags for good (MNT_LOCK_*), and a clone of such a mount keeps them too. */
static int idmap_lock_drop(int mnt, uid_t uid, gid_t gid)
{
    struct mount_attr attr = {MOUNT_ATTR_IDMAP, 0, 0, 0};
    attr.userns_fd = (unsigned)caller_userns(uid, gid);
    if (syscall(SYS_mount_setattr, mnt, "", AT_EMPTY_PATH, &attr, sizeof attr) < 0)
        die(FAILED, "this kernel cannot id-map a squashfs mount: %s", strerror(errno));
    close((int)attr.userns_fd);
    if (unshare(CLONE_NEWNS) < 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0 ||
        syscall(SYS_move_mount, mnt, "", AT_FDCWD, "/dev", MOVE_MOUNT_F_EMPTY_PATH) < 0)
        die(FAILED, "cannot attach the mount in a private namespace: %s", strerror(errno));
    close(mnt);
    drop_privileges(uid, gid);
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) < 0)
        die(FAILED, "cannot create a user namespace: %s", strerror(errno));
    if ((mnt = (int)syscall(SYS_open_tree, AT_FDCWD, "/dev", OPEN_TREE_CLONE |
                            OPEN_TREE_CLOEXEC)) < 0)
        die(FAILED, "cannot clone the locked mount: %s", strerror(errno));
    return mnt;
}

int main(int argc, char **argv)
{
    struct stat st, given;
    struct msghdr msg;
    struct iovec iov;
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } cm;
    char dev[32], byte = 'm';
    uid_t svc = 0;
    int depth = 0;

    if (fcntl(2, F_GETFD) < 0 && open("/dev/null", O_WRONLY) != 2)
        return USAGE;  /* never let a file we open later become stderr */
    if (argc != 2)
        die(USAGE, "usage: hpcc-mount PATH (fd 0: the image, fd 1: a UNIX socket)");
    int fl = fcntl(0, F_GETFL);
    if (fstat(0, &given) < 0 || fl < 0 || (fl & O_PATH) || (fl & O_ACCMODE) == O_WRONLY)
        die(USAGE, "fd 0 must be the image, open for reading");
    if (fstat(1, &st) < 0 || !S_ISSOCK(st.st_mode))
        die(USAGE, "fd 1 must be a UNIX socket");
    if (geteuid() != 0)
        die(FAILED, "not running as root (installed without the setuid bit?)");
    read_store_path();
    size_t slen = strlen(store);
    if (strncmp(argv[1], store, slen) || argv[1][slen] != '/' || slen < 2)
        die(REFUSED, "%.200s is not in the site store %s", argv[1], store);
    for (const char *p = store; *p; p++)
        depth += p[0] != '/' && (p == store || p[-1] == '/');  /* components of the store */
    int img = open_trusted(argv[1], depth, &svc, REFUSED, &st);  /* its owner: the service */
    if (st.st_dev != given.st_dev || st.st_ino != given.st_ino)
        die(REFUSED, "fd 0 is not %.200s", argv[1]);
    char magic[4];
    if (pread(img, magic, 4, 0) != 4 || memcmp(magic, "hsqs", 4))
        die(FAILED, "%.200s is not a squashfs image", argv[1]);
    int lfd = attach_loop(img, dev, sizeof dev);
    int mnt = idmap_lock_drop(mount_squashfs(dev), getuid(), getgid());
    if (fstat(lfd, &st) < 0 || fstat(mnt, &given) < 0 || given.st_dev != st.st_rdev)
        die(FAILED, "the mount is not of %s", dev);
    close(lfd);  /* autoclear: the loop device now lives as long as the mount */
    close(img);

    memset(&msg, 0, sizeof msg);
    iov.iov_base = &byte;
    iov.iov_len = 1;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cm.buf;
    msg.msg_controllen = sizeof cm.buf;
    cm.h.cmsg_level = SOL_SOCKET;
    cm.h.cmsg_type = SCM_RIGHTS;
    cm.h.cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(&cm.h), &mnt, sizeof(int));
    if (sendmsg(1, &msg, MSG_NOSIGNAL) != 1)
        die(FAILED, "cannot send the mount: %s", strerror(errno));
    return 0;
}
