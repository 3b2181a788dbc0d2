"""Keep the site store (with its users' private stores) within its size budget (config
`policy.store_budget_mb`): remove the least recently used images first, never one that a
pending or running Slurm job names, nor one being pulled.

"Recently used" is the later of the squashfs file's access time (mounts read it; relatime
updates it at least daily) and the metadata file's change time (a pull of an image already
present rewrites its tags). When Slurm cannot be asked which images jobs name, nothing is
evicted: an image a job waits for is worth more than the budget.
"""
import os

from hpcc.errors import HpccError

RUNNING = "RUNNING"


def job_image_digests(stores, env=None):
    """Digests, in any of `stores`, of the images named by pending and running jobs."""
    from hpcc.slurm.jobs import jobs, pending_job_images

    names = set(pending_job_images(env=env))
    names.update(j.container.strip() for j in jobs(states={RUNNING}, env=env)
                 if j.container.strip())
    out = set()
    for name in names:
        if name.startswith(("/", "./", "../")):
            continue
        for store in stores:
            try:
                rec = store.find(name)
            except HpccError:
                continue
            if rec is not None:
                out.add(rec.digest)
    return out


def _last_used(rec):
    t = 0.0
    for p in (rec.sqfs_path, rec.store.meta_path(rec.digest)):
        try:
            st = os.stat(p)
        except OSError:
            continue
        t = max(t, st.st_atime, st.st_mtime)
    return t


def evict(stores, budget, *, busy=(), protected=None, env=None):
    """Remove least-recently-used images of `stores` (the site store and its users' private
    stores: one budget for all) until their images fit in `budget` bytes. `busy`: digests
    never to evict (pulls in progress, the image just pulled). `protected`: digests jobs
    name (default: asked from Slurm). Returns [(digest, size, tags, store root)] removed."""
    images = [rec for store in stores for rec in store.images()]
    total = sum(rec.meta.get("size") or 0 for rec in images)
    if total <= budget:
        return []
    if protected is None:
        protected = job_image_digests(stores, env=env)
    keep = set(busy) | set(protected)
    removed = []
    for rec in sorted(images, key=_last_used):
        if total <= budget:
            break
        if rec.digest in keep:
            continue
        size = rec.meta.get("size") or 0
        store = rec.store
        with store.lock(rec.digest, blocking=False) as got:
            if not got:
                continue
            tags, _ = store.remove(rec.digest)
        total -= size
        removed.append((rec.digest, size, tags, store.root))
    return removed
