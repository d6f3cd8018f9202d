"""Saying "the disk is full" when it is: a checkpoint save on a full disk failed with PyTorch's
`RuntimeError: basic_ios::clear: iostream error` (or `unexpected pos ...`), which names neither
the condition nor the path. The errno is lost inside PyTorch's writer, so its messages are
recognised by text, and the free space is looked up to say how full the disk is.
"""
from __future__ import annotations

import errno
import shutil

_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file reached the file-size limit (ulimit -f) or the disk is full",
}
# how PyTorch's file writer, safetensors and Python report the same conditions without an errno
_TEXTS = ("iostream error", "unexpected pos", "file write failed", "No space left", "Disk quota", "File too large",
          "StorageFull", "FileTooLarge")


class DiskFull(OSError):
    """A write failed because the disk (or quota, or file-size limit) is full; the message names the path."""


def free_space(path: str) -> str:
    """'1.2 GB free of 50 GB' for the file system holding `path` ('free space unknown' if it cannot be read)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 1e9:.3g} GB free of {usage.total / 1e9:.3g} GB"


def disk_full_condition(error: BaseException) -> "str | None":
    """What full thing `error` reports ("the disk is full", ...), or None when it is another failure."""
    code = getattr(error, "errno", None)
    if code in _ERRNOS:
        return _ERRNOS[code]
    text = str(error)
    if any(t in text for t in _TEXTS):
        return ("the disk is full, over quota or at a file-size limit (the writer does not say which; its message: "
                + text[:120] + ")")
    return None
