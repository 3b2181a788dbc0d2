/* Escape probes run inside a container by tests/security/test_escape_probes.py.
 *
 * Each probe attempts one thing a contained process must not be able to do and prints one
 * line "NAME SAFE errno-name" when the kernel refused it, or "NAME UNSAFE what-happened".
 * `probe euid` prints the effective uid (run from a setuid-root copy of this program).
 * Built static by the test (gcc -static), so it runs in the busybox test image.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static void report(const char *name, int r, const char *what)
{
    if (r < 0)
        printf("%s SAFE %s\n", name, strerrorname_np(errno) ? strerrorname_np(errno) : "?");
    else
        printf("%s UNSAFE %s\n", name, what);
}

static int open_w(const char *path)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd >= 0)
        close(fd);
    return fd;
}

static int open_r(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char c;
        if (read(fd, &c, 1) < 0) {  /* opened but unreadable counts as refused */
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        close(fd);
    }
    return fd;
}

/* kill(pid, 0) on every process owned by host root: must be refused for each */
static void signals(void)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    int tried = 0, allowed = 0, last_errno = 0;
    if (!d) {
        printf("signal_root SAFE no-proc\n");
        return;
    }
    while ((e = readdir(d))) {
        char path[300], line[256];
        int pid = atoi(e->d_name);
        if (pid <= 0 || pid == getpid())
            continue;
        snprintf(path, sizeof path, "/proc/%d/status", pid);
        FILE *f = fopen(path, "re");
        if (!f)
            continue;
        int uid = -1;
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "Uid:\t%d", &uid) == 1)
                break;
        fclose(f);
        if (uid != 0)
            continue;
        tried++;
        if (kill(pid, 0) == 0)
            allowed++;
        else
            last_errno = errno;
    }
    closedir(d);
    if (allowed)
        printf("signal_root UNSAFE %d of %d root processes accept signals\n", allowed, tried);
    else
        printf("signal_root SAFE %s (%d tried)\n",
               tried ? strerrorname_np(last_errno) : "none-visible", tried);
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "euid")) {
        printf("%d\n", (int)geteuid());
        return 0;
    }
    const char *hostdir = argc > 1 ? argv[1] : "/hostdir";
    char p[512];

    mkdir("/tmp/probe-chroot", 0755);
    report("chroot", chroot("/tmp/probe-chroot"), "chroot() succeeded");
    report("setuid0", setuid(0), "setuid(0) succeeded");
    gid_t g0 = 0;
    report("setgroups", setgroups(1, &g0), "setgroups([0]) succeeded");
    report("mknod_mem", mknod("/tmp/probe-mem", S_IFCHR | 0666, makedev(1, 1)),
           "created a /dev/mem node");
    report("mount_tmpfs", mount("none", "/tmp", "tmpfs", 0, NULL), "mounted a tmpfs");
    report("remount_root_rw", mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND, NULL),
           "remounted / read-write");
    report("umount_root", umount2("/", MNT_DETACH), "detached /");
    signals();
    report("proc_kcore", open_r("/proc/kcore"), "read /proc/kcore");
    report("dev_mem", open_r("/dev/mem"), "read /dev/mem");
    report("sysrq_trigger", open_w("/proc/sysrq-trigger"), "opened /proc/sysrq-trigger");
    report("core_pattern", open_w("/proc/sys/kernel/core_pattern"),
           "opened core_pattern for writing");
    report("sys_uevent_helper", open_w("/sys/kernel/uevent_helper"),
           "opened /sys/kernel/uevent_helper for writing");
    report("image_write", open_w("/bin/busybox"), "opened the image's /bin/busybox for writing");
    report("image_create", open("/probe-new", O_CREAT | O_WRONLY | O_CLOEXEC, 0644),
           "created /probe-new in the root");
    snprintf(p, sizeof p, "%s/probe-new", hostdir);
    report("hostdir_create", open(p, O_CREAT | O_WRONLY | O_CLOEXEC, 0644),
           "created a file in the bound host directory");
    snprintf(p, sizeof p, "%s/file", hostdir);
    report("hostdir_write", open_w(p), "opened a host file for writing through the bind");
    return 0;
}
