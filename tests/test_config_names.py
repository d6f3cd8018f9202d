"""Names people type: a key from the HF Trainer / LLaMA-Factory / ms-swift gets the key it means here, and
train.warmup_ratio exists."""
from __future__ import annotations

import pytest

from ilvr.config import ConfigError, load_config


@pytest.mark.parametrize("override, meant", [
    ("train.learning_rate=1e-5", "train.lr"),
    ("learning_rate=1e-5", "train.lr"),  # no section at all, as in a HF command line
    ("train.per_device_train_batch_size=2", "data.batch_size"),
    ("train.num_train_epochs=3", "train.epochs"),
    ("train.save_total_limit=3", "train.keep_last"),
    ("train.gradient_accumulation_steps=4", "train.grad_accum"),
    ("model.image_max_pixels=1000", "data.max_pixels"),
    ("train.batch_size=2", "data.batch_size"),
    ("data.freeze_vit=false", "model.freeze_vit"),  # a key of another section
])
def test_a_foreign_name_gets_the_key_it_means_not_the_list(override, meant):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], check_paths=False)
    message = str(e.value)
    assert f"Did you mean {meant}?" in message
    assert "Known keys here" not in message


def test_yaml_with_hf_names_at_the_top_gets_the_hint(tmp_path):
    path = tmp_path / "hf.yaml"
    path.write_text("learning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError, match="Did you mean train.lr"):
        load_config(str(path), check_paths=False)


def test_warmup_ratio_is_a_share_of_max_steps_rounded_up():
    from ilvr.training.ds_config import resolve_ds_config

    cfg = load_config(None, ["train.warmup_ratio=0.1", "train.max_steps=25"], check_paths=False)
    ds = resolve_ds_config("ds_configs/zero2.json", cfg, 1, 64, cuda=False)
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 3  # ceil(2.5), as the HF Trainer does
    assert ds["scheduler"]["params"]["warmup_min_ratio"] == 0.0  # a real warmup, from 0
    with pytest.raises(ConfigError, match="both set the warmup"):
        load_config(None, ["train.warmup_ratio=0.1", "train.warmup_steps=2"], check_paths=False)
    with pytest.raises(ConfigError, match=r"train.warmup_ratio=1.0 must be in \[0, 1\)"):
        load_config(None, ["train.warmup_ratio=1"], check_paths=False)


def test_pixel_budget_sets_the_processors_resize_bounds(tiny, tmp_path):
    """data.min_pixels / data.max_pixels bound the resized area (the vision-token count), and are saved with
    the processor; data.max_image_pixels stays a skip limit."""
    import copy

    from PIL import Image

    from data_pipeline.pixel_budget import apply_pixel_budget

    processor = copy.deepcopy(tiny[0])
    big = [Image.new("RGB", (1000, 1000))]
    before = int(processor.image_processor(images=big, return_tensors="pt")["image_grid_thw"].prod())
    assert apply_pixel_budget(processor.image_processor, 0, 140 * 140) == (112 * 112, 140 * 140)
    grid = processor.image_processor(images=big, return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) * 14 * 14 <= 140 * 140 < before * 14 * 14
    processor.save_pretrained(str(tmp_path))
    from data_pipeline.tiny_processor import load_processor

    assert load_processor(str(tmp_path))[0].image_processor.size.longest_edge == 140 * 140
    with pytest.raises(ValueError, match="data.max_pixels=100 is below one merged patch"):
        apply_pixel_budget(processor.image_processor, 0, 100)
    with pytest.raises(ConfigError, match="data.min_pixels=5000 must be <= data.max_pixels=4000"):
        load_config(None, ["data.min_pixels=5000", "data.max_pixels=4000"], check_paths=False)
