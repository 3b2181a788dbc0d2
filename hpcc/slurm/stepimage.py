"""The step's image, found and opened as the job user (hpcc.slurm.stepd runs as root).

A user may only run images they can read: the name is resolved in the user's stores with
their effective ids and groups and their HOME (`as_job_user`), and the image file is opened
with those credentials; the runtime is then given that open file (/proc/self/fd/N), never a
path the user could swap. A relative path is looked up from the job's working directory,
as the user too, and a first-use pull that sbatch started (hpcc.slurm.firstuse) is awaited
as the user before the name is given up as not found.
"""
import os

from ..errors import HpccError, ImageNotFound
from ..runtime.identity import AsUser


class as_job_user:
    """The job user's effective ids and groups (AsUser), with HOME and USER theirs and no
    XDG_DATA_HOME, so that store lookups find the user's own store; all restored on exit.
    A class, not contextlib: the helper's imports stay small."""

    def __init__(self, user):
        self.user = user

    def __enter__(self):
        u = self.user
        self.saved = {k: os.environ.get(k) for k in ("HOME", "XDG_DATA_HOME", "USER")}
        os.environ["HOME"] = u.pw_dir
        os.environ["USER"] = u.pw_name
        os.environ.pop("XDG_DATA_HOME", None)
        try:
            self.ids = AsUser(u.pw_uid, u.pw_gid, os.getgrouplist(u.pw_name, u.pw_gid))
            self.ids.__enter__()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.ids.__exit__(*exc)
        finally:
            self._restore()

    def _restore(self):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def resolve_as_user(name, user, config):
    """(ImageRecord, fd of its squashfs opened as the user)."""
    from ..resolve import resolve_image
    from ..store import StoreAccessDenied

    with as_job_user(user):
        try:
            rec = resolve_image(name, config)
        except (PermissionError, StoreAccessDenied):
            raise ImageNotFound(f"image '{name}': you ({user.pw_name}) may not read it",
                                hint="ask the image's owner or the admins for access") \
                from None
        try:
            fd = os.open(rec.sqfs_path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            raise ImageNotFound(f"image '{name}' exists but you ({user.pw_name}) may not "
                                "read it", hint="ask the image's owner or the admins "
                                "for access") from None
        except FileNotFoundError:
            raise ImageNotFound(f"image '{name}' is listed in the store but its file "
                                f"{rec.sqfs_path} is missing",
                                hint=f"pull it again with 'gateway pull {name}'") from None
    return rec, fd


def wait_for_first_use(image, user, config, note):
    """A pull of the image started by sbatch (hpcc.slurm.firstuse) is awaited, as the user.
    True when one was under way and finished; raises with its reason when it failed."""
    from .firstuse import pending_path, wait_pending

    with as_job_user(user):
        try:
            marker = pending_path(config, image)
        except HpccError:
            return False
        if not (os.path.exists(marker) or os.path.exists(marker + ".failed")):
            return False
        reason = wait_pending(image, config, note)
    if reason:
        raise ImageNotFound(reason, hint="pull it with 'hpcc pull " + image + "' and submit "
                            "the job again")
    return True


def is_relative_path(image):
    """Is IMAGE (as typed) a relative path of an image file? Found from the job's working
    directory, like any relative path the user types."""
    return not image.startswith("/") and (
        image.startswith(("./", "../")) or image.endswith((".sqfs", ".sqsh", ".squashfs")))


def resolve_in_cwd(args, user, config):
    """The image given as a path relative to the job's working directory."""
    image = args["image"]
    path = os.path.normpath(os.path.join(args["cwd"], image))
    groups = os.getgrouplist(user.pw_name, user.pw_gid)
    with AsUser(user.pw_uid, user.pw_gid, groups):
        exists = os.path.isfile(path)
    if not exists:
        if is_relative_path(image):
            raise ImageNotFound(f"image file {image} does not exist in {args['cwd']} (the "
                                "job's working directory)")
        return resolve_as_user(image, user, config)  # the store's own message
    return resolve_as_user(path, user, config)
