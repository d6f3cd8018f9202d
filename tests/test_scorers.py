"""Scorers: VSP on the real 400-map test set, CoMT and Zebra-CoT on hand-written cases, `ilvr-eval score`."""
from __future__ import annotations

import json

import pytest

from data_pipeline.records import Record, record_to_sample
from data_pipeline.shards import ShardWriter
from data_pipeline.sources.vsp import read as read_vsp
from data_pipeline.vsp_world import GOAL, HOLE, MOVES, START, find, shortest_plan
from ilvr.evaluation.cli import main as eval_main
from ilvr.evaluation.scorers import aggregate, comt, get_scorer, infer_benchmark, vsp, zebra


@pytest.fixture
def vsp_records(shared_data) -> list[Record]:
    rows = list(read_vsp(str(shared_data / "vsp_test" / "test_direct.jsonl"), image_root=str(shared_data / "vsp_test")))
    assert all(isinstance(r, Record) for r in rows)
    return rows


def boxed(moves: list[str]) -> str:
    return f"Let me plan. The answer is \\boxed{{{','.join(moves)}}}."


def neighbour(map_desc, pos, value) -> str | None:
    """A move from `pos` onto a square holding `value`, if there is one."""
    n = len(map_desc)
    for move, (dr, dc) in MOVES.items():
        r, c = pos[0] + dr, pos[1] + dc
        if 0 <= r < n and 0 <= c < n and map_desc[r][c] == value:
            return move
    return None


def test_shortest_plans_score_100_percent_on_the_real_test_set(vsp_records):
    assert len(vsp_records) == 400
    scores = [vsp.score(boxed(shortest_plan(r.meta["map_desc"])), r) for r in vsp_records]
    metrics = aggregate(scores, "vsp")
    assert metrics["success_rate"] == metrics["accuracy"] == 1.0
    assert metrics["unparseable"] == 0
    assert {k: metrics[k] for k in metrics if k.startswith("count/")} == {f"count/level{n}": 100.0 for n in (3, 4, 5, 6)}


def test_broken_plans_score_as_expected_on_the_real_test_set(vsp_records):
    checked = {"hole": 0, "short": 0, "leave": 0, "bump": 0}
    for r in vsp_records:
        m = r.meta["map_desc"]
        plan = shortest_plan(m)
        assert not vsp.score(boxed(plan[:-1]), r).correct if plan[:-1] else True  # stopping short
        checked["short"] += bool(plan[:-1])
        # reaching the goal, then stepping off it onto ice: fails (only the final square counts)
        away = neighbour(m, find(m, GOAL), 0)
        if away:
            s = vsp.score(boxed(plan + [away]), r)
            assert not s.correct and s.detail == "not_at_goal"
            checked["leave"] += 1
        # walking into a hole next to the start: fails at once, even if the right plan follows
        into_hole = neighbour(m, find(m, START), HOLE)
        if into_hole:
            s = vsp.score(boxed([into_hole] + plan), r)
            assert not s.correct and s.detail == "fell_in_hole"
            checked["hole"] += 1
        # bumping into an edge first does nothing: still a success
        sr, sc = find(m, START)
        edge = "U" if sr == 0 else "D" if sr == len(m) - 1 else "L" if sc == 0 else "R" if sc == len(m) - 1 else None
        if edge:
            assert vsp.score(boxed([edge, edge] + plan), r).correct
            checked["bump"] += 1
    assert all(n >= 50 for n in checked.values()), checked


def test_vsp_only_the_last_box_counts_and_formats(vsp_records):
    r = vsp_records[0]
    plan = shortest_plan(r.meta["map_desc"])
    wrong = ["U"] * 8 if plan[0] != "U" else ["L"] * 8
    assert vsp.score(boxed(wrong) + " Wait, no: " + boxed(plan), r).correct
    assert not vsp.score(boxed(plan) + " Actually " + boxed(wrong), r).correct
    assert vsp.score("\\boxed{" + "".join(plan) + "}", r).correct
    words = {"L": "Left", "R": "Right", "U": "Up", "D": "Down"}
    assert vsp.score("\\boxed{" + " -> ".join(words[x] for x in plan) + "}", r).correct
    assert vsp.score("\\boxed{\\text{" + ", ".join(plan) + "}}", r).correct
    assert vsp.score("\\boxed{$" + ", ".join(plan) + "$}", r).correct
    for text in ("no box here: R,D", "\\boxed{}", "\\boxed{R, 3, D}", "\\boxed{go somewhere}", "\\boxed{R,D"):
        s = vsp.score(text, r)
        assert s.parsed is None and not s.correct, text


def comt_record(answer: str, category: str = "geometry", choices=None) -> Record:
    meta = {"category": category, **({"choices": choices} if choices is not None else {})}
    return Record(id="c", task="comt", question="q", images=[], steps=[], answer=answer, meta=meta)


@pytest.mark.parametrize("prediction,gold,correct,parsed", [
    ("\\boxed{B}", "B", True, "B"),
    ("\\boxed{(B)}", "(B)", True, "B"),
    ("The answer is (C).", "C", True, "C"),
    ("Answer: D", "D. a square", True, "D"),
    ("I think A... no. The answer is B", "B", True, "B"),
    ("\\boxed{C}", "B", False, "C"),
    ("B", "B", True, "B"),
    ("\\boxed{a square}", "D", True, "D"),
    ("I cannot tell.", "A", False, None),
    ("\\boxed{E}", "A", False, None),
    ("the answer is a square.", "D", False, None),  # a lowercase article is not the letter A
    ("\\boxed{A square}", "D", True, "D"),  # an option's text wins over a leading capital "A"
])
def test_comt_choice_exact_match(prediction, gold, correct, parsed):
    s = comt.score(prediction, comt_record(gold, choices=["A. a circle", "B. a line", "C. a cube", "D. a square"]))
    assert (s.correct, s.parsed) == (correct, parsed)


def test_comt_per_category_and_bad_reference():
    recs = [comt_record("A", "geometry"), comt_record("B", "geometry"), comt_record("C", "deletion")]
    scores = [comt.score(p, r) for p, r in zip(["\\boxed{A}", "\\boxed{A}", "nothing"], recs)]
    m = aggregate(scores, "comt")
    assert m["accuracy"] == pytest.approx(1 / 3) and m["accuracy/geometry"] == 0.5 and m["accuracy/deletion"] == 0.0
    assert m["unparseable"] == 1 and "success_rate" not in m
    with pytest.raises(ValueError, match="not a choice"):
        comt.score("\\boxed{A}", comt_record("forty-two"))


@pytest.mark.parametrize("prediction,gold,correct", [
    ("THOUGHT 1: ... Final Answer: \\boxed{The Red House}", "red house", True),
    ("Final Answer: 42", "42.0", True),
    ("Final Answer: 1,000", "1000", True),
    ("\\boxed{$3.5$}", "3.5", True),
    ("\\boxed{\\text{Blue}.}", "blue", True),
    ("\\boxed{blue}", "green", False),
    ("Final Answer: 41", "42", False),
    ("the answer is blue", "blue", False),  # no final-answer marker: unparseable
])
def test_zebra_normalised_exact_match(prediction, gold, correct):
    r = Record(id="z", task="zebra", question="q", images=[], steps=[], answer=gold, meta={"category": "Visual Logic"})
    s = zebra.score(prediction, r)
    assert s.correct == correct
    assert s.category == "Visual Logic"


def test_zebra_categories_are_safe_metric_keys():
    recs = [Record(id=str(i), task="zebra", question="q", images=[], steps=[], answer="x", meta={"category": c})
            for i, c in enumerate(["2D Visual Reasoning - Maze", "Scientific <Physics>"])]
    m = aggregate([zebra.score("\\boxed{x}", r) for r in recs], "zebra")
    assert m["accuracy/2D Visual Reasoning - Maze"] == 1.0 and m["accuracy/Scientific _Physics_"] == 1.0


def test_benchmark_names():
    with pytest.raises(ValueError, match="unknown benchmark"):
        get_scorer("mmlu")
    assert infer_benchmark([comt_record("A")]) == "comt"
    with pytest.raises(ValueError, match="pass --benchmark"):
        infer_benchmark([comt_record("A"), Record(id="g", task="generic", question="", images=[], steps=[])])


def test_score_subcommand_on_real_vsp_shards(vsp_records, tmp_path, capsys):
    records = vsp_records[::40]  # 10 maps, all levels
    writer = ShardWriter(str(tmp_path / "shards"), prefix="vsp", samples_per_shard=4)
    for i, r in enumerate(records):
        writer.write(record_to_sample(r, i))
    writer.close()
    preds = tmp_path / "preds.jsonl"
    rows = [{"id": r.id, "prediction": boxed(shortest_plan(r.meta["map_desc"]))} for r in records[:8]]
    rows[0]["prediction"] = "I give up"
    preds.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "metrics.json"
    code = eval_main(["score", "--predictions", str(preds), "--benchmark", "vsp", "--data", str(tmp_path / "shards"),
                      "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["success_rate"] == pytest.approx(7 / 8)
    assert printed["unparseable"] == 1 and printed["missing"] == 2 and printed["num_samples"] == 8

    preds.write_text(json.dumps({"id": "level9-999", "prediction": "\\boxed{R}"}) + "\n")
    assert eval_main(["score", "--predictions", str(preds), "--data", str(tmp_path / "shards")]) == 2
    assert "not in the benchmark data" in capsys.readouterr().err
    preds.write_text('{"id": "x"}\n')
    assert eval_main(["score", "--predictions", str(preds), "--data", str(tmp_path / "shards")]) == 2
    assert "preds.jsonl:1" in capsys.readouterr().err


def test_scores_carry_the_gold_reference():
    """predictions.jsonl shows what each answer was judged against: CoMT's letter, Zebra's answer, and for VSP
    the record's plan or, when the row has none (the test set), a shortest plan on its map."""
    assert comt.score("\\boxed{A}", comt_record("(B)", choices=["a", "b", "c", "d"])).gold == "B"
    z = Record(id="z", task="zebra", question="q", images=[], steps=[], answer="42", meta={})
    assert zebra.score("no answer", z).gold == "42"
    grid = [[1, 0], [-1, 2]]
    v = Record(id="v", task="vsp", question="q", images=[], steps=[], answer="", meta={"map_desc": grid})
    assert vsp.score("\\boxed{R,D}", v).gold == ",".join(shortest_plan(grid)) == "R,D"
    v.answer = "R,D"
    assert vsp.score("nothing", v).gold == "R,D"


def test_vsp_metrics_carry_the_random_valid_plan_baseline():
    from data_pipeline.sources import synthetic_vsp
    from data_pipeline.vsp_world import random_plan_success

    records = list(synthetic_vsp.read(num_samples=12, min_size=3, max_size=4, seed=3, style="direct"))
    scores = [vsp.score("no box" if i % 3 == 0 else boxed(r.answer.split(",")), r) for i, r in enumerate(records)]
    chances = [random_plan_success(r.meta["map_desc"]) for r in records]
    assert [s.baseline for s in scores] == chances  # unparseable answers keep their map's chance too
    metrics = aggregate(scores, "vsp")
    assert metrics["baseline"] == pytest.approx(sum(chances) / len(chances))
    for level in (3, 4):
        mine = [c for c, r in zip(chances, records) if r.meta["level"] == level]
        assert metrics[f"baseline/level{level}"] == pytest.approx(sum(mine) / len(mine))
    comt_record = Record(id="c", task="comt", question="q", images=[], steps=[], answer="A")
    assert "baseline" not in aggregate([comt.score("A", comt_record)], "comt")


def _plan_length_outputs():
    """A small evaluation output: predictions on synthetic maps whose shortest plans have 1..4 moves; the
    first two rows of each length answered with a shortest plan, the rest with no box."""
    from data_pipeline.sources import synthetic_vsp
    from ilvr.evaluation.evaluate import score_rows

    records = list(synthetic_vsp.read(num_samples=40, min_size=3, max_size=4, seed=5, style="direct"))
    rows, seen = [], {}
    for r in records:
        n = len(shortest_plan(r.meta["map_desc"]))
        seen[n] = seen.get(n, 0) + 1
        rows.append({"id": r.id, "prediction": boxed(shortest_plan(r.meta["map_desc"])) if seen[n] <= 2 else "?"})
    metrics = score_rows(rows, {r.id: r for r in records}, "vsp")
    return records, rows, metrics, seen


def test_vsp_success_by_shortest_plan_length():
    """Each row carries its map's shortest-plan length; the metrics count rows and successes per length, and
    by_plan_length / describe_plan_lengths give the quick start's line."""
    from ilvr.evaluation.scorers import by_plan_length, describe_plan_lengths

    records, rows, metrics, seen = _plan_length_outputs()
    assert len(seen) >= 3, seen  # several lengths, so the breakdown is not trivial
    assert [row["plan_length"] for row in rows] == [len(shortest_plan(r.meta["map_desc"])) for r in records]
    table = by_plan_length(metrics)
    assert list(table) == [str(n) for n in sorted(seen)]
    assert table == {str(n): {"correct": min(2, count), "count": count} for n, count in sorted(seen.items())}
    assert sum(c["count"] for c in table.values()) == metrics["num_samples"]
    assert sum(c["correct"] for c in table.values()) == metrics["num_correct"]
    line = describe_plan_lengths(table)
    assert line == ", ".join(f"{n} move{'s' if n > 1 else ''} {min(2, c)}/{c}" for n, c in sorted(seen.items()))
    assert describe_plan_lengths({"1": {"correct": 5, "count": 6}, "2": {"correct": 20, "count": 44}}) == \
        "1 move 5/6, 2 moves 20/44"
    comt_record = Record(id="c", task="comt", question="q", images=[], steps=[], answer="A")
    assert by_plan_length(aggregate([comt.score("A", comt_record)], "comt")) == {}


def test_quickstart_final_lines_show_success_by_plan_length(tmp_path):
    """The report lines at the end of scripts/quickstart.sh, run on a small evaluation and a paired one in which
    every answer fails (the constant-latent evaluation): success by plan length, then success beside the paired
    evaluation's with the discordant counts and the exact McNemar p-value."""
    import re
    import subprocess
    import sys

    from ilvr.evaluation.paired import mcnemar_exact
    from ilvr.evaluation.scorers import by_plan_length
    from tests.conftest import REPO

    records, rows, metrics, seen = _plan_length_outputs()
    latent, constant = tmp_path / "export", tmp_path / "export-constant"
    for d, solved in ((latent, True), (constant, False)):
        d.mkdir()
        (d / "predictions.jsonl").write_text("".join(json.dumps({"id": r["id"], "correct": bool(r["correct"]) and solved})
                                                     + "\n" for r in rows))
    (latent / "metrics.json").write_text(json.dumps({"metrics": metrics, "by_plan_length": by_plan_length(metrics)}))
    script = (REPO / "scripts" / "quickstart.sh").read_text()
    code = re.search(r"<<'PYEOF'\n(.*?)\nPYEOF", script, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code, str(latent), str(constant)], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    by_length, result = out.splitlines()[-2:]
    assert by_length.startswith("quickstart: solved, by the length of the map's shortest plan: ")
    first = min(seen)
    assert f"{first} move{'s' if first > 1 else ''} {min(2, seen[first])}/{seen[first]}" in by_length
    solved = sum(bool(r["correct"]) for r in rows)
    assert 0 < solved < len(rows)
    assert f"on {len(records)} held-out" in result
    assert f"success {100 * solved / len(rows):.1f}%" in result and "constant latents: 0.0%" in result
    assert f"solved only with the latents {solved}, only with the constant 0" in result
    assert f"p = {mcnemar_exact(solved, 0):.2g}" in result and "a random valid plan: " in result
