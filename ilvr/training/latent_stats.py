"""A run's latent statistics: the latent/* metrics of each step and the running values training keeps.

- the stage-1 targets' mean norm (a moving average per rank): stage 1's view of `model.latent_rescale`, and at
  the switch to stage 2 the norm fed-back states are rescaled to from then on (the mean over all ranks, or the
  one an export recorded), fixed for the rest of the run;
- the mean fed-back latent state (per rank; over all ranks in each checkpoint's trainer.json `fed_mean`): the
  constant the constant-latent ablation feeds.

Both moving averages are per rank: saved in rank<r>.json, restored on the same layout, merged into their
cross-rank mean on another one (elastic resume). The norm goes to trainer.json as `latent_norm`.
"""
from __future__ import annotations

import json
import logging
import os

import torch

from ilvr.config import Config
from ilvr.model.latent_scale import MovingAverage
from ilvr.training.distributed import all_reduce

log = logging.getLogger(__name__)


class LatentStats:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.target_norm = MovingAverage()  # stage-1 targets' mean norm (this rank)
        self.fed_mean = MovingAverage()  # mean fed-back latent state (this rank): the constant-latent ablation
        self.norm: "float | None" = None  # model.latent_rescale: fixed at the switch to stage 2

    def step_metrics(self, parts: list, stage: int) -> dict:
        """latent/* metrics of one optimizer step, averaged over its micro-batches (the selected-count
        histogram summed, over all ranks: collective); updates the running target norm and fed-back mean."""
        stats = [p["stats"] for p in parts]
        m: dict = {}
        for key in stats[-1]:
            values = [s[key] for s in stats if isinstance(s.get(key), (int, float))]
            if values and key not in ("fed_count",):
                m[f"latent/{key}"] = float(sum(values) / len(values))
        if "selected_hist" in stats[-1]:
            hist = [sum(s["selected_hist"][j] for s in stats) for j in range(len(stats[-1]["selected_hist"]))]
            m["latent/selected_hist"] = [int(v) for v in all_reduce([float(v) for v in hist], "sum")]
            n = sum(m["latent/selected_hist"])
            if n:
                m["latent/selected_mean"] = sum((j + 1) * c for j, c in enumerate(m["latent/selected_hist"])) / n
        fed = [s for s in stats if s.get("fed_count")]
        if fed:
            total = sum(s["fed_sum"].double().cpu() for s in fed)
            self.fed_mean.add(total / sum(s["fed_count"] for s in fed))
        if stage == 1 and any(s.get("segments") for s in stats):
            norms = [s["target_norm"] for s in stats if s.get("segments")]
            self.target_norm.add(torch.tensor(sum(norms) / len(norms)))
        return m

    def norm_so_far(self) -> "float | None":
        """Stage 1's view of model.latent_rescale (only for the recorded fed-back states): this rank's
        running target norm."""
        if not self.cfg.model.latent_rescale:
            return None
        value = self.target_norm.value()
        return None if value is None else float(value)

    def fix_norm(self) -> None:
        """At the switch to stage 2 (acts once; collective): with model.latent_rescale, the norm fed-back states
        are rescaled to: the export's recorded one, else the stage-1 targets' mean norm over all ranks."""
        if not self.cfg.model.latent_rescale or self.norm is not None:
            return
        recorded = self.recorded_norm()
        if recorded is not None:  # stage 2 from an export that measured it in its stage 1
            self.norm = recorded
            log.info("model.latent_rescale: norm %.4g from %s", recorded, self.cfg.model.name_or_path)
            return
        value = self.target_norm.value()
        total, count = all_reduce([float(value) if value is not None else 0.0,
                                   1.0 if value is not None else 0.0], "sum")
        if count == 0:
            raise RuntimeError("model.latent_rescale=true needs the stage-1 targets' norm, and this run has no "
                               "stage-1 step to measure it (train.stage=2): run stage 1 first or turn it off")
        self.norm = total / count
        log.info("model.latent_rescale: fed-back latent states are rescaled to norm %.4g", self.norm)

    def recorded_norm(self) -> "float | None":
        """latent_norm recorded in the exported model this run starts from (ilvr_settings.json), if any."""
        from ilvr.model.ilvr_settings import SETTINGS_FILE

        path = os.path.join(self.cfg.model.name_or_path or "", SETTINGS_FILE)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get("latent_norm")
        return float(value) if value else None

    def fed_mean_all_ranks(self, width: int) -> "list[float] | None":
        """The mean fed-back latent state over all ranks (collective); `width`: the model's hidden size."""
        value = self.fed_mean.value()
        local = value.tolist() if value is not None else [0.0] * width
        summed = all_reduce(local + [1.0 if value is not None else 0.0], "sum")
        return None if summed[-1] == 0 else [v / summed[-1] for v in summed[:-1]]

    def rank_state(self) -> dict:
        """This rank's running values, for its rank<r>.json."""
        return {"target_norm": self.target_norm.state(), "fed_mean": self.fed_mean.state()}

    def load_rank_state(self, state: dict) -> None:
        self.target_norm.load(state.get("target_norm"))
        self.fed_mean.load(state.get("fed_mean"))

    def merge_rank_states(self, states: list[dict]) -> None:
        """Another layout (elastic resume): every rank starts from the old ranks' mean."""
        from ilvr.training.elastic import mean_moving_average

        self.target_norm.load(mean_moving_average([s.get("target_norm") for s in states]))
        self.fed_mean.load(mean_moving_average([s.get("fed_mean") for s in states]))
