"""Gather a ZeRO-3 module's parameters once and keep them for a span of ILVR's choosing.

ILVR calls the decoder's pieces (`language_model`, `lm_head`, `visual`) directly, many
times per step in stage 2 ((S_max + 1) chunk calls + S_max x K latent steps) and several
pieces of the teacher's last layer for the prompt attention. DeepSpeed records its ZeRO-3
parameter trace (and prefetches along it) only from the engine's top-level forward, so
without a trace every such call all-gathers its submodule and frees it right after; every
backward through it gathers again. Stage 2 then moved 4.9x (tiny) to 11.7x (91 MiB) the
bytes of stage 1 per step.

`held(module)` all-gathers the module's partitioned parameters in one coalesced call (the
parameters' own `all_gather(param_list=...)`, as `deepspeed.zero.GatheredParameters` does)
and marks them in use (`ds_active_sub_modules`, the set DeepSpeed's own hooks fill while a
submodule runs), so that DeepSpeed's release hooks leave them in place until the span ends;
DeepSpeed's fetch hooks find them available and gather nothing. At the end the parameters
this context gathered are partitioned again; ones that were already resident (persistent
parameters) are left as DeepSpeed had them. Cost: the module's full parameters are resident
for the span (the ZeRO-2 footprint of those parameters), which stage 2's backward needed at
some point anyway. Outside ZeRO-3 (no `ds_id` on the parameters) it does nothing.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

HOLD_ID = -7331  # a submodule id no DeepSpeed module has: "held by ILVR"


def zero3_params(module: torch.nn.Module) -> list:
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def held(module: "torch.nn.Module | None", enabled: bool = True) -> Iterator[int]:
    """Keep every ZeRO-3 parameter of `module` gathered inside the block; yields how many parameters
    this call gathered. Collective on entry and exit: every rank must enter together."""
    params = zero3_params(module) if module is not None and enabled else []
    if not params:
        yield 0
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    fresh = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if fresh:
        fresh[0].all_gather(param_list=fresh)
    for p in params:
        p.ds_active_sub_modules.add(HOLD_ID)
    try:
        yield len(fresh)
    finally:
        for p in params:
            p.ds_active_sub_modules.discard(HOLD_ID)
        done = [p for p in fresh if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_active_sub_modules]
        if done:
            done[0].partition(param_list=done, has_been_updated=False)
