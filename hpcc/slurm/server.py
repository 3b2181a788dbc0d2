"""The per-node helper server.

Python's start-up and imports are most of a one-shot helper's cost (~50 of ~70 ms CPU).
After serving a step, the one-shot helper leaves a small server behind (one per node
namespace, hpcc installation and config): it has everything imported and forks a child per
step, which does exactly what the one-shot helper does. The plugin connects to it when it
exists, and falls back to the one-shot helper otherwise (server=no in plugstack.conf turns
it off). The server ends after SERVER_IDLE seconds without a step, or when hpcc's code
changed on disk; only root can connect (0700 directory, SO_PEERCRED checked).
"""
import _socket  # the C module: `socket` costs ~5 ms of enum set-up at import
import os
import sys
from _socket import SOL_SOCKET

from ..errors import HpccError
from . import fork_detached
from .stepd import CACHE_DIR, cache_dir_ok, handle
from .wire import parse_args, send_error

SERVER_IDLE = 300


def _code_stamp():
    """Identity of every .py and .so file of the installed hpcc package: a server started
    from other code than is installed now must not serve the next step."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".so")):
                try:
                    st = os.stat(os.path.join(d, name))
                except OSError:
                    continue
                out.append((name, st.st_ino, st.st_mtime_ns, st.st_size))
    return out


def start_server(path):
    """Start a detached server on `path` (double fork, new session, fresh interpreter)."""
    if not path.startswith(CACHE_DIR + "/") or not cache_dir_ok():
        return
    if not fork_detached():
        return
    try:
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
    return handle(args, conn, pending, served=True)


def _warm_up():
    """What every step's child would otherwise do again (the server forks it): import
    hashlib (OpenSSL's set-up, ~2 ms; the named containers' reuse key), load the config
    (~4 ms: the launch cache's file, read and unmarshalled; then one stat per step), and
    load glibc's NSS modules (the job user's passwd and group lookups)."""
    import hashlib  # noqa: F401
    import pwd

    from .. import launchcache  # noqa: F401

    hashlib.sha256(b"")
    _refresh_config()
    try:
        os.getgrouplist(pwd.getpwuid(0).pw_name, 0)
    except (KeyError, OSError):
        pass


def _refresh_config():
    """While idle: a changed config is loaded here once, not by every step's child."""
    from .stepd import load_config_cached
    try:
        load_config_cached()
    except HpccError:
        pass


def serve(path):
    import fcntl
    import time

    if not cache_dir_ok():
        return 1
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another server owns this path
    # everything a request needs, imported once
    import json  # noqa: F401
    import re  # noqa: F401

    from .. import config, resolve, store  # noqa: F401
    from ..runtime import (  # noqa: F401  # noqa: F401
        build_spec,
        elf,
        enter_namespaces,
        idmap,
        imagemount,
        inroot,
        named,
        ocihooks,
        setup_root,
        spec,
        stepcontainer,
        warm,
    )
    from . import batch, options  # noqa: F401
    _warm_up()

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
    last = checked = time.monotonic()
    try:
        while True:
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
            now = time.monotonic()
            if now - last > SERVER_IDLE:
                break
            # the code on disk: once a second at most (a walk of the package, ~0.5 ms of
            # CPU, not after every step of a burst); a step may wait in accept up to the
            # 2 s timeout anyway, so this widens no window
            if now - checked >= 1.0:
                checked = now
                if _code_stamp() != stamp:
                    break
            try:
                fd, _ = srv._accept()
            except TimeoutError:
                _refresh_config()
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
