"""Read raw samples (dicts of bytes) from one WebDataset tar shard, or a range of it.

Local shards are opened seekable, so skipping the first `start` samples reads tar
headers only; remote URLs (pipe:, http://, s3:// through webdataset's gopen) are
streamed. Nothing is extracted to disk and nothing is unpickled.

Shards may come from anywhere, so every member is judged from its tar header before
its data is read: only regular files named like a sample's metadata or images, within
the size limits, are read. A sample with any other member (sparse, link, device,
unknown extension), one over a limit, or one repeating a key seen earlier in the shard
is still yielded, as {"__key__", "__url__", "__error__": (reason, message)} with no
data, so it keeps its place in the plan and is counted as a skip by whoever decodes it.
"""
from __future__ import annotations

import logging
import os
import re
import tarfile
from typing import Any, Iterator

from data_pipeline.limits import DEFAULT_LIMITS, MAX_HEADER_BYTES, MAX_JSON_BYTES, Limits

log = logging.getLogger(__name__)

# what ShardWriter writes: KEY.json, KEY.in<i>.<ext>, KEY.help<i>.<ext> (records.record_to_sample)
MEMBER_EXTENSION = re.compile(r"(json|(in|help)\d+\.(png|jpg|jpeg|gif|bmp|webp))")
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
               tarfile.SOLARIS_XHDTYPE)


class ShardReadError(IOError):
    """A shard could not be read to the end; `read` samples came out before the failure."""

    def __init__(self, url: str, read: int, cause: BaseException):
        super().__init__(f"{url}: read failed after {read} samples ({type(cause).__name__}: {cause})")
        self.url = url
        self.read = read


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized GNU long-name and pax headers (tarfile reads those whole into
    memory), and notes why the member list ended (tarfile stops silently at a cut or garbled header)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.ilvr_end = e  # only an all-zero block (EOFHeaderError) is a proper end of the archive
            raise

    def _proc_member(self, tar):
        if self.type in _META_TYPES and self.size > MAX_HEADER_BYTES:
            raise tarfile.ReadError(f"a {self.size}-byte extended header at offset {self.offset} "
                                    f"(more than {MAX_HEADER_BYTES}): not a sane shard")
        return super()._proc_member(tar)

    def _proc_gnusparse_10(self, next, pax_headers, tar):
        # its sparse map is read from the data area number by number, unbounded
        raise tarfile.ReadError(f"GNU sparse 1.0 member at offset {self.offset}: sparse members are refused")


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's naming rule: "dir/KEY.in0.png" -> ("dir/KEY", "in0.png") (split at the basename's first dot)."""
    directory, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return (f"{directory}/{key}" if directory else key), ext.lower()


def _open(url: str) -> tarfile.TarFile:
    if "://" not in url and not url.startswith("pipe:"):
        # seekable: skipped members are never read
        return tarfile.open(url, mode="r:", tarinfo=_BoundedTarInfo)
    import webdataset as wds

    return tarfile.open(fileobj=wds.gopen(url, "rb"), mode="r|*", tarinfo=_BoundedTarInfo)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members one by one, forgotten once passed (TarFile keeps every member read in `members`)."""
    while True:
        tar.ilvr_end = None  # set by _BoundedTarInfo when a header fails to parse
        member = tar.next()
        if member is None:
            return
        tar.members = []
        yield member


class UncleanEnd(tarfile.ReadError):
    """The member list ended at a cut or garbled header instead of the end-of-archive marker."""


def _check_end(tar: tarfile.TarFile, url: str) -> None:
    """Raise UncleanEnd unless the archive ended with its end-of-archive marker (a cut shard does not)."""
    end = getattr(tar, "ilvr_end", None)
    if not isinstance(end, tarfile.EOFHeaderError):
        raise UncleanEnd(f"{url} ends at byte {tar.offset} without the end-of-archive marker "
                         f"({end or 'no more data'}): the shard is truncated or corrupt")


def member_problem(member: tarfile.TarInfo, ext: str, limits: Limits) -> "tuple[str, str] | None":
    """(reason, message) when `member` must not be read, judged from its header alone; else None."""
    kind = ("a sparse file" if member.issparse() or member.type == tarfile.GNUTYPE_SPARSE else
            "a symlink" if member.issym() else "a hard link" if member.islnk() else
            "a device or FIFO" if member.isdev() else None if member.isreg() else f"of tar type {member.type!r}")
    if kind:
        return "bad_member", f"member {member.name} is {kind}; shards hold only regular files"
    if not MEMBER_EXTENSION.fullmatch(ext):
        return "bad_member", (f"member {member.name} has an unknown extension {ext!r}; shards hold only "
                              "KEY.json and KEY.in<i>/help<i>.<png|jpg|gif|bmp|webp>")
    limit, setting = (MAX_JSON_BYTES, "the metadata limit") if ext == "json" else \
        (limits.max_member_bytes, "data.max_member_bytes")
    if member.size > limit:
        return "too_large", f"member {member.name} is {member.size} bytes > {limit} ({setting})"
    return None


def _grouped(tar: tarfile.TarFile) -> Iterator[tuple[int, str, str, tarfile.TarInfo, bool]]:
    """(sample index, key, extension, member, key seen before) for each member but directories.

    A new sample starts where the key changes, or where an extension repeats within one
    key: two samples under the same key are never merged. Headers only; no data is read.
    """
    index, current, exts, keys = -1, None, set(), set()
    for member in _members(tar):
        if member.isdir():
            continue
        key, ext = split_name(member.name)
        if key != current or ext in exts:
            index, current, exts = index + 1, key, set()
            duplicate = key in keys
            keys.add(key)
        exts.add(ext)
        yield index, key, ext, member, duplicate


class _Sample:
    """The sample being assembled: its members' data, or the reason it is refused."""

    def __init__(self, index: int, key: str, url: str):
        self.index, self.key, self.url = index, key, url
        self.data: dict[str, bytes] = {}
        self.bytes = 0
        self.error: "tuple[str, str] | None" = None

    def refuse(self, reason: str, message: str) -> None:
        if self.error is None:
            self.error = (reason, f"{self.url}: {message}")
        self.data.clear()

    def as_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"__key__": self.key, "__url__": self.url, "__error__": self.error}
        return {"__key__": self.key, "__url__": self.url, **self.data}


def _samples(tar: tarfile.TarFile, url: str, start: int, stop: "int | None", limits: Limits) -> Iterator[_Sample]:
    """Samples number `start` .. `stop`-1; member data is read only for those, and only for members that pass.

    Where the shard breaks off at a header, the sample before the break is whole and still
    comes out; where it breaks inside a member's data, that member's sample is lost.
    """
    current, error = None, None
    try:
        for index, key, ext, member, duplicate in _grouped(tar):
            if current is None or index != current.index:
                if current is not None and current.index >= start:
                    yield current
                if stop is not None and index >= stop:
                    return
                current = _Sample(index, key, url)
                if duplicate:
                    current.refuse("duplicate_key",
                                   f"sample key {key!r} appears twice in the shard; the second is dropped")
            if index >= start and current.error is None:
                _add_member(tar, current, member, ext, limits)
    except (OSError, tarfile.TarError, EOFError) as e:
        if getattr(tar, "ilvr_end", None) is None:
            raise
        error = e
    if current is not None and current.index >= start:
        yield current
    if error is not None:
        raise error
    _check_end(tar, url)


def _add_member(tar: tarfile.TarFile, sample: _Sample, member: tarfile.TarInfo, ext: str, limits: Limits) -> None:
    """Read `member` into `sample`, or refuse the sample, judging from the header before any data is read."""
    problem = member_problem(member, ext, limits)
    if problem is None and sample.bytes + member.size > limits.max_sample_bytes:
        problem = ("too_large",
                   f"sample {sample.key} holds more than {limits.max_sample_bytes} bytes (data.max_sample_bytes)")
    if problem is not None:
        sample.refuse(*problem)
        return
    sample.data[ext] = tar.extractfile(member).read()
    sample.bytes += member.size


def read_samples(url: str, start: int = 0, stop: "int | None" = None,
                 limits: Limits = DEFAULT_LIMITS) -> Iterator[dict[str, Any]]:
    """Yield samples number `start` .. `stop`-1 of the shard, each {"__key__", "__url__", ext: bytes},
    or {"__key__", "__url__", "__error__": (reason, message)} for a refused one.

    Raises ShardReadError when the shard is missing, truncated or corrupt; the samples
    yielded before that are good.
    """
    yielded = 0
    try:
        with _open(url) as tar:
            for sample in _samples(tar, url, start, stop, limits):
                yield sample.as_dict()
                yielded += 1
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        raise ShardReadError(url, yielded, e) from None


class ShardCountError(ValueError):
    """A shard without a manifest entry could not be counted at all."""


def count_samples(url: str) -> int:
    """Count the samples of one shard from its tar headers alone (for shards without a manifest).

    Samples are delimited exactly as read_samples delimits them. A shard that breaks
    off is counted up to the break, the broken sample included, so the loader meets it
    and counts it as a skip ("shard_read_error"); one whose first header cannot be read
    raises ShardCountError naming the file.
    """
    n, tar = 0, None
    try:
        with _open(url) as tar:
            for index, *_ in _grouped(tar):
                n = index + 1
            _check_end(tar, url)
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        if n == 0:
            raise ShardCountError(f"shard {url} cannot be read as a tar ({type(e).__name__}: {e}); remove it, copy "
                                  "it again, or write its manifest with ilvr-prepare") from None
        if getattr(tar, "ilvr_end", None) is not None:
            n += 1  # cut at a header, not inside a counted sample's data: count what followed as one lost sample
        log.warning("shard %s breaks off after %d samples (%s: %s); the loader counts the rest as skipped",
                    url, n - 1, type(e).__name__, e)
    return n
