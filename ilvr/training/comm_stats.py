"""Collective calls and bytes per optimizer step, from DeepSpeed's comms logger.

Under ZeRO-3 the communication is the step on a cluster (on one host a gather is a memcpy),
so the trainer can log, per step and per rank, `comm/{all_gather,reduce_scatter,all_reduce,
other}_{calls,bytes}`. The numbers come from DeepSpeed's own comms logger (enabled with
`train.comm_stats: true`, which adds `"comms_logger": {"enabled": true, "prof_all": true}` to
the DeepSpeed config); it sees every collective DeepSpeed issues (parameter gathers, gradient
reduce-scatters, its all-reduces), not the few small ones the trainer makes through
torch.distributed itself. Bytes are the sizes of the logged tensors, except all-gathers, which
DeepSpeed logs as the local shard: they are reported as the gathered size (x world size).

Cost: the logger synchronises the device after every collective (it times each one), which
removes compute/communication overlap on GPUs: switch it on to diagnose, not for production.
"""
from __future__ import annotations

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "other")


def kind_of(record_name: str) -> str:
    name = record_name.lower()
    if "reduce_scatter" in name or "reducescatter" in name:
        return "reduce_scatter"
    if "gather" in name:
        return "all_gather"
    if "all_reduce" in name or "allreduce" in name:
        return "all_reduce"
    return "other"


def totals(raw: dict, world_size: int) -> dict[str, float]:
    """{comm/<kind>_calls, comm/<kind>_bytes} summed over a comms-logger dict
    {record_name: {msg_size: [count, ...]}}."""
    out = {f"comm/{k}_{what}": 0.0 for k in KINDS for what in ("calls", "bytes")}
    for name, sizes in raw.items():
        kind = kind_of(name)
        scale = world_size if kind == "all_gather" else 1
        for size, record in sizes.items():
            out[f"comm/{kind}_calls"] += record[0]
            out[f"comm/{kind}_bytes"] += float(size) * record[0] * scale
    return out


class CommStats:
    """Per-step differences of DeepSpeed's comms-logger totals (a no-op when the logger is off)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.last: "dict[str, float] | None" = None

    @staticmethod
    def _logger():
        from deepspeed import comm

        logger = getattr(comm, "comms_logger", None)
        return logger if logger is not None and logger.enabled else None

    def step(self) -> dict[str, float]:
        """The counts since the previous call (the first call: since the logger started)."""
        logger = self._logger()
        if logger is None:
            return {}
        now = totals(logger.get_raw_data(), self.world_size)
        before = self.last or {k: 0.0 for k in now}
        self.last = now
        return {k: now[k] - before.get(k, 0.0) for k in now}

    def mark(self) -> None:
        """Start counting from now (e.g. after engine set-up, whose collectives are not a step's)."""
        self.step()
