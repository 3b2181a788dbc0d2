"""What the Slurm helper and spank_hpcc.so say to each other over fd 3 (docs/slurm.md).

In: the helper's arguments (`key=value` words: image, uid, gid, job, step, the
--container-* settings) and, later, the job's working directory ("cwd=DIR\0", sent from
user_init). Out: NUL-terminated records ("env=NAME=VALUE", "unset=NAME", "log=LINE",
"nsfds=KIND,...", "error=LINE", "end=1"), the first byte carrying the step's mount namespace
fd (and the other namespaces' fds) by SCM_RIGHTS. Errors are one line in srun's words.

Only _socket and os here: the helper imports this on every step.
"""
import os
import sys
from _socket import SCM_RIGHTS, SOL_SOCKET

from ..errors import UsageError

# Variables of Slurm and of the PMI servers always keep the job's values.
JOB_PREFIXES = ("SLURM_", "SLURMD_", "PMI_", "PMIX_", "PMI2_", "SPANK_", "_SLURM_")


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


def reply_env(spec, rec, keep, extra):
    """Variables the plugin sets in each task: the image's, then ours; the job keeps its
    SLURM_*/PMI_* variables and the names in keep (--container-env)."""
    out = {}
    image_env = (rec.meta.get("config") or {}).get("Env") or []
    spec_env = dict(item.partition("=")[::2] for item in spec["process"]["env"])
    out["PATH"] = spec_env.get("PATH",
                               "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    for item in image_env:
        k, eq, v = item.partition("=")
        if k and eq:
            out[k] = v
    out.update(extra)
    if extra.get("HPCC_HOST"):
        from .batch import BIN_DIR
        out["PATH"] = BIN_DIR + ":" + out["PATH"]
    out["HPCC_CONTAINER"] = "1"
    if rec.digest:
        out["HPCC_IMAGE_DIGEST"] = rec.digest
    return {k: v for k, v in out.items() if not k.startswith(JOB_PREFIXES) and k not in keep}


def reply_unset(env, keep):
    """Variables of the job that must not reach the tasks: the locale ones (LANG, LANGUAGE,
    LC_ALL) unless --container-env names them or the image sets them."""
    from .options import LOCALE_VARS
    return [k for k in LOCALE_VARS if k not in keep and k not in env]


def send_fd(sock, data, fd, more=()):
    """Send data with fd (the mount namespace) and, after it, the fds in `more`."""
    fds = b"".join(f.to_bytes(4, sys.byteorder) for f in (fd, *more))
    sock.sendmsg([data], [(SOL_SOCKET, SCM_RIGHTS, fds)])


# hpcc's runtime and hooks name `hpcc run`'s options in their messages; under srun the user
# typed the --container-* ones (Slurm's own --mpi=TYPE is left alone).
_SRUN_OPTIONS = {"mpi": "--container-mpi", "mount": "--container-mounts",
                 "workdir": "--container-workdir", "gpus": "--container-gpus",
                 "writable": "--container-writable", "readonly": "--container-readonly",
                 "root": "--container-remap-root", "unshare": "--container-unshare",
                 "name": "--container-name", "save": "--container-save"}


def srun_words(message):
    """A message with hpcc run's option names replaced by srun's."""
    if "--" not in message:
        return message
    import re
    return re.sub(r"(?<![\w-])--(mpi|mount|workdir|gpus|writable|readonly|root|unshare|name|"
                  r"save)(?![\w=-])", lambda m: _SRUN_OPTIONS[m.group(1)], message)


def send_error(sock, message):
    try:
        sock.sendall(f"error={srun_words(message)}\0end=1\0".encode(errors="replace"))
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


def send_namespaces(sock, payload, nsfd, extra):
    """Send the reply: the mount namespace's fd with its first byte, then the fds of
    `extra` ({kind: fd}, the namespaces each task joins besides the mount namespace, named
    by an "nsfds=KIND,..." record); every fd is closed."""
    try:
        if extra:
            rec = f"nsfds={','.join(extra)}\0".encode()
            payload = payload[:-len(b"end=1\0")] + rec + b"end=1\0"
        send_fd(sock, payload[:1], nsfd, list(extra.values()))
        sock.sendall(payload[1:])
    finally:
        os.close(nsfd)
        for fd in extra.values():
            os.close(fd)
