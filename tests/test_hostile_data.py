"""Hostile and careless input on the data path: every case is a counted skip or a clear error, in bounded memory.

The cases of docs/reliability.md ("Data path"), each built here in tmp_path: a 17 KB PNG
that decodes to 144 M pixels, GNU sparse tar members of 400 MB in a shard of a few KB,
links and devices inside a shard, /dev/zero as a JSONL image path, repeated sample keys,
and a cut shard without a manifest. The memory cases run in a child process whose peak
RSS is compared with the same child on a normal shard.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline.limits import MAX_IMAGE_PIXELS, Limits
from data_pipeline.loader import build_loader
from data_pipeline.prepare import main as prepare_main
from data_pipeline.records import (ImageRef, RecordError, check_image, decode_image, record_to_sample,
                                   sample_to_record, shard_key)
from data_pipeline.shard_reader import ShardCountError, ShardReadError, count_samples, read_samples
from data_pipeline.shards import shard_sample_counts
from data_pipeline.sources import iter_jsonl
from tests.factories import as_list, numbered_record, png, truncate_at_sample, write_shards

REPO = Path(__file__).resolve().parents[1]
BOMB_SIDE = 12000  # 144 M pixels: over data.max_image_pixels and over Pillow's own warning limit


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A 12000x12000 1-bit PNG: ~18 KB on disk, 144 MB decoded as "1", 576 MB as RGB."""
    buf = io.BytesIO()
    Image.new("1", (BOMB_SIDE, BOMB_SIDE)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- tar building


def member(name: str, data: bytes = b"", type: bytes = tarfile.REGTYPE, **fields) -> bytes:
    """One tar member (GNU format header + data), with any TarInfo fields set."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = type, len(data), 0
    for key, value in fields.items():
        setattr(info, key, value)
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def gnu_sparse_member(name: str, real_size: int) -> bytes:
    """An old-GNU sparse member ("S"): 512 stored bytes that read back as `real_size` bytes.

    This is what `truncate -s 400M f && tar --sparse -cf` writes; tarfile cannot write it.
    """
    chunk = b"\x89PNG\r\n\x1a\n".ljust(tarfile.BLOCKSIZE, b"\0")
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = tarfile.GNUTYPE_SPARSE, len(chunk), 0
    buf = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    buf[386:398] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)  # sparse map: one chunk at offset 0 ...
    buf[398:410] = tarfile.itn(len(chunk), 12, tarfile.GNU_FORMAT)  # ... of 512 bytes
    buf[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)  # the size it reads back as
    buf[148:156] = b" " * 8
    buf[148:155] = b"%06o\0" % tarfile.calc_chksums(bytes(buf))[0]
    return bytes(buf) + chunk


def key_of(i: int) -> str:
    return shard_key(i, f"rec{i:04d}")


def sample_members(i: int, key: "str | None" = None, drop: tuple = (), **replace: bytes) -> list[bytes]:
    """The members of numbered_record(i) as ShardWriter writes them, under `key`, some dropped or replaced."""
    sample = record_to_sample(numbered_record(i), i)
    del sample["__key__"]
    sample.update(replace)
    return [member(f"{key or key_of(i)}.{ext}", data) for ext, data in sorted(sample.items()) if ext not in drop]


def write_tar(path: Path, members: list[bytes]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(members) + b"\0" * (2 * tarfile.BLOCKSIZE))
    return str(path)


def outcomes(url: str, limits: Limits = Limits()) -> list[str]:
    """Per sample of the shard: the record id, or the reason it is skipped."""
    out = []
    for sample in read_samples(url, limits=limits):
        try:
            out.append(sample_to_record(sample).id)
        except RecordError as e:
            out.append(e.reason)
    return out


@pytest.fixture
def extracted(monkeypatch) -> list[str]:
    """Names of the tar members whose data is read."""
    names: list[str] = []
    original = tarfile.TarFile.extractfile

    def spy(self, member):
        names.append(member.name if isinstance(member, tarfile.TarInfo) else member)
        return original(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    return names


# ----------------------------------------------------------------------------- images


def test_bomb_png_is_refused_from_its_header_without_decoding(bomb_png):
    """12000x12000 is over Pillow's warning limit too; 7000x7000 (49 M pixels) only over data.max_image_pixels."""
    buf = io.BytesIO()
    Image.new("1", (7000, 7000)).save(buf, format="PNG")
    assert len(bomb_png) < 64 << 10 and 7000 * 7000 < Image.MAX_IMAGE_PIXELS
    t0 = time.perf_counter()
    for data in (bomb_png, buf.getvalue()):
        for call in (decode_image, check_image, lambda d: check_image(d, decode=False)):
            with pytest.raises(RecordError) as err:
                call(data)
            assert err.value.reason == "too_large" and "pixels" in str(err.value)
    assert "7000x7000 = 49000000 pixels > 40000000" in str(err.value)
    assert time.perf_counter() - t0 < 2.0, "the bomb was decoded, not refused from its header"


def test_pixel_limit_is_a_parameter(tmp_path):
    small = png((1, 2, 3), size=100)
    assert decode_image(small, max_pixels=100 * 100).size == (100, 100)
    with pytest.raises(RecordError, match="too_large: image is 100x100 = 10000 pixels > 9999"):
        decode_image(small, max_pixels=9999)
    with pytest.raises(RecordError, match="too_large"):
        check_image(small, max_pixels=9999, decode=False)


def test_decompression_bomb_warning_is_an_error_in_scope_only(bomb_png):
    """Above Pillow's own limit the bomb warning refuses the image even when data.max_image_pixels allows it."""
    filters_before, limit_before = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    with pytest.raises(RecordError, match="too_large: image refused as a decompression bomb"):
        check_image(bomb_png, max_pixels=10**12)
    assert warnings.filters == filters_before and Image.MAX_IMAGE_PIXELS == limit_before, "global state changed"


def test_image_shape_the_processor_would_refuse_is_skipped():
    buf = io.BytesIO()
    Image.new("RGB", (5000, 1)).save(buf, format="PNG")
    with pytest.raises(RecordError) as err:
        decode_image(buf.getvalue())
    assert err.value.reason == "bad_image_shape"


def test_helper_images_are_decoded_one_at_a_time(tiny, monkeypatch):
    import weakref

    import data_pipeline.encode as encode
    from tests.factories import vsp_like_record

    processor, latent_ids = tiny
    alive, most = set(), [0]

    def tracked(data, max_pixels=MAX_IMAGE_PIXELS):
        image = decode_image(data, max_pixels)
        key = id(image)
        alive.add(key)
        weakref.finalize(image, alive.discard, key)
        most[0] = max(most[0], len(alive))
        return image

    record = vsp_like_record(n_images=1, n_latent=4)
    expected = encode.encode_record(record, processor, latent_ids, 4, 4096)
    monkeypatch.setattr(encode, "decode_image", tracked)
    got = encode.encode_record(record, processor, latent_ids, 4, 4096)
    assert most[0] == 1, f"{most[0]} decoded images were alive at once"
    assert got.helper_pixel_values.equal(expected.helper_pixel_values)
    assert got.helper_image_grid_thw.equal(expected.helper_image_grid_thw)


# ----------------------------------------------------------------------------- image files (ilvr-prepare)


def test_image_ref_reads_only_bounded_regular_files(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png((9, 9, 9)))
    (tmp_path / "link.png").symlink_to(good)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.png")
    assert ImageRef(path=str(tmp_path / "link.png")).load() == good.read_bytes(), "a symlink to a file is fine"
    cases = {"/dev/zero": "character device", str(tmp_path / "zero.png"): "character device",
             str(tmp_path / "fifo.png"): "FIFO", str(tmp_path): "directory"}
    result: dict = {}

    def load_all():  # in a thread: opening a FIFO for reading would block forever
        for path in cases:
            try:
                ImageRef(path=path).load()
            except RecordError as e:
                result[path] = e
    thread = threading.Thread(target=load_all, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "reading a device or FIFO blocked or never ended"
    for path, kind in cases.items():
        assert result[path].reason == "missing_image" and kind in str(result[path]), path
    with pytest.raises(RecordError, match=r"too_large: .*good.png is \d+ bytes > 10 "):
        ImageRef(path=str(good)).load(max_bytes=10)
    with pytest.raises(RecordError, match="too_large"):
        ImageRef(data=b"x" * 101).load(max_bytes=100)


def test_proc_file_without_a_size_is_read_in_bounded_chunks():
    """/proc files say st_size 0 but hold data: only the chunked read's cap stops them."""
    with pytest.raises(RecordError, match="holds more than 10 bytes"):
        ImageRef(path="/proc/self/status").load(max_bytes=10)


def prepare_rows(tmp_path: Path, image_paths: list, *extra: str) -> tuple[int, dict]:
    """ilvr-prepare on one good row, then one row per entry of `image_paths`; (exit code, manifest)."""
    good = tmp_path / "good.png"
    good.write_bytes(png((0, 200, 0)))
    rows = [{"id": f"r{i}", "text_input": "Q", "image_input": p, "sequence_plan": [{"type": "text", "content": "x"}]}
            for i, p in enumerate([str(good)] + image_paths)]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc = prepare_main(["--source", "ilvr", "--input", str(jsonl), "--out", str(out), "--no-progress", *extra])
    return rc, json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify-images"])
def test_prepare_skips_device_paths_and_bombs(tmp_path, bomb_png, verify):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png)
    rc, manifest = prepare_rows(tmp_path, ["/dev/zero", str(bomb)], *([] if verify else ["--no-verify-images"]))
    assert rc == 0 and manifest["total_samples"] == 1
    assert manifest["skipped"] == {"missing_image": 1, "too_large": 1}


def test_prepare_member_and_sample_byte_caps(tmp_path):
    images = []
    for i, size in enumerate((32, 32, 32, 64)):
        images.append(tmp_path / f"{i}.png")
        images[-1].write_bytes(png((7, 7, 7), size=size))
    small, big = images[0].stat().st_size, images[3].stat().st_size
    assert big > small + 10 and 3 * small > 2 * small + 20
    rc, manifest = prepare_rows(tmp_path, [[str(p) for p in images[:3]], str(images[3])],
                                "--max-member-bytes", str(small + 10), "--max-sample-bytes", str(2 * small + 20))
    assert rc == 0 and manifest["total_samples"] == 1 and manifest["skipped"] == {"too_large": 2}


def test_jsonl_line_without_end_is_skipped_in_bounded_memory(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b"x" * 5000 + b"\n" + b'{"b": 2}\n' + b"[" * 100000 + b"\n\xff\n")
    got = list(iter_jsonl(str(path), max_line_bytes=1000))
    assert [(n, r if isinstance(r, dict) else r.reason) for n, r in got] == [
        (1, {"a": 1}), (2, "too_large"), (3, {"b": 2}), (4, "too_large"), (5, "malformed_record")]
    got = list(iter_jsonl(str(path), max_line_bytes=200000))
    assert got[3][1].reason == "malformed_record" and "nested too deeply" in str(got[3][1])


# ----------------------------------------------------------------------------- shard members


def test_link_device_sparse_and_unknown_members_are_refused_before_reading(tmp_path, extracted):
    image = lambda i: f"{key_of(i)}.in0.png"  # noqa: E731
    hostile = {  # sample number -> its in0.png replaced by this member
        2: member(image(2), type=tarfile.SYMTYPE, linkname="/dev/zero"),
        3: member(image(3), type=tarfile.LNKTYPE, linkname=image(0)),  # another sample's image
        4: member(image(4), type=tarfile.CHRTYPE, devmajor=1, devminor=5),
        5: member(image(5), type=tarfile.FIFOTYPE),
        6: gnu_sparse_member(image(6), 400 << 20),
    }
    members = sample_members(0)
    for i, bad in hostile.items():
        members += sample_members(i, drop=("in0.png",)) + [bad]
    members += sample_members(7) + [member(f"{key_of(7)}.pyc", b"\0" * 600)]  # unknown extension
    members += sample_members(1)
    url = write_tar(tmp_path / "hostile.tar", members)
    assert outcomes(url) == ["rec0000"] + ["bad_member"] * 6 + ["rec0001"]
    assert outcomes(f"pipe:cat {url}") == outcomes(url), "a streamed shard is judged the same way"
    refused = {image(i) for i in hostile} | {f"{key_of(7)}.pyc"}
    assert not refused & set(extracted), f"read before being refused: {refused & set(extracted)}"
    assert count_samples(url) == count_samples(f"pipe:cat {url}") == 8


def test_member_and_sample_byte_caps(tmp_path, extracted):
    limits = Limits(max_image_pixels=MAX_IMAGE_PIXELS, max_member_bytes=2000, max_sample_bytes=3000)
    big, two_halves = b"\x89PNG" + b"\0" * 2100, b"\x89PNG" + b"\0" * 1600
    members = (sample_members(0) + sample_members(1, **{"in0.png": big})
               + sample_members(2, **{"in0.png": two_halves, "help0.png": two_halves})
               + sample_members(3, json=b" " * (9 << 20)) + sample_members(4))
    url = write_tar(tmp_path / "caps.tar", members)
    assert outcomes(url, limits) == ["rec0000", "too_large", "too_large", "too_large", "rec0004"]
    assert not any(n.startswith("000000001_") and n.endswith(".in0.png") for n in extracted), "oversize member was read"


def test_deeply_nested_metadata_is_a_malformed_record(tmp_path):
    url = write_tar(tmp_path / "deep.tar", sample_members(0, json=b"[" * 100000) + sample_members(1))
    assert outcomes(url) == ["malformed_record", "rec0001"]


def test_duplicate_keys_are_never_merged(tmp_path):
    again = sample_members(1, key=key_of(0))  # another record's json and images under sample 0's key
    url = write_tar(tmp_path / "dup.tar", sample_members(0) + again + sample_members(2) + again)
    got = list(read_samples(url))
    assert [s.get("__error__", ("ok",))[0] for s in got] == ["ok", "duplicate_key", "ok", "duplicate_key"]
    record = sample_to_record(got[0])
    assert record.id == "rec0000" and record.images[0].data == numbered_record(0).images[0].data, \
        "the first sample keeps its own json and images"
    assert count_samples(url) == 4


def test_oversized_extended_header_stops_the_shard_not_the_memory(tmp_path):
    huge_pax = member("././@PaxHeader", b"9" * (2 << 20), type=tarfile.XHDTYPE)
    url = write_tar(tmp_path / "pax.tar", sample_members(0) + [huge_pax] + sample_members(1))
    with pytest.raises(ShardReadError, match="extended header"):
        list(read_samples(url))


def test_limits_reach_the_loader_and_the_encoder(tmp_path, tiny):
    from types import SimpleNamespace

    from data_pipeline.pipeline import RecordEncoder

    url = write_tar(tmp_path / "s.tar", sample_members(0) + sample_members(1, **{"in0.png": png((1, 1, 1), 64)})
                    + sample_members(2))
    small = Limits(max_member_bytes=len(png((1, 1, 1), 8)) + 50, max_sample_bytes=10**6)
    ld = build_loader([url], [3], lambda r: r.id, as_list, rank=0, world_size=1, batch_size=1, max_skip_fraction=1.0,
                      limits=small)
    assert {i for b in ld for i in b} == {"rec0000", "rec0002"} and dict(ld.skips.skipped) == {"too_large": 1}
    processor, latent_ids = tiny
    with pytest.raises(RecordError, match="too_large: image is 8x8"):
        RecordEncoder(processor, latent_ids, 4, 4096, max_image_pixels=63)(numbered_record(0))
    assert Limits.from_config(SimpleNamespace(max_image_pixels=5, batch_size=1)) == Limits(max_image_pixels=5)
    with pytest.raises(ValueError, match="data.max_member_bytes=0 must be a positive integer"):
        Limits(max_member_bytes=0)


# ----------------------------------------------------------------------------- shards without a manifest


def test_truncated_shard_without_manifest_is_a_counted_skip(tmp_path):
    urls = write_shards(str(tmp_path), [10, 10])
    for url in urls:
        os.remove(os.path.join(os.path.dirname(url), "manifest.json"))
    truncate_at_sample(urls[0], 4, extra=100)  # inside the header of sample 4
    truncate_at_sample(urls[1], 6, extra=700)  # inside the data of sample 6
    counts = shard_sample_counts(urls)
    assert counts == [5, 7] and [count_samples(f"pipe:cat {u}") for u in urls] == counts
    ld = build_loader(urls, counts, lambda r: r.id, as_list, rank=0, world_size=1, batch_size=2, max_skip_fraction=0.5)
    ids = {i for batch in ld for i in batch}
    assert dict(ld.skips.skipped) == {"shard_read_error": 2}
    assert ids == {f"rec{i:04d}" for i in list(range(4)) + list(range(10, 16))}


def test_shard_that_is_not_a_tar_is_a_clear_error(tmp_path):
    bad = tmp_path / "s-000000.tar"
    bad.write_bytes(b"not a tar at all" * 10)
    with pytest.raises(ShardCountError, match=re.escape(f"shard {bad} cannot be read as a tar") + ".*ilvr-prepare"):
        shard_sample_counts([str(bad)])
    bad.write_bytes(b"")
    with pytest.raises(ShardCountError, match="s-000000.tar"):
        shard_sample_counts([str(bad)])


def test_counting_reads_headers_only(tmp_path, extracted):
    urls = write_shards(str(tmp_path), [5])
    os.remove(os.path.join(os.path.dirname(urls[0]), "manifest.json"))
    assert shard_sample_counts(urls) == [5] and extracted == []


# ----------------------------------------------------------------------------- peak memory, in a child process

CHILD = r"""
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a failed protection must not take the machine down
mode, args = sys.argv[1], sys.argv[2:]
result = {}
if mode == "loader":
    from data_pipeline.loader import build_loader
    from data_pipeline.pipeline import BatchCollator, RecordEncoder
    from data_pipeline.shards import expand_shards, shard_sample_counts
    from data_pipeline.tiny_processor import load_processor
    processor, latent_ids = load_processor(args[1])
    urls = expand_shards(args[0])
    ld = build_loader(urls, shard_sample_counts(urls), RecordEncoder(processor, latent_ids, 4, 4096),
                      BatchCollator(processor.tokenizer.pad_token_id), rank=0, world_size=1, batch_size=1,
                      max_skip_fraction=1.0)
    result["batches"] = sum(1 for _ in ld)
    result["skipped"] = dict(ld.skips.skipped)
else:
    from data_pipeline.prepare import main
    result["rc"] = main(args)
    result["manifest"] = json.load(open(os.path.join(args[args.index("--out") + 1], "manifest.json")))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked (pytest-sized) parent
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
result["peak_mb"] = int(hwm.split()[1]) / 1024
print("RESULT " + json.dumps(result))
"""


def peak(*args: str) -> dict:
    """Run CHILD with `args`; its result, with its peak RSS in MB."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(REPO))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed (rc {proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def shard_dir(root: Path, replace: "dict[str, bytes] | None" = None, extra: "list[bytes] | None" = None) -> str:
    """A manifest-less shard (as a glob: a dir without a manifest is refused): samples 0..3, sample 1 with
    `replace`d members, then `extra` members."""
    members = []
    for i in range(4):
        members += sample_members(i, **((replace or {}) if i == 1 else {}))
    write_tar(root / "s-000000.tar", members + (extra or []))
    return str(root / "*.tar")


@pytest.mark.slow
def test_peak_memory_of_hostile_shards_stays_near_a_normal_shard(tmp_path, bomb_png, tiny_processor_dir):
    key = key_of(8)
    meta = json.loads(record_to_sample(numbered_record(8), 8)["json"])
    meta.update(question="<image>" * 3 + "Q", images=[f"in{i}.png" for i in range(3)],
                steps=[{"type": "latent", "image": f"help{i}.png"} for i in range(4)] + [{"type": "text", "text": "A"}])
    bomb7 = [member(f"{key}.json", json.dumps(meta).encode())]
    bomb7 += [member(f"{key}.{p}{i}.png", bomb_png) for p, n in (("in", 3), ("help", 4)) for i in range(n)]
    sparse = sample_members(9, drop=("in0.png", "help0.png")) + [
        gnu_sparse_member(f"{key_of(9)}.{name}", 400 << 20) for name in ("help0.png", "in0.png", "in1.png")]
    cases = {
        "normal": (shard_dir(tmp_path / "normal"), {}),
        "bomb as one image": (shard_dir(tmp_path / "bomb1", {"in0.png": bomb_png}), {"too_large": 1}),
        "bomb as all 7 images": (shard_dir(tmp_path / "bomb7", extra=bomb7), {"too_large": 1}),
        "3 sparse members of 400 MB": (shard_dir(tmp_path / "sparse", extra=sparse), {"bad_member": 1}),
    }
    got = {name: peak("loader", path, tiny_processor_dir) for name, (path, _) in cases.items()}
    base = got["normal"]["peak_mb"]
    report = {name: round(r["peak_mb"]) for name, r in got.items()}
    print(f"loader peak RSS (MB): {report}")
    for name, (_, skipped) in cases.items():
        assert got[name]["skipped"] == skipped, (name, got[name])
        assert got[name]["peak_mb"] < 2 * base, f"{name}: {got[name]['peak_mb']:.0f} MB vs {base:.0f} MB normally"


@pytest.mark.slow
def test_peak_memory_of_prepare_with_dev_zero_stays_near_a_normal_row(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png((0, 200, 0)))
    runs = {}
    for name, path in (("normal", str(good)), ("/dev/zero", "/dev/zero")):
        rows = [{"id": f"r{i}", "text_input": "Q", "image_input": p,
                 "sequence_plan": [{"type": "text", "content": "x"}]} for i, p in enumerate([str(good), path])]
        jsonl = tmp_path / f"{len(runs)}.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = str(tmp_path / f"o{len(runs)}")
        runs[name] = peak("prepare", "--source", "ilvr", "--input", str(jsonl), "--out", out, "--no-progress")
    print(f"ilvr-prepare peak RSS (MB): { {k: round(v['peak_mb']) for k, v in runs.items()} }")
    assert runs["/dev/zero"]["rc"] == 0 and runs["/dev/zero"]["manifest"]["skipped"] == {"missing_image": 1}
    assert runs["/dev/zero"]["peak_mb"] < 2 * runs["normal"]["peak_mb"]
