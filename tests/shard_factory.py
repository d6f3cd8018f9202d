"""Small synthetic shards for loader tests: records with real PNG bytes, shard sizes of the test's choosing."""
from __future__ import annotations

import io
import os
import tarfile

from data_pipeline.records import ImageRef, Record, Step, record_to_sample
from data_pipeline.shards import ShardWriter


def png(color: tuple[int, int, int], size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def make_record(i: int) -> Record:
    return Record(
        id=f"rec{i:04d}", task="test", question=f"<image>question {i}",
        images=[ImageRef(data=png((i % 256, 0, 0)))],
        steps=[Step.of_text(f"step {i}"), Step.of_latent(ImageRef(data=png((0, i % 256, 0)))),
               Step.of_text(f"answer \\boxed{{{i}}}")],
        answer=str(i),
    )


def write_shards(out_dir: str, counts: list[int], start: int = 0) -> list[str]:
    """Write len(counts) shards with counts[k] records each; record ids run on from `start`."""
    os.makedirs(out_dir, exist_ok=True)
    urls, i = [], start
    for k, n in enumerate(counts):
        writer = ShardWriter(os.path.join(out_dir, f"part{k}"), prefix="s", samples_per_shard=max(n, 1))
        for _ in range(n):
            writer.write(record_to_sample(make_record(i), i))
            i += 1
        manifest = writer.close()
        urls += [os.path.join(out_dir, f"part{k}", s.file) for s in manifest.shards]
    return urls


def truncate_at_sample(url: str, sample: int, extra: int = 100) -> None:
    """Cut the tar file `extra` bytes into sample number `sample`: samples before it stay readable."""
    keys = []
    with tarfile.open(url) as tar:
        for m in tar:
            key = m.name.split(".", 1)[0]
            if not keys or keys[-1][0] != key:
                keys.append((key, m.offset))
    offset = keys[sample][1] + extra
    with open(url, "r+b") as f:
        f.truncate(offset)


def record_id_of(record) -> str:
    """Encode function for tests: a record becomes its id."""
    return record.id


def as_list(items: list) -> list:
    return list(items)
