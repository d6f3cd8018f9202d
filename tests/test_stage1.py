"""Stage-1 loss: injection, relative target noise, gradients (student only, targets detached),
the alignment written out by hand (h_{i-1} vs e_i, first-pad part, copy baseline), CE against
the stock loss, learning, packed = padded.

Tolerances: injected embeddings exact with noise 0; CE vs the stock loss, the alignment vs
its hand-written form and packed vs padded within 1e-5 (fp32); the noise's relative norm
within 15% of the setting (~100 draws of dimension 64).
"""
from __future__ import annotations

import copy

import pytest
import torch

from data_pipeline.collate import collate_packed, collate_padded
from data_pipeline.encode import encode_record
from ilvr.config import LossConfig
from ilvr.model.inputs import embed_tokens
from ilvr.model.selection import select_targets
from ilvr.model.stage1 import injection_sites, stage1_loss
from tests.factories import vsp_like_record

K = 4


@pytest.fixture(scope="module")
def samples(tiny):
    processor, latent_ids = tiny
    records = [vsp_like_record(n_images=n, n_latent=m, rid=f"r{n}{m}") for n, m in ((2, 3), (1, 1), (0, 2))]
    return [encode_record(r, processor, latent_ids, K, 4096) for r in records]


@pytest.fixture
def batch(tiny, samples):
    return collate_padded(samples, tiny[0].tokenizer.pad_token_id)


def capture_embeds(model) -> list:
    seen = []
    model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    return seen


def test_injected_embeddings_are_the_targets(tiny, tiny_model_factory, batch):
    student, teacher = tiny_model_factory(), tiny_model_factory(seed=1)
    cfg = LossConfig(target_noise=0.0, temperature=1e-4)  # sharp: K* < K, so some pads stay plain
    seen = capture_embeds(student)
    out = stage1_loss(student, teacher, batch, cfg, K)
    sel = select_targets(teacher, batch, cfg, K)
    embeds = seen[0]
    plain = embed_tokens(student, batch).detach()
    injected = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for s, (row, first, _, _) in enumerate(batch["latent_segments"].tolist()):
        n = int(sel.counts[s])
        assert torch.equal(embeds[row, first:first + n], sel.targets[s, :n])
        injected[row, first:first + n] = True
    assert int(sel.counts.sum()) < K * len(sel.counts)
    assert torch.equal(embeds[~injected], plain[~injected])  # other pads keep the pad embedding
    assert out.stats["selected_hist"] == torch.bincount(sel.counts, minlength=K + 1)[1:].tolist()


@pytest.mark.parametrize("relative", [0.05, 0.3])
def test_target_noise_is_relative_reproducible_and_only_in_training(tiny_model_factory, batch, relative):
    student, teacher = tiny_model_factory().train(), tiny_model_factory(seed=1)
    cfg = LossConfig(target_noise=relative)
    seen = capture_embeds(student)
    runs = [stage1_loss(student, teacher, batch, cfg, K, torch.Generator().manual_seed(7)).loss for _ in range(2)]
    assert torch.equal(seen[0], seen[1]) and torch.equal(runs[0], runs[1])
    sites = injection_sites(batch["latent_segments"], select_targets(teacher, batch, cfg, K))
    noise = seen[0][sites.rows, sites.cols] - sites.targets
    ratio = noise.norm(dim=-1) / sites.targets.norm(dim=-1)  # ~ relative whatever the targets' scale
    assert abs(float(ratio.mean()) / relative - 1) < 0.15, float(ratio.mean())
    stage1_loss(student.eval(), teacher, batch, cfg, K, torch.Generator().manual_seed(7))
    assert torch.equal(seen[2][sites.rows, sites.cols], sites.targets)  # no noise outside training


def test_gradients_reach_the_student_not_the_teacher(tiny_model_factory, batch):
    """Even a teacher whose parameters would take gradients gets none: targets are computed without
    grad and detached wherever they enter the loss (the input side and the alignment side)."""
    student = tiny_model_factory().train()
    teacher = copy.deepcopy(student).requires_grad_(True)
    out = stage1_loss(student, teacher, batch, LossConfig(w_ce=0.0), K)
    assert out.align.requires_grad
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.model.language_model.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_no_gradient_through_targets_when_teacher_is_student(tiny, tiny_model_factory, samples):
    """The helper images reach the loss only through the targets: with no input image, a
    gradient in the vision tower could only have come through them."""
    student = tiny_model_factory().train()
    batch = collate_padded([samples[2]], tiny[0].tokenizer.pad_token_id)  # no input image, 2 segments
    out = stage1_loss(student, student, batch, LossConfig(), K)
    out.loss.backward()
    assert out.align.requires_grad and out.align.item() > 0
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in student.model.visual.parameters())


def test_teacher_copy_gives_the_same_loss_as_teacher_is_student(tiny_model_factory, batch):
    student = tiny_model_factory()
    cfg = LossConfig(target_noise=0.0)
    same = stage1_loss(student, student, batch, cfg, K)
    copied = stage1_loss(student, copy.deepcopy(student), batch, cfg, K)
    torch.testing.assert_close(same.loss, copied.loss, atol=1e-6, rtol=0)


def test_ce_equals_the_stock_loss_without_segments(tiny, tiny_model_factory):
    processor, latent_ids = tiny
    records = [vsp_like_record(n_images=n, n_latent=0, rid=f"t{n}") for n in (2, 1)]
    batch = collate_padded([encode_record(r, processor, latent_ids, K, 4096) for r in records],
                           processor.tokenizer.pad_token_id)
    model = tiny_model_factory()
    out = stage1_loss(model, model, batch, LossConfig(w_align=0.0), K)
    with torch.no_grad():
        stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                      pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                      mm_token_type_ids=batch["mm_token_type_ids"]).loss
    torch.testing.assert_close(out.ce, stock, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, stock, atol=1e-5, rtol=1e-5)
    assert out.align.item() == 0.0 and out.stats["segments"] == 0


def test_loss_is_the_weighted_sum_of_its_parts(tiny_model_factory, batch):
    student, teacher = tiny_model_factory(), tiny_model_factory(seed=1)
    out = stage1_loss(student, teacher, batch, LossConfig(w_ce=2.0, w_align=3.0, target_noise=0.0), K)
    torch.testing.assert_close(out.loss, 2.0 * out.ce + 3.0 * out.align)
    assert out.stats["segments"] == 6
    assert sum(out.stats["selected_hist"]) == 6 and 1.0 <= out.stats["selected_mean"] <= K


def test_alignment_pairs_the_state_before_each_pad_with_its_target(tiny, tiny_model_factory, batch):
    """The alignment, its first-pad part and the copy baseline written out pad by pad from an
    independent forward over the injected embeddings: pins h_{i-1} (not h_i) against e_i."""
    from ilvr.model.inputs import rope_positions, run_decoder

    student, teacher = tiny_model_factory(), tiny_model_factory(seed=1)
    cfg = LossConfig(target_noise=0.0, temperature=0.05)
    seen = capture_embeds(student)
    out = stage1_loss(student, teacher, batch, cfg, K)
    sel = select_targets(teacher, batch, cfg, K)
    with torch.no_grad():
        hidden, _ = run_decoder(student, seen[0], rope_positions(student, batch)[0], batch["attention_mask"])
    cos = torch.nn.functional.cosine_similarity
    every, first, later, copy_ = [], [], [], []
    for s, (row, pad, _, _) in enumerate(batch["latent_segments"].tolist()):
        for j in range(int(sel.counts[s])):
            c = float(cos(hidden[row, pad + j - 1], sel.targets[s, j], dim=0))
            every.append(c)
            (first if j == 0 else later).append(c)
            if j:
                copy_.append(float(cos(sel.targets[s, j - 1], sel.targets[s, j], dim=0)))
    assert later and copy_, "the batch needs segments with K* > 1"
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    torch.testing.assert_close(out.align.item(), 1 - mean(every), atol=1e-5, rtol=0)
    for key, want in (("align_first", first), ("align_later", later), ("align_copy", copy_)):
        assert abs(out.stats[key] - mean(want)) < 1e-5, key
    shifted = mean([float(cos(hidden[r, p + j], sel.targets[s, j], dim=0)) for s, (r, p, _, _) in
                    enumerate(batch["latent_segments"].tolist()) for j in range(int(sel.counts[s]))])
    assert abs(shifted - mean(every)) > 1e-3  # h_i instead of h_{i-1} would be told apart


def test_align_loss_decreases_with_a_few_steps(tiny_model_factory, batch):
    student, teacher = tiny_model_factory().train(), tiny_model_factory(seed=1)
    cfg = LossConfig(target_noise=0.0)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(6):
        out = stage1_loss(student, teacher, batch, cfg, K)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append((out.align.item(), out.ce.item()))
    assert history[-1][0] < 0.5 * history[0][0], history
    assert history[-1][1] < history[0][1], history


def test_packed_batch_gives_the_padded_loss(tiny, tiny_model_factory, samples):
    student, teacher = tiny_model_factory(), tiny_model_factory(seed=1)
    cfg = LossConfig(target_noise=0.0, temperature=0.002)
    pad = tiny[0].tokenizer.pad_token_id
    padded = stage1_loss(student, teacher, collate_padded(samples, pad), cfg, K)
    packed = stage1_loss(student, teacher, collate_packed(samples, pad), cfg, K)
    for name in ("loss", "ce", "align"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), atol=1e-5, rtol=1e-5)
    assert packed.stats["selected_hist"] == padded.stats["selected_hist"]
