"""Test data made on the spot: PNG maps, records, a text corpus, shards of chosen sizes, damaged shards, logit bias."""
from __future__ import annotations

import contextlib
import io
import os
import random
import tarfile

from data_pipeline.records import ImageRef, Record, Step, record_to_sample
from data_pipeline.shards import ShardWriter


def png(color: tuple[int, int, int], size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def numbered_record(i: int) -> Record:
    """A small record whose id, question and images are derived from `i`."""
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
            writer.write(record_to_sample(numbered_record(i), i))
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


VSP_QUESTION = (
    "As a professional maze solver, your task is to analyze a grid-based map and devise an action plan "
    "that enables a player to reach the goal from the starting point without falling into any holes.\n"
    "Here is the map: <image>\nAnd the same map, larger: <image>\n"
    "Please provide your action plan. The final answer MUST BE put in \\boxed{}."
)


def corpus_texts() -> list[str]:
    """A small deterministic corpus in the style of the VSP prompts and reasoning steps."""
    rng = random.Random(0)
    moves = ["L", "R", "U", "D"]
    texts = [VSP_QUESTION] * 20
    for _ in range(300):
        plan = ",".join(rng.choice(moves) for _ in range(rng.randint(1, 8)))
        texts.append(f"The player is at row {rng.randint(0, 7)}, column {rng.randint(0, 7)}. "
                     f"Move {rng.choice(moves)} to avoid the hole. The answer is \\boxed{{{plan}}}.")  # fmt: skip
    return texts


def png_bytes(size: int = 192, seed: int = 0) -> bytes:
    """A PNG grid map: random cell colours on a size x size image."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    cells = 4
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    step = size // cells
    for r in range(cells):
        for c in range(cells):
            colour = tuple(rng.randint(0, 255) for _ in range(3))
            draw.rectangle([c * step, r * step, (c + 1) * step - 1, (r + 1) * step - 1], fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def vsp_like_record(n_images: int = 2, n_latent: int = 3, rid: str = "r0", sizes=(192, 384)) -> Record:
    """A VSP-like record: text and latent steps alternate (two latents back to back), then the answer."""
    images = [ImageRef(data=png_bytes(sizes[i % len(sizes)], seed=i)) for i in range(n_images)]
    question = VSP_QUESTION if n_images == 2 else "Plan a path. " + "<image> " * n_images
    steps = [Step.of_text("Start at the top left.")]
    for i in range(n_latent):
        steps.append(Step.of_latent(ImageRef(data=png_bytes(256, seed=100 + i))))
        if i != 1:
            steps.append(Step.of_text(f" After move {i + 1} the player is safe."))
    steps.append(Step.of_text(" The answer is \\boxed{R,D,D}."))
    return Record(id=rid, task="vsp", question=question, images=images, steps=steps, answer="R,D,D")


@contextlib.contextmanager
def logit_bias(model, token_id: int, value: float, row: int | None = None):
    """Add `value` to one token's logit (in every row, or in one batch row only)."""

    def hook(module, args, out):
        out = out.clone()
        if row is None:
            out[..., token_id] += value
        else:
            out[row, ..., token_id] += value
        return out

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def synthetic_vsp_shards(out_dir: str, num_samples: int, seed: int, samples_per_shard: int = 8) -> str:
    """Synthetic VSP records (maps 3x3-4x4) written as training shards into `out_dir`."""
    from data_pipeline.sources.synthetic_vsp import read as synthetic

    writer = ShardWriter(out_dir, prefix="train", samples_per_shard=samples_per_shard)
    for i, rec in enumerate(synthetic(num_samples=num_samples, seed=seed, min_size=3, max_size=4)):
        writer.write(record_to_sample(rec, i))
    writer.close()
    return out_dir
