"""Acting as the job user inside a root process (the Slurm helper, root launches).

`AsUser` switches the effective uid, gid and supplementary groups to the user's for the
duration of a `with` block (the real and saved ids stay 0, so the block can switch back):
files opened and access checks made inside it get the user's rights, no more. It is how
root opens a user's image and bind sources, and where the user's own processes must not
gain anything from root doing the work. Not thread-safe: the ids are per thread in the
kernel but glibc applies them to every thread, so use it where one thread runs.
"""
import os


class AsUser:
    """Effective identity of a user (groups, gid, uid) within a root process. Does nothing
    when the process is not root or the user is root."""

    def __init__(self, uid, gid, groups=()):
        self.uid, self.gid, self.groups = uid, gid, list(groups)
        self.active = os.geteuid() == 0 and uid != 0
        self._saved = None

    @classmethod
    def of_spec(cls, user):
        """From an OCI process.user object ({uid, gid, additionalGids})."""
        return cls(user["uid"], user["gid"], user.get("additionalGids") or [])

    def __enter__(self):
        if self.active:
            self._saved = os.getgroups()
            os.setgroups(self.groups)
            os.setresgid(-1, self.gid, -1)
            os.setresuid(-1, self.uid, -1)
        return self

    def __exit__(self, *exc):
        if self.active:
            os.setresuid(-1, 0, -1)
            os.setresgid(-1, 0, -1)
            os.setgroups(self._saved or [])
        return False


class NoChange:
    """A `with` block that changes nothing (unprivileged launches)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
