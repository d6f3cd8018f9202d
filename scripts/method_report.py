"""The method table's report: results.json -> a Markdown table, the goals checked, and plots (matplotlib)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def pct_ci(d: "dict | None") -> str:
    if not d:
        return "-"
    lo, hi = d["ci95"]
    return f"{100 * d['success']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def _real(entry: dict, level: str) -> str:
    detail = (entry.get("vsp_real_detail") or {}).get("per_level", {}).get(level)
    return pct_ci(detail)


def table(results: dict) -> list[str]:
    variants = results["variants"]
    levels = sorted({lv for e in variants.values() for m in e["modes"].values()
                     for lv in (m.get("vsp_real_detail") or {}).get("per_level", {})})
    head = ["variant", "mode", "synthetic success % [95% CI]", "unparseable %"] + [f"real {lv} %" for lv in levels] \
        + ["K* (end of stage 1)", "cos of consecutive targets within a segment (`align_copy`), stage 1 start -> end", "fed-back norm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in variants.items():
        t = e.get("training", {})
        for mode, m in e["modes"].items():
            cells = [name, mode, pct_ci(m["synthetic"]), pct(m["synthetic"]["unparseable_rate"])]
            cells += [_real(m, lv) for lv in levels]
            latent = e["style"].startswith("latent-")
            cells += [f"{t['stage1/selected_mean']:.2f}" if latent and "stage1/selected_mean" in t else "-",
                      f"{t['stage1/align_copy_start']:.3f} -> {t['stage1/align_copy']:.5f}"
                      if latent and "stage1/align_copy_start" in t else "-",
                      f"{t.get('stage2/fed_norm', t.get('stage1/fed_norm', 0)):.1f}"
                      if latent and "stage1/fed_norm" in t else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(variants.values()), None)
    if first:
        m = next(iter(first["modes"].values()))
        cells = ["random valid plan", "-", pct(m["synthetic"]["random_plan_baseline"]), "0.0"]
        real = (m.get("vsp_real_detail") or {}).get("per_level", {})
        cells += [pct(real.get(lv, {}).get("random_plan_baseline")) for lv in levels] + ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _get(results, name, mode="latent"):
    e = results["variants"].get(name)
    if not e:
        return None
    m = e["modes"].get(mode) or next(iter(e["modes"].values()))
    return m["synthetic"]


def goals(results: dict) -> list[tuple[str, "bool | None", str]]:
    """The issue's goals, each (statement, met?, the numbers); None when a variant is missing."""
    out = []
    base = _get(results, "direct")
    chance = next(iter(results["variants"].values()))["synthetic"]["random_plan_baseline"] if results["variants"] else None
    for name in ("cot-coords", "cot-moves", "ilvr"):
        r = _get(results, name)
        if r is None or base is None:
            continue
        ok = r["unparseable_rate"] <= 0.05 and r["ci95"][0] > max(base["ci95"][1], chance or 0)
        out.append((f"{name} learns: unparseable <= 5% and success above direct answer and random plan", ok,
                    f"{pct(r['success'])}% (unparseable {pct(r['unparseable_rate'])}%) vs direct {pct(base['success'])}%, "
                    f"random {pct(chance)}%"))

    def above(a, b, by_ci: bool, label: str):
        ra, rb = a, b
        if ra is None or rb is None:
            return
        ok = ra["ci95"][0] > rb["ci95"][1] if by_ci else ra["success"] >= rb["success"]
        out.append((label, ok, f"{pct(ra['success'])}% vs {pct(rb['success'])}%"))

    def paired_above(a: str, b: str, label: str):
        """met: A's success above B's on the same maps with exact McNemar p < 0.05."""
        row = next((r for r in results.get("paired", []) if r["a"] == a and r["b"] == b and "synthetic" in r), None)
        if row is None:
            return
        r = row["synthetic"]
        ok = r["a_success"] > r["b_success"] and r["p_value"] < 0.05
        out.append((label, ok, f"{pct(r['a_success'])}% vs {pct(r['b_success'])}%, {r['only_a']} vs {r['only_b']} "
                               f"discordant maps, paired p = {r['p_value']:.3g}"))

    ilvr = _get(results, "ilvr")
    above(ilvr, _get(results, "cot-moves"), False, "ILVR 1+2 (latent) >= text CoT moves-only")
    if results.get("paired"):
        for v in ("ilvr", "ilvr-pooled", "ilvr-change"):
            for m in ("constant-latent", "shuffled-latent"):
                paired_above(f"{v} latent", f"{v} {m}", f"{v}: latent > {m} on the same maps (paired p < 0.05)")
    else:  # results from before the paired tests
        above(ilvr, _get(results, "ilvr", "constant-latent"), True, "ILVR latent > constant-latent, beyond the CIs")
        above(ilvr, _get(results, "ilvr", "shuffled-latent"), True, "ILVR latent > shuffled-latent, beyond the CIs")
    above(ilvr, _get(results, "ilvr-stage1"), False, "stage 1+2 >= stage 1 only")
    above(ilvr, _get(results, "ilvr-pooled"), False, "teacher selection >= fixed pooling")
    e = results["variants"].get("ilvr")
    m = next(iter(e["modes"].values())) if e else {}
    if m.get("vsp_real_detail"):
        syn = m["synthetic"]["per_level"]
        real = m["vsp_real_detail"]["per_level"]
        gaps = {lv: abs(syn[lv]["success"] - real[lv]["success"]) for lv in ("level3", "level4")
                if lv in syn and lv in real}
        if gaps:
            out.append(("transfer: real levels 3-4 within 10 points of synthetic", all(g <= 0.10 for g in gaps.values()),
                        ", ".join(f"{lv}: synthetic {pct(syn[lv]['success'])}% / real {pct(real[lv]['success'])}%"
                                  for lv in gaps)))
    return out


def figures(results: dict, out: Path) -> list[str]:
    """success per variant/mode with 95% CIs (synthetic and real), and the training loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(9, 3.6))
    rows = [(f"{n}\n{m}" if m not in ("text", "latent") else n, md) for n, e in results["variants"].items()
            for m, md in e["modes"].items()]
    for i, (label, md) in enumerate(rows):
        for j, (key, color) in enumerate((("synthetic", "tab:blue"), ("vsp_real_detail", "tab:orange"))):
            d = md.get(key)
            if not d:
                continue
            lo, hi = d["ci95"]
            ax.bar(i + (j - 0.5) * 0.38, d["success"], 0.36, color=color, yerr=[[d["success"] - lo], [hi - d["success"]]],
                   capsize=2, label=("held-out synthetic" if key == "synthetic" else "real VSP (all levels)") if i == 0 else None)
    if rows:
        chance = rows[0][1]["synthetic"]["random_plan_baseline"]
        ax.axhline(chance, color="gray", ls="--", lw=1, label="random valid plan (synthetic)")
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "success.png", dpi=110)
    plt.close(fig)
    names.append("success.png")

    fig, ax = plt.subplots(figsize=(9, 3.2))
    root = Path(results["settings"]["out"])
    for name in ["base", *results["variants"]]:
        path = root / name / "train" / "metrics.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        pts = [(r["step"], r["ce"]) for r in rows if "ce" in r and "step" in r]
        if pts:
            k = max(1, len(pts) // 60)  # a running mean over ~60 points
            xs = [pts[i][0] for i in range(0, len(pts), k)]
            ys = [sum(p[1] for p in pts[i:i + k]) / len(pts[i:i + k]) for i in range(0, len(pts), k)]
            ax.plot(xs, ys, label=name, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("text cross-entropy")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)
    names.append("training.png")
    return names


def probe_cells(probe: dict) -> dict[str, str]:
    """'probe / step-only control / majority' in % for the row and the column of a linear probe's result."""
    return {a: f"{pct(probe[a]['probe'])} / {pct(probe[a]['step_only_control'])} / {pct(probe[a]['majority'])}"
            for a in ("row", "col")}


def run_time(results: dict) -> str:
    """The wall time of the run, or, for a table assembled from variants trained in separate runs, their
    logged training time (evaluation not included)."""
    if results.get("elapsed_s") is not None:
        return f"the whole run took {results['elapsed_s'] / 60:.0f} min"
    per = ", ".join(f"{n} {v.get('train_s', 0) / 60:.0f}" for n, v in results["variants"].items())
    return f"assembled from variants trained in separate runs; their training took (min) {per}, evaluation not included"


def markdown(results: dict, figure_dir: str) -> str:
    s = results["settings"]
    lines = [
        "# Method table (generated by scripts/method_table.py)",
        "",
        f"{results.get('date', '?')} on {results.get('machine', '?')}; {run_time(results)}. Model: {'Qwen2.5-VL with a perception-pretrained tower' if s.get('base_model') else 'random-init Qwen2.5-VL'}, LM hidden {s['tiny_hidden']} x "
        f"{s['tiny_layers']} layers, vision hidden {s['tiny_vision_hidden']} x {s['tiny_vision_depth']} "
        f"({('frozen' + ('' if s.get('base_model') else ' at init')) if s.get('freeze_vision') else 'trainable'}), patch {s['patch_size']} px (one merged "
        f"token per 64 px square), {'no system message' if s.get('system_prompt') == '' else 'a system message'}, "
        f"the {s.get('question', 'full')} question with the map first. Data: {s['train_maps']} synthetic maps "
        f"{s['min_size']}x{s['min_size']}-{s['max_size']}x{s['max_size']} (seed 0) per variant, {s['test_maps']} "
        f"held-out (seed 1). Base: "
        f"{('the perception-pretrained ' + s['base_model']) if s.get('base_model') else str(s['base_steps']) + ' steps of map reading'}"
        f"; then {s['steps']} steps per variant "
        f"(batch {s['batch_size']} x 2 ranks, ZeRO-2, lr {s['lr']}, K = {s['latent_size']}; the 1+2 variants switch "
        f"after {round(s['steps'] * s['stage1_fraction'])}).",
        "",
        *table(results),
        "",
        "Success in %, [95% Wilson interval]. Real maps are asked in the synthetic wording (see docs/method.md).",
        "",
        "## Goals",
        "",
    ]
    for text, ok, numbers in goals(results):
        lines.append(f"- {'met' if ok else 'NOT met'}: {text} ({numbers})")
    lines += ["", "(A comparison of two variants that are both below the random plan says nothing about the method: "
                  "read such a 'met' as noise.)"]
    if results.get("paired"):
        lines += ["", "## Paired comparisons on the same maps (exact McNemar, ilvr/evaluation/paired.py)", "",
                  "| A | B | maps | A % | B % | A only | B only | p | real maps: A % / B %, p |", "|---|---|---|---|---|---|---|---|---|"]
        for row in results["paired"]:
            r, real = row.get("synthetic"), row.get("real")
            if r is None:
                continue
            real_cell = (f"{pct(real['a_success'])} / {pct(real['b_success'])}, {real['p_value']:.3g}" if real else "-")
            lines.append(f"| {row['a']} | {row['b']} | {r['n']} | {pct(r['a_success'])} | {pct(r['b_success'])} | "
                         f"{r['only_a']} | {r['only_b']} | {r['p_value']:.3g} | {real_cell} |")
    diag = {n: e["targets"] for n, e in results["variants"].items() if "changed_share" in e.get("targets", {})}
    if diag:
        lines += ["", "## What the trained model's teacher selects (scripts/target_diagnostics.py, held-out maps)", "",
                  "| variant | segments | picks include a changed square (random picks) | player's square from the targets: "
                  "row probe / control / majority | column | swap test: CE rise of the following text |",
                  "|---|---|---|---|---|---|"]
        for n, r in diag.items():
            cell = probe_cells(r["player_probe"])
            lines.append(f"| {n} | {r['segments']} | {pct(r['changed_share'])} ({pct(r['changed_chance'])}) | "
                         f"{cell['row']} | {cell['col']} | {r.get('swap_ce_rise', float('nan')):+.3f} |")
    probes = {n: e["latent_probe"] for n, e in results["variants"].items() if "row" in e.get("latent_probe", {})}
    if probes:
        lines += ["", "## Do the latents carry the state? (linear probe, ilvr/evaluation/latent_probe.py)", "",
                  "| variant | examples | row: probe / step-only control / majority | "
                  "column: probe / step-only control / majority |", "|---|---|---|---|"]
        for n, r in probes.items():
            cell = probe_cells(r)
            lines.append(f"| {n} | {r['examples']} | {cell['row']} | {cell['col']} |")
    lines += ["", f"![success]({figure_dir}/success.png)", "", f"![training]({figure_dir}/training.png)", ""]
    return "\n".join(lines)


def write_report(results: dict, out: Path, docs: "Path | None" = None) -> None:
    """<out>/method.md + <out>/figures/*.png; with `docs`, also <docs>/method/table.md and its figures."""
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    names = figures(results, fig_dir)
    (out / "method.md").write_text(markdown(results, "figures"))
    if docs is not None:
        dest = docs / "method"
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(fig_dir / name, dest / name)
        (dest / "table.md").write_text(markdown(results, "."))
