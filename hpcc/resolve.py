"""Which image a name means: the order of the stores a launch looks in (a path to a .sqfs
file, the user's store, the user's private images in the site store, the site store), a tag
of the user's store naming an image only another store holds, the one-line answers when
nothing is found, and the files a resolution read (the launch cache checks them by stat).

hpcc.store owns one store (its layout, lookups, publishing, removal and gc); this module
owns the choice between stores. It is on the launch path when the launch cache misses: it
imports only the standard library and the store.
"""
import errno
import os

from .errors import ImageNotFound
from .image import is_image_path, local_image
from .reference import DIGEST_RE, local_alternative, parse_reference
from .store import Store, StoreAccessDenied


def resolve_image(arg, config, cache=None):
    """Resolve what a user typed: a path to a .sqfs file, else the user's store, then the
    user's private images in the site store, then the site store. A tag in the user's store
    may name an image that only the site store holds (`hpcc pull` of an image the site
    already has converts nothing). O(1) file operations; never lists a store."""
    if is_image_path(arg):
        return local_image(arg, cache)
    user = Store.user(config)
    site = Store.site(config)
    # geteuid: the Slurm helper resolves with the job user's effective uid
    stores = (user, Store.private(site.root, os.geteuid()), site)
    denied = None
    for store in stores:
        try:
            rec = store.find(arg)
        except StoreAccessDenied as e:
            denied = denied or e
            continue
        except OSError as e:
            if e.errno in (errno.EACCES, errno.ENOENT):
                continue
            raise
        if rec is not None:
            return rec
    rec = shared_image(user, stores[1:], arg)
    if rec is not None:
        return rec
    if denied is not None:
        raise denied
    if os.path.lexists(arg):
        what = "a directory" if os.path.isdir(arg) else "a file"
        raise ImageNotFound(f"image '{arg}' is not in the store, and '{arg}' here is {what}",
                            hint=f"to run a .sqfs file give its path: ./{arg}")
    raise ImageNotFound(f"image '{arg}' not found in the store",
                        hint=f"pull it with 'hpcc pull {arg}' (or ask an admin to 'gateway pull "
                             f"{arg}')")


def resolution_paths(name, config):
    """The tag files resolve_image(name) reads, in every store it looks in (the launch
    cache checks them to know the answer still holds); [] for a digest."""
    if name.startswith("sha256") or "@" in name:
        return []
    ref = parse_reference(name)
    local = local_alternative(name)
    user = Store.user(config)
    site = Store.site(config)
    paths = []
    for store in (user, Store.private(site.root, os.getuid()), site):
        paths.append(store.ref_path(ref))
        if local is not None:
            paths.append(store.ref_path(local))
    return paths


def shared_image(user, others, name):
    """The image a tag of the user's store points to when one of `others` holds it."""
    if name.startswith("sha256") or DIGEST_RE.match(name):
        return None
    ref = parse_reference(name)
    digest = ref.digest or user.lookup_tag(ref)
    if digest is None:
        return None
    for store in others:
        try:
            rec = store.get(digest)
        except (OSError, ImageNotFound, StoreAccessDenied):
            continue
        if rec is not None:
            return rec
    return None
