import json
import typing

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from cnexp.config import TrainConfig
from cnexp.data.datamodule import LAYOUTS
from cnexp.errors import ConfigError
from cnexp.knobs import Branch, Fidelity, Scheduler
from cnexp.validate import validate
from conftest import ROOT, compose_cfg


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


@pytest.mark.parametrize("data", ["tinyworld", "fill50k", "hf", "captions"])
@pytest.mark.parametrize("base, native", [("tiny", 64), ("sd15", 512), ("sd21", 768)])
def test_every_layout_trains_at_the_bases_native_resolution(base, native, data):
    """base.resolution is the data's default in every layout (SD 2.1 with fill50k trains at
    768, not the layout's 512); an explicit data.resolution still wins."""
    cfg = compose_cfg([f"base={base}", f"data={data}"])
    assert cfg.base.resolution == cfg.data.resolution == native
    assert compose_cfg([f"base={base}", f"data={data}", "data.resolution=256"]).data.resolution \
        == 256
    assert compose_cfg([f"base={base}", "base.resolution=128"]).data.resolution == 128


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


# ---- one source of truth: choices and ranges are declared with the fields -------------------
@pytest.mark.parametrize("override", [
    "control.branch=lit", "control.connector_init=zeros", "control.init_scope=all",
    "data.layout=fill5k", "data.crop=left", "sampling.scheduler=euler",
    "eval.prompt_settings=[none,vague]", "eval.fidelity=psnr", "trainer.on_nonfinite=ignore",
    "logger.mode=on"])
def test_a_misspelt_choice_fails_at_composition_naming_the_knob_and_its_choices(override):
    knob, value = override.split("=")
    field_type = _field_type(knob)
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg([override])
    message = f"{err.value}\n{err.value.__cause__}"
    bad = value.strip("[]").split(",")[-1]
    assert f"Invalid value '{bad}', expected one of [{', '.join(field_type)}]" in message
    assert f"full_key: {knob}" in message


def _field_type(knob: str):
    """The Enum a schema field declares (inside Optional[...] or list[...])."""
    section, name = knob.split(".")
    hints = typing.get_type_hints(typing.get_type_hints(TrainConfig)[section])
    kind = hints[name]
    while typing.get_args(kind):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def test_choices_compare_print_and_record_as_their_plain_strings(tmp_path):
    cfg = compose_cfg(["control.branch=lite", "sampling.scheduler=dpmsolver"], out_dir=tmp_path)
    assert isinstance(cfg.control.branch, Branch) and cfg.control.branch == "lite"
    assert f"{cfg.control.branch}" == str(cfg.control.branch) == "lite"
    assert json.dumps(OmegaConf.to_container(cfg.control))  # W&B config, metrics.json
    OmegaConf.save(cfg, tmp_path / "config.yaml", resolve=True)
    assert "branch: lite" in (tmp_path / "config.yaml").read_text()
    recorded = OmegaConf.load(tmp_path / "config.yaml")  # a run's record merges back
    again = OmegaConf.merge(OmegaConf.structured(TrainConfig), recorded)
    assert again.control.branch is Branch.lite and again.sampling.scheduler == "dpmsolver"


def test_every_choice_has_its_implementation():
    from cnexp.control import BRANCHES
    from cnexp.metrics.fidelity import FIDELITY
    from cnexp.sampling import SAMPLERS

    assert set(BRANCHES.load_all()) == set(Branch)
    assert set(SAMPLERS) == set(Scheduler)
    assert set(FIDELITY) | {"auto"} == set(Fidelity)
    assert set(LAYOUTS) == {"fill50k", "hf", "captions"}  # the datamodule's tuple of choices


@pytest.mark.parametrize("override, message", [
    ("eval.every_n_steps=-1", r"eval\.every_n_steps is -1; must be >= 0 \(0: off\)"),
    ("eval.num_images=0", r"eval\.num_images is 0; must be > 0"),
    ("sampling.steps=0", r"sampling\.steps is 0; must be > 0"),
    ("control.xs_size_ratio=0", r"control\.xs_size_ratio is 0\.0; use a value in \(0, 1\]"),
    ("control.gaussian_std=-1", r"control\.gaussian_std is -1\.0; must be > 0"),
])
def test_ranges_declared_beside_the_fields_name_the_override(override, message):
    with pytest.raises(ConfigError, match=message + r" \(override it: python run\.py "):
        validate(compose_cfg([override]))


def test_presets_hold_only_what_differs_from_the_schema():
    """No group file repeats a schema default (a repeated default is a second place to edit, and
    a later file in the defaults list silently overrides an earlier preset's value)."""
    schema = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    for group in ("trainer", "data"):
        for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
            preset = OmegaConf.to_container(OmegaConf.load(path))  # unresolved
            preset.pop("defaults", None)
            assert preset, path
            for key, value in preset.items():
                assert value != schema[group][key], f"{path.name}: {key} repeats the default"


def test_trainer_presets_inherit_and_base_presets_are_not_overridden():
    ddp = compose_cfg(["trainer=ddp_cpu"]).trainer
    assert (ddp.accelerator, ddp.devices, ddp.strategy) == ("cpu", 2, "ddp")
    gpu = compose_cfg(["trainer=gpu"]).trainer
    assert (gpu.accelerator, gpu.precision, gpu.max_steps) == ("gpu", "bf16-mixed", 10000)
    assert gpu.accumulate_grad_batches == 1 and gpu.gradient_clip_val == 1.0  # schema defaults
    sd15 = compose_cfg(["base=sd15"])
    assert sd15.data.batch_size == 4 and sd15.sampling.guidance_scale == 7.5  # the preset's own
    assert compose_cfg().eval.fid_feature == "clip"  # base/tiny.yaml's
