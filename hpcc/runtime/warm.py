"""Warm the page cache of a freshly mounted image with the files the command will exec.

Why: the first exec from a just-mounted squashfs is slow. The loader faults the program in a
few pages at a time, and every fault decompresses a block. Through squashfuse_ll (0.1.x),
which keeps no cache of decompressed data blocks, each fault is also a FUSE request that
decompresses its 128-512 KiB block again: measured here with a static busybox, 26-32 ms for
the exec of `true`, against 13 ms to read the same file once from start to end, after which
the exec takes 2.5 ms (the kernel's squashfs: about 20 ms, 8 ms less after warming).
So, as soon as the image is mounted, one background thread reads the command's executable,
its ELF interpreter and the libraries it names (DT_NEEDED, found in the usual library
directories) from start to end, while the main thread goes on assembling the root. By the
time the command execs, most of its pages are in the page cache of the image's inodes,
which the overlay root passes through.

Everything here is best effort and reads the untrusted image only through `open_in_root`
(symlinks resolve inside the image). Any error ends the warming silently: the exec then
simply pays the faults. The bytes read are capped by the site config
(`launcher.warm_mb`, 0 turns it off).

(Not to be confused with `gateway prefetch`, which pulls the images of pending Slurm jobs
into the store, nor with the flattener's read-ahead of a layer's decompressed bytes.)
"""
import _signal as signal  # the C module: `signal` would import enum (~3 ms)
import _thread
import os

from .elf import elf_deps
from .inroot import open_in_root

CHUNK = 1 << 20
LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib",
            "/usr/local/lib")
MAX_FILES = 32


def command_path(root_fd, prog, path_var):
    """The image file `prog` names (PATH search like execvp), or None."""
    if "/" in prog:
        return prog if prog.startswith("/") else None
    for d in path_var.split(":"):
        if not d.startswith("/"):
            continue
        cand = f"{d.rstrip('/')}/{prog}"
        try:
            fd = open_in_root(root_fd, cand)
        except OSError:
            continue
        os.close(fd)
        return cand
    return None


def _read_all(fd, budget, entry):
    """Read fd from the start, up to budget bytes, counting in entry[1] as it goes."""
    off = 0
    while off < budget:
        n = len(os.pread(fd, min(CHUNK, budget - off), off))
        if n == 0:
            break
        off += n
        entry[1] = off
    return off


def _deps(root_fd, fd):
    """What loading the open file fd needs first (its ELF interpreter or a script's
    interpreter) and after (its DT_NEEDED libraries, as paths inside the root)."""
    head = os.pread(fd, 64, 0)
    interp, needed = elf_deps(head, fd, os.fstat(fd).st_size)
    if head[:2] == b"#!":
        line = os.pread(fd, 256, 0).split(b"\n", 1)[0][2:].split()
        if line:
            interp = line[0].decode("utf-8", "replace")
    libs = []
    for name in needed:
        for d in LIB_DIRS:
            try:
                os.close(open_in_root(root_fd, f"{d}/{name}"))
            except OSError:
                continue
            libs.append(f"{d}/{name}")
            break
    return (interp if interp and interp.startswith("/") else None), libs


def warm_files(root_fd, paths, budget, report=None):
    """Read the files in `paths` (inside the root) and the ELF objects they load, in the
    order the loader needs them (interpreter, program, libraries), up to `budget` bytes in
    all. Appends [path, bytes read so far] to `report` as it goes and returns the total;
    never raises."""
    done = 0
    report = [] if report is None else report
    try:
        queue, seen, parsed = list(paths), set(), set()
        while queue and done < budget and len(seen) < MAX_FILES:
            path = queue.pop(0)
            if path in seen:
                continue
            try:
                fd = open_in_root(root_fd, path, os.O_RDONLY)
            except OSError:
                seen.add(path)
                continue
            try:
                if path not in parsed:
                    parsed.add(path)
                    interp, libs = _deps(root_fd, fd)
                    queue.extend(libs)
                    if interp and interp not in seen:
                        queue[:0] = [interp, path]  # the interpreter runs first
                        continue
                seen.add(path)
                entry = [path, 0]
                report.append(entry)
                done += _read_all(fd, budget - done, entry)
            finally:
                os.close(fd)
    except BaseException:  # noqa: BLE001 (best effort: the exec pays the faults instead)
        pass
    return done


class Warming:
    """A running (or finished) warming: .files lists [path, bytes read so far]."""

    def __init__(self):
        self.files = []
        self.done = False

    def summary(self):
        total = sum(n for _, n in self.files)
        names = ", ".join(p for p, _ in self.files[:4]) + (", ..." if len(self.files) > 4 else "")
        state = "" if self.done else " (still reading)"
        return f"warmed {len(self.files)} file(s), {total / 1e6:.1f} MB{state}: {names}"


def start(root_fd, prog, path_var, budget):
    """Warm the page cache with the command `prog` from the image whose root directory is
    root_fd (an O_PATH fd the thread takes over and closes) in a background thread that ends
    on its own; a read blocked on a FUSE daemon that dies returns an error and ends it too.
    Returns the Warming the thread fills in."""
    job = Warming()
    if budget <= 0 or not prog:
        os.close(root_fd)
        job.done = True
        return job

    def run():
        try:
            path = command_path(root_fd, prog, path_var)
            if path:
                warm_files(root_fd, [path], budget, job.files)
        except BaseException:  # noqa: BLE001
            pass
        finally:
            os.close(root_fd)
            job.done = True

    # The thread must never take a signal meant for the supervisor, which waits for SIGCHLD
    # and the forwarded signals with sigwaitinfo: a SIGCHLD delivered to this thread would
    # be lost. New threads inherit the creator's mask, so block everything around the start.
    old = signal.pthread_sigmask(signal.SIG_SETMASK, signal.valid_signals())
    try:
        _thread.start_new_thread(run, ())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return job
