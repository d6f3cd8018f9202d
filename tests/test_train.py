"""End to end: `ilvr/train.py` on 2 gloo ranks with DeepSpeed (torchrun), on synthetic VSP shards."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests import warm_launch
from tests.factories import synthetic_vsp_shards
from ilvr.training.spawn import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return synthetic_vsp_shards(str(tmp_path_factory.mktemp("train_shards")), 48, seed=7)


def command(out_dir: str, shards: str, processor: str, *overrides: str, ds: str = "zero3", nproc: int = 2,
            launcher: str = "warm"):
    """ilvr/train.py on `nproc` ranks. launcher="warm": ranks forked from a server that imported the heavy stack
    (tests/warm_launch.py, torchrun's contract); "torchrun": the real launcher, fresh interpreters as its children."""
    start = ([sys.executable, "-m", "torch.distributed.run"] if launcher == "torchrun"
             else [sys.executable, str(REPO / "tests" / "warm_launch.py"), "run", warm_launch.server_socket()])
    return [*start, f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            str(REPO / "ilvr" / "train.py"), "--deepspeed", str(REPO / "ds_configs" / f"{ds}.json"),
            "--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"train.output_dir={out_dir}",
            f"data.train_shards={shards}", "data.eval_shards=", f"data.processor={processor}", "data.num_workers=0",
            "data.batch_size=2", "train.log_every=1", *overrides]


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("MLFLOW_RUN_ID", None)
    return e


def train(*args, timeout: float = 400, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(*args, **kw), env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def metrics(out_dir: str) -> dict[int, dict]:
    """Per step, the last logged metrics (a resumed run logs the steps after its checkpoint again)."""
    rows = {}
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            rows[row["step"]] = row
    return rows


def test_zero3_two_stages_loss_falls_and_mlflow_has_the_run(tmp_path, shards, tiny_processor_dir):
    out = str(tmp_path / "run")
    train(out, shards, tiny_processor_dir, "train.max_steps=30", "train.stage1_steps=20", "train.save_every=0",
          "train.warmup_steps=2", "train.lr=2e-3")
    m = metrics(out)
    assert sorted(m) == list(range(1, 31))
    assert {m[s]["stage"] for s in range(1, 21)} == {1.0} and {m[s]["stage"] for s in range(21, 31)} == {2.0}
    first = sum(m[s]["ce"] for s in (1, 2, 3)) / 3
    late = sum(m[s]["ce"] for s in (18, 19, 20)) / 3
    assert late < first - 0.5, (first, late)
    assert "latent/selected_mean" in m[5] and sum(m[5]["latent/selected_hist"]) > 0
    assert all(0 <= m[s]["align"] <= 2 for s in range(1, 21))
    assert m[30]["ce"] < m[21]["ce"] + 0.5  # stage 2 trains on from stage 1 without blowing up
    assert os.path.isfile(os.path.join(out, "checkpoints", "step-30", "COMPLETE"))
    with open(os.path.join(out, "checkpoints", "step-30", "trainer.json"), encoding="utf-8") as f:
        fed_mean = json.load(f)["fed_mean"]  # the constant-latent ablation's constant, at the fed-back scale
    assert len(fed_mean) == 64 and sum(v * v for v in fed_mean) ** 0.5 > 1.0
    from ilvr.training.health import read_health

    health = read_health(os.path.join(out, "checkpoints", "step-30"))  # the defaults never fire on a normal run
    assert health["healthy"] and health["problems"] == [] and health["weight_rms"] < 1.0, health

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{os.path.abspath(out)}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.latent_size"] == "4" and run.data.tags.get("world_size") == "2"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 30
    assert len(client.get_metric_history(run.info.run_id, "latent/selected_k1")) == 20  # the histogram, bucketed


def test_resume_reproduces_the_uninterrupted_run(tmp_path, shards, tiny_processor_dir):
    # latent_rescale: the running target norm (per rank) and the norm fixed at the stage switch resume too
    common = ("train.max_steps=7", "train.stage1_steps=4", "train.save_every=0", "train.warmup_steps=1",
              "model.latent_rescale=true")
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train(straight, shards, tiny_processor_dir, *common)
    train(split, shards, tiny_processor_dir, *common, "train.stop_after=3")  # "preempted" after step 3
    assert sorted(metrics(split)) == [1, 2, 3]
    train(split, shards, tiny_processor_dir, *common)  # --resume auto
    a, b = metrics(straight), metrics(split)
    assert sorted(b) == list(range(1, 8))
    for step in range(1, 8):  # fp32 on CPU: exactly the same numbers
        assert b[step]["loss"] == a[step]["loss"], (step, a[step]["loss"], b[step]["loss"])
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{os.path.abspath(split)}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, "the resumed run logs into the same MLflow run"


def test_a_diverged_run_keeps_its_healthy_checkpoint_for_resume_and_export(tmp_path, shards, tiny_processor_dir,
                                                                         caplog):
    """The issue's reproduction, lr=1e6: step 1 leaves the weights as they were, then they run away (RMS 1e6,
    1e10) while the loss stays finite, then it turns NaN and the run stops. Before: the runaway checkpoints were
    `latest`, keep_last=2 pruned step 1, and `--resume auto` and ilvr-export took the runaway weights."""
    import logging

    from ilvr.export import main as export_main
    from ilvr.training.checkpoint import resolve_resume
    from ilvr.training.health import read_health

    out = str(tmp_path / "diverged")
    proc = subprocess.run(command(out, shards, tiny_processor_dir, "train.lr=1e6", "train.warmup_steps=0",
                                  "train.save_every=1", "train.keep_last=2", "train.max_steps=8",
                                  "train.stage1_steps=8", "train.max_bad_steps=2"),
                          env=env(), capture_output=True, text=True, timeout=400)
    # the runaway either turns the loss NaN (train.max_bad_steps) or stays finite to the end with inf gradient
    # norms (clipped to no update): either way the run fails, and its checkpoints do not count
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "FloatingPointError" in proc.stderr or "training diverged: the last checkpoint" in proc.stderr, \
        proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "finished.json"))
    root = os.path.join(out, "checkpoints")
    steps = sorted(int(n.split("-")[1]) for n in os.listdir(root) if n.startswith("step-"))
    healthy = [s for s in steps if read_health(os.path.join(root, f"step-{s}"))["healthy"]]
    assert healthy and steps[-1] > healthy[-1], (steps, healthy)  # an unhealthy newest one, the healthy one kept
    good = os.path.join(root, f"step-{healthy[-1]}")
    sick = os.path.join(root, f"step-{steps[-1]}")
    assert "weight RMS" in read_health(sick)["problems"][0]
    with open(os.path.join(root, "latest"), encoding="utf-8") as f:
        assert f.read().strip() == os.path.basename(good)
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("auto", out) == good  # what the trainer's --resume auto loads
        assert export_main(["--checkpoint", out, "--out", str(tmp_path / "exported")]) == 0
    assert caplog.text.count(f"using {good}, the newest healthy checkpoint") == 2, caplog.text
    with open(tmp_path / "exported" / "ilvr_settings.json", encoding="utf-8") as f:
        assert json.load(f)["step"] == healthy[-1]
    with pytest.raises(SystemExit) as refused:  # the runaway checkpoint named explicitly
        export_main(["--checkpoint", sick, "--out", str(tmp_path / "sick")])
    assert refused.value.code == 2 and not (tmp_path / "sick").exists()


# ZeRO-2 end to end (both stages, 3 steps): tests/test_run_dir.py::test_rerunning_into_a_run_dir runs on it


def _wait_for_steps(proc, out: str, n: int, timeout: float = 300) -> None:
    deadline, path = time.time() + timeout, os.path.join(out, "metrics.jsonl")
    while time.time() < deadline and not (os.path.isfile(path) and len(open(path).readlines()) >= n):
        assert proc.poll() is None, "training ended before the test could act"
        time.sleep(0.5)


def test_sigusr1_to_one_rank_checkpoints_everywhere_and_exits_cleanly(tmp_path, shards, tiny_processor_dir):
    out = str(tmp_path / "usr1")
    proc = subprocess.Popen(command(out, shards, tiny_processor_dir, "train.max_steps=1000", "train.save_every=0",
                                    launcher="torchrun"),
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_steps(proc, out, 2)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(workers[-1]), signal.SIGUSR1)  # e.g. Slurm's warning before the time limit, to one rank
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = max(metrics(out))
    assert last < 1000
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        assert f.read().strip() == f"step-{last}"
    assert all(os.path.isfile(os.path.join(out, "checkpoints", f"step-{last}", f"rank{r}.json")) for r in (0, 1))


def test_killing_one_rank_ends_the_job_quickly(tmp_path, shards, tiny_processor_dir):
    out = str(tmp_path / "kill")
    proc = subprocess.Popen(command(out, shards, tiny_processor_dir, "train.max_steps=1000", "train.save_every=0",
                                    "train.collective_timeout=60", launcher="torchrun"),
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_steps(proc, out, 2)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGKILL)
        killed_at = time.time()
        code = proc.wait(timeout=120)
        assert code != 0
        assert time.time() - killed_at < 120
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_warm_launcher_gives_torchruns_environment_and_ends_the_ranks_when_one_fails(tmp_path):
    """tests/warm_launch.py stands in for torchrun in most of these tests: each rank gets its rank, the world, the
    master port and the launcher's streams; the first rank to fail gets the others SIGTERM and the launcher exits 1."""
    script = tmp_path / "ranks.py"
    script.write_text("import os, sys, time\n"
                      "rank = int(os.environ['RANK'])\n"
                      "print('rank', rank, os.environ['LOCAL_RANK'], os.environ['WORLD_SIZE'], os.environ['MASTER_PORT'],"
                      " os.getcwd(), os.environ['ILVR_PROBE'], flush=True)\n"
                      "if rank == 1:\n    sys.exit(3)\n"
                      "time.sleep(120)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "warm_launch.py"), "run", warm_launch.server_socket(),
                           "--nproc_per_node=2", "--master_port=12345", str(script)], cwd=tmp_path,
                          env=dict(os.environ, ILVR_PROBE="seen"), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 1 and time.monotonic() - t0 < 30, (proc.returncode, proc.stderr)
    assert sorted(proc.stdout.splitlines()) == [f"rank {r} {r} 2 12345 {tmp_path} seen" for r in (0, 1)], proc.stdout
    assert "rank 0 exited with -15, rank 1 exited with 3" in proc.stderr, proc.stderr
