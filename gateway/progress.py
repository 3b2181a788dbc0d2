"""Progress reporting for long gateway work.

On a terminal: rich progress bars (one per layer download, one for the conversion), with
elapsed time. Elsewhere (logs, CI, --json): one plain line per phase with its elapsed time,
on stderr, or nothing at all when quiet.
"""
import sys
import threading
import time


def _mb(n):
    return f"{n / 1e6:.1f} MB"


def short(digest):
    """sha256:da81c14264d15cd7... -> da81c14264d1 (what a terminal line needs)."""
    return str(digest).split(":")[-1][:12]


def drop_summary(report):
    """What a conversion left out or changed, for the closing line ('' when nothing): the
    full list is in the image's metadata (`gateway inspect`)."""
    report = report or {}
    parts = [f"{n} {kind}" for kind, n in sorted((report.get("dropped") or {}).items()) if n]
    if report.get("dropped_xattrs"):
        parts.append(f"{report['dropped_xattrs']} xattrs")
    out = ("dropped " + ", ".join(parts)) if parts else ""
    if report.get("stripped_mode_bits"):
        out += ("; " if out else "") + (f"setuid/setgid bits stripped from "
                                        f"{report['stripped_mode_bits']} files")
    return out


class Reporter:
    """Base/plain reporter: a line per phase on stderr."""

    def __init__(self, quiet=False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._layer_t0 = {}

    def _elapsed(self):
        return f"{time.monotonic() - self.t0:6.1f}s"

    def line(self, msg):
        if not self.quiet:
            with self._lock:
                print(f"[{self._elapsed()}] {msg}", file=self.stream, flush=True)

    # phases
    def resolved(self, ref, digest, nlayers, total):
        self.line(f"{ref}: {short(digest)} ({nlayers} layers, {_mb(total)} compressed)")

    def download(self, event, digest, done, total):
        """Callback for RegistryClient.fetch_blob."""
        short = digest.split(":")[-1][:12]
        if event == "start":
            self._layer_t0[digest] = time.monotonic()
        elif event == "done":
            dt = time.monotonic() - self._layer_t0.get(digest, self.t0)
            self.line(f"layer {short}: downloaded {_mb(total or done)} in {dt:.1f}s")
        elif event == "cached":
            self.line(f"layer {short}: in the blob cache")
        elif event == "retry":
            self.line(f"layer {short}: connection lost at {_mb(done)}, resuming")
        elif event == "restart":
            self.line(f"layer {short}: downloading it again from the start")

    def converting(self, total_bytes):
        self.line(f"converting to squashfs (one pass, {_mb(total_bytes)} compressed input)")

    def converted_bytes(self, n):
        pass

    def layer_started(self, index, count, digest):
        pass

    def done(self, msg):
        self.line(msg)

    def close(self):
        pass


class RichReporter(Reporter):
    """Progress bars on a TTY."""

    def __init__(self, quiet=False, stream=None):
        super().__init__(quiet, stream)
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self.console = Console(file=self.stream)
        self.progress = Progress(TextColumn("{task.description:<28}"), BarColumn(),
                                 DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
                                 console=self.console, transient=False)
        self.progress.start()
        self._tasks = {}
        self._convert = None

    def line(self, msg):
        if not self.quiet:
            self.progress.console.print(f"[dim]{self._elapsed()}[/dim] {msg}", highlight=False)

    def download(self, event, digest, done, total):
        short = digest.split(":")[-1][:12]
        with self._lock:
            tid = self._tasks.get(digest)
            if tid is None:
                tid = self.progress.add_task(f"layer {short}", total=total or None)
                self._tasks[digest] = tid
        if event in ("cached", "done"):
            cached = " (cached)" if event == "cached" else ""
            self.progress.update(tid, completed=total or done, description=f"layer {short}{cached}")
        else:
            self.progress.update(tid, completed=done)

    def converting(self, total_bytes):
        self._convert = self.progress.add_task("squashfs", total=None)

    def converted_bytes(self, n):
        if self._convert is not None:
            self.progress.advance(self._convert, n)

    def done(self, msg):
        if self._convert is not None:
            self.progress.update(self._convert, total=self.progress.tasks[self._convert].completed)
        self.line(msg)

    def close(self):
        self.progress.stop()


def make_reporter(quiet=False, json_output=False):
    if json_output or quiet:
        return Reporter(quiet=True)
    if sys.stderr.isatty():
        try:
            return RichReporter()
        except Exception:  # rich unavailable or no usable terminal: plain lines
            pass
    return Reporter()
