"""The life of a libsquashfs object held by Python: freed by close(), on leaving a `with`
block, and when the holder is garbage-collected (a reader or writer dropped on an error
path must not keep its file open)."""


class NativeHandle:
    """Base of SquashfsReader and SquashfsWriter; subclasses define close(), which must be
    safe to call more than once."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def close(self):
        raise NotImplementedError
