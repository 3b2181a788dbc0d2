"""Open an image layer's blob for flattening: a whole file or a member's bytes inside an
uncompressed archive, decompressed (gzip through ISA-L when installed, zstd) ahead of the
reader in a thread of its own."""
import gzip
import io

from hpcc.errors import ImageError


class _Slice(io.RawIOBase):
    """A read-only window [offset, offset+length) of a file (a blob inside an archive)."""

    def __init__(self, path, offset, length):
        self._f = open(path, "rb")
        self._f.seek(offset)
        self._left = length

    def readable(self):
        return True

    def readinto(self, b):
        if self._left <= 0:
            return 0
        view = memoryview(b)[:self._left]
        n = self._f.readinto(view)
        if not n:
            raise EOFError("archive member is truncated")
        self._left -= n
        return n

    def close(self):
        self._f.close()
        super().close()


def open_raw(path, offset=0, length=None):
    """Binary stream of a whole file, or of a member's bytes inside an uncompressed tar."""
    if length is None:
        return open(path, "rb")
    return io.BufferedReader(_Slice(path, offset, length), 1 << 20)


def _gzip_reader(raw):
    """gzip decompression: ISA-L's igzip (2-3x faster than zlib) when available, its C
    reader straight (IGzipFile adds a Python layer and a buffer)."""
    try:
        from isal.isal_zlib import _GzipReader
    except ImportError:
        try:
            from isal import igzip
        except ImportError:
            return gzip.GzipFile(fileobj=raw, mode="rb")
        return igzip.IGzipFile(fileobj=raw, mode="rb")
    return _GzipReader(raw, 1 << 19)


class _ReadAhead(io.RawIOBase):
    """Read-ahead: decompress in a thread of its own, up to `depth` pieces ahead of the reader.

    ISA-L and zstd release the GIL while they decompress, so the layer's decompression
    (about a third of the main thread's work) runs on the other core while the main thread
    parses tar headers and feeds the squashfs writer. The thread owns `stream` (and closes
    it); an error it meets is raised to the reader where it happened in the stream, after
    the data before it. close() does not wait for the thread: it stops at its next piece
    (a read of a blob still downloading may wait for the download)."""

    def __init__(self, stream, size=1 << 20, depth=4):
        import queue
        import threading

        self._q = queue.Queue(depth)
        self._free = queue.SimpleQueue()
        self._stop = threading.Event()
        self._piece = None       # (buffer, length) being read
        self._at = 0
        self._end = False
        self._size = size
        self._t = threading.Thread(target=self._run, args=(stream,), daemon=True,
                                   name="hpcc-inflate")
        self._t.start()

    def _run(self, stream):
        import queue

        try:
            while not self._stop.is_set():
                try:
                    buf = self._free.get_nowait()
                except queue.Empty:
                    buf = bytearray(self._size)
                n = 0
                try:
                    n = stream.readinto(buf)
                    item = (buf, n) if n else None
                except BaseException as e:   # raised to the reader in its place
                    item = e
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        pass
                if not n:
                    return
        finally:
            try:
                stream.close()
            except Exception:
                pass

    def readable(self):
        return True

    def readinto(self, b):
        piece = self._piece
        while piece is None:
            if self._end:
                return 0
            item = self._q.get()
            if item is None:
                self._end = True
                return 0
            if isinstance(item, BaseException):
                self._end = True
                raise item
            piece, self._at = item, 0
            self._piece = piece
        buf, n = piece
        at = self._at
        k = min(len(b), n - at)
        memoryview(b)[:k] = memoryview(buf)[at:at + k]
        at += k
        if at >= n:
            self._piece = None
            self._free.put(buf)
        self._at = at
        return k

    def close(self):
        if not self.closed:
            self._stop.set()
            try:                     # unblock a thread waiting to queue a piece
                while True:
                    self._q.get_nowait()
            except Exception:
                pass
        super().close()


class LayerSource:
    """One layer to flatten: where its blob is (a file, or a slice of an archive), how it
    is compressed, and its digest for messages."""

    __slots__ = ("path", "compression", "digest", "offset", "length", "opener")

    def __init__(self, path, compression, digest="", offset=0, length=None, opener=None):
        self.path = str(path)
        self.compression = compression
        self.digest = digest
        self.offset = offset
        self.length = length
        self.opener = opener  # a callable giving the raw stream (a blob still downloading)

    def open(self):
        """The decompressed tar stream (decompressed ahead in a thread)."""
        raw = self.opener() if self.opener else open_raw(self.path, self.offset, self.length)
        if self.compression == "gzip":
            return _ReadAhead(_Closing(_gzip_reader(raw), raw))
        if self.compression == "zstd":
            import zstandard

            return _ReadAhead(zstandard.ZstdDecompressor().stream_reader(
                raw, read_across_frames=True, closefd=True))
        if self.compression in ("none", None, ""):
            return raw
        raw.close()
        raise ImageError(f"layer {self.digest or self.path} uses unsupported compression "
                         f"'{self.compression}'")


class _Closing(io.RawIOBase):
    """A decompressing stream that also closes the raw file under it."""

    def __init__(self, stream, raw):
        self._s, self._raw = stream, raw

    def readable(self):
        return True

    def read(self, n=-1):
        return self._s.read(n)

    def readinto(self, b):
        return self._s.readinto(b)

    def close(self):
        try:
            self._s.close()
        finally:
            self._raw.close()
            super().close()
