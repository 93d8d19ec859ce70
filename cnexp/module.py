"""LightningModule: train a ControlNet against a frozen base with the diffusion loss."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import ModelMixin

from cnexp.base import BaseBundle
from cnexp.cadence import host_reads_at
from cnexp.config import OptimConfig
from cnexp.control import Branch, branch_of
from cnexp.encode_cache import FrozenEncoderCache
from cnexp.errors import CnexpError
from cnexp.families.family import get_family

FROZEN_PREFIXES = ("unet.", "vae.", "text_encoder.", "base_extra.")
DECODER_LR_RATIO = 0.2  # optim.decoder_lr unset: the authors' decoder rate 2e-6 at lr 1e-5


def learning_rates(optim: OptimConfig) -> dict[str, float]:
    """{"control": .., "decoder": ..}: the AdamW groups' rates, optim.lr_factor applied.
    Rounded to 12 significant digits, so 0.1 x 1e-5 is the 1e-6 a user would type (the float
    product is 1.0000000000000002e-06) and a factor reproduces a run made at that rate."""
    factor = getattr(optim, "lr_factor", 1.0)  # a config.yaml written before the knob: 1
    decoder = optim.decoder_lr if optim.decoder_lr is not None else optim.lr * DECODER_LR_RATIO
    return {name: float(f"{rate * factor:.12g}")
            for name, rate in (("control", optim.lr), ("decoder", decoder))}


class ControlNetModule(L.LightningModule):
    def __init__(self, base: BaseBundle, controlnet: ModelMixin, optim: OptimConfig,
                 seed: int = 0, cache: FrozenEncoderCache | None = None,
                 compiled: bool = False, branch: Branch | None = None):
        """`branch`: the one that built `controlnet` (default: found from its class)."""
        super().__init__()
        self.base, self.family = base, get_family(base.family)  # what the base is, how it trains
        self.unet, self.vae, self.text_encoder = base.unet, base.vae, base.text_encoder
        self.tokenizer, self.noise_scheduler = base.tokenizer, base.noise_scheduler
        # the encoders past the first (SDXL's, SD3's, Flux's): submodules, so that Lightning
        # moves them to the device with the rest (frozen: never in a checkpoint)
        self.base_extra = torch.nn.ModuleDict({name: part for name, part in base.extra.items()
                                               if isinstance(part, torch.nn.Module)})
        self.controlnet = controlnet
        self.branch = branch or branch_of(controlnet)
        self.branch.bind(controlnet, self.unet)  # a branch that reads the frozen UNet (cross_norm)
        self.optim = optim
        self.seed = seed
        self.cache = cache or FrozenEncoderCache(latents=False, text=False)
        # condition latents are cached only where the control reads latents (SD3, Flux)
        self.cache.use_conditions = self.cache.use_conditions and self.family.control_reads_latents
        self.strict_loading = False  # checkpoints hold only the trainable part (see below)
        # trainer.compile: the training forward (frozen UNet and control branch together, so the
        # frozen UNet's normalisations and activations fuse too) goes through torch.compile;
        # sampling and the step-0 base damage stay eager: their batch shapes differ and they run
        # too rarely to repay a compile
        self.compiled_predict = torch.compile(self.branch.predict) if compiled else None
        self._empty_text: torch.Tensor | None = None  # empty_prompt's memo
        self._black_control: torch.Tensor | None = None  # black_control's memo

    # ---- the frozen base --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Frozen weights never change: storing them in every checkpoint would only cost disk.
        # Kept: whatever trains (with control.sd_locked=false, the UNet decoder too). Dropped:
        # the base and the frozen parts of the control branch (XS's copy of the base), which
        # the run rebuilds from the base on resume.
        state = checkpoint["state_dict"]
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        frozen = {name for name, p in self.named_parameters() if not p.requires_grad}
        for key in [k for k in state if k not in trained
                    and (k.startswith(FROZEN_PREFIXES) or k in frozen)]:
            del state[key]

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in self.family.frozen(self.base):
            frozen.eval()  # Lightning calls .train() on the whole module each epoch
        return self

    def on_train_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        train_set = getattr(datamodule, "datasets", {}).get("train")
        if train_set is not None:
            progress = self.trainer.progress_bar_callback is not None and \
                self.trainer.is_global_zero
            conditions = self._condition_moments if self.cache.use_conditions else None
            self.cache.precompute(train_set, self._vae_moments, self._text_encoder, self.device,
                                  progress=progress, encode_conditions=conditions)
        self._empty_text = None  # "" as the filled cache holds it, if it does

    @torch.no_grad()
    def _vae_moments(self, images: torch.Tensor) -> torch.Tensor:
        return self.family.latent_moments(self.base, images)  # (B, 2C, h, w)

    @torch.no_grad()
    def _condition_moments(self, conditions: torch.Tensor) -> torch.Tensor:
        return self.family.latent_moments(self.base, conditions * 2 - 1)  # [0, 1] -> [-1, 1]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator,
                      indices: list[int] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), a fresh posterior sample
        (the same draw as `latent_dist.sample(generator)`), from cached moments when possible."""
        moments = self.cache.moments(self._vae_moments, images, indices).float()
        mean, std = moments.chunk(2, dim=1)  # fp32 latents, whatever dtype the VAE is stored in
        noise = self.draw(torch.randn, mean.shape, generator, dtype=mean.dtype)
        return self.family.scale_latents(self.base, mean + std * noise)

    @torch.no_grad()
    def _text_encoder(self, prompts: list[str]) -> torch.Tensor:
        return self.family.encode_text(self.base, prompts, self.device)  # (B, T, D)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.cache.embeddings(self._text_encoder, prompts, self.device)

    # ---- the controlled model ---------------------------------------------------------------
    def controlled_prediction(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                              condition: torch.Tensor | None, conditioning_scale: float = 1.0,
                              training: bool = False,
                              control: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen UNet steered by the control branch (its `predict`): what is trained.
        `control`: what the control network reads, made already (else from the condition
        pixels). training=True (the diffusion loss) runs the compiled forward under
        trainer.compile."""
        compiled = training and self.compiled_predict is not None
        predict = self.compiled_predict if compiled else self.branch.predict
        cond = self.family.conditioning(self.base, text, noisy)  # the denoiser's text inputs
        if control is None:
            control = self.family.control_input(self.base, condition)  # pixels, or latents
        return predict(self.unet, self.controlnet, noisy, t, cond, control, conditioning_scale)

    def step_generator(self) -> torch.Generator:
        """Noise, timesteps and prompt dropout come from (seed, step) alone, so a resumed run
        draws exactly what the uninterrupted run drew."""
        return torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + self.global_step)

    def draw(self, sampler, shape: torch.Size | tuple, generator: torch.Generator, **kwargs):
        """`sampler(shape)` for this rank's samples. Draws are made for the whole global batch
        and this rank keeps its positions (rank, rank + world, ..., as the data sampler deals
        them), so DDP sees the same noise per sample as one process with the same global batch."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) \
            if self._trainer is not None else (0, 1)
        full = sampler(*kwargs.pop("args", ()), (shape[0] * world, *shape[1:]),
                       generator=generator, device=self.device, **kwargs)
        return full[rank::world]

    def prompt_keep(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n,) bool on the device: which captions survive prompt dropout (probability
        `prompt_dropout` each of becoming "")."""
        return self.draw(torch.rand, (n,), generator) >= self.optim.prompt_dropout

    def drop_prompts(self, captions: list[str], generator: torch.Generator) -> list[str]:
        """The captions after prompt dropout, as text (for inspection: the training step selects
        embeddings on the device, dropped_prompt_embeddings, and never reads `keep` back)."""
        keep = self.prompt_keep(len(captions), generator)
        return [c if k else "" for c, k in zip(captions, keep.tolist())]

    def dropped_prompt_embeddings(self, captions: list[str],
                                  generator: torch.Generator) -> torch.Tensor:
        """(B, T, D): each caption's embedding, or that of "" where dropout drops it. The same
        draw and the same rows as encoding drop_prompts' list, chosen without a host sync."""
        keep = self.prompt_keep(len(captions), generator)
        text = self.encode_prompts(captions)
        return torch.where(keep.view(-1, 1, 1), text, self.empty_prompt().to(text.dtype))

    def empty_prompt(self) -> torch.Tensor:
        """(1, T, D): the embedding of "" (a dropped caption), encoded once (the encoder is
        frozen; computed again only if the module moved to another device)."""
        if self._empty_text is None or self._empty_text.device != self.device:
            self._empty_text = self.encode_prompts([""])
        return self._empty_text

    def drop_conditions(self, conditions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Replace each condition by zeros with probability `condition_dropout` (per sample,
        independent of prompt dropout; Uni-ControlNet's split). At 0 nothing is drawn, so the
        other random draws of a run do not move."""
        if not self.optim.condition_dropout:
            return conditions
        keep = self.draw(torch.rand, (len(conditions),), generator) >= self.optim.condition_dropout
        return conditions * keep.to(conditions.dtype).view(-1, 1, 1, 1)

    def training_control(self, conditions: torch.Tensor, indices: list[int] | None,
                         generator: torch.Generator) -> torch.Tensor:
        """What the control network reads for a training batch, condition dropout applied: from
        the cached condition latents where the cache holds them (SD3, Flux; a dropped one reads
        as the black image's latents, as its zeroed pixels would), else from the pixels."""
        if not self.cache.use_conditions:
            dropped = self.drop_conditions(conditions, generator)  # (B, 3, H, W)
            return self.family.control_input(self.base, dropped)
        moments = self.cache.moments(self._condition_moments, conditions, indices, "conditions")
        control = self.family.control_from_moments(self.base, moments)
        if not self.optim.condition_dropout:
            return control
        keep = self.draw(torch.rand, (len(control),), generator) >= self.optim.condition_dropout
        keep = keep.view(-1, *[1] * (control.dim() - 1))
        return torch.where(keep, control, self.black_control(moments).to(control.dtype))

    def black_control(self, moments: torch.Tensor) -> torch.Tensor:
        """(1, ...): what the control network reads for a black condition (a dropped one) at
        the size of the condition moments (B, 2C, h, w); encoded once (the VAE is frozen)."""
        if self._black_control is None or self._black_control.device != self.device:
            h, w = (side * self.base.latent_scale for side in moments.shape[-2:])
            black = torch.zeros(1, 3, h, w, device=self.device)
            self._black_control = self.family.control_input(self.base, black)
        return self._black_control

    def diffusion_loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The family's objective on one batch; every draw from `generator`, in this order."""
        indices = batch.get("index")
        if torch.is_tensor(indices):  # the data module hands a list (no device round trip);
            indices = indices.tolist()  # a batch built by hand may hold a host tensor
        # images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f), f the VAE's factor
        latents = self.encode_images(batch["image"], generator, indices)
        # text (B, T, D): the captions' encoder states, "" where prompt dropout drops one
        text = self.dropped_prompt_embeddings(list(batch["caption"]), generator)
        noise = self.draw(torch.randn, latents.shape, generator)  # (B, C, h, w)
        t = self.family.timesteps(self.base, self.draw, latents.shape[0], generator)  # (B,)
        noisy = self.family.noised(self.base, latents, noise, t)  # (B, C, h, w)
        control = self.training_control(batch["condition"], indices, generator)
        pred = self.controlled_prediction(noisy, t, text, None, training=True, control=control)
        pred = self.family.loss_prediction(self.base, pred, noisy, t)  # as the target reads it
        target = self.family.target(self.base, latents, noise, t)  # (B, C, h, w)
        return F.mse_loss(pred.float(), target.float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, self.step_generator())
        logged = loss.detach()
        # under DDP the logged loss is the global batch's mean, as one process would log it;
        # reduced only where it is read (log steps, the last): no collective in other steps
        if self.trainer.world_size > 1 and host_reads_at(self.trainer, self.global_step + 1):
            logged = self.trainer.strategy.reduce(logged, reduce_op="mean")
        # not prog_bar: Lightning converts progress-bar metrics to floats after every batch (a
        # host sync); StepProgressBar reads train/loss itself at the logging cadence
        self.log("train/loss", logged, batch_size=len(batch["caption"]))
        return loss

    def on_train_epoch_end(self) -> None:  # once per epoch: a per-step log costs step time
        if self.cache.hits + self.cache.misses:
            self.log("perf/cache_hit_rate", self.cache.hits / (self.cache.hits + self.cache.misses))

    def configure_optimizers(self):
        """One AdamW group for the control branch; with control.sd_locked=false a second one
        for the UNet decoder at its own (lower) learning rate."""
        rates = learning_rates(self.optim)
        groups = [{"name": "control", "lr": rates["control"],
                   "params": [p for p in self.controlnet.parameters() if p.requires_grad]}]
        decoder = [p for p in self.unet.parameters() if p.requires_grad]
        if decoder:
            groups.append({"name": "decoder", "lr": rates["decoder"], "params": decoder})
        kwargs = {"lr": rates["control"], "weight_decay": self.optim.weight_decay,
                  "betas": tuple(self.optim.betas)}
        if self.optim.eight_bit:
            try:
                import bitsandbytes
            except ImportError as err:
                raise CnexpError("optim.eight_bit=true needs bitsandbytes (pip install "
                                 "bitsandbytes; CUDA only), or set optim.eight_bit=false") from err
            return bitsandbytes.optim.AdamW8bit(groups, **kwargs)
        return torch.optim.AdamW(groups, fused=self.optim.fused or None, **kwargs)
