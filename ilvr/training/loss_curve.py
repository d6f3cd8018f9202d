"""A loss-curve picture for the run's artifacts: PNG through matplotlib, else a small SVG written by hand."""
from __future__ import annotations

import os
from typing import Mapping, Sequence


def _series(history) -> dict[str, list[tuple[float, float]]]:
    """dict name -> [(step, value)], or [(step, value)], or [{"step": s, "loss": v, ...}] -> named curves."""
    if isinstance(history, Mapping):
        return {str(k): [(float(x), float(y)) for x, y in v] for k, v in history.items()}
    out: dict[str, list[tuple[float, float]]] = {}
    for row in history:
        if isinstance(row, Mapping):
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    out.setdefault(k, []).append((float(row["step"]), float(v)))
        else:
            out.setdefault("loss", []).append((float(row[0]), float(row[1])))
    return out


def plot_loss_curve(history, path: str) -> str:
    """Write a loss curve and return its path: PNG via matplotlib, SVG if matplotlib is not installed.

    `history`: see _series. Without an extension in `path`, .png / .svg is added.
    """
    series = _series(history)
    root, ext = os.path.splitext(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        path = root + ".svg"
        with open(path, "w", encoding="utf-8") as f:
            f.write(_svg(series))
        return path
    path = path if ext else root + ".png"
    fig = Figure(figsize=(7, 4), dpi=100)  # no pyplot: no global figure state
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set(xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def _svg(series: Mapping[str, Sequence[tuple[float, float]]], w: int = 700, h: int = 400, pad: int = 50) -> str:
    points = [p for pts in series.values() for p in pts]
    xs, ys = [p[0] for p in points] or [0.0, 1.0], [p[1] for p in points] or [0.0, 1.0]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (w - 2 * pad) / ((x1 - x0) or 1.0)
    sy = (h - 2 * pad) / ((y1 - y0) or 1.0)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    text = '<text x="{}" y="{}" text-anchor="{}" fill="{}">{}</text>'.format
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>',
             f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="none" stroke="#888"/>',
             text(pad, h - pad + 16, "start", "black", f"{x0:g}"), text(w - pad, h - pad + 16, "end", "black",
                                                                          f"step {x1:g}"),
             text(pad - 4, h - pad, "end", "black", f"{y0:.4g}"), text(pad - 4, pad + 10, "end", "black", f"{y1:.4g}")]
    for i, (name, pts) in enumerate(series.items()):
        color = colors[i % len(colors)]
        coords = " ".join(f"{pad + (x - x0) * sx:.1f},{h - pad - (y - y0) * sy:.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        parts.append(text(w - pad - 4, pad + 16 + 14 * i, "end", color, name.replace("&", "&amp;").replace("<", "&lt;")))
    parts.append("</svg>\n")
    return "\n".join(parts)
