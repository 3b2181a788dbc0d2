"""Images on first use: an image named by srun, salloc or sbatch that is in no store is
fetched once, on the submit host, as the user, before the job's tasks start.

spank_hpcc.so runs this on the submit host (srun, salloc, sbatch; never in a step on a
compute node), as the user who typed the command, with the command's terminal:

    python3 -I -m hpcc.slurm.firstuse wait|detach IMAGE

- the image is a file, or a store has it: exit 0 at once (the usual case: one lookup; it
  leaves a marker, seen_path, with which the plugin skips this process for an hour);
- `wait` (srun, salloc): what `hpcc pull IMAGE` does runs in the foreground (in this
  process, without the command line's click layer), progress on the user's terminal,
  and the command goes on when it succeeded (it stops with the pull's message when it
  failed);
- `detach` (sbatch): the pull is handed to a background process and sbatch returns at
  once. A marker in the user's store (.pending/<hash of the reference>) says that the pull
  is under way; the job's first step (hpcc.slurm.stepd) waits for the marker to go, with a
  message in the job's output, and fails with the pull's last line when it failed.

`hpcc pull` goes through the site's gateway service when one is configured, else into the
user's store: compute nodes never pull. Exit codes: 0 go on, 1 the image cannot be had.
"""
import os
import sys

from . import fork_detached

PENDING_DIR = ".pending"
WAIT_LIMIT = 3600  # seconds a first step waits for a pull started by sbatch
SEEN_TTL = 3600    # the plugin skips this process for an image found less than this ago


def seen_path(image):
    """A marker that IMAGE (as typed) was found in a store: spank_hpcc.so checks it with one
    stat and skips starting Python for the next SEEN_TTL seconds (srun's cost on the submit
    host). Named by the FNV-1a hash the plugin computes (64-bit, hex)."""
    h = 1469598103934665603
    for b in image.encode(errors="surrogateescape"):
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hpcc", "seen", f"{h:016x}")


def mark_seen(image):
    path = seen_path(image)
    try:
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        with open(path, "w"):
            pass
        os.utime(path)
    except OSError:
        pass  # only a speed-up


def _is_path(image):
    return image.startswith(("/", "./", "../")) or image.endswith((".sqfs", ".sqsh",
                                                                    ".squashfs"))


def pending_name(image):
    """File name of the marker of a pull of `image` (its normalised reference)."""
    import hashlib

    from ..reference import parse_reference
    return hashlib.sha256(str(parse_reference(image)).encode()).hexdigest()[:32]


def pending_path(config, image):
    from ..store import Store
    return os.path.join(Store.user(config).root, PENDING_DIR, pending_name(image))


def _hpcc():
    return os.path.join(os.path.dirname(sys.executable), "hpcc")


def _have(image, config):
    """A store has the image (also one the user may not read: the step says so)."""
    from ..store import Store, StoreAccessDenied
    site = Store.site(config)
    for store in (Store.user(config), Store.private(site.root, os.geteuid()), site):
        try:
            if store.find(image) is not None:
                return True
        except (PermissionError, StoreAccessDenied):
            return True
        except FileNotFoundError:
            continue
    return False


def detach(image, config):
    """Start `hpcc pull IMAGE` in the background, behind a marker the first step waits on."""
    marker = pending_path(config, image)
    os.makedirs(os.path.dirname(marker), 0o700, exist_ok=True)
    log = marker + ".log"
    failed = marker + ".failed"
    for p in (failed, log):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    with open(marker, "w") as f:
        f.write(f"{os.uname().nodename} {os.getpid()}\n")
    if not fork_detached():
        return
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        import subprocess
        code = subprocess.call([_hpcc(), "pull", image])
        if code != 0:
            os.rename(log, failed)
        else:
            os.unlink(log)
        os.unlink(marker)
    finally:
        os._exit(0)


def wait_pending(image, config, note, limit=WAIT_LIMIT):
    """In the first step (as the job user): when a pull of `image` started by sbatch is
    under way, call note(message) once and wait for it. Returns None when there was none or
    it finished, else the one-line reason it failed."""
    import time
    try:
        marker = pending_path(config, image)
    except Exception:  # noqa: BLE001 - not a reference: nothing was pulled for it
        return None
    failed = marker + ".failed"
    if os.path.exists(marker):
        note(f"hpcc: waiting for image '{image}': it is being pulled for this job "
             "(started by sbatch on the submit host)")
        deadline = time.monotonic() + limit
        while os.path.exists(marker):
            if time.monotonic() > deadline:
                return f"the pull of '{image}' started by sbatch did not finish in {limit} s"
            time.sleep(0.5)
    if os.path.exists(failed):
        try:
            with open(failed, errors="replace") as f:
                lines = [ln.strip() for ln in f if ln.strip()]
        except OSError:
            lines = []
        return (f"the pull of '{image}' started by sbatch failed: "
                + (lines[-1] if lines else "no message"))
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("wait", "detach"):
        print("usage: python -m hpcc.slurm.firstuse wait|detach IMAGE", file=sys.stderr)
        return 2
    mode, image = argv
    if _is_path(image) or (os.sep in image and os.path.isfile(image)):
        return 0  # a file: the step opens it (or says it is missing)
    from ..errors import HpccError
    from ..launchcache import LaunchCache, load_config_cached
    try:
        cache = LaunchCache()
        config = load_config_cached(cache)
        cache.save()
        if _have(image, config):
            mark_seen(image)
            return 0
        if mode == "detach":
            detach(image, config)
            print(f"hpcc: image '{image}' is in no store: pulling it for this job in the "
                  "background; the job's first step waits for it", file=sys.stderr)
            return 0
    except HpccError as e:
        print(f"hpcc: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"hpcc: cannot prepare the pull of '{image}': {e.strerror}: {e.filename}",
              file=sys.stderr)
        return 1
    print(f"hpcc: image '{image}' is in no store: pulling it before the step starts",
          file=sys.stderr)
    sys.stderr.flush()
    if _pull(image) == 0:
        mark_seen(image)
        return 0
    return 1


def _pull(image):
    """`hpcc pull IMAGE` in this process, without its command line: the check and the pull
    share one interpreter and its imports, and click with the other image commands is not
    loaded (~20 ms of a first-use pull; bench/srun.sh part 4). The same config (validated
    as `hpcc pull` validates it), store, progress and one-line errors as `hpcc pull`."""
    from ..config import load_config
    from ..errors import HpccError
    from ..gateway.progress import make_reporter
    from ..gateway.userpull import pull_for_user
    from ..store import Store
    try:
        config = load_config()
        pull_for_user(config, Store.user(config), image, reporter=make_reporter())
    except HpccError as e:
        print(f"hpcc: {e}", file=sys.stderr)
        return e.exit_code or 1
    except KeyboardInterrupt:
        print("hpcc: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        print(f"hpcc: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
