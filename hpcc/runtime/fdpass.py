"""File descriptors made by a child process and handed to its parent.

Some fds can only be made by a process that joined another namespace or took other ids for
good (a FUSE connection in a user namespace, a clone of a mount as the host's mount
namespace has it); a forked child makes them and passes them back over a socket pair
(SCM_RIGHTS). `_socket`, not `socket`: the latter imports enum (~3 ms of every launch).
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
