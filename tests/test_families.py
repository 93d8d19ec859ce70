"""Base families (cnexp/families/): the training step asks the base's family for its objective,
so a family module dropped in changes what is trained, with nothing else edited."""
import dataclasses

import torch
import torch.nn.functional as F

from cnexp.control import build_controlnet
from cnexp.families.family import FAMILIES, get_family
from conftest import compose_cfg
from cnexp.module import ControlNetModule

FLOW = '''
import torch

from cnexp.families.family import register
from cnexp.families.sd import StableDiffusionFamily


@register
class ToyFlowFamily(StableDiffusionFamily):
    """The tiny UNet trained as a rectified flow: x_s = (1 - s) x + s noise, target noise - x."""
    name = "toy_flow"

    def timesteps(self, base, draw, n, generator):
        return draw(torch.rand, (n,), generator) * 999

    def noised(self, base, latents, noise, t):
        s = (t / 1000).view(-1, 1, 1, 1)
        return (1 - s) * latents + s * noise

    def target(self, base, latents, noise, t):
        return noise - latents
'''


def test_the_tiny_world_is_the_sd_family():
    assert get_family(None) is get_family("sd")  # a config from before the knob
    assert {"sd": "sd", "sdxl": "sdxl", "sd3": "sd3"}.items() <= FAMILIES.declared().items()
    assert compose_cfg([]).base.family == "sd"


def test_a_toy_family_owns_the_training_objective(toy_package, tiny_cfg, tiny_base):
    toy_package("toy_families", FLOW)
    __import__("toy_families.toy")
    try:
        base = dataclasses.replace(tiny_base, family="toy_flow")
        module = ControlNetModule(base, build_controlnet(base.unet, tiny_cfg.control),
                                  tiny_cfg.optim)
        batch = {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "condition": torch.rand(2, 3, 64, 64),
                 "caption": ["a red circle", "a blue square"]}
        with torch.no_grad():
            loss = module.diffusion_loss(batch, torch.Generator().manual_seed(0))
            # the same draws by hand, in the step's order, with the flow's objective
            generator = torch.Generator().manual_seed(0)
            latents = module.encode_images(batch["image"], generator)
            text = module.dropped_prompt_embeddings(batch["caption"], generator)
            noise = torch.randn(latents.shape, generator=generator)
            s = (torch.rand((2,), generator=generator) * 999 / 1000).view(-1, 1, 1, 1)
            pred = module.controlled_prediction((1 - s) * latents + s * noise, s.view(-1) * 1000,
                                                text, batch["condition"])
            expected = F.mse_loss(pred, noise - latents)
            sd_loss = ControlNetModule(tiny_base, module.controlnet, tiny_cfg.optim
                                       ).diffusion_loss(batch, torch.Generator().manual_seed(0))
        torch.testing.assert_close(loss, expected)
        assert not torch.isclose(loss, sd_loss)  # the family, not the module, chose it
    finally:
        FAMILIES.unregister("toy_flow")
