import torch

from cnexp.control import build_controlnet
from cnexp.encode_cache import FrozenEncoderCache
from cnexp.module import ControlNetModule


def test_cached_encodings_give_the_same_loss_as_encoding_every_step(tiny_cfg, tiny_base, tiny_data):
    items = [tiny_data.datasets["train"][i] for i in range(6)]
    batch = {"condition": torch.stack([x["condition"] for x in items]),
             "image": torch.stack([x["image"] for x in items]),
             "caption": [x["caption"] for x in items],
             "index": torch.tensor([x["index"] for x in items])}
    controlnet = build_controlnet(tiny_base.unet, tiny_cfg.control)
    plain = ControlNetModule(tiny_base, controlnet, tiny_cfg.optim)
    cached = ControlNetModule(tiny_base, controlnet, tiny_cfg.optim, cache=FrozenEncoderCache())
    with torch.no_grad():
        for seed in range(3):  # seed 0 fills the cache, seeds 1-2 read it
            a = plain.diffusion_loss(batch, torch.Generator().manual_seed(seed))
            b = cached.diffusion_loss(batch, torch.Generator().manual_seed(seed))
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert cached.cache.misses == 6 and cached.cache.hits == 12
