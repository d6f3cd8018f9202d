"""Student and momentum teacher built under ZeRO-3 by ilvr/training/engines.py, in fresh processes.

transformers >= 5.25 decorates Qwen2.5-VL's attention class after it is defined (kernels'
`use_kernelized_func`). A class first imported inside `deepspeed.zero.Init` loses that decorator
when the context exits, so the second model built (the teacher) broke at its first forward
(`no attribute '_kernel_funcs'`). The ranks are spawned interpreters that have not imported the
modeling module yet, as in a real `deepspeed ilvr/train.py` start; this module must not import it
at the top either.
"""
from __future__ import annotations

import pytest

from ilvr.training.spawn import run_on_ranks
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.compat, pytest.mark.usefixtures("fresh_rank_interpreters")]


def _build_like_the_trainer(rank: int, world_size: int, processor_dir: str, dtype: str) -> dict:
    import sys

    import deepspeed
    import torch

    from data_pipeline.tiny_processor import load_processor
    from ilvr.config import load_config
    from ilvr.training.ds_config import resolve_ds_config
    from ilvr.training.engines import build_student, build_teacher

    assert "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl" not in sys.modules  # the class is not defined yet
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config([str(REPO / "configs" / "tiny_cpu.yaml")], [
        "data.train_shards=", "data.eval_shards=", f"data.processor={processor_dir}", f"model.dtype={dtype}"])
    processor, latent_ids = load_processor(processor_dir)
    ds_config = resolve_ds_config(str(REPO / "ds_configs" / "zero3.json"), cfg, world_size, 64)
    student = build_student(cfg, ds_config, processor, latent_ids, wants_teacher=True)
    teacher = build_teacher(cfg, ds_config, student, processor, latent_ids)
    attention = [type(m) for m in student.engine.module.modules() if type(m).__name__ == "Qwen2_5_VLAttention"][0]

    def attributes(module) -> list[set]:  # what each attention module's __init__ stored on the instance
        return [set(vars(m)) for m in module.modules() if type(m) is attention]

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        student_logits = student.engine.module(input_ids=ids).logits
        teacher_logits = teacher.module(input_ids=ids).logits  # raised on transformers 5.25 before
    return {"student": attributes(student.engine.module), "teacher": attributes(teacher.module),
            "same_logits": bool(torch.equal(student_logits, teacher_logits)),
            "finite": bool(torch.isfinite(teacher_logits.float()).all())}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_teacher_built_after_the_student_under_zero_init_runs_like_the_student(tiny_processor_dir, dtype):
    results = run_on_ranks(_build_like_the_trainer, world_size=2, timeout=300, processor_dir=tiny_processor_dir,
                           dtype=dtype)
    for rank, r in enumerate(results):
        assert r["teacher"] == r["student"], f"rank {rank}: the teacher's attention modules lack attributes"
        assert r["same_logits"] and r["finite"], f"rank {rank}: the teacher starts as a copy of the student"
