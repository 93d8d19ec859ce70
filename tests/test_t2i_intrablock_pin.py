"""cnexp/control/t2i_adapter.py's intrablock_features re-implements where
`UNet2DConditionModel.forward` (diffusers) adds `down_intrablock_additional_residuals`: with a
plain sum as the join it must give the stock UNet's output exactly, on the SD 1.5 layout and the
tiny world's (whose first block does not attend and whose last feature enters after the middle
block, as T2I-Adapter-XL's). A diffusers upgrade that moves those additions fails here."""
import pytest
import torch
from omegaconf import OmegaConf

from cnexp.control import get_branch
from cnexp.control.t2i_adapter import intrablock_features
from test_arm_t2i_adapter import sd_layout_unet


def features_for(unet, tiny_cfg, size):
    """Random (non-zero) features of the shapes the adapter built for this UNet gives."""
    adapter = get_branch("t2i_adapter").build(unet, OmegaConf.merge(tiny_cfg.control, {}))
    pixels = size * 2 ** (len(tiny_cfg.control.conditioning_embedding_out_channels) - 1)
    with torch.no_grad():
        shapes = [f.shape for f in adapter(torch.zeros(1, 3, pixels, pixels))]
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) for shape in shapes]


@pytest.mark.parametrize("layout", ["sd15", "tiny"])
def test_a_summing_join_is_the_stock_unet(layout, tiny_cfg, tiny_base):
    unet = sd_layout_unet() if layout == "sd15" else tiny_base.unet
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(1, unet.config.in_channels, size, size, generator=generator)
    text = torch.randn(1, 5, unet.config.cross_attention_dim, generator=generator)
    t = torch.tensor([500])
    features = features_for(unet, tiny_cfg, size)
    joins = []

    def add(k, feature, hidden):
        joins.append(k)
        return hidden + feature

    with torch.no_grad():
        stock = unet(noisy, t, encoder_hidden_states=text,
                     down_intrablock_additional_residuals=[f.clone() for f in features]).sample
        with intrablock_features(unet, add):
            ours = unet(noisy, t, encoder_hidden_states=text,
                        down_intrablock_additional_residuals=list(features)).sample
        plain = unet(noisy, t, encoder_hidden_states=text).sample
    assert joins == list(range(len(features)))  # every feature entered, in order
    assert not torch.equal(stock, plain)  # the features matter here
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-6)
