"""Read raw samples (dicts of bytes) from one WebDataset tar shard, or a range of it.

Local shards are opened seekable, so skipping the first `start` samples reads tar
headers only; remote URLs (pipe:, http://, s3:// through webdataset's gopen) are
streamed. Only regular files are read, into memory; nothing is extracted to disk and
nothing is unpickled.
"""
from __future__ import annotations

import os
import tarfile
from typing import Any, Iterator

MAX_MEMBER_BYTES = 512 << 20  # a member this large is not a sane image or JSON


class ShardReadError(IOError):
    """A shard could not be read to the end; `read` samples came out before the failure."""

    def __init__(self, url: str, read: int, cause: BaseException):
        super().__init__(f"{url}: read failed after {read} samples ({type(cause).__name__}: {cause})")
        self.url = url
        self.read = read


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's naming rule: "dir/KEY.in0.png" -> ("dir/KEY", "in0.png") (split at the basename's first dot)."""
    directory, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return (f"{directory}/{key}" if directory else key), ext.lower()


def _open(url: str) -> tarfile.TarFile:
    if "://" not in url and not url.startswith("pipe:"):
        return tarfile.open(url, mode="r:")  # seekable: skipped members are never read
    import webdataset as wds

    return tarfile.open(fileobj=wds.gopen(url, "rb"), mode="r|*")


def read_samples(url: str, start: int = 0, stop: "int | None" = None) -> Iterator[dict[str, Any]]:
    """Yield samples number `start` .. `stop`-1 of the shard, each {"__key__", "__url__", ext: bytes}.

    Raises ShardReadError when the shard is missing, truncated or corrupt; the samples
    yielded before that are good.
    """
    index, yielded = -1, 0
    current: "dict[str, Any] | None" = None
    try:
        with _open(url) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if current is None or key != current["__key__"]:
                    if current is not None and index >= start:
                        yield current
                        yielded += 1
                    index += 1
                    if stop is not None and index >= stop:
                        return
                    current = {"__key__": key, "__url__": url}
                if index < start:
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    raise ValueError(f"member {member.name} is {member.size} bytes")
                current[ext] = tar.extractfile(member).read()
        if current is not None and index >= start:
            yield current
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        raise ShardReadError(url, yielded, e) from None
