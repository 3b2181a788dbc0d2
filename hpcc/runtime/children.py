"""Work done in a forked child, and what it hands back to its parent: fds, or output and
an exit status.

Some work needs a process that joins another namespace or takes other ids for good (a FUSE
connection in a user namespace, a clone of a mount as the host's mount namespace has it,
the overlay mounted with the user's ids, a save written as the user, the image's entrypoint
run in the container). fds come back over a socket pair (SCM_RIGHTS); `_socket`, not
`socket`: the latter imports enum (~3 ms of every launch).
"""
import errno
import os
import struct
import sys


def recv_fds(sock, nbytes, maxfds):
    """(data, [fds]) of one message on a unix socket."""
    import _socket
    data, anc, _, _ = sock.recvmsg(nbytes, _socket.CMSG_SPACE(4 * maxfds))
    fds = []
    for lvl, typ, d in anc:
        if lvl == _socket.SOL_SOCKET and typ == _socket.SCM_RIGHTS:
            fds += [int.from_bytes(d[i:i + 4], sys.byteorder) for i in range(0, len(d) - 3, 4)]
    return data, fds


def fds_from_child(make, count):
    """Run make() in a forked child and return the `count` fds it returns, now this
    process's; an OSError in the child is raised here with its errno."""
    import _socket

    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                fds = make()
                theirs.sendmsg([b"0"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                         struct.pack(f"{len(fds)}i", *fds))])
            except OSError as e:
                theirs.send(str(e.errno or errno.EIO).encode())
            except BaseException:  # noqa: BLE001
                theirs.send(str(errno.EIO).encode())
            finally:
                os._exit(0)
        theirs.close()
        msg, fds = recv_fds(ours, 16, count)
        os.waitpid(pid, 0)
    finally:
        ours.close()
        theirs.close()
    if len(fds) != count:
        for fd in fds:
            os.close(fd)
        code = int(msg) if msg.isdigit() else errno.EIO
        raise OSError(code, os.strerror(code))
    return fds


def output_of_child(child, limit=1 << 20):
    """Fork; the child runs child(w), w being the write end of a pipe, and exits with the
    int it returns (125 if it raises). Returns (the child's exit code as
    os.waitstatus_to_exitcode gives it, the first `limit` bytes it wrote to w)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 125
        try:
            os.close(r)
            code = child(w)
        finally:
            os._exit(code)
    os.close(w)
    out = b""
    try:
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            if len(out) < limit:
                out += chunk
    finally:
        os.close(r)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out[:limit]
