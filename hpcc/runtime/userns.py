"""Why this host refuses unprivileged user namespaces, in words an admin can act on.

The launcher calls `explain` only after unshare(CLONE_NEWUSER) (or the first mount in the
new namespace) failed, and `hpcc doctor` calls `settings` and `explain` for its report. It
reads sysctls under /proc/sys and nothing else. The sysctls are per user namespace where
the kernel makes them so (user.max_user_namespaces): what this process sees is what limits
it.
"""
import errno

MAX_USER_NAMESPACES = "/proc/sys/user/max_user_namespaces"
UNPRIVILEGED_CLONE = "/proc/sys/kernel/unprivileged_userns_clone"  # Debian/old Ubuntu only
APPARMOR_RESTRICT = "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"  # Ubuntu 23.10+

SLURM_CHOICE = ("or run through Slurm (srun --container-image=IMAGE), where hpcc's root "
                "helper builds the container")


def read_sysctl(path):
    """The integer in a sysctl file, or None when the file is absent or unreadable."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def settings():
    """{sysctl name: value or None (absent)} of the three settings that gate user namespaces."""
    return {
        "user.max_user_namespaces": read_sysctl(MAX_USER_NAMESPACES),
        "kernel.unprivileged_userns_clone": read_sysctl(UNPRIVILEGED_CLONE),
        "kernel.apparmor_restrict_unprivileged_userns": read_sysctl(APPARMOR_RESTRICT),
    }


def explain(err_no=None, values=None):
    """(cause, fix) for a refused user namespace, from the sysctls (and the errno, if any).
    cause and fix are phrases without a trailing period; fix names the sysctl to set."""
    v = settings() if values is None else values
    limit = v.get("user.max_user_namespaces")
    if limit == 0:
        return ("this host allows no user namespaces (user.max_user_namespaces = 0)",
                "ask the admin to enable them (sysctl -w user.max_user_namespaces=15000, "
                "kept in /etc/sysctl.d/)")
    if err_no == errno.ENOSPC:
        return (f"the limit of {limit} user namespaces (user.max_user_namespaces) is reached",
                "ask the admin to raise user.max_user_namespaces")
    if v.get("kernel.unprivileged_userns_clone") == 0:
        return ("this host allows user namespaces to root only "
                "(kernel.unprivileged_userns_clone = 0)",
                "ask the admin to enable them (sysctl -w kernel.unprivileged_userns_clone=1, "
                "kept in /etc/sysctl.d/)")
    if v.get("kernel.apparmor_restrict_unprivileged_userns") == 1:
        return ("AppArmor restricts unprivileged user namespaces "
                "(kernel.apparmor_restrict_unprivileged_userns = 1) and hpcc's interpreter "
                "has no profile allowing them",
                "ask the admin to run hpcc's `make install` as root, which installs that "
                "profile (README, \"Ubuntu\")")
    return ("a security policy (seccomp filter or security module) refuses them",
            "ask the admin to allow unprivileged user namespaces for hpcc")


def launch_message(err_no, strerror):
    """The launcher's one line (without the `hpcc: ` prefix) when it cannot get a user
    namespace: what failed, why, and the two ways out."""
    cause, fix = explain(err_no)
    return (f"cannot create a user namespace ({strerror}): {cause}; {fix}, {SLURM_CHOICE} "
            "(`hpcc doctor` explains)")
