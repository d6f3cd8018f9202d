"""Hostile and careless configs: each is a ConfigError naming the problem, in bounded memory and text.

The cases of docs/reliability.md ("Checkpoints, export, output directories, configuration"):
a 424-byte YAML alias bomb, a mapping nested 10,000 deep, a batch size of 1e12, and
messages about huge values. The bombs run in a child process under a 2 GB address-space
limit (so a regression fails with MemoryError instead of exhausting the machine), whose
peak RSS must stay under 1 GB.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ilvr.config import ConfigError, load_config
from ilvr.config_yaml import MAX_REPR
from tests.conftest import REPO

TINY = str(REPO / "configs" / "tiny_cpu.yaml")

# "billion laughs": 9 levels of 9 aliases, 9^10 strings once expanded, in a few hundred bytes
BOMB = ('[&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"], '
        + ", ".join(f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")) + "]")

CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from ilvr.config import ConfigError, load_config
paths, overrides = json.loads(sys.argv[1])
try:
    load_config(paths, overrides, check_paths=False)
    result = {"error": None}
except ConfigError as e:
    result = {"error": str(e)}
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
result["peak_mb"] = int(hwm.split()[1]) / 1024
print("RESULT " + json.dumps(result))
"""


def load_in_child(paths: list[str], overrides: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([paths, overrides])], capture_output=True,
                          text=True, timeout=120, env=env, cwd=str(REPO))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_alias_bomb_in_a_file_is_refused_in_bounded_memory(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(f"data:\n  train_shards: {BOMB}\n")
    assert recipe.stat().st_size < 500
    result = load_in_child([TINY, str(recipe)], [])
    assert "expands to more than" in result["error"] and "aliases" in result["error"]
    assert str(recipe) in result["error"]
    assert result["peak_mb"] < 1024


def test_alias_bomb_in_an_override_is_refused_in_bounded_memory():
    result = load_in_child([TINY], [f"data.train_shards={BOMB}"])
    assert "override data.train_shards expands to more than" in result["error"]
    assert result["peak_mb"] < 1024


def test_a_small_alias_is_still_allowed(tmp_path):
    recipe = tmp_path / "alias.yaml"
    recipe.write_text("train:\n  betas: &b [0.9, 0.95]\nloss:\n  w_ce: 1.0\n")
    assert load_config([TINY, str(recipe)], check_paths=False).train.betas == (0.9, 0.95)


def test_an_alias_that_refers_to_itself_is_refused(tmp_path):
    recipe = tmp_path / "loop.yaml"
    recipe.write_text("data:\n  train_shards: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config([TINY, str(recipe)], check_paths=False)


def block_mapping(depth: int) -> str:
    """A block-style mapping `depth` deep, as the value of a key at indentation 2."""
    return "\n" + "\n".join(f"{'  ' * (i + 2)}k{i}:" for i in range(depth)) + " 1"


@pytest.mark.parametrize("nested", ["{a: " * 10_000 + "1" + "}" * 10_000, "[" * 10_000 + "]" * 10_000,
                                    block_mapping(600)], ids=["flow-mapping", "flow-list", "block-mapping"])
def test_deep_nesting_is_a_config_error(tmp_path, nested):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text(f"data:\n  train_shards: {nested}\n")
    with pytest.raises(ConfigError, match=r"deep.yaml'? is nested more than \d+ levels deep"):
        load_config([TINY, str(recipe)], check_paths=False)


def test_error_messages_about_huge_values_are_bounded(tmp_path):
    recipe = tmp_path / "long.yaml"
    recipe.write_text("data:\n  train_shards: [" + ", ".join(["shard"] * 50_000) + "]\n")
    with pytest.raises(ConfigError, match="data.train_shards must be a string") as e:
        load_config([TINY, str(recipe)], check_paths=False)
    assert len(str(e.value)) < MAX_REPR + 100
    with pytest.raises(ConfigError, match="data.mode=") as e:
        load_config([TINY], ["data.mode=" + "x" * 1_000_000], check_paths=False)
    assert len(str(e.value)) < MAX_REPR + 100


@pytest.mark.parametrize("field", ["data.batch_size", "eval.batch_size", "data.shuffle_buffer", "data.num_workers"])
def test_sizes_past_the_documented_maximum_are_refused(field):
    with pytest.raises(ConfigError, match=rf"{field}=1000000000000 is more than \d+, the most allowed"):
        load_config([TINY], [f"{field}=1000000000000"], check_paths=False)


def test_the_maximum_batch_size_itself_is_allowed():
    cfg = load_config([TINY], ["data.batch_size=1024", "eval.batch_size=1024"], check_paths=False)
    assert cfg.data.batch_size == 1024


def test_a_huge_config_file_is_refused_unread(tmp_path):
    recipe = tmp_path / "huge.yaml"
    recipe.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="huge.yaml.* more than"):
        load_config([TINY, str(recipe)], check_paths=False)
