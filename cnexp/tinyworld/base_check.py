"""Is a tiny-world base a real base for the experiment? It should draw the shape the prompt
names (the semantics a ControlNet builds on) at a place of its own (placement is the control's
job). Both read off samples of the base alone, no ControlNet:

    python -m cnexp.tinyworld.base_check assets/tinydit     # or assets/tinyworld (the UNet)

For one-shape scenes (the validation split's seed), the base samples each caption; the largest
drawn shape's kind (cnexp.metrics.shape_kind.drawn_kind) is compared with the caption's:
- kind_acc: the share drawn as the named kind. Chance is 1/3 (three kinds, named equally
  often); the same reading of the real target images gives its ceiling.
- shape_iou: the drawn foreground against where the scene put its shape: low for a base that
  places shapes at random (the real images: 1).
Sampling as the tiny presets evaluate: 10 steps, guidance 3.0, DDIM for a UNet base (cnexp's
sampling.scheduler default), the base's own flow scheduler for a transformer; image i from
noise seeded i.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cnexp.families.sd3_control import NO_T5_TOKENS
from cnexp.metrics.fidelity import foreground_mask
from cnexp.metrics.shape_kind import drawn_kind
from cnexp.tinyworld.shapes import SPLIT_SEEDS, scene_at

STEPS, GUIDANCE, BATCH = 10, 3.0, 16


def one_shape_scenes(n: int) -> list:
    return [scene_at(SPLIT_SEEDS["val"], i, max_shapes=1) for i in range(n)]


def load_base(path: Path):
    from diffusers import DDIMScheduler, DiffusionPipeline

    index = json.loads((path / "model_index.json").read_text())
    absent = {name: None for name, value in index.items() if value == [None, None]}  # no T5
    pipe = DiffusionPipeline.from_pretrained(str(path), **absent)
    if hasattr(pipe, "unet"):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, captions: list[str]) -> list[np.ndarray]:
    # an SD3 bundle without T5 was trained with no T5 rows (cnexp.families.sd3_control)
    extra = {"max_sequence_length": NO_T5_TOKENS} if hasattr(pipe, "text_encoder_3") and \
        pipe.text_encoder_3 is None else {}
    images = []
    for start in range(0, len(captions), BATCH):
        batch = captions[start:start + BATCH]
        generators = [torch.Generator().manual_seed(start + i) for i in range(len(batch))]
        out = pipe(prompt=batch, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   generator=generators, height=64, width=64, output_type="np",
                   **extra).images
        images += [(np.clip(image, 0, 1) * 255).round().astype(np.uint8) for image in out]
    return images


def score(images: list[np.ndarray], scenes: list) -> dict:
    kinds, ious = [], []
    for image, scene in zip(images, scenes):
        drawn, truth = foreground_mask(image), foreground_mask(np.asarray(scene.target()))
        kinds.append(drawn_kind(drawn) == scene.shapes[0].kind)
        ious.append((drawn & truth).sum() / max(1, (drawn | truth).sum()))
    return {"kind_acc": float(np.mean(kinds)), "shape_iou": float(np.mean(ious))}


def check(path: Path, images: int) -> dict:
    scenes = one_shape_scenes(images)
    real = score([np.asarray(s.target()) for s in scenes], scenes)
    with torch.no_grad():
        base = score(sample(load_base(path), [s.caption() for s in scenes]), scenes)
    return {"base": str(path), "images": images, "chance_kind_acc": 1 / 3,
            "real": real, "sampled": base}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="a tiny-world base directory (assets/tinydit)")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = check(args.base, args.images)
    sampled, real = result["sampled"], result["real"]
    print(f"{args.base}: {args.images} one-shape captions; kind_acc {sampled['kind_acc']:.3f} "
          f"(chance 0.333, real images {real['kind_acc']:.3f}); shape_iou "
          f"{sampled['shape_iou']:.3f} (real images {real['shape_iou']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
