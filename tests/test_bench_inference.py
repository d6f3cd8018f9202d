"""bench/inference.py and inference_paths.py, structure only (timings are never asserted): both variants
decode the same text around their segments, the pixel path really appends the image where the full sequence
has it, and the batched paths keep each row's work intact."""
from __future__ import annotations

import json

import pytest
import torch

from bench import inference, inference_paths as paths
from bench.common import Clock
from ilvr.model.inputs import embed_tokens, rope_positions, run_decoder

pytestmark = pytest.mark.slow
N = 2  # segments


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(bench with the --quick model, problems on a 3x3 and a 4x4 map); one torch thread as the bench uses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = inference.parse_args(["--quick"])
    records = [paths.vsp_record(side, 0, N) for side in (3, 4)]
    bench = paths.build_bench(args, records, str(tmp_path_factory.mktemp("bench_inference")))
    try:
        yield bench, [paths.to_problem(r, bench.processor) for r in records]
    finally:
        torch.set_num_threads(threads)


def fed_ids(st) -> torch.Tensor:
    return torch.cat([ids for ids, _ in st.fed], dim=1)


def expected_ids(bench, problem, variant: str) -> list[int]:
    """prompt, then per segment the move's text and the segment's tokens, then the answer."""
    cfg, lat = bench.model.config, bench.latent_ids
    segment = ([lat.start] + [lat.pad] * bench.k + [lat.end] if variant == "latent" else
               [cfg.vision_start_token_id] + [cfg.image_token_id] * problem.image_tokens + [cfg.vision_end_token_id])
    ids = problem.prompt.input_ids.tolist()
    for s in range(N):
        ids += problem.move(s) + segment
    return ids + problem.answer


def test_same_text_around_segments_and_cache_growth(setup):
    bench, problems = setup
    for p in problems:
        for variant in inference.VARIANTS:
            st = paths.trajectory(bench, p, N, variant)
            expected = expected_ids(bench, p, variant)
            assert fed_ids(st)[0].tolist() == expected
            assert st.length == len(expected)  # latent: K+2 per segment; pixel: image tokens + 2
        growth = len(expected_ids(bench, p, "pixel")) - len(expected_ids(bench, p, "latent"))
        assert growth == N * (p.image_tokens - bench.k) and p.image_tokens > bench.k


def test_pixel_path_equals_one_full_forward(setup):
    """Positions fed piece by piece = get_rope_index on the whole sequence; the final state = a no-cache
    forward over the whole sequence with every image's pixels (so the image tokens reached the model)."""
    bench, problems = setup
    model, p = bench.model, problems[1]
    st = paths.trajectory(bench, p, N, "pixel")
    images = [paths.render_state(p, s) for s in range(N)]
    helper = bench.processor.image_processor(images=images, return_tensors="pt")
    ids = fed_ids(st)
    batch = {"input_ids": ids, "mm_token_type_ids": (ids == model.config.image_token_id).long(),
             "image_grid_thw": torch.cat(st.grids),
             "pixel_values": torch.cat([p.prompt.pixel_values, helper["pixel_values"]])}
    assert torch.equal(torch.cat(st.grids[1:]), helper["image_grid_thw"])
    with torch.no_grad():
        positions, _ = rope_positions(model, batch)
        assert torch.equal(torch.cat([pos for _, pos in st.fed], dim=2), positions)
        hidden, _ = run_decoder(model, embed_tokens(model, batch), positions)
    torch.testing.assert_close(st.last, hidden[:, -1], atol=1e-4, rtol=1e-4)


def test_latent_positions_are_text_positions(setup):
    bench, problems = setup
    st = paths.trajectory(bench, problems[0], N, "latent")
    ids = fed_ids(st)
    batch = {"input_ids": ids, "mm_token_type_ids": (ids == bench.model.config.image_token_id).long(),
             "image_grid_thw": torch.cat(st.grids)}
    assert torch.equal(torch.cat([pos for _, pos in st.fed], dim=2), rope_positions(bench.model, batch)[0])


def test_batched_pixel_path_equals_rows_alone(setup):
    """Rows with different image sizes (padded chunks, masked) decode what each decodes alone."""
    bench, problems = setup
    sched = paths.Schedule(text_len=3, segments=N, answer_len=2)
    together = paths.pixel_batch(bench, problems, sched, Clock())
    ids, mask = fed_ids(together), together.mask
    for row, p in enumerate(problems):
        alone = paths.pixel_batch(bench, [p], sched, Clock())
        assert ids[row][mask[row].bool()].tolist() == fed_ids(alone)[0].tolist()
        torch.testing.assert_close(together.last[row], alone.last[0], atol=1e-4, rtol=1e-4)
    assert problems[0].image_tokens != problems[1].image_tokens  # so the shorter chunk was padded


def test_scripted_schedule_opens_every_segment(setup):
    bench, problems = setup
    sched = paths.Schedule(text_len=3, segments=N, answer_len=2)
    clock = Clock()
    results = paths.latent_batch(bench, problems, sched, clock)
    period = sched.text_len + bench.k + 2
    for r in results:
        assert r.latent_segments == [(s * period + sched.text_len + 1, bench.k) for s in range(N)]
        assert len(r.token_ids) == N * period + sched.answer_len
    assert clock.ms["prompt"] > 0


def test_quick_run_writes_json(tmp_path):
    out = tmp_path / "inference.json"
    assert inference.main(["--quick", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["sweep"]) == {"1", "2"} and set(results["throughput"]) == {"1", "4"}
    assert results["flops"]["per_segment"]["pixel"] > results["flops"]["per_segment"]["latent"] > 0
