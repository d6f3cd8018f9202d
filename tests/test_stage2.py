"""Stage 2 (free-running latents): the KV-cache lockstep forward equals the n+1-pass reference.

Equality is checked in float64. The stock RMSNorm rounds through float32 whatever the
model dtype, which alone puts ~1e-8 relative noise on the gradients; so the exact check
swaps the test model's norms for a float64 one (same math) and asks for atol 1e-10,
rtol 1e-8 (observed: loss equal, gradients within 1e-16), and the stock model is checked at 1e-6 of each gradient's scale.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from data_pipeline.collate import collate_packed, collate_padded
from data_pipeline.encode import encode_record
from ilvr.model.inputs import embed_tokens, rope_positions, run_decoder
from ilvr.model.stage2 import text_ce, naive_stage2_loss, stage2_loss
from tests.factories import vsp_like_record

K = 3
TOL = {"atol": 1e-10, "rtol": 1e-8}


class _Float64RMSNorm(torch.nn.Module):
    """The RMSNorm formula without the float32 round trip (assigned as a test model's norms' class)."""

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _exact_float64(model):
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.__class__ = type("Exact" + type(module).__name__, (_Float64RMSNorm, type(module)), {})
    return model


def _batch(tiny, specs):
    """specs: (n_images, n_latent) per sample; image sizes kept small for speed."""
    processor, latent_ids = tiny
    records = [vsp_like_record(n_images=n, n_latent=m, rid=f"r{i}", sizes=(56, 84)) for i, (n, m) in enumerate(specs)]
    samples = [encode_record(r, processor, latent_ids, K, 4096) for r in records]
    return samples, collate_padded(samples, processor.tokenizer.pad_token_id)


def _decoder_calls(model):
    """Record (inputs_embeds, output hidden) of every text-decoder call; returns (records, hook handle)."""
    calls = []

    def hook(module, args, kwargs, out):
        calls.append((kwargs["inputs_embeds"].detach(), out.last_hidden_state.detach()))

    return calls, model.model.language_model.register_forward_hook(hook, with_kwargs=True)


def _loss_and_grads(fn, model, batch):
    model.zero_grad(set_to_none=True)
    out = fn(model, batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("specs", [[(2, 3)], [(2, 3), (1, 1), (0, 0)]], ids=["B1", "B3"])
def test_matches_naive_loss_and_gradients_in_float64(tiny, tiny_model_factory, specs):
    model = _exact_float64(tiny_model_factory(dtype=torch.float64))
    _, batch = _batch(tiny, specs)
    assert len({int(n) for n in batch["attention_mask"].sum(1)}) == len(specs)  # different lengths
    ours, g_ours = _loss_and_grads(stage2_loss, model, batch)
    ref, g_ref = _loss_and_grads(naive_stage2_loss, model, batch)
    torch.testing.assert_close(ours.loss, ref.loss, **TOL)
    assert g_ours.keys() == g_ref.keys() and len(g_ref) == len(list(model.parameters()))
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], **TOL, msg=name)
    for key in ("latent_fed_norm", "token_embed_norm", "latent_steps"):
        assert ours.stats[key] == pytest.approx(ref.stats[key], rel=1e-9)
    assert ours.stats["latent_steps"] == K * sum(m for _, m in specs)
    # the latents must matter: feeding the pads' token embeddings instead gives another loss
    with torch.no_grad():
        hidden, _ = run_decoder(model, embed_tokens(model, batch), rope_positions(model, batch)[0],
                                batch["attention_mask"])
        assert abs(float(text_ce(model, hidden, batch["labels"])) - float(ref.loss)) > 1e-6


def test_latent_rescale_matches_naive_and_feeds_states_at_the_given_norm(tiny, tiny_model_factory):
    """model.latent_rescale: both implementations feed h * norm / ||h|| (gradients through the rescale
    included), and the loss differs from the unscaled one."""
    model = _exact_float64(tiny_model_factory(dtype=torch.float64))
    _, batch = _batch(tiny, [(2, 3), (1, 1)])
    fn = lambda f: (lambda m, b: f(m, b, latent_norm=0.3))  # noqa: E731
    ours, g_ours = _loss_and_grads(fn(stage2_loss), model, batch)
    ref, g_ref = _loss_and_grads(fn(naive_stage2_loss), model, batch)
    torch.testing.assert_close(ours.loss, ref.loss, **TOL)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], **TOL, msg=name)
    fed_mean = ours.stats["fed_sum"] / ours.stats["fed_count"]
    assert float(fed_mean.norm()) <= 0.3 + 1e-9  # a mean of vectors of norm 0.3
    seen = []
    model.model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        stage2_loss(model, batch, latent_norm=0.3)
    steps = [x for x in seen if x.shape[1] == 1]  # latent steps feed one position each
    norms = torch.cat([x[:, 0].norm(dim=-1) for x in steps])
    assert steps and torch.allclose(norms[norms > 0.01], torch.tensor(0.3, dtype=norms.dtype))
    plain = stage2_loss(model, batch)
    assert abs(float(plain.loss.detach()) - float(ours.loss.detach())) > 1e-6


@pytest.mark.parametrize("latent_norm", [None, 0.3])
def test_checkpointed_calls_give_the_plain_loss_and_gradients(tiny, tiny_model_factory, latent_norm):
    """Activation checkpointing per decoder call (the KV cache rebuilt inside each checkpointed call):
    float64 loss and every gradient equal to the plain KV-cache run, which equals the naive reference."""
    model = _exact_float64(tiny_model_factory(dtype=torch.float64)).train()
    _, batch = _batch(tiny, [(2, 3), (1, 1), (0, 0)])
    plain, g_plain = _loss_and_grads(lambda m, b: stage2_loss(m, b, latent_norm=latent_norm), model, batch)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ckpt, g_ckpt = _loss_and_grads(
            lambda m, b: stage2_loss(m, b, latent_norm=latent_norm, checkpoint_calls=True), model, batch)
    torch.testing.assert_close(ckpt.loss, plain.loss, **TOL)
    assert g_ckpt.keys() == g_plain.keys()
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], **TOL, msg=name)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(-t.numel()) or t, lambda t: t):
        _loss_and_grads(lambda m, b: stage2_loss(m, b, latent_norm=latent_norm), model, batch)
    kept_ckpt = sum(n for n in saved if n > 0)
    kept_plain = -sum(n for n in saved if n < 0)
    assert kept_ckpt < 0.7 * kept_plain, (kept_ckpt, kept_plain)  # activations saved for backward


def test_stock_norms_match_naive_to_float32_noise(tiny, tiny_model_factory):
    model = tiny_model_factory(dtype=torch.float64)
    _, batch = _batch(tiny, [(2, 3), (1, 1), (0, 0)])
    ours, g_ours = _loss_and_grads(stage2_loss, model, batch)
    ref, g_ref = _loss_and_grads(naive_stage2_loss, model, batch)
    torch.testing.assert_close(ours.loss, ref.loss, atol=1e-9, rtol=1e-7)
    for name in g_ref:
        scale = float(g_ref[name].abs().max())
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-6 * scale + 1e-12, rtol=0, msg=name)


def test_pads_receive_the_previous_hidden_state(tiny, tiny_model_factory):
    """B=1: every latent step's input is exactly the previous call's last output; chunks end with
    <|latent_start|> and restart at <|latent_end|>; the naive reference's final pass agrees."""
    _, latent_ids = tiny
    model = tiny_model_factory(dtype=torch.float64)
    _, batch = _batch(tiny, [(1, 3)])
    table = model.get_input_embeddings().weight.detach()
    calls, handle = _decoder_calls(model)
    with torch.no_grad():
        stage2_loss(model, batch)
    steps = [i for i, (x, _) in enumerate(calls) if x.shape[1] == 1]  # chunks here are >= 2 tokens
    assert len(steps) == 3 * K and len(calls) == 3 * K + 4
    for i in steps:
        torch.testing.assert_close(calls[i][0][0, 0], calls[i - 1][1][0, -1], atol=0, rtol=0)
    chunks = [x[0] for i, (x, _) in enumerate(calls) if i not in steps]
    for before, after in itertools.pairwise(chunks):
        torch.testing.assert_close(before[-1], table[latent_ids.start], atol=0, rtol=0)
        torch.testing.assert_close(after[0], table[latent_ids.end], atol=0, rtol=0)
    calls.clear()
    with torch.no_grad():
        naive_stage2_loss(model, batch)
    handle.remove()
    x, out = calls[-1]
    pads = (batch["input_ids"][0] == latent_ids.pad).nonzero()[:, 0]
    assert len(pads) == 3 * K
    torch.testing.assert_close(x[0, pads], out[0, pads - 1], atol=1e-10, rtol=1e-8)


def test_decoder_call_counts(tiny, tiny_model_factory):
    model = tiny_model_factory()
    _, batch = _batch(tiny, [(2, 3), (1, 1), (0, 0)])
    calls, handle = _decoder_calls(model)
    with torch.no_grad():
        out = stage2_loss(model, batch)
        s_max = 3
        assert len(calls) == (s_max + 1) + s_max * K == out.stats["decoder_calls"]
        calls.clear()
        naive_stage2_loss(model, batch)
        assert len(calls) == s_max * K + 1  # n + 1 full passes, n = most pads in a row
        assert all(x.shape[1] == batch["input_ids"].shape[1] for x, _ in calls)
    handle.remove()


def test_padding_calls_for_other_ranks_changes_nothing_but_the_count(tiny, tiny_model_factory):
    """ZeRO-3 ranks must make the same calls: a rank with fewer segments pads with hole-only calls."""
    model = tiny_model_factory()
    _, batch = _batch(tiny, [(1, 1), (0, 0)])  # this rank: 1 segment; another rank has 3
    calls, handle = _decoder_calls(model)
    with torch.no_grad():
        plain = stage2_loss(model, batch)
        calls.clear()
        padded = stage2_loss(model, batch, always_run_vision=True, min_segments=3, min_steps=K)
    handle.remove()
    assert len(calls) == (3 + 1) + 3 * K == padded.stats["decoder_calls"]
    torch.testing.assert_close(padded.loss, plain.loss, atol=1e-6, rtol=1e-6)


def test_loss_decreases_with_sgd(tiny, tiny_model_factory):
    model = tiny_model_factory().train()
    _, batch = _batch(tiny, [(1, 2), (0, 1)])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        out = stage2_loss(model, batch)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses


def test_rejects_packed_batches_and_gradient_checkpointing(tiny, tiny_model_factory):
    samples, batch = _batch(tiny, [(0, 1)])
    model = tiny_model_factory()
    with pytest.raises(ValueError, match="packing=false"):
        stage2_loss(model, collate_packed(samples, tiny[0].tokenizer.pad_token_id))
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        stage2_loss(model.train(), batch)

