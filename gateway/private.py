"""Images pulled with a user's own registry credentials: readable by that user only.

They live in the site store's `.private/<uid>/` directory, a complete store of its own
(images, tags, blob cache). The gateway service's account owns everything; `.private` is
mode 0711 (no one can list whose private stores exist) and `<uid>` is mode 0700 with one
POSIX ACL entry giving user <uid> read and search access. Files inside are 0644, but no
other user can reach them: the directory is the gate. Root and the service account can read
them (the Slurm helper launches the user's job from there).

The account needs no privilege for this: the owner of a file may set its ACL. A filesystem
without POSIX ACLs makes private pulls fail with one line instead of exposing the image.
"""
import errno
import os
import struct

from hpcc.errors import StoreError
from hpcc.store import PRIVATE_DIR, Store

# linux/posix_acl_xattr.h
_ACL_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_UNDEFINED_ID = 0xFFFFFFFF


def _acl(owner_perm, uid, user_perm):
    entries = [(_USER_OBJ, owner_perm, _UNDEFINED_ID), (_USER, user_perm, uid),
               (_GROUP_OBJ, 0, _UNDEFINED_ID), (_MASK, user_perm, _UNDEFINED_ID),
               (_OTHER, 0, _UNDEFINED_ID)]
    return struct.pack("<I", _ACL_VERSION) + b"".join(
        struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


def grant_user(path, uid):
    """Owner rwx, user `uid` r-x, nobody else anything (access ACL of a directory)."""
    try:
        os.setxattr(path, "system.posix_acl_access", _acl(7, uid, 5))
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise StoreError(f"the site store's filesystem ({path}) does not support POSIX "
                             "ACLs, which private images need",
                             hint="ask the site's admins (mount it with ACLs)") from None
        raise StoreError(f"cannot set the access list of {path}: {e.strerror}") from None


def private_store(site_root, uid):
    """The private store of `uid` under `site_root`, created and gated if missing."""
    base = os.path.join(site_root, PRIVATE_DIR)
    root = os.path.join(base, str(int(uid)))
    try:
        os.makedirs(base, mode=0o711, exist_ok=True)
        os.chmod(base, 0o711)
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            pass
        os.chmod(root, 0o700)
    except OSError as e:
        raise StoreError(f"cannot create the private store {root}: {e.strerror}") from None
    grant_user(root, int(uid))
    store = Store(root)
    store.ensure()
    return store
