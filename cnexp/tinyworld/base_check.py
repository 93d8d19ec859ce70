"""Is a tiny-world base a real base for the experiment? It should draw the shape the prompt
names (the semantics a ControlNet builds on) at a place of its own (placement is the control's
job). Both read off samples of the base alone:

    python -m cnexp.tinyworld.base_check base=tiny_dit     # or base=tiny (the UNet); any override

For one-shape scenes (the validation split's seed), the base samples each caption; the largest
drawn shape's kind (cnexp.metrics.shape_kind.drawn_kind) is compared with the caption's:
- kind_acc: the share drawn as the named kind. Chance is 1/3 (three kinds, named equally
  often); the same reading of the real target images gives its ceiling.
- shape_iou: the drawn foreground against where the scene put its shape: low for a base that
  places shapes at random (the real images: 1).
Sampled exactly as a run's evaluation samples at step 0 (cnexp.sampling, the config's
sampling.*: scheduler, steps, guidance, seeds): the baseline's zero connectors leave the base's
prediction unchanged bit for bit, so these are the base's own samples.

Why a base misses the kinds, `--words`: how far the base's prediction (in its training
objective's space) moves when each caption's kind word is swapped for another kind, against
when its colour word is swapped, at three noise levels; and the same for the text encoder's
states. A base that draws kinds moves about as much for either word; the ratio is scale-free,
so bases of different objectives compare.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cnexp.metrics.fidelity import foreground_mask
from cnexp.metrics.shape_kind import drawn_kind
from cnexp.tinyworld.shapes import COLOURS, SHAPES, SPLIT_SEEDS, scene_at

BATCH = 16


def one_shape_scenes(n: int) -> list:
    return [scene_at(SPLIT_SEEDS["val"], i, max_shapes=1) for i in range(n)]


def as_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float().div(255)  # (3, H, W)


@torch.no_grad()
def sample_base(cfg, scenes: list) -> list[np.ndarray]:
    """The base's samples of the scenes' captions, as uint8 (H, W, 3)."""
    from cnexp.sampling import generate, make_pipeline
    from cnexp.train import build_model

    model = build_model(cfg, torch.float32)
    pipe = make_pipeline(model.module, cfg.sampling, progress=False)
    images = []
    for start in range(0, len(scenes), BATCH):
        batch = scenes[start:start + BATCH]
        conditions = torch.stack([as_tensor(s.condition()) for s in batch])
        out = generate(pipe, conditions, [s.caption() for s in batch], cfg.sampling, start)
        images += [(x.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy() for x in out]
    return images


def score(images: list[np.ndarray], scenes: list) -> dict:
    kinds, ious = [], []
    for image, scene in zip(images, scenes):
        drawn, truth = foreground_mask(image), foreground_mask(np.asarray(scene.target()))
        kinds.append(drawn_kind(drawn) == scene.shapes[0].kind)
        ious.append((drawn & truth).sum() / max(1, (drawn | truth).sum()))
    return {"kind_acc": float(np.mean(kinds)), "shape_iou": float(np.mean(ious))}


def swapped_caption(scene, field: str) -> str:
    """The caption of a one-shape scene with its shape's `field` ("kind" or "colour") replaced
    by the next value of its kind (a colour other than the background's)."""
    shape = scene.shapes[0]
    values = SHAPES if field == "kind" else [c for c in COLOURS if c != scene.background]
    now = values.index(getattr(shape, field))
    other = replace(shape, **{field: values[(now + 1) % len(values)]})
    return replace(scene, shapes=(other,)).caption()


@torch.no_grad()
def word_sensitivity(cfg, scenes: list, seed: int = 0) -> dict:
    """Mean squared change of the base's prediction (and of its text states) when the kind
    word, or the colour word, of each caption is swapped; at the schedule's 1/4, 1/2, 3/4."""
    from cnexp.base import load_base
    from cnexp.families.family import get_family

    base, family = load_base(cfg.base), get_family(cfg.base.family)
    images = torch.stack([as_tensor(s.target()) for s in scenes]) * 2 - 1  # (N, 3, H, W)
    latents = family.scale_latents(base, family.latent_moments(base, images).chunk(2, 1)[0])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    captions = [s.caption() for s in scenes]
    texts = {name: family.encode_text(base, c, "cpu") for name, c in (
        ("true", captions), ("kind", [swapped_caption(s, "kind") for s in scenes]),
        ("colour", [swapped_caption(s, "colour") for s in scenes]))}
    change = {"text": {w: (texts[w] - texts["true"]).pow(2).mean().item()
                       for w in ("kind", "colour")}}
    for t in family.spread_timesteps(base, 5, "cpu")[1:-1]:
        steps = t.repeat(len(scenes))
        noisy = family.noised(base, latents, noise, steps)
        pred = {w: family.loss_prediction(base, family.predict(base, noisy, steps, x), noisy, steps)
                for w, x in texts.items()}
        change[f"t={t.item():g}"] = {w: (pred[w] - pred["true"]).pow(2).mean().item()
                                     for w in ("kind", "colour")}
    for row in change.values():
        row["kind/colour"] = row["kind"] / max(row["colour"], 1e-12)
    return change


def check(cfg, images: int) -> dict:
    scenes = one_shape_scenes(images)
    real = score([np.asarray(s.target()) for s in scenes], scenes)
    return {"base": cfg.base.name, "pretrained": str(cfg.base.pretrained), "images": images,
            "chance_kind_acc": 1 / 3, "real": real, "sampled": score(sample_base(cfg, scenes),
                                                                     scenes)}


def main(argv=None) -> dict:
    from cnexp.data.check_cli import compose

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="as run.py takes them: base=tiny_dit")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--words", action="store_true",
                        help="also: how much the prediction moves for the kind word vs the colour")
    args = parser.parse_args(argv)
    cfg = compose(args.overrides)
    result = check(cfg, args.images)
    if args.words:
        result["words"] = word_sensitivity(cfg, one_shape_scenes(min(args.images, 64)))
        for where, row in result["words"].items():
            print(f"{where}: squared change, kind word swapped {row['kind']:.4g}, colour "
                  f"{row['colour']:.4g}, ratio {row['kind/colour']:.3f}")
    sampled, real = result["sampled"], result["real"]
    print(f"base={cfg.base.name}: {args.images} one-shape captions; kind_acc "
          f"{sampled['kind_acc']:.3f} (chance 0.333, real images {real['kind_acc']:.3f}); "
          f"shape_iou {sampled['shape_iou']:.3f} (real images {real['shape_iou']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
