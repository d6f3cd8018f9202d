"""Do the latents carry the state? A linear probe from fed-back latent states to the player's square (VSP).

    python -m ilvr.evaluation.latent_probe --model EXPORT --shards TEST_SHARDS [--limit 300] [--out probe.json]

The model answers held-out maps in latent mode ("Move R." + a latent segment per move); the K
states fed back in segment s are recorded (generate(record_latents=True)) and labelled with the
square the player stands on after the model's own first s+1 moves (simulated on the map). A
multinomial logistic regression on half of the maps predicts row and column on the other half.
Two references say what the probe's accuracy means:
  - majority: always the most frequent row / column of the training half;
  - step-only control: the same probe on the latents of ANOTHER map at the same step (what the
    step index and the model's generic behaviour alone predict).
A probe well above both reads the position from the latent contents.
"""
from __future__ import annotations

import argparse
import json
import re

import torch

from data_pipeline.encode import encode_prompt
from data_pipeline.vsp_world import simulate
from ilvr.model.generate import LATENT_MARKER, generate

MOVE = re.compile(r"Move ([LRUD])")


def latent_examples(em, records, batch_size: int = 50, max_new_tokens: int = 200):
    """(features [N, K*H], rows [N], cols [N], map index [N], step [N]) over every complete latent segment
    whose preceding text named a move."""
    feats, rows, cols, owner, steps = [], [], [], [], []
    k = em.latent_size
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        prompts = [encode_prompt(r, em.processor) for r in batch]
        results = generate(em.model, prompts, em.processor.tokenizer, em.latent_ids, k, mode="latent",
                           max_new_tokens=max_new_tokens, latent_norm=em.latent_norm, record_latents=True)
        for i, (record, res) in enumerate(zip(batch, results)):
            if res.latent_inputs is None:
                continue
            pieces = res.text.split(LATENT_MARKER)[:-1]  # text before each segment
            moves = []
            for s, (text, (_, n_pads)) in enumerate(zip(pieces, res.latent_segments)):
                named = MOVE.findall(text)
                if not named or n_pads != k:
                    break
                moves.append(named[-1])
                pos = simulate(record.meta["map_desc"], moves).final
                feats.append(res.latent_inputs[s * k:(s + 1) * k].reshape(-1).float())
                rows.append(pos[0])
                cols.append(pos[1])
                owner.append(start + i)
                steps.append(s)
    if not feats:
        return None
    return torch.stack(feats), torch.tensor(rows), torch.tensor(cols), torch.tensor(owner), torch.tensor(steps)


def fit_probe(x_train, y_train, x_test, y_test, classes: int, iters: int = 300, l2: float = 1e-3) -> float:
    """Test accuracy of a multinomial logistic regression (standardised features, L-BFGS)."""
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    xtr, xte = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(xtr.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, y_train) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1) == y_test).float().mean())


def probe(examples, seed: int = 0) -> dict:
    """Row / column accuracy of the probe, the majority rate and the step-only control, on held-out maps."""
    x, rows, cols, owner, steps = examples
    g = torch.Generator().manual_seed(seed)
    maps = owner.unique()
    test_maps = maps[torch.randperm(len(maps), generator=g)[: len(maps) // 2]]
    test = torch.isin(owner, test_maps)
    # control: each example's features replaced by those of another map's example at the same step
    control = x.clone()
    for s in steps.unique():
        idx = (steps == s).nonzero().squeeze(1)
        control[idx] = x[idx[torch.roll(torch.arange(len(idx)), 1)]] if len(idx) > 1 else x[idx]
    out = {"examples": int(len(x)), "maps": int(len(maps)), "test_examples": int(test.sum())}
    for name, y in (("row", rows), ("col", cols)):
        classes = int(y.max()) + 1
        majority = float((y[test] == y[~test].mode().values).float().mean())
        out[name] = {
            "probe": fit_probe(x[~test], y[~test], x[test], y[test], classes),
            "step_only_control": fit_probe(control[~test], y[~test], control[test], y[test], classes),
            "majority": majority,
        }
    return out


def main(argv: "list[str] | None" = None) -> int:
    from ilvr.evaluation.data import load_records
    from ilvr.evaluation.loading import load_eval_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported ILVR model (latent steps after each move)")
    p.add_argument("--shards", required=True, help="held-out VSP shards (records with meta.map_desc)")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--out", default=None, help="write the result JSON here too")
    args = p.parse_args(argv)
    em = load_eval_model(args.model)
    em.model.eval()
    records = load_records(args.shards, limit=args.limit).records
    with torch.no_grad():
        examples = latent_examples(em, records, max_new_tokens=args.max_new_tokens)
    result = {"error": "no complete latent segment after a 'Move X.' step"} if examples is None else probe(examples)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0 if examples is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
