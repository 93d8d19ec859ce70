"""cache.conditions: on the families whose ControlNet reads the condition's VAE latents (SD3,
Flux), those latents are cached like the target images', so a training step decodes and encodes
no condition; condition dropout then reads the black image's latents, as zeroed pixels would.
The UNet families read pixels: the knob leaves them as they were."""
import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf

from cnexp.base import load_base
from cnexp.control import build_controlnet
from cnexp.data.datamodule import TriplesDataModule
from cnexp.encode_cache import FrozenEncoderCache
from cnexp.encode_store import DiskEncoderCache
from cnexp.errors import ConfigError
from cnexp.families.family import get_family
from cnexp.module import ControlNetModule
from cnexp.validate import validate

CPU = torch.device("cpu")
SMALL = ["data.train_size=8", "data.val_size=4", "data.test_size=4", "data.batch_size=4",
         "logger.mode=disabled", "logger.csv=false"]


@pytest.fixture(scope="module", params=["tiny_sd3", "tiny_flux"])
def world(request, tmp_path_factory):
    """(config, base, the training set) of a latent-reading family."""
    root = tmp_path_factory.mktemp(request.param)
    cfg = compose_cfg([f"base={request.param}", f"data.root={root / 'data'}", *SMALL],
                      out_dir=root / "run")
    data = TriplesDataModule(cfg.data)
    data.prepare_data()
    data.setup()
    return cfg, load_base(cfg.base), data.datasets["train"]


def module_with(world, cache: FrozenEncoderCache, **optim) -> ControlNetModule:
    cfg, base, _ = world
    family = get_family(base.family)
    branch = family.branch(cfg.control.branch)
    control = build_controlnet(family.denoiser(base), cfg.control, branch)
    return ControlNetModule(base, control, OmegaConf.merge(cfg.optim, optim), cache=cache,
                            branch=branch)


def filled(module: ControlNetModule, dataset) -> ControlNetModule:
    module.cache.precompute(dataset, module._vae_moments, module._text_encoder, CPU,
                            encode_conditions=module._condition_moments)
    return module


def conditions_of(dataset, positions):
    """The conditions as an uncached training batch holds them, and their dataset indices."""
    items = [dataset[p] for p in positions]
    return torch.stack([x["condition"] for x in items]), [x["index"] for x in items]


def test_cached_condition_latents_are_what_the_vae_makes_of_the_condition(world):
    _, base, dataset = world
    module = filled(module_with(world, FrozenEncoderCache(conditions=True)), dataset)
    pixels, indices = conditions_of(dataset, [3, 0, 5, 1])
    dataset.latents_cached = dataset.conditions_cached = True
    try:
        loaded = dataset[3]
    finally:
        dataset.latents_cached = dataset.conditions_cached = False
    assert loaded["condition"].numel() == 0 == loaded["image"].numel()  # nothing decoded
    calls = []
    encode = module._condition_moments
    module._condition_moments = lambda c: calls.append(c) or encode(c)
    cached = module.training_control(torch.empty(4, 0), indices, torch.Generator())
    assert calls == []  # every row from the cache: no VAE call in the step
    direct = get_family(base.family).control_input(base, pixels)
    torch.testing.assert_close(cached, direct, rtol=1e-4, atol=1e-5)
    assert module.cache.hits == 4


def test_condition_dropout_reads_the_black_images_latents(world):
    _, base, dataset = world
    module = filled(module_with(world, FrozenEncoderCache(conditions=True),
                                condition_dropout=1.0), dataset)
    pixels, indices = conditions_of(dataset, [0, 1])
    dropped = module.training_control(torch.empty(2, 0), indices, torch.Generator())
    black = get_family(base.family).control_input(base, torch.zeros_like(pixels))
    torch.testing.assert_close(dropped, black, rtol=1e-4, atol=1e-5)
    kept = filled(module_with(world, FrozenEncoderCache(conditions=True)), dataset)
    assert not torch.allclose(kept.training_control(torch.empty(2, 0), indices,
                                                    torch.Generator()), dropped)


def test_losses_with_cached_conditions_match_the_uncached_step(world):
    """The same draws in the same order, condition dropout on: cached or not, one loss."""
    _, _, dataset = world
    plain = module_with(world, FrozenEncoderCache(latents=False, text=False),
                        condition_dropout=0.5)
    cached = filled(module_with(world, FrozenEncoderCache(latents=False, text=False,
                                                          conditions=True),
                                condition_dropout=0.5), dataset)
    torch.manual_seed(0)  # non-zero outputs everywhere, so that the control input shows
    with torch.no_grad():
        for weight in plain.controlnet.parameters():
            weight.normal_(0, 0.05)
    cached.controlnet.load_state_dict(plain.controlnet.state_dict())
    items = [dataset[p] for p in range(len(dataset))]  # 8: some conditions dropped
    batch = {"image": torch.stack([x["image"] for x in items]),
             "condition": torch.stack([x["condition"] for x in items]),
             "caption": [x["caption"] for x in items], "index": [x["index"] for x in items]}
    with torch.no_grad():
        want = plain.diffusion_loss(batch, torch.Generator().manual_seed(3))
        got = cached.diffusion_loss({**batch, "condition": torch.empty(len(items), 0)},
                                    torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_disk_store_holds_the_condition_moments_of_the_memory_store(world, tmp_path):
    _, _, dataset = world
    memory = filled(module_with(world, FrozenEncoderCache(conditions=True)), dataset)
    disk_cache = DiskEncoderCache(tmp_path, {"test": "conditions"}, conditions=True)
    disk = filled(module_with(world, disk_cache), dataset)
    assert sorted(disk_cache.directory.glob("*.conditions.bin"))
    for index in memory.cache.filled["conditions"]:
        assert torch.equal(disk_cache.stored_moments(index, "conditions"),
                           memory.cache.stored_moments(index, "conditions"))
    assert disk.cache.key(dataset, CPU)["conditions"] is True
    without = DiskEncoderCache(tmp_path, {"test": "conditions"})
    assert without.directory_for(dataset, CPU) != disk_cache.directory  # another key


def test_the_unet_families_read_pixels_and_leave_the_knob_alone(tiny_cfg, tiny_base):
    family = get_family(tiny_base.family)
    control = build_controlnet(family.denoiser(tiny_base), tiny_cfg.control,
                               family.branch(tiny_cfg.control.branch))
    module = ControlNetModule(tiny_base, control, tiny_cfg.optim,
                              cache=FrozenEncoderCache(conditions=True))
    assert module.cache.use_conditions is False
    random_crop = ["data.crop=random", "cache.latents=false"]
    validate(compose_cfg([*SMALL, *random_crop]), warn=False)  # SD: nothing to refuse
    with pytest.raises(ConfigError, match="cache.conditions"):
        validate(compose_cfg(["base=tiny_sd3", *SMALL, *random_crop]), warn=False)
    validate(compose_cfg(["base=tiny_sd3", *SMALL, *random_crop, "cache.conditions=false"]),
             warn=False)
