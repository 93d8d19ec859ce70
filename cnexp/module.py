"""LightningModule: train a ControlNet against a frozen base with the diffusion loss."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel

from cnexp.base import BaseBundle
from cnexp.config import OptimConfig

FROZEN_PREFIXES = ("unet.", "vae.", "text_encoder.")


class ControlNetModule(L.LightningModule):
    def __init__(self, base: BaseBundle, controlnet: ControlNetModel, optim: OptimConfig,
                 seed: int = 0):
        super().__init__()
        self.unet, self.vae, self.text_encoder = base.unet, base.vae, base.text_encoder
        self.tokenizer, self.noise_scheduler = base.tokenizer, base.noise_scheduler
        self.controlnet = controlnet
        self.optim = optim
        self.seed = seed
        self.strict_loading = False  # checkpoints hold only the trainable part (see below)

    # ---- the frozen base --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The base never changes: storing it in every checkpoint would only cost disk.
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.unet, self.vae, self.text_encoder):
            frozen.eval()  # Lightning calls .train() on the whole module each epoch
        return self

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/f, W/f)."""
        dist = self.vae.encode(images).latent_dist
        return dist.sample(generator=generator) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]  # (B, T, D)

    # ---- the controlled model ---------------------------------------------------------------
    def controlled_unet(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                        condition: torch.Tensor, conditioning_scale: float = 1.0) -> torch.Tensor:
        """Frozen UNet + ControlNet residuals: the model the paper trains."""
        down, mid = self.controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=condition,
                                    conditioning_scale=conditioning_scale, return_dict=False)
        return self.unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    def step_generator(self) -> torch.Generator:
        """Noise, timesteps and prompt dropout come from (seed, step) alone, so a resumed run
        draws exactly what the uninterrupted run drew."""
        return torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + self.global_step)

    def drop_prompts(self, captions: list[str], generator: torch.Generator) -> list[str]:
        """Replace each caption by "" with probability `prompt_dropout` (per sample)."""
        keep = torch.rand(len(captions), generator=generator, device=self.device) >= \
            self.optim.prompt_dropout
        return [c if k else "" for c, k in zip(captions, keep.tolist())]

    def diffusion_loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        latents = self.encode_images(batch["image"], generator)
        text = self.encode_prompts(self.drop_prompts(list(batch["caption"]), generator))
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                          generator=generator, device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.controlled_unet(noisy, t, text, batch["condition"])
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unsupported prediction_type {kind!r} in the base's scheduler config")
        return F.mse_loss(pred.float(), target.float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, self.step_generator())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.controlnet.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay,
                                 betas=tuple(self.optim.betas))
