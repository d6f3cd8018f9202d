"""WebDataset shards: the writer, the manifest beside them, and shard-list expansion.

A shard is a plain tar of samples `KEY.json` + `KEY.in0.png` + `KEY.help0.png` ...
(see records.record_to_sample). `manifest.json` in the shard directory lists each
shard's sample count, size and sha256, so loaders can plan exact epochs without
reading the data, and anyone can check a copy is complete.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from braceexpand import braceexpand

from data_pipeline.shard_reader import count_samples  # noqa: F401  (re-exported: counting reads headers only)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ilvr-shards/1"
COMPLETE, FAILED = "complete", "failed"  # Manifest.status: a failed run's shards are kept but not used
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_.-]+-\d{6,}\.tar(\.tmp)?$")  # what ShardWriter names its files


@dataclass
class ShardInfo:
    file: str  # name relative to the manifest's directory
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    shards: list[ShardInfo] = field(default_factory=list)
    source: str = ""
    skipped: dict[str, int] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT
    status: str = COMPLETE  # FAILED: ilvr-prepare refused its own output (error says why); loaders refuse it
    error: str = ""

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def save(self, directory: str) -> str:
        path = os.path.join(directory, MANIFEST)
        data = asdict(self)
        data["total_samples"] = self.total_samples
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(path: str) -> "Manifest":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{path}: not an ILVR shard manifest (format {data.get('format')!r})")
        return Manifest(
            shards=[ShardInfo(**s) for s in data["shards"]],
            source=data.get("source", ""),
            skipped=data.get("skipped", {}),
            status=data.get("status", COMPLETE),
            error=data.get("error", ""),
        )


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Writes samples into `prefix-000000.tar`, `prefix-000001.tar`, ... of `samples_per_shard` each.

    Each shard is written under a temporary name and renamed when complete, so a
    crash never leaves a truncated shard with a final name. Tar headers carry a fixed
    mtime so the same records give byte-identical shards.
    """

    def __init__(self, out_dir: str, prefix: str = "train", samples_per_shard: int = 1000, source: str = ""):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.manifest = Manifest(source=source)
        self._tar = None
        self._file = None
        self._count = 0

    def _open(self) -> None:
        import webdataset as wds

        name = f"{self.prefix}-{len(self.manifest.shards):06d}.tar"
        self._name = name
        self._file = open(os.path.join(self.out_dir, name + ".tmp"), "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0, user="ilvr", group="ilvr")
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()  # also closes the file object
        tmp = os.path.join(self.out_dir, self._name + ".tmp")
        final = os.path.join(self.out_dir, self._name)
        os.replace(tmp, final)
        self.manifest.shards.append(ShardInfo(self._name, self._count, os.path.getsize(final), _sha256(final)))
        self._tar = self._file = None

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish()

    def abort(self, error: str) -> None:
        """After a failure (a full disk, Ctrl-C): remove the unfinished shard's `.tar.tmp` and mark the set
        failed in its manifest (the complete shards listed, so `ilvr-prepare --overwrite` can remove them).
        Without this a full disk left a shard, a `.tar.tmp` and no manifest, which training took for a
        whole shard set. If even the manifest cannot be written, the directory has none, and is refused."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # the disk that failed the write may fail the flush too
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.out_dir, self._name + ".tmp"))
            self._tar = self._file = None
        self.manifest.status, self.manifest.error = FAILED, error
        try:
            self.manifest.save(self.out_dir)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.out_dir, MANIFEST + ".tmp"))

    def close(self, skipped: "dict[str, int] | None" = None, error: str = "") -> Manifest:
        """Finish the last shard and write the manifest; an `error` marks the set failed (shards kept)."""
        if self._tar is not None:
            self._finish()
        self.manifest.skipped = dict(skipped or {})
        self.manifest.status, self.manifest.error = (FAILED, error) if error else (COMPLETE, "")
        self.manifest.save(self.out_dir)
        return self.manifest


def previous_output(directory: str) -> tuple[list[str], list[str]]:
    """(files an earlier ilvr-prepare wrote here, other entries) of a shard directory.

    Ours: manifest.json if it is an ILVR manifest, the shard files it lists, and unfinished
    `<prefix>-NNNNNN.tar.tmp` files; a listed name is only taken when it is a plain file name of
    ShardWriter's form (a hostile manifest cannot point outside the directory). Everything else
    (unlisted tars included: nothing says which run wrote them) is 'other'.
    """
    names = sorted(os.listdir(directory))
    ours: set[str] = set()
    path = os.path.join(directory, MANIFEST)
    if os.path.isfile(path):
        try:
            listed = {s.file for s in Manifest.load(path).shards}
        except (ValueError, KeyError, TypeError, OSError):
            listed = None  # not one of ours (or unreadable): left alone
        if listed is not None:
            ours.add(MANIFEST)
            ours.update(n for n in listed if isinstance(n, str) and _SHARD_NAME.match(n) and n in names)
    ours.update(n for n in names if n.endswith(".tar.tmp") and _SHARD_NAME.match(n))
    ours = {n for n in ours if os.path.isfile(os.path.join(directory, n)) or os.path.islink(os.path.join(directory, n))}
    return sorted(ours), [n for n in names if n not in ours]


# ----------------------------------------------------------------------------- shard lists


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


class ShardSetIncomplete(FileNotFoundError):
    """A shard directory whose manifest is missing, or whose listed shards are missing or changed."""


def check_listed_shards(directory: str, manifest: Manifest) -> None:
    """Every shard the manifest lists exists with the size it lists, else ShardSetIncomplete naming them.

    A deleted shard used to cost its samples silently (one warning on one rank, skip counts that
    no record showed). Sizes cost a `stat` per shard; hashes (`verify_manifest`) read every byte,
    too slow for each start of a large run, so they are left to a check after copying.
    """
    problems = []
    for s in manifest.shards:
        path = os.path.join(directory, s.file)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
        elif os.path.getsize(path) != s.bytes:
            problems.append(f"{path} is {os.path.getsize(path)} bytes, the manifest lists {s.bytes}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ShardSetIncomplete(
            f"{os.path.join(directory, MANIFEST)} lists {len(manifest.shards)} shards, but {'; '.join(problems[:3])}"
            f"{more}: the shard set is incomplete or changed since ilvr-prepare wrote it. Copy the shards again "
            "(data_pipeline.shards.verify_manifest checks a copy), or prepare again")


def _without_manifest(directory: str) -> ShardSetIncomplete:
    unfinished = sorted(glob.glob(os.path.join(directory, "*.tar.tmp")))
    why = (f"it holds an unfinished {os.path.basename(unfinished[0])}: an ilvr-prepare there stopped before the end"
           if unfinished else "ilvr-prepare writes it last, so the directory may hold part of a shard set")
    return ShardSetIncomplete(
        f"shard directory {directory!r} holds no {MANIFEST} ({why}). Prepare again (--overwrite), or, to use "
        f"whatever tar files are there, name them yourself: {os.path.join(directory, '*.tar')!r}")


def _has_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def expand_shards(spec: "str | list[str]", must_exist: bool = False) -> list[str]:
    """Shard URLs from a brace pattern, a glob, a comma-separated list, a directory, or a manifest path.

    A directory (or manifest.json) yields the manifest's shards in order; one without a manifest
    is refused (ShardSetIncomplete): an interrupted ilvr-prepare leaves part of a set. A glob
    (`dir/*.tar`) takes the matching files, sorted. Local files are checked when `must_exist`,
    a manifest's shards by their listed sizes; remote URLs (pipe:, http://, s3://) are passed through.
    """
    items = spec if isinstance(spec, list) else [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError("no shards given")
    urls: list[str] = []
    for item in items:
        if _is_url(item):
            urls.extend(braceexpand(item))
            continue
        if os.path.isdir(item) or os.path.basename(item) == MANIFEST:
            directory = item if os.path.isdir(item) else os.path.dirname(item)
            manifest = os.path.join(directory, MANIFEST)
            if os.path.isfile(manifest):
                loaded = Manifest.load(manifest)
                if loaded.status != COMPLETE:
                    raise ValueError(f"{manifest} is marked {loaded.status!r} by ilvr-prepare ({loaded.error}); "
                                     "fix the source data, or prepare again with a higher --max-skip-fraction")
                if must_exist:
                    check_listed_shards(directory, loaded)
                urls.extend(os.path.join(directory, s.file) for s in loaded.shards)
            else:
                raise _without_manifest(directory)
            continue
        expanded = [found for pattern in braceexpand(item)
                    for found in (sorted(glob.glob(pattern)) or [pattern] if _has_glob(pattern) else [pattern])]
        if must_exist:
            missing = [p for p in expanded if not os.path.isfile(p)]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise FileNotFoundError(f"shard {missing[0]!r} does not exist{more}")
        urls.extend(expanded)
    if not urls:
        raise ValueError(f"{spec!r} names no shards")
    return urls


def shard_sample_counts(urls: list[str]) -> list[int]:
    """Samples per shard, from the manifest beside each shard; shards without one are counted from their
    tar headers (shard_reader.count_samples: no data is read; a shard that is not a tar raises ShardCountError)."""
    manifests: dict[str, dict[str, int]] = {}
    counts = []
    for url in urls:
        directory, name = os.path.split(url)
        if directory not in manifests:
            path = os.path.join(directory, MANIFEST)
            manifests[directory] = (
                {s.file: s.samples for s in Manifest.load(path).shards}
                if not _is_url(url) and os.path.isfile(path) else {}
            )
        n = manifests[directory].get(name)
        counts.append(n if n is not None else count_samples(url))
    return counts


def verify_manifest(directory: str) -> list[str]:
    """Problems found checking every shard in `directory` against its manifest (empty = all good)."""
    manifest = Manifest.load(os.path.join(directory, MANIFEST))
    problems = []
    for s in manifest.shards:
        path = os.path.join(directory, s.file)
        if not os.path.isfile(path):
            problems.append(f"{s.file}: missing")
        elif os.path.getsize(path) != s.bytes or _sha256(path) != s.sha256:
            problems.append(f"{s.file}: size or checksum differs from the manifest")
    return problems
