"""slurm/train.sh and slurm/eval_sweep.sh on a real two-node Slurm 22.05 cluster (tests/slurm_cluster.py).

1. `sbatch --wait -N 2 slurm/train.sh`: ZeRO-3 over gloo across two nodes, to the end.
2. The time-limit warning (`scancel --signal=USR1 --batch`, what `--signal=B:USR1@grace` does):
   checkpoint, requeue, resume, the same losses as the uninterrupted run of test 1, one MLflow run.
3. The requeue cap: a run that stops unfinished with no requeue left ends with a `.failed` marker.
4. `slurm/eval_sweep.sh`: two checkpoints x one benchmark as a job array, then the summary job.
5. Elastic resume: a 2-node job loses a node (drained), the warning requeues it, the pending job is
   changed to `-N 1` (scontrol update NumNodes=1): it resumes from the 2-rank checkpoint and finishes.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest

from data_pipeline.records import record_to_sample
from data_pipeline.shards import ShardWriter
from data_pipeline.sources.synthetic_vsp import read as synthetic
from tests.conftest import REPO
from tests.slurm_cluster import ClusterUnavailable, SlurmCluster
from tests.test_train import metrics

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MAX_STEPS = 8
SBATCH = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the test nodes: 1 CPU, no GPU each
# MLFLOW_* reach rank 0 (the experiment name shows it); the batch log names them, never their values
SECRET_ENV = {"MLFLOW_EXPERIMENT_NAME": "slurm-test", "MLFLOW_TRACKING_PASSWORD": "s3cret-never-logged"}


@pytest.fixture(scope="module")
def cluster():
    ctx = SlurmCluster(nodes=2, cpus_per_node=1)
    try:
        ctx.__enter__()
    except ClusterUnavailable as e:
        if os.environ.get("ILVR_REQUIRE_SLURM"):  # CI: a cluster that cannot come up is a failure, not a skip
            pytest.fail(f"ILVR_REQUIRE_SLURM is set but no local Slurm cluster could start: {e}")
        pytest.skip(f"no local Slurm cluster: {e}")
    try:
        yield ctx
    finally:
        ctx.__exit__(None, None, None)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("slurm_data")
    for name, n, seed in (("train", 48, 7), ("eval", 8, 3)):
        writer = ShardWriter(str(out / name), prefix=name, samples_per_shard=8)
        for i, rec in enumerate(synthetic(num_samples=n, seed=seed, min_size=3, max_size=4)):
            writer.write(record_to_sample(rec, i))
        writer.close()
    return {"train": str(out / "train"), "eval": str(out / "eval")}


def overrides(data: dict, processor: str) -> list[str]:
    return [f"data.train_shards={data['train']}", "data.eval_shards=", f"data.processor={processor}",
            "data.num_workers=0", "data.batch_size=2", "train.log_every=1", f"train.max_steps={MAX_STEPS}",
            "train.stage1_steps=4", "train.save_every=4", "train.warmup_steps=1"]


def job_env(cluster: SlurmCluster, **extra: str) -> dict:
    """What sbatch passes on to the job (--export=ALL): this venv's python, the tiny recipe (ILVR_CONFIG is
    required), CPU DeepSpeed, no outside MLflow."""
    env = {k: v for k, v in cluster.env().items() if not k.startswith(("MLFLOW_", "ILVR_"))}
    env.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", ILVR_PYTHON=sys.executable,
               ILVR_CONFIG="configs/tiny_cpu.yaml", **extra)
    return env


def submit(cluster, out: str, data: dict, processor: str, *extra_overrides: str, wait: bool = False,
           expect_rc: int = 0, env: "dict | None" = None, nodes: str = "2"):
    """sbatch slurm/train.sh from the repo root; returns (job id, batch log path)."""
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), "-N", nodes, *SBATCH,
           f"--output={out}.batch-%j.log",
           "--job-name=ilvr-test", "slurm/train.sh", *overrides(data, processor), *extra_overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(cluster, ILVR_OUTPUT_DIR=out, **(env or {})),
                          capture_output=True, text=True, timeout=300)
    job = proc.stdout.strip().split(";")[0].splitlines()[0] if proc.stdout.strip() else "?"
    log = f"{out}.batch-{job}.log"
    assert proc.returncode == expect_rc, f"sbatch exit {proc.returncode}: {proc.stderr}\n{logs(cluster, out, log)}"
    return job, log


def logs(cluster: SlurmCluster, out: str, batch_log: str) -> str:
    """The batch log, the per-node logs and the daemons' logs, for assertion messages."""
    parts = []
    node_logs = os.path.join(out, "slurm", "logs")
    paths = [batch_log] + sorted(os.path.join(node_logs, n) for n in
                                 (os.listdir(node_logs) if os.path.isdir(node_logs) else []))
    for path in paths:
        if os.path.isfile(path):
            with open(path, errors="replace") as f:
                parts.append(f"--- {path}\n" + "".join(f.readlines()[-40:]))
    return "\n".join(parts) + "\n" + cluster.logs(tail=15)


def mlflow_runs(out: str) -> tuple:
    """(client, runs) of the run directory's default MLflow store."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{os.path.abspath(out)}/mlflow.db")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def assert_no_drained_node(cluster: SlurmCluster) -> None:
    # Slurm reports COMPLETED even for jobs it could not run properly; a drained node tells
    drained = cluster.run("sinfo", "-R", "-h").strip()
    assert drained == "", f"nodes drained: {drained}\n{cluster.logs()}"


@pytest.fixture(scope="module")
def reference(cluster, data, tiny_processor_dir, tmp_path_factory) -> dict:
    """The uninterrupted two-node run (test 1 checks it; test 2 compares with it; test 3 evaluates it)."""
    out = str(tmp_path_factory.mktemp("slurm_runs") / "straight")
    t0 = time.time()
    job, batch_log = submit(cluster, out, data, tiny_processor_dir, wait=True, env=SECRET_ENV)
    return {"out": out, "job": job, "log": batch_log, "seconds": time.time() - t0}


def test_two_node_training_finishes(cluster, reference):
    out, job = reference["out"], reference["job"]
    context = logs(cluster, out, reference["log"])
    assert os.path.isfile(os.path.join(out, "slurm", f"{job}.done")), "no success marker\n" + context
    with open(os.path.join(out, "finished.json")) as f:
        assert json.load(f)["step"] == MAX_STEPS
    assert sorted(metrics(out)) == list(range(1, MAX_STEPS + 1))
    ckpt = os.path.join(out, "checkpoints", f"step-{MAX_STEPS}")
    assert os.path.isfile(os.path.join(ckpt, "COMPLETE"))
    assert all(os.path.isfile(os.path.join(ckpt, f"rank{r}.json")) for r in (0, 1))  # one rank per node
    with open(os.path.join(out, "ds_config.resolved.json")) as f:
        assert json.load(f)["zero_optimization"]["stage"] == 3
    node_logs = sorted(os.listdir(os.path.join(out, "slurm", "logs")))
    assert len(node_logs) == 2 and node_logs[0].startswith(f"{job}-node0"), node_logs
    with open(reference["log"]) as f:
        batch = f.read()
    assert "2 node(s): node1 node2" in batch and f"finished at step {MAX_STEPS}" in batch, batch
    assert "MLFLOW_TRACKING_PASSWORD" in batch and SECRET_ENV["MLFLOW_TRACKING_PASSWORD"] not in batch
    client, runs = mlflow_runs(out)
    assert len(runs) == 1
    run = runs[0]
    assert client.get_experiment(run.info.experiment_id).name == "slurm-test"
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("world_size") == "2" and run.data.tags.get("slurm_job_id") == job
    assert len(client.get_metric_history(run.info.run_id, "loss")) == MAX_STEPS
    assert_no_drained_node(cluster)


def _lines(path: str) -> int:
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return len(f.readlines())


def _wait_for(predicate, timeout: float, what: str, context) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}\n{context()}"
        time.sleep(0.5)


def test_time_limit_warning_checkpoints_requeues_and_resumes(cluster, data, tiny_processor_dir, reference,
                                                             tmp_path):
    out = str(tmp_path / "preempted")
    job, batch_log = submit(cluster, out, data, tiny_processor_dir)

    def context() -> str:
        return logs(cluster, out, batch_log)

    path = os.path.join(out, "metrics.jsonl")
    _wait_for(lambda: _lines(path) >= 2, 180, "two steps", context)
    # what --signal=B:USR1@grace does shortly before the time limit
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    done, failed = (os.path.join(out, "slurm", f"{job}.{s}") for s in ("done", "failed"))
    _wait_for(lambda: os.path.exists(done) or os.path.exists(failed), 300, "the requeued job to finish", context)
    assert os.path.exists(done), context()
    with open(done) as f:
        assert "restarts=1 " in f.read()  # requeued exactly once

    with open(batch_log) as f:
        batch = f.read()
    assert "USR1 (time limit" in batch and "requeue 1 of at most 3" in batch and "(requeued 1 times)" in batch, batch
    node_logs = os.path.join(out, "slurm", "logs")
    stopped = []
    for name in os.listdir(node_logs):
        with open(os.path.join(node_logs, name), errors="replace") as f:
            stopped += [line for line in f if "stopping after step" in line and "checkpoint saved" in line]
    assert len(stopped) == 2, "both ranks should checkpoint and stop\n" + context()  # one per node
    a, b = metrics(reference["out"]), metrics(out)
    assert sorted(b) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):  # resume is exact on CPU: the uninterrupted run's numbers
        assert b[step]["loss"] == a[step]["loss"], (step, a[step]["loss"], b[step]["loss"])

    client, runs = mlflow_runs(out)
    assert len(runs) == 1, "the requeued part must log into the first part's MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed") == "true"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(1, MAX_STEPS + 1))
    assert_no_drained_node(cluster)


def test_requeue_cap_ends_the_job_with_a_failed_marker(cluster, data, tiny_processor_dir, tmp_path):
    out = str(tmp_path / "capped")
    # train.stop_after: the ranks leave with a checkpoint after 2 steps, as if warned; no requeue allowed
    job, batch_log = submit(cluster, out, data, tiny_processor_dir, "train.stop_after=2", wait=True, expect_rc=2,
                            env={"ILVR_MAX_REQUEUES": "0"})
    failed = os.path.join(out, "slurm", f"{job}.failed")
    assert os.path.isfile(failed), logs(cluster, out, batch_log)
    with open(failed) as f:
        assert "not finished after 0 requeues (ILVR_MAX_REQUEUES=0)" in f.read()
    assert not os.path.exists(os.path.join(out, "finished.json"))
    assert sorted(metrics(out)) == [1, 2]
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step-2"


def test_eval_sweep_runs_a_job_array_and_a_summary(cluster, reference, data, tmp_path):
    checkpoints = [os.path.join(reference["out"], "checkpoints", f"step-{s}") for s in (4, MAX_STEPS)]
    sweep = str(tmp_path / "sweep")
    cmd = ["bash", str(REPO / "slurm" / "eval_sweep.sh"), "--out", sweep, "--checkpoints", *checkpoints,
           "--benchmark", f"vsp={data['eval']}", "--limit", "2", "--max-new-tokens", "16", "--max-parallel", "2",
           "--wait"]
    env = job_env(cluster, ILVR_EVAL_GPUS="0", ILVR_EVAL_CPUS="1", ILVR_EVAL_TIME="00:10:00")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    task_logs = ""
    for name in sorted(os.listdir(os.path.join(sweep, "logs"))) if os.path.isdir(os.path.join(sweep, "logs")) else []:
        with open(os.path.join(sweep, "logs", name), errors="replace") as f:
            task_logs += f"--- {name}\n" + "".join(f.readlines()[-20:])
    context = proc.stdout[-3000:] + proc.stderr[-3000:] + task_logs + cluster.logs(tail=10)
    assert proc.returncode == 0, context
    assert "ARRAY_JOB=" in proc.stdout and "SUMMARY_JOB=" in proc.stdout, context
    with open(os.path.join(sweep, "summary.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["index"], r["step"], r["benchmark"], r["status"]) for r in rows] == \
        [("0", "4", "vsp", "ok"), ("1", str(MAX_STEPS), "vsp", "ok")], rows
    # tasks/<i>/metrics.json, or tasks/<i>/<benchmark>-<mode>/metrics.json (one child run per evaluation)
    assert all(glob.glob(os.path.join(sweep, "tasks", str(i), "**", "metrics.json"), recursive=True) for i in (0, 1))
    with open(os.path.join(sweep, "summary.md")) as f:
        table = f.read()
    assert all(c in table for c in checkpoints), table
    assert_no_drained_node(cluster)


def test_a_requeued_job_that_comes_back_on_fewer_nodes_resumes_elastically(cluster, data, tiny_processor_dir,
                                                                          reference, tmp_path):
    from tests.test_elastic import LOSS_TOLERANCE

    out = str(tmp_path / "elastic")
    job, batch_log = submit(cluster, out, data, tiny_processor_dir)

    def context() -> str:
        return logs(cluster, out, batch_log)

    def requeued_and_pending() -> bool:
        info = cluster.run("scontrol", "show", "job", job, check=False)
        return "JobState=PENDING" in info and "Restarts=1" in info

    path = os.path.join(out, "metrics.jsonl")
    done, failed = (os.path.join(out, "slurm", f"{job}.{s}") for s in ("done", "failed"))
    try:
        _wait_for(lambda: _lines(path) >= 2, 180, "two steps", context)
        # the node is lost while the job runs: the requeued job cannot get 2 nodes again
        cluster.run("scontrol", "update", "nodename=node2", "state=drain", "reason=elastic-test")
        cluster.run("scancel", "--signal=USR1", "--batch", job)  # the warning: checkpoint, requeue
        _wait_for(requeued_and_pending, 120, "the job to be requeued", context)
        # what a user or a site policy does (the tasks and CPUs too, or Slurm keeps asking for 2 nodes' worth)
        cluster.run("scontrol", "update", f"jobid={job}", "NumNodes=1", "NumTasks=1", "NumCPUs=1")
        _wait_for(lambda: os.path.exists(done) or os.path.exists(failed), 300, "the requeued job to finish",
                  context)
    finally:
        cluster.run("scontrol", "update", "nodename=node2", "state=resume", check=False)
    assert os.path.exists(done), context()
    with open(batch_log) as f:
        batch = f.read()
    assert "2 node(s): node1 node2" in batch and "(requeued 1 times), 1 node(s): node1" in batch, batch
    assert "the previous part ran on 2 rank(s) (2 node(s)), this one has 1: elastic resume" in batch, batch
    node_logs = os.path.join(out, "slurm", "logs")
    text = ""
    for name in os.listdir(node_logs):
        with open(os.path.join(node_logs, name), errors="replace") as f:
            text += f.read()
    assert "saved by 2 ranks, this run has 1" in text and "re-planned for 1 ranks" in text, context()

    a, b = metrics(reference["out"]), metrics(out)
    assert sorted(b) == list(range(1, MAX_STEPS + 1))
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        assert f.read().strip() == f"step-{MAX_STEPS}"
    stopped = int(re.search(r"stopping after step (\d+)", text).group(1))  # the 2-node part's last step
    for step in range(1, MAX_STEPS + 1):  # the 2-node part is the reference run; then the same state, 1 rank
        if step <= stopped:
            assert b[step]["loss"] == a[step]["loss"], (step, a[step]["loss"], b[step]["loss"])
        else:
            assert abs(b[step]["loss"] - a[step]["loss"]) < LOSS_TOLERANCE, (step, a[step]["loss"], b[step]["loss"])
    client, runs = mlflow_runs(out)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert_no_drained_node(cluster)
