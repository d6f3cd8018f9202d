"""The momentum teacher under DeepSpeed on 2 gloo ranks: a shard-local EMA equal to a full-weight EMA.

Each run_on_ranks launch costs ~10 s (imports), so one training run per configuration
feeds several tests through a module-scoped fixture.
"""
from __future__ import annotations

import pytest
import torch

from ilvr.training.spawn import run_on_ranks

DECAY = 0.8  # far from 1 so that every step visibly moves the teacher
STEPS = 3


# ---------------------------------------------------------------- models and configs (built in every rank)

class Toy(torch.nn.Module):
    """Odd-sized parameters (padded shards) on both sides of the default persistence threshold (1e5)."""

    def __init__(self, out: int = 7):
        super().__init__()
        self.embed = torch.nn.Embedding(1001, 101)  # 101101 elements: partitioned
        self.norm = torch.nn.LayerNorm(101)  # persistent under the default threshold
        self.head = torch.nn.Linear(101, out)

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)))


def make_model(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "toy":
        return Toy()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # embeddings/lm_head 2048 x 64 = 131k elements (partitioned); norms, biases, projections persistent
    config = Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, attn_implementation="eager")
    return Qwen2ForCausalLM(config)


def ds_config(stage: int, threshold=None, lr: float = 3e-2) -> dict:
    zero = {"stage": stage}
    if threshold is not None:
        zero["stage3_param_persistence_threshold"] = threshold
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
            "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}}}


def batch(kind: str, seed: int) -> torch.Tensor:
    return torch.randint(0, 1001, (2, 6), generator=torch.Generator().manual_seed(seed))


def forward(kind: str, model, ids):
    """(loss, logits) of `model` on `ids` (a next-token loss for Qwen2, a mod-7 target for the toy)."""
    if kind == "toy":
        logits = model(ids)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), (ids % 7).flatten()), logits
    out = model(input_ids=ids, labels=ids)
    return out.loss, out.logits


def engines(kind, stage, threshold, decay=DECAY):
    import deepspeed

    from ilvr.training.teacher import MomentumTeacher

    cfg = ds_config(stage, threshold)
    model = make_model(kind, seed=0)
    if kind == "toy":
        model.norm.requires_grad_(False)  # frozen (like the vision tower): copied once, no EMA state
    student, *_ = deepspeed.initialize(model=model, config=cfg)
    teacher = MomentumTeacher(student, make_model(kind, seed=1), cfg, decay)  # another init: the copy must work
    return student, teacher


def gather(module) -> dict[str, torch.Tensor]:
    """Full weights of `module` (read only; materialised persistent parameters are left resident)."""
    import deepspeed

    params = dict(module.named_parameters())
    missing = [p for p in params.values() if hasattr(p, "ds_id") and p.data.numel() != p.ds_numel]
    with deepspeed.zero.GatheredParameters(missing, modifier_rank=None, enabled=bool(missing)):
        return {n: p.detach().clone() for n, p in params.items()}


def train_step(kind, student, teacher, step, rank):
    with torch.no_grad():
        forward(kind, teacher.module, batch(kind, 100 + step))  # as in stage 1: materialises persistent params
    loss, _ = forward(kind, student, batch(kind, 10 * step + rank))
    student.backward(loss)
    student.step()


class CollectiveCounter:
    """Counts c10d collectives (gloo profiler events) issued inside the block."""

    def __enter__(self):
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        self.names = [e.name for e in self.prof.events() if e.name.startswith("gloo:")]
        self.count = len(self.names)


# ---------------------------------------------------------------- rank functions

def _train_with_teacher(rank, world_size, kind, stage, threshold, out_dir):
    """Train STEPS steps with an EMA teacher; rank 0 saves the weights seen (the result queue is a pipe
    that blocks on large results, so tensors go through a file)."""
    import deepspeed

    student, teacher = engines(kind, stage, threshold)
    states, update_s, update_collectives = [gather(student.module)], [], 0
    for step in range(STEPS):
        train_step(kind, student, teacher, step, rank)
        with CollectiveCounter() as counter:
            update_s.append(teacher.update())
        update_collectives += counter.count
        states.append(gather(student.module))
    with torch.no_grad():
        _, logits = forward(kind, teacher.module, batch(kind, 999))
    # TRAP 1: a resident full copy of a persistent parameter must agree with the teacher's own shard
    persistent = 0
    for p in teacher.module.parameters():
        if hasattr(p, "ds_id") and p.ds_persist and p.data.numel() == p.ds_numel:
            per_rank = p.ds_tensor.ds_numel
            start = per_rank * rank
            valid = max(0, min(per_rank, p.ds_numel - start))
            assert torch.equal(p.data.view(-1)[start:start + valid], p.ds_tensor[:valid])
            persistent += 1
    result = dict(states=states, teacher=teacher.gathered_state_dict(), logits=logits, persistent=persistent,
                  update_s=update_s, update_collectives=update_collectives)
    if stage == 3:  # the reference design: gather all weights, EMA on rank 0, broadcast (timing + positive control)
        t_params, s_params = list(teacher.module.parameters()), list(student.module.parameters())
        with CollectiveCounter() as counter:
            import time

            started = time.perf_counter()
            with deepspeed.zero.GatheredParameters(t_params + s_params, modifier_rank=0), torch.no_grad():
                torch._foreach_mul_(t_params, DECAY)
                torch._foreach_add_(t_params, s_params, alpha=1 - DECAY)
            result["gathered_ema_s"] = time.perf_counter() - started
        result["gathered_ema_collectives"] = counter.count
    if rank == 0:
        torch.save(result, f"{out_dir}/result.pt")


def _mismatched_partitions_raise(rank, world_size):
    import deepspeed

    from ilvr.training.teacher import MomentumTeacher

    cfg = ds_config(3, 0)
    student, *_ = deepspeed.initialize(model=Toy(out=7), config=cfg)
    try:
        MomentumTeacher(student, Toy(out=8), cfg, DECAY)
    except ValueError as e:
        return str(e)
    return None


def _save_load_round_trip(rank, world_size, directory):
    from safetensors import safe_open

    from ilvr.training.teacher import MomentumTeacher

    kind, cfg = "qwen2", ds_config(3)
    student, teacher = engines(kind, 3, None)
    for step in range(2):
        train_step(kind, student, teacher, step, rank)
        teacher.update()
    ids = batch(kind, 999)
    with torch.no_grad():
        before = forward(kind, teacher.module, ids)[1]
    path = teacher.save(directory, rank)
    with safe_open(path, "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    fresh = MomentumTeacher(student, make_model(kind, seed=2), cfg, DECAY)  # starts as the student
    with torch.no_grad():
        fresh_out = forward(kind, fresh.module, ids)[1]  # also materialises its persistent parameters
        fresh.load(directory, rank)
        after = forward(kind, fresh.module, ids)[1]
    return dict(restored=torch.equal(before, after), fresh_differs=not torch.allclose(before, fresh_out),
                dtypes=dtypes, buffers_equal=all(torch.equal(a, b) for a, b in
                                                 zip(teacher.state_dict().values(), fresh.state_dict().values())))


def _modifier_rank_none_drops_update(rank, world_size):
    """TRAP 2, kept as a test so the reason for the shard-local design stays documented."""
    import deepspeed

    from ilvr.training.teacher import teacher_ds_config

    engine, *_ = deepspeed.initialize(model=Toy(), config=teacher_ds_config(ds_config(3, 0)))
    weight = engine.module.embed.weight
    before = gather(engine.module)["embed.weight"]
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None), torch.no_grad():
        weight.add_(1.0)
    dropped = torch.equal(gather(engine.module)["embed.weight"], before)
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=0), torch.no_grad():
        weight.add_(1.0)
    kept = torch.equal(gather(engine.module)["embed.weight"], before + 1.0)
    return dropped, kept


# ---------------------------------------------------------------- tests

RUNS = {"qwen2-zero3-default-threshold": ("qwen2", 3, None), "qwen2-zero3-threshold0": ("qwen2", 3, 0),
        "toy-zero3-padded-shards": ("toy", 3, None), "toy-zero2": ("toy", 2, None)}


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, tmp_path_factory):
    kind, stage, threshold = RUNS[request.param]
    out_dir = tmp_path_factory.mktemp("teacher_run")
    run_on_ranks(_train_with_teacher, world_size=2, kind=kind, stage=stage, threshold=threshold, out_dir=str(out_dir))
    return dict(kind=kind, stage=stage, threshold=threshold, **torch.load(out_dir / "result.pt", weights_only=True))


def full_weight_ema(states: list[dict], decay: float) -> dict:
    """The definition, on full weights in one process: t0 = s0, t <- d t + (1 - d) s after each step."""
    teacher = {n: t.clone() for n, t in states[0].items()}
    for state in states[1:]:
        for n in teacher:
            teacher[n] = decay * teacher[n] + (1 - decay) * state[n]
    return teacher


def test_shard_local_ema_equals_full_weight_ema(run):
    expected = full_weight_ema(run["states"], DECAY)
    assert run["teacher"].keys() == expected.keys()
    for name, value in run["teacher"].items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0, msg=name)
    moved = [n for n in expected if not torch.allclose(expected[n], run["states"][0][n], atol=1e-4)]
    lags = [n for n in expected if not torch.allclose(expected[n], run["states"][-1][n], atol=1e-4)]
    assert len(moved) > len(expected) // 2 and len(lags) > len(expected) // 2  # the test is not vacuous
    if run["stage"] == 3 and run["threshold"] is None:
        assert run["persistent"] > 0  # TRAP 1 exercised: resident full copies were updated too


def test_teacher_forward_equals_plain_forward_of_gathered_weights(run):
    plain = make_model(run["kind"], seed=5)
    plain.load_state_dict(run["teacher"])
    with torch.no_grad():
        _, logits = forward(run["kind"], plain.eval(), batch(run["kind"], 999))
    torch.testing.assert_close(run["logits"], logits, atol=1e-5, rtol=1e-5)


def test_update_issues_no_collective(run):
    assert run["update_collectives"] == 0
    if run["stage"] == 3:
        assert run["gathered_ema_collectives"] > 0  # the counter does see collectives


def test_mismatched_partitions_raise_a_clear_error():
    messages = run_on_ranks(_mismatched_partitions_raise, world_size=2)
    for message in messages:
        assert message is not None and "do not line up" in message and "head.weight" in message


def test_save_load_restores_exact_teacher_outputs(tmp_path):
    for result in run_on_ranks(_save_load_round_trip, world_size=2, directory=str(tmp_path)):
        assert result["restored"] and result["fresh_differs"] and result["buffers_equal"]
        assert result["dtypes"] == {torch.float32}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher_rank0.safetensors", "teacher_rank1.safetensors"]


def test_gathered_parameters_with_modifier_rank_none_drops_in_place_updates():
    for dropped, kept in run_on_ranks(_modifier_rank_none_drops_update, world_size=2):
        assert dropped, "GatheredParameters(modifier_rank=None) kept an update: TRAP 2 no longer holds"
        assert kept


def test_teacher_config_drops_the_optimizer_and_the_students_zeropp_copies():
    from ilvr.training.teacher import teacher_ds_config

    student = ds_config(2) | {"scheduler": {"type": "WarmupLR"}}
    teacher = teacher_ds_config(student)
    assert "optimizer" not in teacher and "scheduler" not in teacher and teacher["zero_optimization"]["stage"] == 0
    assert student["optimizer"] and student["zero_optimization"]["stage"] == 2  # not modified
    assert teacher_ds_config(ds_config(3, 0))["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    zpp = {"stage": 3, "zero_hpz_partition_size": 8, "zero_quantized_weights": True}
    teacher = teacher_ds_config(ds_config(3) | {"zero_optimization": zpp})
    assert teacher["zero_optimization"] == {"stage": 3, "zero_hpz_partition_size": 1, "zero_quantized_weights": False}
    with pytest.raises(ValueError, match="NVMe"):
        teacher_ds_config(ds_config(3) | {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})
