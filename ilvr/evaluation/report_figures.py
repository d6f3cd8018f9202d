"""The report's figures: matplotlib PNGs (matplotlib comes with mlflow) embedded as data URIs, so the HTML
report stays one self-contained file."""
from __future__ import annotations

import base64
import io
import math
from typing import Sequence

from ilvr.evaluation.report_data import (TRAINING_PANELS, EvalRow, TrainingRun, accuracy_ci, is_number, n_label,
                                         order_names, stage_switch)
from ilvr.model.generate import MODES  # display order; other modes follow alphabetically

def _png(fig) -> str:
    """A matplotlib figure as a PNG data URI (embedded: the report stays one file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display needed

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _percent_axis(ax) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.set_ylim(-0.04, 1.04)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(alpha=0.3)


MARKERS = ("o", "s", "^", "D", "v", "P")
LINESTYLES = ("-", "--", "-.", ":")


def training_figure(training: TrainingRun, eval_steps: Sequence[int] = ()) -> "str | None":
    """Loss terms, alignment vs its copy baseline, K*, lr, grad norm and throughput over steps, with the
    stage switch and the evaluated checkpoints marked."""
    panels = [(t, [(k, lab, ls) for k, lab, ls in lines if training.curves.get(k)]) for t, lines in TRAINING_PANELS]
    panels = [(t, lines) for t, lines in panels if lines]
    if not panels:
        return None
    cols = 3
    fig, axes = _figure(math.ceil(len(panels) / cols), cols, 13, 3.3 * math.ceil(len(panels) / cols))
    switch = stage_switch(training.curves, training.params)
    trained = [s for pts in training.curves.values() for s, _ in pts]
    eval_steps = [s for s in eval_steps if min(trained) <= s <= max(trained)]  # others belong to another run
    for ax, (title, lines) in zip(axes.flat, panels):
        for key, label, style in lines:
            xs, ys = zip(*training.curves[key])
            ax.plot(xs, ys, style, label=label, color="grey" if style == "--" else None, lw=1.5)
        if title.startswith("K*") and str(training.params.get("model.latent_size", "")).isdigit():
            ax.axhline(int(training.params["model.latent_size"]), color="grey", ls=":", label="K")
        if switch is not None:
            ax.axvline(switch, color="black", ls="--", lw=1, label="stage 1 -> 2")
        for s in eval_steps if title == "loss terms" else ():
            ax.axvline(s, color="tab:purple", ls=":", lw=1)
        ax.set_title(title + (" (dotted: evaluated checkpoints)" if title == "loss terms" and eval_steps else ""),
                     fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return _png(fig)


def _dodge(modes: Sequence[str], steps: Sequence[int]) -> "tuple[dict, float]":
    """A small x offset per mode (and the unit), so equal accuracies (0% in every mode) do not hide one another."""
    unit = 0.015 * ((max(steps) - min(steps)) if len(steps) > 1 else 1.0)
    return {m: (i - (len(modes) - 1) / 2) * 2 * unit for i, m in enumerate(modes)}, unit


def accuracy_figure(benchmark: str, stepped: Sequence[EvalRow], other: Sequence[EvalRow]) -> "str | None":
    """Accuracy vs checkpoint step, one line per mode with 95% Wilson intervals; exported models as stars."""
    pts = [r for r in stepped if is_number(r.accuracy)]
    stars = [r for r in other if is_number(r.accuracy) and r.step is not None]
    if not pts and not stars:
        return None
    modes = order_names({r.mode for r in pts + stars}, MODES)
    steps = sorted({r.step for r in pts + stars})
    dx, unit = _dodge(modes, steps)
    fig, axes = _figure(1, 1, 9, 4.2)
    ax = axes[0][0]
    for i, m in enumerate(modes):
        for rs, kind in (([r for r in pts if r.mode == m], "line"), ([r for r in stars if r.mode == m], "star")):
            rs = sorted(rs, key=lambda r: r.step)
            if not rs:
                continue
            shift = dx[m] if kind == "line" else max(dx.values()) + 2 * unit * (i + 1)  # stars right of the lines
            xs = [r.step + shift for r in rs]
            ys = [r.accuracy for r in rs]
            cis = [accuracy_ci(r.accuracy, r.n) or (r.accuracy, r.accuracy) for r in rs]
            err = [[y - lo for y, (lo, _) in zip(ys, cis)], [hi - y for y, (_, hi) in zip(ys, cis)]]
            color = f"C{i}"
            if kind == "line":
                ax.errorbar(xs, ys, yerr=err, fmt=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i % len(LINESTYLES)],
                            color=color, capsize=4, lw=1.5, ms=6, label=m)
            else:
                ax.errorbar(xs, ys, yerr=err, fmt="*", color=color, ms=14, capsize=4, mec="black",
                            label=f"{m} (exported model)")
    chance = [r.metrics["baseline"] for r in pts + stars if is_number(r.metrics.get("baseline"))]
    if chance:
        ax.axhline(sum(chance) / len(chance), color="gray", ls="--", lw=1, label="chance (random valid plan)")
    _percent_axis(ax)
    ax.set_xticks(steps)
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{benchmark}: accuracy vs checkpoint step (95% Wilson CI, n = {n_label(pts + stars)} per point; "
                 "modes offset sideways)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def category_figure(benchmark: str, stepped: Sequence[EvalRow]) -> "str | None":
    """Accuracy per category (VSP: level = grid size) x checkpoint step as heatmaps, one panel per mode; each
    cell says its accuracy and n (a heatmap: equal values cannot hide one another as lines would)."""
    modes = order_names({r.mode for r in stepped if r.categories()}, MODES)
    if not modes:
        return None
    cats = sorted({c for r in stepped for c in r.categories()})
    steps = sorted({r.step for r in stepped})
    fig, axes = _figure(1, len(modes), 1.2 + len(modes) * (1.2 + 0.55 * len(steps)), 1.2 + 0.42 * len(cats))
    image = None
    for ax, m in zip(axes[0], modes):
        cells = {(c, r.step): r.categories()[c] for r in stepped if r.mode == m for c in r.categories()}
        grid = [[cells[(c, s)][0] if is_number(cells.get((c, s), (None,))[0]) else math.nan for s in steps] for c in cats]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, c), (j, s) in ((ic, js) for ic in enumerate(cats) for js in enumerate(steps)):
            acc, n = cells.get((c, s), (None, None))
            if is_number(acc) and len(steps) <= 12:
                ax.text(j, i, f"{100 * acc:.0f}%" + (f"\nn={n:.0f}" if is_number(n) else ""), ha="center", va="center",
                        fontsize=7, color="white" if acc < 0.6 else "black")
        ax.set_xticks(range(len(steps)), [str(s) for s in steps])
        ax.set_yticks(range(len(cats)), cats)
        ax.set_title(f"{benchmark} / {m}", fontsize=10)
        ax.set_xlabel("checkpoint step")
    fig.colorbar(image, ax=list(axes[0]), label="accuracy", shrink=0.9)
    return _png(fig)
