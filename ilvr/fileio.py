"""Durable small-file writes and file hashes, shared by checkpoints, tracking and evaluation outputs."""
from __future__ import annotations

import hashlib
import os


def fsync_path(path: str) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write and fsync a small file, rename it into place (readers see old or new, never half), fsync the dir."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path) or ".")


def fsync_tree(root: str) -> None:
    """fsync every file and directory under `root`."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):  # python 3.10 has no hashlib.file_digest
            digest.update(block)
    return digest.hexdigest()
