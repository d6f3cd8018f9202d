"""Latent generation: well-formed segments, cache == recompute, batch == one by one, stock parity, modes.

A random tiny model rarely opens a latent segment by itself, so most tests add a logit
bias to <|latent_start|> with a forward hook on lm_head (0.4 gives a mix of text and
latent segments on these prompts; 100 forces a segment at every text step).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from data_pipeline.encode import encode_prompt
from ilvr.model.generate import LATENT_MARKER, generate, left_pad_prompts
from tests.factories import logit_bias, vsp_like_record

K = 4
MIX = 0.4  # logit bias on <|latent_start|>: a mix of text and latent segments
FORCE = 100.0  # a segment whenever text is decoded


@pytest.fixture(scope="module")
def setup(tiny, tiny_model_factory):
    """(model, tokenizer, latent ids, prompts of 3 lengths: no image, one image, two images).

    One intra-op thread while these tests run: the model is tiny and hundreds of one-token
    steps run, so on a shared CPU extra threads only spin (10-100x slower when loaded).
    """
    processor, latent_ids = tiny
    prompts = [encode_prompt(vsp_like_record(n_images=n, rid=f"p{n}"), processor) for n in (0, 1, 2)]
    assert len({p.input_ids.numel() for p in prompts}) == 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tiny_model_factory(), processor.tokenizer, latent_ids, prompts
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def captured_logits(model):
    """Collect every lm_head output as [B, V] (stock generate keeps only the last position too)."""
    outputs = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: outputs.append(out.reshape(out.shape[0], -1)))
    try:
        yield outputs
    finally:
        handle.remove()


def assert_well_formed(result, latent_ids, k=K):
    """Every start is followed by k pads then end (unless cut by the end of the ids); no stray pad/end."""
    ids, segments, i = result.token_ids, [], 0
    while i < len(ids):
        assert ids[i] not in (latent_ids.pad, latent_ids.end), f"stray latent id at {i}: {ids}"
        if ids[i] == latent_ids.start:
            pads = ids[i + 1:i + 1 + k]
            assert pads == [latent_ids.pad] * len(pads)
            segments.append((i + 1, len(pads)))
            if i + 1 + k < len(ids):
                assert ids[i + 1 + k] == latent_ids.end
            i += k + 2
        else:
            i += 1
    assert result.latent_segments == segments
    assert result.num_latent_segments == len(segments) == result.text.count(LATENT_MARKER)


def test_latent_segments_are_well_formed(setup):
    model, tokenizer, latent_ids, prompts = setup
    with logit_bias(model, latent_ids.start, MIX):
        results = generate(model, prompts, tokenizer, latent_ids, K, max_new_tokens=40)
    for r, p in zip(results, prompts):
        assert r.id == p.id and len(r.token_ids) == 40 and not r.finished
        assert_well_formed(r, latent_ids)
        assert r.num_latent_segments >= 3
    # text between segments too, not only back-to-back latents
    assert any(len(r.text.replace(LATENT_MARKER, "")) > 0 for r in results)


@pytest.mark.parametrize("rows", [[2], [0, 1, 2]])
def test_cache_equals_recompute(setup, rows):
    model, tokenizer, latent_ids, prompts = setup
    chosen = [prompts[i] for i in rows]
    with logit_bias(model, latent_ids.start, MIX):
        cached = generate(model, chosen, tokenizer, latent_ids, K, max_new_tokens=30)
        full = generate(model, chosen, tokenizer, latent_ids, K, max_new_tokens=30, use_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in full]
    assert sum(r.num_latent_segments for r in cached) >= 2


def test_batched_equals_one_by_one(setup):
    model, tokenizer, latent_ids, prompts = setup
    with logit_bias(model, latent_ids.start, MIX):
        batched = generate(model, prompts, tokenizer, latent_ids, K, max_new_tokens=30)
        alone = [generate(model, [p], tokenizer, latent_ids, K, max_new_tokens=30)[0] for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.latent_segments for r in batched] == [r.latent_segments for r in alone]


def test_a_finished_row_stops_and_the_others_go_on(setup):
    model, tokenizer, latent_ids, prompts = setup
    eos = tokenizer.eos_token_id
    with logit_bias(model, latent_ids.start, MIX):
        plain = generate(model, prompts, tokenizer, latent_ids, K, max_new_tokens=20)
        with logit_bias(model, eos, 100.0, row=0):
            stopped = generate(model, prompts, tokenizer, latent_ids, K, max_new_tokens=20)
    assert stopped[0].token_ids == [eos] and stopped[0].finished and stopped[0].text == ""
    assert [r.token_ids for r in stopped[1:]] == [r.token_ids for r in plain[1:]]


def test_text_mode_matches_stock_generate_and_emits_no_latents(setup):
    """Positions of new tokens (left padding, images, rope_deltas) as in stock transformers generation."""
    model, tokenizer, latent_ids, prompts = setup
    batch = left_pad_prompts(prompts, tokenizer.pad_token_id, "cpu")
    with logit_bias(model, latent_ids.start, FORCE):
        with captured_logits(model) as ours_logits:
            ours = generate(model, prompts, tokenizer, latent_ids, K, mode="text", max_new_tokens=16)
        with captured_logits(model) as stock_logits, torch.no_grad():
            stock = model.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                   suppress_tokens=list(latent_ids.as_tuple()))
    assert [r.token_ids for r in ours] == stock[:, batch["input_ids"].shape[1]:].tolist()
    torch.testing.assert_close(torch.stack(ours_logits), torch.stack(stock_logits), atol=1e-5, rtol=1e-5)
    for r in ours:
        assert not set(r.token_ids) & set(latent_ids.as_tuple()) and r.num_latent_segments == 0


def _fed_latents(model, pad_id, run):
    """Run `run()` and return, per batch row, [(latent input, previous final hidden)] at every pad step."""
    inputs, outputs = [], []
    lm = model.model.language_model
    pre = lm.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(kwargs["inputs_embeds"]), with_kwargs=True)
    post = lm.register_forward_hook(lambda m, args, out: outputs.append(out.last_hidden_state))
    try:
        results = run()
    finally:
        pre.remove()
        post.remove()
    # a calibration pass (ablation modes) comes first: keep the calls of the last pass only
    calls = max(len(r.token_ids) for r in results)
    inputs, outputs = inputs[-calls:], outputs[-calls:]
    # generated token j is fed at decoder call j + 1; the state fed back comes out of call j
    fed = [[(inputs[j + 1][b, 0], outputs[j][b, -1]) for j, t in enumerate(r.token_ids)
            if t == pad_id and j + 1 < len(inputs)] for b, r in enumerate(results)]
    return results, fed


@pytest.mark.parametrize("constant", [None, "zeros"])
def test_constant_latent_feeds_a_constant_and_keeps_the_structure(setup, constant):
    """The constant is the one given (the export's fed_mean) or, by default, the mean of the states the
    batch feeds back in latent mode: the ablation keeps the fed-back states' scale."""
    model, tokenizer, latent_ids, prompts = setup
    vector = torch.zeros(model.config.text_config.hidden_size) if constant == "zeros" else None
    with logit_bias(model, latent_ids.start, FORCE):  # segments regardless of the random weights

        def run(mode):
            return generate(model, prompts[:2], tokenizer, latent_ids, K, mode=mode, max_new_tokens=20,
                            constant_latent=vector)

        latent, fed_latent = _fed_latents(model, latent_ids.pad, lambda: run("latent"))
        const, fed_const = _fed_latents(model, latent_ids.pad, lambda: run("constant-latent"))
    expected = vector if vector is not None else torch.stack([g for row in fed_latent for g, _ in row]).mean(0)
    for results, fed in ((latent, fed_latent), (const, fed_const)):
        for r in results:
            assert_well_formed(r, latent_ids)
        assert sum(len(f) for f in fed) >= 2 * K
    for row in fed_latent:  # the model's own previous state is fed back ...
        for given, previous in row:
            torch.testing.assert_close(given, previous)
            assert not torch.allclose(given, expected)
    for row in fed_const:  # ... or the constant
        for given, _ in row:
            torch.testing.assert_close(given, expected)
    if vector is None:  # at the fed-back states' scale, not the token embeddings' (~1000x smaller)
        own = torch.stack([g for row in fed_latent for g, _ in row]).norm(dim=-1).mean()
        assert float(expected.norm()) > 0.3 * float(own)


def test_shuffled_latent_feeds_the_next_samples_latents(setup):
    model, tokenizer, latent_ids, prompts = setup
    with logit_bias(model, latent_ids.start, FORCE):
        run = lambda mode: generate(model, prompts, tokenizer, latent_ids, K, mode=mode,  # noqa: E731
                                    max_new_tokens=20)
        latent, fed_latent = _fed_latents(model, latent_ids.pad, lambda: run("latent"))
        shuffled, fed_shuffled = _fed_latents(model, latent_ids.pad, lambda: run("shuffled-latent"))
    donors = [[g for g, _ in row] for row in fed_latent]
    for b, row in enumerate(fed_shuffled):
        assert_well_formed(shuffled[b], latent_ids)
        donor = donors[(b + 1) % len(donors)]
        assert row and donor
        for n, (given, _) in enumerate(row):
            torch.testing.assert_close(given, donor[n % len(donor)])
            assert not torch.allclose(given, donors[b][n % len(donors[b])])
    with pytest.raises(ValueError, match="batch of >= 2"):
        generate(model, prompts[:1], tokenizer, latent_ids, K, mode="shuffled-latent", max_new_tokens=4)


def test_latent_norm_rescales_every_fed_back_state(setup):
    model, tokenizer, latent_ids, prompts = setup
    with logit_bias(model, latent_ids.start, FORCE):
        _, fed = _fed_latents(model, latent_ids.pad, lambda: generate(
            model, prompts[:2], tokenizer, latent_ids, K, mode="latent", max_new_tokens=12, latent_norm=0.25))
    pairs = [p for row in fed for p in row]
    assert len(pairs) >= K
    for given, previous in pairs:
        assert abs(float(given.norm()) - 0.25) < 1e-5 and float(previous.norm()) > 1.0
        torch.testing.assert_close(given, previous * (0.25 / previous.norm()))


def test_sampling_is_reproducible_with_a_generator(setup):
    model, tokenizer, latent_ids, prompts = setup

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompts, tokenizer, latent_ids, K, max_new_tokens=20, do_sample=True,
                        temperature=0.8, top_p=0.9, generator=g)

    with logit_bias(model, latent_ids.start, MIX):
        a, b, c = sample(0), sample(0), sample(1)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    for r in a + c:
        assert_well_formed(r, latent_ids)


def test_max_new_tokens_cuts_inside_a_segment(setup):
    model, tokenizer, latent_ids, prompts = setup
    with logit_bias(model, latent_ids.start, FORCE):
        for n, segments in ((1, [(1, 0)]), (4, [(1, 3)]), (7, [(1, K), (7, 0)])):
            r = generate(model, prompts[:1], tokenizer, latent_ids, K, max_new_tokens=n)[0]
            assert len(r.token_ids) == n and not r.finished and r.latent_segments == segments
            assert_well_formed(r, latent_ids)


def test_bad_arguments(setup):
    model, tokenizer, latent_ids, prompts = setup
    with pytest.raises(ValueError):
        generate(model, prompts, tokenizer, latent_ids, K, mode="pixels")
    with pytest.raises(ValueError):
        generate(model, prompts, tokenizer, latent_ids, 0)
    assert generate(model, [], tokenizer, latent_ids, K) == []
