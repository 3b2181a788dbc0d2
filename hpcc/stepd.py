"""Per-step container setup for Slurm, run as root by spank_hpcc.so in slurmstepd.

    python3 -I -m hpcc.stepd image=IMG uid=N gid=N job=N step=N node=N cwd=DIR [key=value...]

fd 3 is a socket to slurmstepd. The plugin starts the helper early (init_post_opt), so its
start-up overlaps Slurm's own step set-up, and sends the job's working directory later
("cwd=DIR\\0", from user_init). Replies are NUL-terminated records ("cwd=", "env=NAME=VALUE",
"unset=NAME", "error=LINE", "end=1"); an error is one line that the plugin prints on the
user's srun output before failing the step (every task exits 125 without running).

Once per node and step:
1. resolve the image as the job user (their groups, their effective ids): a user may only
   run images they can read; the image file is opened with their credentials and the
   runtime is given that open file (/proc/self/fd/N), never a path they could swap;
2. build the spec with hpcc's runtime (the launcher's code: same root, binds, /etc/passwd
   entries, /tmp, /dev, hooks such as the MPI one);
3. fork a child that unshares its mount namespace, assembles the root (setup_root,
   privileged) and sends an fd of that namespace, the image's environment and the working
   directory to slurmstepd over fd 3 (SCM_RIGHTS). Every task joins that namespace before
   exec. The namespace dies with the last of slurmstepd's fd and the tasks in it.
   When the image had to be mounted with squashfuse (not a root-owned site image), the
   child stays as the FUSE daemon's parent until slurmstepd closes the socket.

Imports stay small: no click, jsonschema, requests (launch cost is paid once per node and step).
"""
import _socket  # the C module: `socket` costs ~5 ms of enum set-up at import
import os
import sys
from _socket import SCM_RIGHTS, SOL_SOCKET

from .errors import EXIT_LAUNCH, HpccError, ImageNotFound, LaunchError, UsageError
from .runtime.identity import AsUser

BATCH_STEP = 4294967291
INTERACTIVE_STEP = 4294967290
# Variables of Slurm and of the PMI servers always keep the job's values.
JOB_PREFIXES = ("SLURM_", "SLURMD_", "PMI_", "PMIX_", "PMI2_", "SPANK_", "_SLURM_")
HOST_DIR = "/.hpcc/host"      # where the host's /usr appears in batch containers
BIN_DIR = "/.hpcc/bin"        # Slurm client wrappers (srun, sbatch...) in batch containers


def parse_args(argv):
    out = {}
    for a in argv:
        k, eq, v = a.partition("=")
        if not eq:
            raise UsageError(f"hpcc.stepd: bad argument '{a}' (expected key=value)")
        out[k] = v
    for k in ("image", "uid", "gid", "job", "step"):
        if k not in out:
            raise UsageError(f"hpcc.stepd: missing argument {k}=")
    return out


def resolve_as_user(name, user, config):
    """(ImageRecord, fd of its squashfs opened as the user)."""
    from .store import resolve_image

    saved = {k: os.environ.get(k) for k in ("HOME", "XDG_DATA_HOME", "USER")}
    os.environ["HOME"] = user.pw_dir
    os.environ["USER"] = user.pw_name
    os.environ.pop("XDG_DATA_HOME", None)
    groups = os.getgrouplist(user.pw_name, user.pw_gid)
    try:
        with AsUser(user.pw_uid, user.pw_gid, groups):
            try:
                rec = resolve_image(name, config)
            except PermissionError:
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
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rec, fd


def _slurm_conf_values(path):
    """A few keys of slurm.conf (first occurrence), for the client binds of batch steps."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                k, eq, v = line.partition("=")
                if eq and k.strip().lower() in ("authinfo", "plugstackconfig", "plugindir"):
                    out.setdefault(k.strip().lower(), v.strip())
    except OSError:
        pass
    return out


def _host_loader():
    for p in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1",
              "/lib64/ld64.so.2", "/lib/ld64.so.1"):
        if os.path.exists(p):
            return os.path.realpath(p)
    return None


def slurm_client_setup(args):
    """Binds and variables that let a batch script inside the container run srun, sbatch,
    squeue... : the host's /usr read-only under /.hpcc/host, Slurm's plugin and config
    directories, the munge socket, the SPANK plugin, and wrapper scripts that start the
    host's clients with the host's dynamic loader and libraries."""
    mounts, env = [], {}
    loader = _host_loader()
    if not loader or not loader.startswith("/usr/"):
        return mounts, env  # a host without merged /usr: not supported
    mounts.append(f"/usr:{HOST_DIR}/usr:ro")
    conf = args.get("slurm_conf") or "/etc/slurm/slurm.conf"
    vals = _slurm_conf_values(conf)
    plugindir = vals.get("plugindir") or ""
    libdirs = []
    for lib in ("libslurmfull.so",):
        for d in ("/usr/lib/x86_64-linux-gnu/slurm-wlm", "/usr/lib64/slurm", "/usr/lib/slurm",
                  "/usr/lib/aarch64-linux-gnu/slurm-wlm"):
            if os.path.exists(os.path.join(d, lib)):
                plugindir = plugindir or d
                libdirs.append(d)
                break
    libdirs.append(os.path.dirname(loader))
    binds = {plugindir} if plugindir else set()
    binds.add(os.path.dirname(os.path.abspath(conf)))
    auth = vals.get("authinfo", "")
    sock = "/run/munge/munge.socket.2"
    for item in auth.split(","):
        if item.startswith("socket="):
            sock = item[len("socket="):]
    binds.add(os.path.dirname(sock))
    plugstack = vals.get("plugstackconfig")
    if plugstack:
        binds.add(plugstack)
    if args.get("plugin"):
        binds.add(args["plugin"])
    for b in sorted(binds):
        if b and os.path.exists(b):
            mounts.append(f"{b}:{b}:ro")
    from importlib.resources import files
    wrappers = str(files("hpcc").joinpath("data", "slurm-bin"))
    if os.path.isdir(wrappers):
        mounts.append(f"{wrappers}:{BIN_DIR}:ro")
    env["HPCC_HOST_LD"] = HOST_DIR + loader
    env["HPCC_HOST_LIBS"] = ":".join(HOST_DIR + d for d in libdirs)
    env["HPCC_HOST"] = HOST_DIR
    if args.get("slurm_conf"):
        env["SLURM_CONF"] = args["slurm_conf"]
    return mounts, env


CACHE_DIR = "/run/hpcc-stepd"


def _cache_dir_ok():
    import stat

    try:
        os.mkdir(CACHE_DIR, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    st = os.lstat(CACHE_DIR)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o077


def config_cache_path(path):
    """Where the JSON copy of the config file `path` is kept."""
    return os.path.join(CACHE_DIR, os.path.abspath(path).replace("%", "%25")
                        .replace("/", "%2F")[-200:] + ".json")


def load_config_cached():
    """The site config without TOML parsing on every step: a JSON copy in a root-only
    directory, valid while the file's identity, size and mtime are unchanged."""
    import json

    from .config import config_path, load_config

    path, _ = config_path()
    try:
        st = os.stat(path)
    except OSError:
        return load_config(validate_schema=False)  # defaults, or the one-line error
    key = f"{os.path.abspath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"
    name = config_cache_path(path)
    usable = _cache_dir_ok()
    if usable:
        try:
            with open(name) as f:
                cached = json.load(f)
            if cached.get("key") == key:
                return cached["config"]
        except (OSError, ValueError, AttributeError):
            pass
    config = load_config(validate_schema=False)
    if usable:
        tmp = f"{name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"key": key, "config": config}, f)
            os.rename(tmp, name)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return config


def prepare(args):
    """What needs no working directory: config, user, image (opened as the user)."""
    import pwd

    uid, gid = int(args["uid"]), int(args["gid"])
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        raise LaunchError(f"uid {uid} has no passwd entry on this node") from None
    if user.pw_gid != gid:
        user = pwd.struct_passwd((user.pw_name, user.pw_passwd, uid, gid, user.pw_gecos,
                                  user.pw_dir, user.pw_shell))
    config = load_config_cached()
    rec, fd = resolve_as_user(args["image"], user, config)
    return user, config, rec, fd


def build(args, user, config, rec, fd):
    """The spec of this step's container. Returns (spec, extra_env)."""
    from .runtime import build_spec
    from .runtime.spec import parse_mount

    uid = user.pw_uid
    mounts = [m for m in args.get("mounts", "").split(",") if m]
    extra_env = {}
    system = []   # binds of Slurm's own files: opened by root, not subject to the user's rights
    step = int(args["step"])
    if step in (BATCH_STEP, INTERACTIVE_STEP):
        script = args.get("argv0", "")
        if step == BATCH_STEP and script.startswith("/"):
            d = os.path.dirname(script)
            system.append(f"{d}:{d}:ro")
        more, extra_env = slurm_client_setup(args)
        system += more
    annotations = {"org.hpcc.slurm.job": args["job"], "org.hpcc.slurm.step": args["step"]}
    if args.get("mpi") == "1":
        annotations["org.hpcc.mpi"] = "1"
    if args.get("gpus"):
        annotations["org.hpcc.gpu"] = args["gpus"]
    # The job's working directory is bound (launcher.mount_cwd) unless it is a system path;
    # the runtime opens user-given bind sources with the user's credentials.
    spec = build_spec(rec, mode="exec", command=["/bin/true"], mounts=mounts,
                      workdir=args.get("workdir") or None,
                      writable=args.get("writable") == "1", user=str(uid),
                      annotations=annotations, config=config, privileged=True,
                      host_env={"HOME": user.pw_dir}, cwd=args["cwd"], image_name=args["image"])
    for item in system:
        src, dst, ro = parse_mount(item, cwd="/")
        spec["mounts"].append({"destination": dst, "type": "bind", "source": src,
                               "options": ["rbind", "nosuid", "nodev"] + (["ro"] if ro else []),
                               "x-hpcc-origin": "slurm"})
    spec["hpcc"]["image"] = f"/proc/self/fd/{fd}"
    return spec, extra_env


def reply_env(spec, rec, keep, extra):
    """Variables the plugin sets in each task: the image's, then ours; the job keeps its
    SLURM_*/PMI_* variables and the names in keep (--container-env)."""
    out = {}
    image_env = (rec.meta.get("config") or {}).get("Env") or []
    spec_env = dict(item.partition("=")[::2] for item in spec["process"]["env"])
    out["PATH"] = spec_env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    for item in image_env:
        k, eq, v = item.partition("=")
        if k and eq:
            out[k] = v
    out.update(extra)
    if BIN_DIR and extra.get("HPCC_HOST"):
        out["PATH"] = BIN_DIR + ":" + out["PATH"]
    out["HPCC_CONTAINER"] = "1"
    if rec.digest:
        out["HPCC_IMAGE_DIGEST"] = rec.digest
    return {k: v for k, v in out.items() if not k.startswith(JOB_PREFIXES) and k not in keep}


def send_fd(sock, data, fd):
    sock.sendmsg([data], [(SOL_SOCKET, SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))])


def send_error(sock, message):
    try:
        sock.sendall(f"error={message}\0end=1\0".encode(errors="replace"))
    except OSError:
        pass


def recv_cwd(sock, data=b""):
    """The job's working directory, sent by the plugin from user_init ("cwd=DIR\\0").
    `data`: bytes already received after the request (a server reads both at once)."""
    while b"\0" not in data:
        chunk = sock.recv(8192)
        if not chunk:
            return None  # the step ended before its tasks were started
        data += chunk
    text = data[:data.index(b"\0")].decode(errors="surrogateescape")
    return text[4:] if text.startswith("cwd=") else None


def container_child(spec, sock, payload):
    """In the forked child: new mount namespace, root assembly, send the namespace fd.
    Returns the RootHandle (its FUSE daemon must outlive the message when there is one)."""
    from .runtime import enter_namespaces, setup_root

    enter_namespaces(True)
    nsfd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    # no prefetch of the command: this process is gone before the tasks exec
    spec["hpcc"]["prefetch_bytes"] = 0
    handle = setup_root(spec, privileged=True)
    send_fd(sock, payload[:1], nsfd)
    sock.sendall(payload[1:])
    os.close(nsfd)
    return handle


def run(args, sock, pending=b""):
    user, config, rec, img_fd = prepare(args)
    cwd = recv_cwd(sock, pending)
    if cwd is None:
        return 0
    args["cwd"] = cwd
    spec, extra = build(args, user, config, rec, img_fd)
    keep = {n for n in args.get("keep_env", "").split(",") if n}
    env = reply_env(spec, rec, keep, extra)
    records = [f"cwd={spec['process']['cwd']}"] + [f"env={k}={v}" for k, v in env.items()]
    if not extra:
        # a step started from a batch container: the client wrappers' variables do not apply
        records += [f"unset={k}" for k in ("HPCC_HOST", "HPCC_HOST_LD", "HPCC_HOST_LIBS")]
    records.append("end=1")
    if any("\0" in r for r in records):
        raise LaunchError("the image's environment contains a NUL byte")
    payload = "".join(r + "\0" for r in records).encode(errors="surrogateescape")

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        # Nothing started from here (FUSE daemon, hooks) may hold slurmstepd's stderr.
        devnull = os.open("/dev/null", os.O_RDWR)
        os.dup2(devnull, 2)
        os.close(devnull)
        try:
            os.close(r)
            handle = container_child(spec, sock, payload)
            if handle.fuse_pid:
                # Keep the FUSE daemon's parent alive until slurmstepd closes its end.
                os.write(w, b"k")
                os.close(w)
                try:
                    while sock.recv(4096):
                        pass
                except OSError:
                    pass
                handle.close()
            else:
                os.write(w, b"o")
        except HpccError as e:
            send_error(sock, f"hpcc: {e}")
            code = e.exit_code
        except BaseException as e:  # noqa: BLE001 - report, never a traceback
            send_error(sock, f"hpcc: cannot set up the container: {type(e).__name__}: {e}")
            code = EXIT_LAUNCH
        os._exit(code)
    os.close(w)
    os.close(img_fd)
    sock.close()
    status = os.read(r, 1)
    os.close(r)
    if status == b"k":
        return 0  # the keeper lives on; its exit status no longer matters here
    _, st = os.waitpid(pid, 0)
    if status == b"o":
        return 0
    return os.WEXITSTATUS(st) if os.WIFEXITED(st) and os.WEXITSTATUS(st) else EXIT_LAUNCH


def handle(args, sock, pending=b""):
    """One request: set up the container, reply on sock. Returns the exit status."""
    try:
        return run(args, sock, pending)
    except HpccError as e:
        send_error(sock, f"hpcc: {e}")
        return e.exit_code or 1
    except Exception as e:  # noqa: BLE001 - report, never a traceback
        send_error(sock, f"hpcc: cannot set up the container: {type(e).__name__}: {e}")
        return EXIT_LAUNCH


# ---- per-node server --------------------------------------------------------------------
# Python's start-up and imports are most of a one-shot helper's cost (~50 of ~70 ms CPU).
# After serving a step, the one-shot helper leaves a small server behind (one per node
# namespace, hpcc installation and config): it has everything imported and forks a child per
# step, which does exactly what the one-shot helper does. The plugin connects to it when it
# exists, and falls back to the one-shot helper otherwise (server=no in plugstack.conf turns
# it off). The server ends after SERVER_IDLE seconds without a step, or when hpcc's code
# changed on disk; only root can connect (0700 directory, SO_PEERCRED checked).
SERVER_IDLE = 300


def _code_stamp():
    here = os.path.dirname(os.path.abspath(__file__))
    out = []
    for rel in ("stepd.py", "store.py", "config.py", os.path.join("runtime", "rootfs.py"),
                os.path.join("runtime", "inroot.py"), os.path.join("runtime", "imagemount.py"),
                os.path.join("runtime", "spec.py")):
        try:
            st = os.stat(os.path.join(here, rel))
            out.append((st.st_ino, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return out


def start_server(path):
    """Start a detached server on `path` (double fork, new session, fresh interpreter)."""
    if not path.startswith(CACHE_DIR + "/") or not _cache_dir_ok():
        return
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(3, 65536)
        os.execv(sys.executable, [sys.executable, "-I", "-m", "hpcc.stepd", "--serve", path])
    finally:
        os._exit(0)


def _recv_args(conn):
    """(args, bytes received after them): records "key=value\\0"..., then an empty one."""
    data = b""
    while True:
        end = data.find(b"\0\0")
        if end >= 0:
            break
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    items = data[:end].decode(errors="surrogateescape").split("\0")
    return parse_args([i for i in items if i]), data[end + 2:]


def _serve_one(conn):
    import signal
    import struct

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(SOL_SOCKET, _socket.SO_PEERCRED, 12))
    if uid != 0:
        return 1
    try:
        args, pending = _recv_args(conn)
    except HpccError as e:
        send_error(conn, f"hpcc: {e}")
        return 2
    if args is None:
        return 0
    return handle(args, conn, pending)


def serve(path):
    import fcntl
    import time

    if not _cache_dir_ok():
        return 1
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another server owns this path
    # everything a request needs, imported once
    from . import config, store  # noqa: F401
    from .runtime import build_spec, enter_namespaces, setup_root  # noqa: F401
    from .runtime import hooks, spec  # noqa: F401
    import json  # noqa: F401
    import re  # noqa: F401

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        srv.bind(path)
    finally:
        os.umask(old)
    ino = os.stat(path).st_ino
    import signal

    def _terminate(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    srv.listen(64)
    srv.settimeout(2.0)
    stamp = _code_stamp()
    last = time.monotonic()
    try:
        while True:
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
            if time.monotonic() - last > SERVER_IDLE or _code_stamp() != stamp:
                break
            try:
                fd, _ = srv._accept()
            except TimeoutError:
                continue
            except InterruptedError:
                continue
            last = time.monotonic()
            conn = _socket.socket(fileno=fd)
            conn.setblocking(True)
            child = os.fork()
            if child == 0:
                code = 1
                try:
                    srv.close()
                    code = _serve_one(conn)
                finally:
                    os._exit(code)
            conn.close()
    finally:
        try:
            if os.stat(path).st_ino == ino:
                os.unlink(path)
            os.unlink(path + ".lock")
        except OSError:
            pass
        srv.close()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"] and len(argv) == 2:
        return serve(argv[1])
    try:
        sock = _socket.socket(fileno=3)
    except OSError:
        print("hpcc.stepd: fd 3 must be the socket from spank_hpcc.so", file=sys.stderr)
        return 2
    try:
        args = parse_args(argv)
    except HpccError as e:
        send_error(sock, f"hpcc: {e}")
        return e.exit_code or 1
    code = handle(args, sock)
    sock.close()
    if args.get("serve"):
        start_server(args["serve"])
    return code


if __name__ == "__main__":
    sys.exit(main())
