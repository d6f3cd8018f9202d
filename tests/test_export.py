"""ilvr-export: the exported directory loads with stock transformers, weights intact, and generates.

Both paths: `export_model` on an in-memory model, and the CLI on a 2-rank ZeRO-3 checkpoint
(the shards consolidated with DeepSpeed's zero_to_fp32).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from data_pipeline.encode import encode_prompt
from data_pipeline.tiny_processor import load_processor
from ilvr.export import export_model, main
from ilvr.model.ilvr_settings import SETTINGS_FILE
from ilvr.model.generate import generate
from ilvr.training.spawn import run_on_ranks
from tests.factories import vsp_like_record

K = 4


def load_stock(path: str):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()


def assert_same_weights(state: dict, reference: dict) -> None:
    assert sorted(state) == sorted(reference)
    for name, value in reference.items():
        assert torch.equal(state[name].float(), value.float()), name


def read_settings(out_dir: str) -> dict:
    with open(os.path.join(out_dir, SETTINGS_FILE), encoding="utf-8") as f:
        return json.load(f)


def generate_with_export(model, out_dir: str):
    """Greedy latent decoding of one image prompt with the exported processor."""
    processor, latent_ids = load_processor(out_dir)
    prompt = encode_prompt(vsp_like_record(n_images=1), processor)
    bias = model.lm_head.register_forward_hook(lambda m, a, out: out.index_add(
        -1, torch.tensor([latent_ids.start]), torch.full(out.shape[:-1] + (1,), 100.0)))  # open a segment
    try:
        return generate(model, [prompt], processor.tokenizer, latent_ids, K, max_new_tokens=2 + K)[0]
    finally:
        bias.remove()


def test_export_model_round_trip(tmp_path, tiny, tiny_model_factory):
    processor, latent_ids = tiny
    model = tiny_model_factory(seed=3)
    out = str(tmp_path / "export")
    export_model(model, processor, out, {"latent_size": K, "stage": "2", "step": 12, "loss": {"w_align": 1.0}})
    assert os.path.isfile(os.path.join(out, "model.safetensors"))

    loaded = load_stock(out)
    assert type(loaded).__name__ == type(model).__name__
    assert_same_weights(loaded.state_dict(), model.state_dict())
    assert loaded.config.ilvr_latent_token_ids == list(latent_ids.as_tuple())
    settings = read_settings(out)
    assert settings["latent_size"] == K and settings["stage"] == "2" and settings["step"] == 12
    assert settings["latent_tokens"]["pad"] == {"token": "<|latent_pad|>", "id": latent_ids.pad}

    result = generate_with_export(loaded, out)
    assert result.latent_segments == [(1, K)]
    assert result.token_ids == generate_with_export(model, out).token_ids


def test_export_model_refuses_a_processor_with_other_latent_ids(tmp_path, tiny, tiny_model_factory):
    processor, latent_ids = tiny
    model = tiny_model_factory()
    model.config.ilvr_latent_token_ids = [latent_ids.start + 1, latent_ids.pad + 1, latent_ids.end + 1]
    with pytest.raises(ValueError, match="latent token ids"):
        export_model(model, processor, str(tmp_path / "x"), {"latent_size": K})


def train_and_save(rank, world_size, out_dir: str, processor_dir: str):
    """Two ZeRO-3 steps, a checkpoint at step 2, and (rank 0) the gathered weights as the reference."""
    from safetensors.torch import save_file

    from ilvr.training.checkpoint import CheckpointManager
    from tests.test_checkpoint import full_state_dict, make_engine, train_step

    engine, processor = make_engine(processor_dir, seed=0)
    for step in (1, 2):
        train_step(engine, rank, step)
    config = {"model": {"latent_size": K}, "train": {"stage": "1+2", "stage1_steps": 2}, "loss": {"w_ce": 1.0}}
    CheckpointManager(out_dir, keep_last=1, processor=processor).save(engine, 2, {"config": config})
    reference = full_state_dict(engine)
    if rank == 0:
        save_file(reference, os.path.join(out_dir, "reference.safetensors"))


@pytest.mark.slow
def test_cli_exports_a_zero3_checkpoint(tmp_path, tiny_processor_dir):
    from safetensors.torch import load_file

    run = str(tmp_path / "run")
    run_on_ranks(train_and_save, world_size=2, timeout=120, out_dir=run, processor_dir=tiny_processor_dir)
    out = str(tmp_path / "export")
    assert main(["--checkpoint", run, "--out", out]) == 0  # a run dir: its latest checkpoint
    assert sorted(os.listdir(tmp_path)) == ["export", "run"]  # no temporary sibling left

    loaded = load_stock(out)
    assert_same_weights(loaded.state_dict(), load_file(os.path.join(run, "reference.safetensors")))
    settings = read_settings(out)
    assert (settings["latent_size"], settings["stage"], settings["step"]) == (K, "2", 2)
    assert settings["loss"] == {"w_ce": 1.0}
    assert generate_with_export(loaded, out).latent_segments == [(1, K)]
    with pytest.raises(SystemExit) as e:  # an existing export is replaced only on request
        main(["--checkpoint", os.path.join(run, "checkpoints", "step-2"), "--out", out])
    assert e.value.code == 2
    with open(os.path.join(out, "marker.txt"), "w") as f:
        f.write("from the earlier export")
    assert main(["--checkpoint", run, "--out", out, "--overwrite"]) == 0  # an earlier export: swapped whole
    assert not os.path.exists(os.path.join(out, "marker.txt"))
    assert sorted(os.listdir(tmp_path)) == ["export", "run"]
    assert_same_weights(load_stock(out).state_dict(), load_file(os.path.join(run, "reference.safetensors")))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_exported_files_follow_the_umask(tmp_path, tiny, tiny_model_factory, umask):
    """safetensors writes 0600; a cluster group must read an export as its umask says."""
    import stat

    processor, _ = tiny
    old = os.umask(umask)
    try:
        out = str(tmp_path / "export")
        export_model(tiny_model_factory(), processor, out, {"latent_size": K})
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) for name in os.listdir(out)}
    assert "model.safetensors" in modes and all(m == 0o666 & ~umask for m in modes.values()), \
        {k: oct(v) for k, v in modes.items()}
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask


def test_the_export_readme_snippet_loads_the_model_and_processor(tmp_path, tiny, tiny_model_factory, monkeypatch):
    """The README.md written into the export: stock AutoProcessor where torchvision exists, the project's
    loader otherwise (this CPU environment has no torchvision: the fallback runs here)."""
    import re

    processor, latent_ids = tiny
    out = tmp_path / "export"
    export_model(tiny_model_factory(), processor, str(out), {"latent_size": K, "step": 3, "stage": "2"})
    readme = (out / "README.md").read_text()
    assert "step 3, stage 2, K = 4" in readme and 'pip install "ilvr-train[vision]"' in readme
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(out)  # path = "." in the snippet
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert type(scope["model"]).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert scope["processor"].tokenizer.convert_tokens_to_ids("<|latent_pad|>") == latent_ids.pad
