/* Run inside a container by test_mount_kinds.py: what a program of the image can do with
 * its own setuid bit, a device node of the image and the image's mount. Prints key=value. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(void)
{
    char line[256];
    int fd = open("/node", O_RDONLY);
    printf("euid=%d\nruid=%d\n", (int)geteuid(), (int)getuid());
    printf("no_new_privs=%d\n", prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
    printf("device_node=%s\n", fd >= 0 ? "opened" : strerror(errno));
    printf("remount_root=%s\n", mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND, NULL) == 0
                                    ? "done" : strerror(errno));
    printf("setuid0=%s\n", setuid(0) == 0 ? "done" : strerror(errno));
    FILE *f = fopen("/proc/self/status", "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "Cap", 3)) {
            line[strcspn(line, ":")] = '=';
            fputs(line, stdout);
        }
    return 0;
}
