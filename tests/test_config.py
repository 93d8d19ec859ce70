import pytest
from hydra.errors import ConfigCompositionException

from cnexp.validate import validate
from conftest import compose_cfg


def test_default_composes_to_the_tiny_world():
    cfg = compose_cfg()
    assert cfg.base.name == "tiny" and cfg.base.pretrained.endswith("assets/tinyworld")
    assert cfg.data.resolution == 64 and cfg.ablation == "baseline"
    assert cfg.optim.lr == pytest.approx(1e-3)  # the tiny world's own learning rate
    validate(cfg)


def test_sd15_preset_uses_the_paper_learning_rate_and_512px():
    cfg = compose_cfg(["base=sd15"])
    assert cfg.base.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.optim.lr == pytest.approx(1e-5) and cfg.data.resolution == 512
    assert list(cfg.control.conditioning_embedding_out_channels) == [16, 32, 96, 256]
    assert compose_cfg(["base=sd21"]).data.resolution == 768


def test_ablation_is_appended_not_default():
    cfg = compose_cfg(["+ablation=baseline"])
    assert cfg.ablation == "baseline" and cfg.optim.prompt_dropout == 0.5


@pytest.mark.parametrize("override", ["optim.lrr=1e-4", "control.nonsense=1", "+ablation=nope"])
def test_unknown_knob_or_preset_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose_cfg([override])


def test_mistyped_value_fails_at_composition():
    with pytest.raises(Exception, match="max_steps"):
        compose_cfg(["trainer.max_steps=abc"])
