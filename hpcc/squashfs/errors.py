"""libsquashfs error codes as one-line text."""
import os

from hpcc.errors import SquashfsError

_TEXT = {
    -1: "out of memory",
    -2: "I/O error",
    -3: "compressor error (corrupt compressed data?)",
    -4: "internal libsquashfs error",
    -5: "corrupted data structure",
    -6: "unsupported feature",
    -7: "size overflow (corrupted or hostile image?)",
    -8: "out-of-bounds reference (truncated or corrupted image)",
    -9: "not a squashfs image (bad magic)",
    -10: "unsupported squashfs version",
    -11: "invalid block size",
    -12: "not a directory",
    -13: "no such file or directory",
    -14: "hard link loop",
    -15: "not a regular file",
    -16: "invalid argument",
    -17: "calls made in the wrong order",
}


def describe(code, err=0):
    """Text for a negative SQFS_ERROR code; with an errno for I/O errors when one is known."""
    text = _TEXT.get(code, f"libsquashfs error {code}")
    if code == -2 and err:
        text = f"I/O error: {os.strerror(err)}"
    return text


def fail(what, code, err=0):
    """Raise SquashfsError for a failed libsquashfs call: '<what>: <reason>'."""
    raise SquashfsError(f"{what}: {describe(code, err)}")
