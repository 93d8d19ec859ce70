"""A base and its control branch measured on the meta device: exact parameter counts, and one
forward of each network at the run's resolution and prompt length that records, per Linear and
Conv2d, the input elements it reads (the activation model's units, cnexp/launch/memory.py) and
its FLOPs, plus the inputs of the blocks diffusers checkpoints (resnets and transformer blocks).
No weights are read or allocated: the components are built from their config.json values (a
bundle's own, or the published ones in cnexp/launch/published.py).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cnexp.launch.published import BUNDLES, BY_FAMILY, DENOISERS, TEXT_ENCODERS
from cnexp.launch.reach import read_json

META = torch.device("meta")
BLOCK_LISTS = ("resnets", "transformer_blocks", "single_transformer_blocks")  # checkpointed
CONTROLNETS = ("ControlNetModel", "SD3ControlNetModel", "FluxControlNetModel")


@dataclass
class Network:
    """One network's forward for one sample: `leaves` (input elements, FLOPs, trains?, block or
    None) per Linear/Conv2d, `blocks` (input elements per checkpointed block), total FLOPs
    (attention included), and whether diffusers can checkpoint it."""
    leaves: list[tuple[float, float, bool, Optional[str]]] = field(default_factory=list)
    blocks: dict[str, float] = field(default_factory=dict)
    flops: float = 0.0
    checkpointable: bool = True


@dataclass
class Geometry:
    family: str
    source: str  # where the configs came from
    params: dict[str, int]  # component -> parameters (denoiser, vae, text encoders, branch)
    trained: int  # parameters that train (the branch's, an unlocked decoder's)
    frozen_branch: int  # the branch's frozen parameters (a LoRA copy's base weights, XS's copy)
    denoiser: Network
    branch: Network
    branch_note: str  # which branch was measured
    text_flops: dict[str, float]  # text encoder -> forward FLOPs per prompt
    vae_flops: float  # one image through the VAE's encoder
    tokens: dict[str, int]  # text encoder -> tokens per prompt
    widths: dict[str, int]  # text encoder -> width of its hidden states
    t5: Optional[str]  # the T5 encoder's component name (its states dominate a cached prompt)
    text_row: tuple[int, int, int]  # (context tokens, width, pooled width): a cached prompt
    latent: tuple[int, int]  # (channels, side) of one latent
    latent_control: bool  # the control image goes through the VAE too (SD3, Flux)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(library: str, class_name: str, config: dict) -> nn.Module:
    """A component from its config.json values, on the meta device (no memory)."""
    import diffusers
    import transformers

    with warnings.catch_warnings(), torch.device(META):
        warnings.simplefilter("ignore")  # deprecations inside diffusers' own constructors
        if library == "diffusers":
            return getattr(diffusers, class_name).from_config(dict(config))
        cls = getattr(transformers, class_name)
        return cls(cls.config_class(**config))


def published_parts(pretrained: str, base_dir: Optional[str]) -> Optional[tuple[dict, str]]:
    """{component: (library, class, config)} of the bundle's model_index.json and config.json
    files (base_dir: a local or cached bundle), else of a published id; None if neither."""
    index = read_json(base_dir, "model_index.json")
    if index:
        parts = {}
        for name in (*DENOISERS, "vae", *TEXT_ENCODERS):
            config = read_json(base_dir, f"{name}/config.json")
            if name in index and None not in index[name] and config is not None:
                parts[name] = (index[name][0], index[name][1], config)
        if any(name in parts for name in DENOISERS) and "vae" in parts:
            return parts, f"the configs in {base_dir}"
    if pretrained in BUNDLES:
        return BUNDLES[pretrained]["parts"], f"{pretrained}'s published configs"
    return None


def forward_inputs(model: nn.Module, side: int, context: int, pixels: int) -> dict:
    """Meta inputs of one sample for a denoiser (or the ControlNet built on it)."""
    cfg, kind = model.config, type(model).__name__
    zeros = lambda *shape: torch.zeros(*shape, device=META)  # noqa: E731
    t = zeros(1)
    if kind in ("UNet2DConditionModel", "ControlNetModel"):
        inputs = dict(sample=zeros(1, cfg.in_channels, side, side), timestep=t,
                      encoder_hidden_states=zeros(1, context, cfg.cross_attention_dim))
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {"text_embeds": zeros(1, pooled),
                                           "time_ids": zeros(1, 6)}
        if kind == "ControlNetModel":
            inputs["controlnet_cond"] = zeros(1, cfg.conditioning_channels, pixels, pixels)
        return inputs
    text = dict(encoder_hidden_states=zeros(1, context, cfg.joint_attention_dim),
                pooled_projections=zeros(1, cfg.pooled_projection_dim), timestep=t)
    if kind in ("SD3Transformer2DModel", "SD3ControlNetModel"):
        inputs = dict(hidden_states=zeros(1, cfg.in_channels, side, side), **text)
        if kind == "SD3ControlNetModel":
            extra = cfg.extra_conditioning_channels
            inputs["controlnet_cond"] = zeros(1, cfg.in_channels + extra, side, side)
        return inputs
    packed = (side // 2) ** 2  # Flux: 2x2 latent patches as tokens
    inputs = dict(hidden_states=zeros(1, packed, cfg.in_channels), img_ids=zeros(packed, 3),
                  txt_ids=zeros(context, 3), **text)
    if cfg.guidance_embeds:
        inputs["guidance"] = zeros(1)
    if kind == "FluxControlNetModel":
        inputs["controlnet_cond"] = zeros(1, packed, cfg.in_channels)
    return inputs


def trace(model: nn.Module, run: Callable[[], object]) -> Network:
    """`run()` (a meta forward of `model`), recording its Linear/Conv2d leaves, its checkpointed
    blocks and its attention FLOPs (scaled_dot_product_attention is stood in for by an empty
    output of the right shape: FLOPs 4 x queries x keys x head width per head)."""
    net, handles = Network(), []
    blocks = {f"{name}.{child}": module for name, parent in model.named_modules()
              if name.rsplit(".", 1)[-1] in BLOCK_LISTS
              for child, module in parent.named_children()}

    def block_of(name: str) -> Optional[str]:
        parts = name.split(".")
        return next((p for p in (".".join(parts[:i]) for i in range(len(parts), 0, -1))
                     if p in blocks), None)

    def leaf_hook(name):
        def hook(module, args, out):
            width = module.in_features if isinstance(module, nn.Linear) else \
                module.in_channels // module.groups * math.prod(module.kernel_size)
            flops = 2.0 * out.numel() * width
            net.flops += flops
            net.leaves.append((args[0].numel(), flops, module.weight.requires_grad,
                               block_of(name)))
        return hook

    def block_hook(name):
        def hook(module, args, kwargs):
            tensors = [*args, *kwargs.values()]
            net.blocks[name] = float(sum(x.numel() for x in tensors
                                         if isinstance(x, torch.Tensor) and x.dim() >= 3))
        return hook

    def attention(query, key, value, *args, **kwargs):  # (B, H, Tq, d), (B, H, Tk, d)
        net.flops += 4.0 * query.shape[:-1].numel() * key.shape[-2] * query.shape[-1]
        return query.new_empty((*query.shape[:-1], value.shape[-1]))

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            handles.append(module.register_forward_hook(leaf_hook(name)))
        if name in blocks:
            handles.append(module.register_forward_pre_hook(block_hook(name), with_kwargs=True))
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = attention
    try:
        with torch.no_grad():
            run()
    finally:
        F.scaled_dot_product_attention = sdpa
        for handle in handles:
            handle.remove()
    net.checkpointable = bool(getattr(model, "_supports_gradient_checkpointing", False))
    return net


def scaled(net: Network, factor: float, trained: bool) -> Network:
    """A network of unknown layout sized as `factor` x `net` (a branch cnexp cannot trace)."""
    return Network([(u * factor, f * factor, trained, b) for u, f, _, b in net.leaves],
                   {k: v * factor for k, v in net.blocks.items()}, net.flops * factor,
                   net.checkpointable)


def build_branch(cfg: DictConfig, denoiser: nn.Module) -> tuple[nn.Module, str]:
    """The control branch as the run builds it (its family's, on the meta denoiser); the peer
    script's ControlNet when that cannot be built on the meta device."""
    from cnexp.control import build_controlnet
    from cnexp.families.family import get_family

    name = str(cfg.control.branch)
    try:
        with warnings.catch_warnings(), torch.device(META):
            warnings.simplefilter("ignore")
            family = get_family(cfg.base.family)
            return build_controlnet(denoiser, cfg.control, family.branch(name)), \
                f"control.branch={name} as cnexp builds it"
    except Exception as err:  # noqa: BLE001 - a family or branch not buildable without weights
        kind, kwargs = BY_FAMILY[str(cfg.base.family)]["controlnet"]
        denoiser.requires_grad_(False)
        peer = peer_controlnet(kind, dict(denoiser.config), kwargs)
        return peer, (f"the peer script's {kind} (control.branch={name} did not build on the "
                      f"meta device: {type(err).__name__})")


def peer_controlnet(kind: str, config: dict, kwargs: dict) -> nn.Module:
    if kind == "ControlNetModel":
        from diffusers import ControlNetModel

        unet = build("diffusers", "UNet2DConditionModel", config)
        with torch.device(META):
            return ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    return build("diffusers", kind, {**config, **kwargs})


def find_controlnet(branch: nn.Module) -> Optional[nn.Module]:
    return next((m for m in branch.modules() if type(m).__name__ in CONTROLNETS), None)


def text_geometry(family: str, denoiser: nn.Module,
                  models: dict) -> tuple[dict, dict, dict, tuple]:
    """(tokens per prompt, hidden width, forward FLOPs per prompt, cached row (tokens, width,
    pooled)) of the text encoders as the family encodes prompts."""
    known, tokens, flops = BY_FAMILY[family], {}, {}
    widths = {name: getattr(m.config, "hidden_size", None) or m.config.d_model
              for name, m in models.items()}
    for name, model in models.items():
        limit = getattr(model.config, "max_position_embeddings", None)
        tokens[name] = min(known["tokens"].get(name, limit or 77), limit or 10 ** 9)
        lookup = sum(count(m) for m in model.modules() if isinstance(m, nn.Embedding))
        flops[name] = 2.0 * (count(model) - lookup) * tokens[name]  # 2 x weights x tokens
    den = dict(denoiser.config)
    context = known["context"]
    width = den.get("cross_attention_dim") or den.get("joint_attention_dim")
    if "pooled_projection_dim" in den:
        pooled = den["pooled_projection_dim"]
    elif den.get("addition_embed_type") == "text_time":
        pooled = den["projection_class_embeddings_input_dim"] - 6 * den["addition_time_embed_dim"]
    else:
        pooled = 0
    return tokens, widths, flops, (sum(tokens.get(n, 0) for n in context), width, pooled)


_MEASURED: dict[tuple, Optional[Geometry]] = {}


def measure(cfg: DictConfig, base_dir: Optional[str], resolution: int) -> Optional[Geometry]:
    """The geometry of the run's base and branch at `resolution`; None when neither the bundle
    nor a published config says what the base is (or its family is not in published.BY_FAMILY)."""
    key = (str(cfg.base.pretrained), base_dir, resolution, str(cfg.base.family),
           OmegaConf.to_yaml(cfg.control))
    if key not in _MEASURED:
        level = logging.getLogger("diffusers").level
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        try:
            _MEASURED[key] = _measure(cfg, base_dir, resolution)
        finally:
            logging.getLogger("diffusers").setLevel(level)
    return _MEASURED[key]


def _measure(cfg: DictConfig, base_dir: Optional[str], resolution: int) -> Optional[Geometry]:
    found, family = published_parts(str(cfg.base.pretrained), base_dir), str(cfg.base.family)
    if found is None or family not in BY_FAMILY:
        return None
    parts, source = found
    models = {name: build(*spec) for name, spec in parts.items()}
    den_name = next(n for n in DENOISERS if n in models)
    denoiser = models[den_name].requires_grad_(False)
    branch, note = build_branch(cfg, denoiser)
    vae_cfg = models["vae"].config
    scale = 2 ** (len(vae_cfg.block_out_channels) - 1)
    side = resolution // scale
    texts = {n: m for n, m in models.items() if n in TEXT_ENCODERS}
    tokens, widths, text_flops, row = text_geometry(family, denoiser, texts)
    den_net = trace(denoiser, lambda: denoiser(**forward_inputs(denoiser, side, row[0],
                                                                resolution)))
    trained = sum(p.numel() for p in branch.parameters() if p.requires_grad) + \
        sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    frozen_branch = sum(p.numel() for p in branch.parameters() if not p.requires_grad)
    controlnet = find_controlnet(branch)
    if controlnet is not None:
        inputs = forward_inputs(controlnet, side, row[0], resolution)
        branch_net = trace(controlnet, lambda: controlnet(**inputs))
    else:  # a branch of cnexp's own layout: sized as the denoiser by its share of parameters
        branch_net = scaled(den_net, count(branch) / count(denoiser), True)
        note += " (its activations sized by its share of the denoiser's parameters)"
    vae = models["vae"]
    vae_net = trace(vae, lambda: vae.encode(torch.zeros(1, 3, resolution, resolution,
                                                        device=META)))
    params = {name: count(model) for name, model in models.items()}
    params["branch"] = count(branch)
    return Geometry(family, source, params, trained, frozen_branch, den_net, branch_net, note,
                    text_flops, vae_net.flops, tokens, widths,
                    next((n for n, m in texts.items() if m.config.model_type == "t5"), None), row,
                    (vae_cfg.latent_channels, side), BY_FAMILY[family]["latent_control"])
