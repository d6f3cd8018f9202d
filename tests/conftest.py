"""Shared fixtures: the real data beside the project, the tiny processor (built once), CUDA skips."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_pipeline.tiny_processor import build_tiny_processor, load_processor
from tests.factories import corpus_texts

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed on CPU, and one cache for the op it compiles on first use (~24 s otherwise)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED_DATA = Path(os.environ.get("ILVR_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    """Each pytest-xdist worker takes its share of the cores for torch (as share_cpu_threads does for ranks)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads() // workers))
    _mlflow_template(config)


def _mlflow_template(config):
    """One MLflow store template per session (tests/_site/sitecustomize.py): new SQLite stores are copied from it,
    here and in every subprocess the tests start (PYTHONPATH), instead of each running MLflow's migrations."""
    import tempfile

    if os.environ.get("ILVR_TEST_MLFLOW_TEMPLATE") or os.environ.get("ILVR_TEST_NO_MLFLOW_TEMPLATE"):
        return
    directory = tempfile.mkdtemp(prefix="ilvr-mlflow-template-")
    config.add_cleanup(lambda: __import__("shutil").rmtree(directory, ignore_errors=True))
    os.environ["ILVR_TEST_MLFLOW_TEMPLATE"] = os.path.join(directory, "mlflow.db")
    site = str(Path(__file__).resolve().parent / "_site")
    os.environ["PYTHONPATH"] = os.pathsep.join([site, *filter(None, [os.environ.get("PYTHONPATH")])])
    from tests._site import sitecustomize

    sitecustomize.install()


def _ranks_from_a_fork_server() -> None:
    """run_on_ranks' ranks fork from a server that has imported torch, DeepSpeed and transformers (tests/fork_server_ranks.py)."""
    import ilvr.training.spawn as spawn

    from tests import fork_server_ranks

    if not isinstance(spawn.mp, fork_server_ranks.Multiprocessing) and not os.environ.get("ILVR_TEST_SPAWN_RANKS"):
        spawn.mp = fork_server_ranks.Multiprocessing(spawn.mp)


_ranks_from_a_fork_server()


@pytest.fixture
def fresh_rank_interpreters(monkeypatch):
    """run_on_ranks with torch's plain "spawn": ranks that have imported nothing yet."""
    import ilvr.training.spawn as spawn
    import torch.multiprocessing

    monkeypatch.setattr(spawn, "mp", torch.multiprocessing)


# scripts/test.sh runs the suite on two pytest-xdist workers with `--dist loadfile`: each test file is one unit
# of work (its module-scoped fixtures are built once), and the files that take minutes are handed out first so
# that no worker ends alone on one. (xdist's loadgroup cannot be used: with pytest 9 its group suffix is lost.)
LONG_FIRST = ("test_method_table.py", "test_slurm.py", "test_bench_quickstart_step.py", "test_precision.py",
              "test_lora.py", "test_elastic.py", "test_train.py", "test_periodic_eval.py", "test_hostile_checkpoints.py",
              "test_tracking.py", "test_evaluation.py", "test_param_groups.py")


def pytest_collection_modifyitems(config, items):
    import torch

    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def shared_data() -> Path:
    """The real public data in ../shared/data; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_processor_dir(tmp_path_factory) -> str:
    """A tiny Qwen2.5-VL processor dir (with latent tokens), trained once per test session."""
    return build_tiny_processor(str(tmp_path_factory.mktemp("tiny_processor")), corpus_texts())


@pytest.fixture(scope="session")
def tiny(tiny_processor_dir):
    """(processor, LatentTokenIds) loaded from the tiny processor dir."""
    return load_processor(tiny_processor_dir)


@pytest.fixture(scope="session")
def tiny_model_factory(tiny):
    """Builds a tiny random Qwen2.5-VL matching the tiny processor: factory(seed=0, dtype=float32, **TinySize)."""
    from ilvr.model.build import TinySize, build_tiny_model, init_latent_embeddings

    processor, latent_ids = tiny

    def make(seed: int = 0, dtype=None, **size):
        import torch

        model = build_tiny_model(processor.tokenizer, processor.image_processor, TinySize(**size), seed=seed,
                                 dtype=dtype or torch.float32)
        init_latent_embeddings(model, processor.tokenizer, latent_ids)
        return model.eval()

    return make


@pytest.fixture(scope="session")
def two_stage_run(tmp_path_factory, tiny_processor_dir) -> dict:
    """One `ilvr/train.py` run on 2 ZeRO-3 ranks that several tests check (train once, check many things):
    4 steps (2 of stage 1, 2 of stage 2) on 24 synthetic maps, a checkpoint every 2 steps (keep 3), the vision
    tower trainable at train.vit_lr_mult=0.25 through a linear 2-step warm-up, data.max_pixels=22500.
    tests/test_evaluation.py exports, evaluates, sweeps and reports it; tests/test_param_groups.py checks its
    learning rates and its checkpoint's processor. Tests may add to it (evaluations log into its MLflow store)
    but never change what is there."""
    import subprocess

    from tests.factories import synthetic_vsp_shards
    from tests.test_train import command, env

    root = tmp_path_factory.mktemp("two_stage_run")
    shards = synthetic_vsp_shards(str(root / "train_shards"), 24, seed=5, samples_per_shard=4)
    run = str(root / "run")
    proc = subprocess.run(command(run, shards, tiny_processor_dir, "train.max_steps=4", "train.stage1_steps=2",
                                  "train.save_every=2", "train.keep_last=3", "train.warmup_steps=2",
                                  "train.lr_schedule=linear", "model.freeze_vit=false", "train.vit_lr_mult=0.25",
                                  "data.max_pixels=22500"),
                          env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {"dir": run, "shards": shards}
