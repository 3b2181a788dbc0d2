"""`hpcc`: run, exec and shell (the launch path), plus the user's store commands.

The launch path is kept cheap: a hand-written option parser (no click, argparse, jsonschema,
cffi, rich or requests), the config read without schema validation (`hpcc config check`
validates), the image resolved with O(1) store lookups. pull, images, inspect, rm, gc are
handed to the gateway's click CLI, imported only then.
"""
import os
import sys
import time

from .errors import EXIT_LAUNCH, EXIT_USAGE, HpccError, UsageError

USAGE = """\
usage: hpcc [-v|-q] COMMAND ...

Run commands in container images (squashfs files in the image store).

commands:
  run [OPTIONS] IMAGE [--] [CMD [ARG...]]   run the image's ENTRYPOINT/CMD (CMD replaced by
                                            the given command), like docker run
  exec [OPTIONS] IMAGE CMD [ARG...]         run a command as is
  shell [OPTIONS] IMAGE [ARG...]            start your shell in the image (or /bin/sh)
  pull REF                                  pull an image: through the site's gateway
                                            service when it runs one, else into your store
  images | inspect REF | rm REF             list, show, remove images (--json for output)
  containers [--json] | containers rm NAME  list, remove your named containers (--name)
  gc                                        clean your own store (debris, layer blobs)
  login REGISTRY | logout REGISTRY          store, remove your registry credentials
  config check                              validate the site configuration
  doctor [--json] [--image IMAGE]           check this host and say how to fix problems
  version                                   print hpcc's version

Run `hpcc COMMAND --help` for the options of a command.
"""

LAUNCH_USAGE = """\
usage: hpcc {cmd} [OPTIONS] IMAGE {tail}

{what}

IMAGE is a store reference (ubuntu:22.04, name@sha256:..., sha256:...) or a path to a
.sqfs file (its image config is read from a .json file beside it, if any).

options:
  --mount SRC:DST[:ro]   bind a host path into the container (repeatable; rw by default)
  -w, --workdir DIR      working directory inside the container (default: the current
                         directory when it is bound, else the image's WorkingDir, else /)
  -e, --env K=V | K      set a variable (K alone: take it from the host; repeatable)
  --env-file FILE        read K=V lines from FILE (repeatable; before --env)
{entrypoint}  --writable             make the root writable (a tmpfs overlay, discarded at exit)
  --readonly             keep the root read-only (the default unless launcher.writable)
  --root                 be root (uid 0) in the container: a user namespace maps it to
                         you; no privilege outside (--no-root: the site default off)
  --name NAME[:FLAG]     keep the writable layer under NAME for later launches; FLAG:
                         auto (default), create, exec (attach to it running), no_exec
  --save PATH            after the command, write the container (image and writable
                         layer) to PATH as a squashfs image you can run
  --unshare net,ipc,uts  namespaces of the container's own (default: the host's)
  --home / --no-home     bind / do not bind your home directory (launcher.mount_home)
  --no-cwd               do not bind the current directory
  --user USER            run as USER (root callers only)
  --annotation K=V       add an OCI annotation (hooks select on them; repeatable)
  --mpi                  inject the host's MPI (annotation org.hpcc.mpi=1)
  --gpus SPEC            inject NVIDIA GPUs: all or 0,1 (annotation org.hpcc.gpu=SPEC)
  -v, --verbose          print what hpcc does, with timings
  -q, --quiet            print only errors
  -h, --help             show this help

Exit status: the command's; 128+N when it dies by signal N; 125 when hpcc fails before the
command starts; 126 when the command cannot be executed; 127 when it is not found.
"""

CONFIG_CHECK_USAGE = """\
usage: hpcc config check [--json] [FILE]

Validate the site configuration (FILE, else $HPCC_CONFIG, else /etc/hpcc/hpcc.toml) against
hpcc's schema, and the OCI hook configs in its launcher.hooks_dir. Prints "FILE: ok", or one
line naming the first bad key, with exit status 1.
"""

_WHAT = {
    "run": ("[--] [CMD [ARG...]]",
            "Run the image's ENTRYPOINT with its CMD, or with CMD ARG... instead."),
    "exec": ("CMD [ARG...]", "Run CMD ARG... in the image as is (no ENTRYPOINT)."),
    "shell": ("[ARG...]", "Start your login shell in the image (or /bin/sh when it lacks it)."),
}
_VALUE_OPTS = {"--mount": "mounts", "--bind": "mounts", "-w": "workdir", "--workdir": "workdir",
               "-e": "env", "--env": "env", "--env-file": "env_files",
               "--entrypoint": "entrypoint", "--user": "user", "-u": "user",
               "--annotation": "annotations", "--gpus": "gpus", "--name": "name",
               "--save": "save", "--unshare": "unshare"}
_LISTS = {"mounts", "env", "env_files", "annotations"}
_FLAGS = {"--writable": "writable", "--no-home": "no_home", "--no-cwd": "no_cwd",
          "--mpi": "mpi", "-v": "verbose", "--verbose": "verbose", "-q": "quiet",
          "--quiet": "quiet", "--readonly": "readonly", "--root": "root",
          "--no-root": "no_root", "--home": "home"}


class _Opts:
    def __init__(self):
        self.mounts, self.env, self.env_files, self.annotations = [], [], [], []
        self.workdir = self.entrypoint = self.user = self.gpus = None
        self.name = self.save = self.unshare = None
        self.writable = self.no_home = self.no_cwd = self.mpi = False
        self.readonly = self.root = self.no_root = self.home = False
        self.verbose = self.quiet = False
        self.image = None
        self.command = []


def parse_launch_args(cmd, argv, verbose=False, quiet=False):
    o = _Opts()
    o.verbose, o.quiet = verbose, quiet
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            tail, what = _WHAT[cmd]
            ep = ("  --entrypoint CMD       replace the image's ENTRYPOINT (\"\" clears it; "
                  "also drops its CMD)\n" if cmd == "run" else "")
            sys.stdout.write(LAUNCH_USAGE.format(cmd=cmd, tail=tail, what=what, entrypoint=ep))
            raise SystemExit(0)
        if a == "--":
            i += 1
            break
        if not a.startswith("-") or a == "-":
            break
        name, eq, val = a.partition("=") if a.startswith("--") else (a, "", "")
        if name in _FLAGS and not eq:
            setattr(o, _FLAGS[name], True)
            i += 1
            continue
        if name in _VALUE_OPTS and not (name == "--entrypoint" and cmd != "run"):
            key = _VALUE_OPTS[name]
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"option {name} needs a value (see hpcc {cmd} --help)")
                val = argv[i + 1]
                i += 1
            i += 1
            if key in _LISTS:
                getattr(o, key).append(val)
            else:
                setattr(o, key, val)
            continue
        raise UsageError(f"unknown option {a} for hpcc {cmd} (see hpcc {cmd} --help)")
    if i >= len(argv):
        raise UsageError(f"missing IMAGE: hpcc {cmd} [OPTIONS] IMAGE {_WHAT[cmd][0]}")
    o.image = argv[i]
    rest = argv[i + 1:]
    if rest and rest[0] == "--":
        rest = rest[1:]
    o.command = rest
    if o.command and not o.command[0]:
        raise UsageError(f"the command is an empty string: hpcc {cmd} [OPTIONS] IMAGE "
                         f"{_WHAT[cmd][0]}")
    if cmd == "exec" and not o.command:
        raise UsageError("hpcc exec needs a command: hpcc exec IMAGE CMD [ARG...]")
    for a in o.annotations:
        if "=" not in a or a.startswith("="):
            raise UsageError(f"bad --annotation '{a}': expected KEY=VALUE")
    for a, b in (("writable", "readonly"), ("root", "no_root"), ("home", "no_home")):
        if getattr(o, a) and getattr(o, b):
            raise UsageError(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} "
                             "contradict each other")
    if o.readonly and o.name:
        raise UsageError("--readonly and --name contradict each other (a named container "
                         "keeps what is written in it)")
    if o.name is not None:
        from .runtime.named import parse_name
        parse_name(o.name)
    if o.save is not None and not o.save:
        raise UsageError("--save needs a path")
    return o


def resolve_image(arg, config, cache=None):
    from .image import is_image_path, local_image
    if is_image_path(arg):
        return local_image(arg, cache)
    if cache is not None:
        from .launchcache import resolve_cached
        return resolve_cached(arg, config, cache)
    from .resolve import resolve_image as store_resolve
    return store_resolve(arg, config)


def _launch(cmd, argv, verbose, quiet):
    t0 = time.perf_counter()
    o = parse_launch_args(cmd, argv, verbose, quiet)

    def log(msg):
        if o.verbose:
            sys.stderr.write(f"hpcc: [{(time.perf_counter() - t0) * 1000:6.1f} ms] {msg}\n")

    from .launchcache import LaunchCache, load_config_cached
    cache = LaunchCache()
    warn = None if o.quiet else (lambda line: sys.stderr.write(f"hpcc: {line}\n"))
    config = load_config_cached(cache, warn=warn)
    image = resolve_image(o.image, config, cache)
    from .image import check_squashfs, is_image_path
    check_squashfs(image.sqfs_path, o.image if is_image_path(o.image) else
                   f"{image.sqfs_path} (image {o.image})")
    log(f"image {image.sqfs_path}")
    annotations = dict(a.split("=", 1) for a in o.annotations)
    if o.mpi:
        annotations["org.hpcc.mpi"] = "1"
    if o.gpus:
        annotations["org.hpcc.gpu"] = o.gpus
    from .runtime import build_spec, run_container
    from .runtime.spec import parse_unshare
    unshare = parse_unshare(o.unshare) if o.unshare is not None else ()
    privileged = os.geteuid() == 0
    named = None
    if o.name is not None:
        from .runtime.named import open_named
        named = open_named(o.name, image=image, image_name=o.image, privileged=privileged,
                           config=config,
                           uid=_user_uid(o.user) if privileged else None, scope="user")
        recorded = (named.image or {}).get("sqfs")
        if recorded and recorded != str(image.sqfs_path):
            from .image import local_image
            if not o.quiet:
                sys.stderr.write(f"hpcc: container '{named.name}' exists: running it on its "
                                 f"own image {recorded}, not {o.image}\n")
            image = local_image(recorded)
        log(f"named container {named.path}" + (" (new)" if named.created else "")
            + (f" running as pid {named.running_pid}: attaching" if named.running_pid
               else ""))
    premount = None
    if not privileged and not (named is not None and named.running_pid):
        # the mount helper works while the spec is built
        from .runtime.imagemount import HelperMount
        from .runtime.spec import site_store
        premount = HelperMount.start(config["launcher"].get("mount_helper", ""),
                                     image.sqfs_path, site_store(config))
    save_to = None
    if o.save is not None:
        from .runtime.save import open_destination
        from .squashfs import writer  # noqa: F401  (nothing can be imported after pivot_root)
        save_to = open_destination(o.save)
    writable = True if o.writable else (False if o.readonly else None)
    spec = build_spec(image, mode=cmd, command=o.command, entrypoint=o.entrypoint,
                      env=o.env, env_files=o.env_files, mounts=o.mounts, workdir=o.workdir,
                      writable=writable,
                      bind_home=False if o.no_home else (True if o.home else None),
                      bind_cwd=False if o.no_cwd else None, user=o.user,
                      annotations=annotations, config=config, image_name=o.image,
                      cache=cache, remap_root=True if o.root else (False if o.no_root else None),
                      unshare=unshare, named=named, warn=warn)
    cache.save()
    log(f"spec built: {spec['process']['args']!r} in {spec['process']['cwd']}")
    if named is not None and named.running_pid:
        from .runtime.process import attach_container
        return attach_container(spec, named.running_pid, log=log)
    return run_container(spec, log=log, named=named, save_to=save_to,
                         premount=premount)


def _user_uid(user):
    """The uid of --user (root callers), 0 without it."""
    if user is None:
        return 0
    import pwd
    try:
        return pwd.getpwuid(int(user)).pw_uid if user.isdigit() else pwd.getpwnam(user).pw_uid
    except (KeyError, ValueError):
        raise UsageError(f"unknown user '{user}' for --user") from None


def _containers(argv):
    """hpcc containers [--json] | hpcc containers rm NAME..."""
    from .config import load_config
    from .runtime.named_admin import list_named, remove_named
    privileged = os.geteuid() == 0
    config = load_config(validate_schema=False)
    if argv[:1] == ["rm"]:
        if len(argv) < 2:
            raise UsageError("usage: hpcc containers rm NAME...")
        code = 0
        for name in argv[1:]:
            if not remove_named(name, privileged=privileged, config=config):
                sys.stderr.write(f"hpcc: no container named '{name}'\n")
                code = 1
        return code
    if argv and argv != ["--json"]:
        raise UsageError("usage: hpcc containers [--json] | hpcc containers rm NAME...")
    rows = list_named(privileged=privileged, config=config)
    if argv == ["--json"]:
        import json
        print(json.dumps([{"name": n, "image": img.get("name") or img.get("sqfs"),
                           "sqfs": img.get("sqfs"), "digest": img.get("digest"),
                           "running": running} for n, img, running in rows]))
        return 0
    for n, img, running in rows:
        print(f"{n}\t{img.get('name') or img.get('sqfs') or '?'}"
              f"\t{'running' if running else 'stopped'}")
    return 0


def _config_check(argv):
    from .config import config_path, load_config
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        raise UsageError("usage: hpcc config check [--json] [FILE] (see 'hpcc config check "
                         "--help')")
    path, _ = config_path(argv[0] if argv else None)
    load_config(argv[0] if argv else None, validate_schema=True, memo=False)
    hooks_dir = load_config(argv[0] if argv else None, validate_schema=False)["launcher"].get(
        "hooks_dir")
    n = 0
    if hooks_dir and os.path.isdir(hooks_dir):
        from .runtime.ocihooks import load_hooks
        n = len(load_hooks(hooks_dir))
    if as_json:
        import json
        print(json.dumps({"config": str(path), "ok": True, "hooks_dir": hooks_dir,
                          "hook_configs": n}))
        return 0
    print(f"{path}: ok" + (f"; {n} hook config(s) in {hooks_dir}: ok" if n else ""))
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = quiet = False
    while argv and argv[0] in ("-v", "--verbose", "-q", "--quiet"):
        if argv.pop(0) in ("-v", "--verbose"):
            verbose = True
        else:
            quiet = True
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if argv else EXIT_USAGE
    cmd, rest = argv[0], argv[1:]
    launching = cmd in ("run", "exec", "shell")
    try:
        if launching:
            code = _launch(cmd, rest, verbose, quiet)
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os._exit(code)  # after pivot_root, Python's teardown must not import anything
        if cmd in ("pull", "images", "inspect", "rm", "gc", "login", "logout"):
            from .gateway.cli import user_main
            return user_main((["-q"] if quiet else []) + (["-v"] if verbose else []) + argv)
        if cmd == "containers":
            return _containers(rest)
        if cmd == "config":
            if rest[:1] == ["check"]:
                if any(a in ("-h", "--help") for a in rest[1:]):
                    sys.stdout.write(CONFIG_CHECK_USAGE)
                    return 0
                return _config_check(rest[1:])
            if rest[:1] in (["-h"], ["--help"]):
                sys.stdout.write(CONFIG_CHECK_USAGE)
                return 0
            raise UsageError("unknown config command (see 'hpcc config check --help')")
        if cmd == "doctor":
            from .doctor import main as doctor_main
            return doctor_main(rest)
        if cmd in ("version", "--version"):
            from . import __version__
            print(f"hpcc {__version__}")
            return 0
        raise UsageError(f"unknown command '{cmd}' (see hpcc --help)")
    except HpccError as e:
        code = e.exit_code
        if launching and code not in (EXIT_USAGE,) and code < EXIT_LAUNCH:
            code = EXIT_LAUNCH
        sys.stderr.write(f"hpcc: {e}\n")
        if launching:
            sys.stderr.flush()
            os._exit(code)
        return code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
