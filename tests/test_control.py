import copy

import torch

from cnexp.control import build_controlnet
from cnexp.module import ControlNetModule


def _module(tiny_cfg, tiny_base):
    return ControlNetModule(tiny_base, build_controlnet(tiny_base.unet, tiny_cfg.control),
                            tiny_cfg.optim, seed=0)


def _batch(tiny_data, n=4):
    items = [tiny_data.datasets["train"][i] for i in range(n)]
    return {"condition": torch.stack([x["condition"] for x in items]),
            "image": torch.stack([x["image"] for x in items]),
            "caption": [x["caption"] for x in items]}


def test_zero_connectors_make_step0_exactly_the_base(tiny_cfg, tiny_base, tiny_data):
    module = _module(tiny_cfg, tiny_base)
    connectors = [*module.controlnet.controlnet_down_blocks, module.controlnet.controlnet_mid_block]
    assert all(torch.count_nonzero(p) == 0 for c in connectors for p in c.parameters())
    batch = _batch(tiny_data)
    gen = torch.Generator().manual_seed(0)
    latents = module.encode_images(batch["image"], gen)
    noisy = torch.randn(latents.shape, generator=gen)
    t = torch.tensor([10, 300, 600, 999])
    text = module.encode_prompts(batch["caption"])
    with torch.no_grad():
        controlled = module.controlled_prediction(noisy, t, text, batch["condition"])
        plain = tiny_base.unet(noisy, t, encoder_hidden_states=text).sample
    assert torch.equal(controlled, plain)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_cfg, tiny_base, tiny_data):
    module = _module(tiny_cfg, tiny_base)
    module.optim = copy.deepcopy(module.optim)
    module.optim.prompt_dropout = 0.0
    batch = _batch(tiny_data, n=8)

    def loss_at(seed):
        return module.diffusion_loss(batch, torch.Generator().manual_seed(seed))

    with torch.no_grad():
        before = sum(loss_at(s).item() for s in range(4))
    opt = module.configure_optimizers()
    for step in range(30):
        loss = loss_at(step % 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss_at(s).item() for s in range(4))
    assert after < 0.95 * before, (before, after)
    # Only the ControlNet learns; the base is untouched.
    assert all(p.grad is None for p in tiny_base.unet.parameters())


def test_prompt_dropout_drops_per_sample_at_the_configured_rate(tiny_cfg, tiny_base):
    module = _module(tiny_cfg, tiny_base)
    captions = ["a red circle on a blue background"] * 4000
    dropped = module.drop_prompts(captions, torch.Generator().manual_seed(0)).count("")
    assert abs(dropped / 4000 - tiny_cfg.optim.prompt_dropout) < 0.03
    again = module.drop_prompts(captions, torch.Generator().manual_seed(0))
    assert again == module.drop_prompts(captions, torch.Generator().manual_seed(0))
