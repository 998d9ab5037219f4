"""Emu's visual decoder: a latent diffusion model that turns the N visual embeddings the LLM regresses
into an image. Built on diffusers, so a directory it saves is an ordinary diffusers one:

  DIR/vae/        AutoencoderKL (the latent space)            config.json + diffusion_pytorch_model.safetensors
  DIR/unet/       UNet2DConditionModel (denoises the latents)  the same
  DIR/scheduler/  the training noise schedule (DDPMScheduler)  scheduler_config.json
  DIR/condition.safetensors  what maps our embeddings to the UNet's cross-attention: the projection,
                  a learned position per embedding, the learned "no condition" and, with a semantic
                  token, its two read-outs and projection

Emu starts from Stable Diffusion and swaps its text encoder's 77 tokens for the N embeddings;
`from_pretrained_dir` does the same with any local SD-style directory. Without one, a small VAE and UNet
are built from `DecoderConfig` and trained from scratch (train/decoder_stage.py): the VAE on pixels first,
then the UNet on the frozen VAE's latents.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from nextmm.config import DecoderConfig
from nextmm.errors import UserError
from nextmm.train.checkpoint import write_atomically

# A light KL keeps the latents near a unit Gaussian without blurring the reconstruction; their scale is
# then set by `calibrate_latent_scale`, not by the KL.
KL_WEIGHT = 1e-4
# Extra weight on the colour part of a pixel's error (what is left once its grey part is taken out). A
# VAE trained from scratch learns lightness first and hue last: on Shapes World, with plain MSE, every
# colour was still drawn on one blue-orange axis after 500 steps; with this weight the eight colours
# were told apart by then (the 60 s budget on 2 CPU cores).
CHROMA_WEIGHT = 8.0


class DecoderDirError(UserError):
    """A decoder directory that is missing or not in the layout the decoder reads."""


def fit_ridge(x: torch.Tensor, y: torch.Tensor, ridge: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of y (S, D) on x (S, F), each feature standardised first; returns the (D, F) weight
    and (D,) bias of the map on raw x, the standardisation folded in. Solved in whichever of the primal
    (F x F) or dual (S x S) form is smaller: the same solution, and a real Emu's 64 x 4096 features would
    need a 262k-square primal system."""
    device = x.device
    x, y = x.double().cpu(), y.double().cpu()  # float64 on the CPU: not every accelerator has it
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    eye = lambda n: ridge * torch.eye(n, dtype=x.dtype)  # noqa: E731
    if z.shape[1] <= z.shape[0]:
        solution = torch.linalg.solve(z.T @ z + eye(z.shape[1]), z.T @ y)
    else:
        solution = z.T @ torch.linalg.solve(z @ z.T + eye(z.shape[0]), y)
    weight = (solution[:-1] / std[:, None]).T
    bias = solution[-1] - (mean / std) @ solution[:-1]
    return weight.float().contiguous().to(device), bias.float().contiguous().to(device)


class DecoderSamplingError(UserError):
    """Sampling produced NaN or inf: diverged or corrupt weights, or a guidance too strong for them."""


def norm_groups(channels: list[int], most: int = 32) -> int:
    """GroupNorm groups that divide every channel count (sums of them too, as in the UNet's skip
    concatenations), as many as `most` but keeping at least two channels per group: SD's 32 needs 64+
    channels, and tiny test widths such as 16 still work."""
    common = math.gcd(*channels)
    return max(g for g in range(1, most + 1) if common % g == 0 and (common // g >= 2 or g == 1))


def build_vae(cfg: DecoderConfig) -> AutoencoderKL:
    blocks = len(cfg.vae_channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=norm_groups(cfg.vae_channels),
        sample_size=cfg.image_size,
        # Self-attention in the middle adds a fifth to a small VAE's step on CPU (0.49 vs 0.41 s at batch
        # 32, vae_channels [8, 16, 32], 1 thread), and rebuilding flat shapes needs no global context.
        mid_block_add_attention=False,
        scaling_factor=1.0,  # set from the data by calibrate_latent_scale after training
    )


def build_unet(cfg: DecoderConfig, cross_attention_dim: int) -> UNet2DConditionModel:
    """Plain ResNet blocks at the latent resolution, cross-attention (the condition) from the first
    downsampled one on: at 16 x 16 latents that is 8 x 8 and below, where attention is cheap and every
    position still sees the whole image."""
    levels = len(cfg.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1) if levels > 1 else ("CrossAttnDownBlock2D",)
    up = tuple({"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}[b] for b in reversed(down))
    latent_size = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=up,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block,
        norm_num_groups=norm_groups(cfg.unet_channels),
        cross_attention_dim=cross_attention_dim,
        # diffusers' `attention_head_dim` is really the number of heads (diffusers issue 2011), and
        # its `num_attention_heads` is refused; heads of cfg.unet_head_dim channels each, at least one.
        attention_head_dim=tuple(max(1, c // cfg.unet_head_dim) for c in cfg.unet_channels),
    )


def build_scheduler(cfg: DecoderConfig) -> DDPMScheduler:
    # Stable Diffusion's schedule (LDM's scaled-linear betas), which latent diffusion was tuned for.
    # Trailing spacing makes the samplers built from this config start at the last training timestep,
    # where the UNet learned to start from pure noise; SD's "leading" starts short of it (at 961 of 999
    # for 25 steps), from noise the UNet never saw at that timestep (Lin et al. 2023).
    return DDPMScheduler(
        num_train_timesteps=cfg.train_timesteps, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=cfg.prediction_type, clip_sample=False, timestep_spacing="trailing",
    )


class VisualDecoder(nn.Module):
    """The VAE, the UNet, the training noise schedule, and the small part that turns N embeddings of
    `condition_width` into the UNet's cross-attention input.

    With `semantic_width` > 0 the UNet reads 1 + `semantic_grid`² more tokens: the N embeddings read out
    (by a fixed linear map, `fit_readouts`) onto the CLIP stage's image space of that width, for the whole
    picture and for each cell of a grid over it (CLIP.encode_image_cells). An L2 regression from a
    caption is the average over every place the caption allows, where a shape is a faint difference
    (several times fainter than a colour); CLIP's space, trained against captions, keeps shape as far
    apart as colour. A pooled feature cannot say which colour goes with which shape; read out per cell,
    swapping the colours of "a red circle left of a blue square" moves its regression nearly as far as
    replacing one, pooled about half as far (research/attribute_separation.py). Regressed
    and seen embeddings get a read-out each: one linear map fitted on both read shape from the
    regressions at half the strength."""

    def __init__(
        self,
        cfg: DecoderConfig,
        condition_width: int,
        num_queries: int,
        vae: AutoencoderKL | None = None,
        unet: UNet2DConditionModel | None = None,
        scheduler: DDPMScheduler | None = None,
        semantic_width: int = 0,
        semantic_grid: int = 0,
    ):
        super().__init__()
        self.cfg = cfg
        self.condition_width = condition_width
        self.num_queries = num_queries
        self.vae = vae if vae is not None else build_vae(cfg)
        self.unet = unet if unet is not None else build_unet(cfg, condition_width)
        self.scheduler = scheduler if scheduler is not None else build_scheduler(cfg)
        if self.vae.config.latent_channels != self.unet.config.in_channels:
            raise ValueError(
                f"the VAE makes {self.vae.config.latent_channels}-channel latents but the UNet reads "
                f"{self.unet.config.in_channels}; give a VAE and UNet made for each other"
            )
        context = self.unet.config.cross_attention_dim
        self.condition_proj = nn.Identity() if context == condition_width else nn.Linear(condition_width, context)
        # Cross-attention treats its keys as a set; which of the N slots an embedding fills (with region
        # seeds, where in the picture it was read) is told here. Zero: starts as the plain projection.
        self.condition_pos = nn.Parameter(torch.zeros(num_queries, context))
        # The learned "no condition": what condition dropout trains in, and the default negative.
        self.null_condition = nn.Parameter(torch.randn(num_queries, condition_width) * 0.02)
        self.semantic_width = semantic_width
        self.semantic_grid = semantic_grid if semantic_width else 0
        if semantic_width:
            flat, tokens = num_queries * condition_width, self.semantic_tokens
            for kind in ("regressed", "seen"):  # fitted, not trained: zeros until fit_readouts
                self.register_buffer(f"readout_{kind}_weight", torch.zeros(tokens * semantic_width, flat))
                self.register_buffer(f"readout_{kind}_bias", torch.zeros(tokens * semantic_width))
            self.semantic_proj = nn.Linear(semantic_width, context, bias=False)
            # Unit weights: a unit-length CLIP feature becomes a token about as long as a projected embedding.
            nn.init.normal_(self.semantic_proj.weight, std=1.0)
            self.null_semantic = nn.Parameter(torch.randn(tokens, semantic_width) * 0.02)
            if self.semantic_grid:  # which cell a token reads, as condition_pos does for the N slots
                self.semantic_pos = nn.Parameter(torch.zeros(tokens, context))
        self.downsampling = 2 ** (len(self.vae.config.block_out_channels) - 1)
        sample_size = self.unet.config.sample_size
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        self.image_size = sample_size * self.downsampling if sample_size else cfg.image_size

    @property
    def semantic_tokens(self) -> int:
        """How many semantic tokens the UNet reads: the whole picture's and one per grid cell (0: none)."""
        return 1 + self.semantic_grid**2 if self.semantic_width else 0

    # ------------------------------------------------------------------------- latents

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def _latent_shift(self) -> float:
        return float(self.vae.config.get("shift_factor") or 0.0)  # SD3/Flux-style VAEs centre their latents too

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> diffusion latents (B, C, H/f, W/f), about unit variance once calibrated.

        The posterior's mean, not a sample: the same image then always gives the UNet the same target,
        the one the scale was calibrated on; a sample would add the posterior's noise to what the UNet
        must learn to denoise, with nothing to gain since sampling ends in `decode` of a clean latent."""
        mean = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean
        return (mean - self._latent_shift()) * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pixels = self.vae.decode(latents.to(self.vae.dtype) / self.latent_scale + self._latent_shift()).sample
        return pixels.float().clamp(-1, 1)

    def autoencoder_loss(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Squared error through a posterior sample, its colour part weighted up (CHROMA_WEIGHT), plus
        KL_WEIGHT x KL to a unit Gaussian; each a mean per element. With L1 instead, the shapes stayed dark
        blurs of the wrong colour for far longer."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        error = self.vae.decode(posterior.sample()).sample.float() - pixels.float()
        chroma = error - error.mean(1, keepdim=True)
        recon = error.pow(2).mean() + CHROMA_WEIGHT * chroma.pow(2).mean()
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return {"loss": recon + KL_WEIGHT * kl, "recon": recon, "kl": kl}

    @torch.no_grad()
    def calibrate_latent_scale(self, pixels: torch.Tensor) -> float:
        """After the VAE's training: scale latents to unit standard deviation (SD's 0.18215 is the same
        number for its VAE) and record it in the VAE's config, so save/load keep it."""
        std = float(self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean.float().std())
        if not math.isfinite(std) or std <= 0:
            raise ValueError(f"the VAE's latents have standard deviation {std}, so cannot be scaled; did its training diverge?")
        self.vae.register_to_config(scaling_factor=1.0 / std)
        return 1.0 / std

    # ------------------------------------------------------------------------- the condition

    @torch.no_grad()
    def fit_readouts(self, regressed: torch.Tensor, seen: torch.Tensor, clip_features: torch.Tensor, ridge: float = 1.0) -> None:
        """Fit the semantic tokens' two read-outs: the (S, N, width) embeddings the LLM regressed from S
        pictures' captions, and those the vision stack made of the pictures, each onto the pictures'
        (S, semantic tokens, semantic width) CLIP features (CLIP.encode_image_cells)."""
        if clip_features.shape[1:] != (self.semantic_tokens, self.semantic_width):
            raise ValueError(f"CLIP features of shape {tuple(clip_features.shape[1:])}, not ({self.semantic_tokens}, {self.semantic_width}) per picture")
        for kind, x in (("regressed", regressed), ("seen", seen)):
            weight, bias = fit_ridge(x.flatten(1).float(), clip_features.flatten(1).float(), ridge)
            getattr(self, f"readout_{kind}_weight").copy_(weight)
            getattr(self, f"readout_{kind}_bias").copy_(bias)

    def _semantic(self, condition: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """(B, N, width) and a (B,) bool of which rows were seen -> (B, semantic tokens, semantic width)
        read-outs, in fp32: the folded standardisation makes the weights too uneven for bf16."""
        flat = condition.flatten(1).float()
        with torch.autocast(flat.device.type, enabled=False):
            regressed = F.linear(flat, self.readout_regressed_weight, self.readout_regressed_bias)
            seen_rows = F.linear(flat, self.readout_seen_weight, self.readout_seen_bias)
        picked = torch.where(seen[:, None].to(flat.device), seen_rows, regressed)
        return picked.view(len(flat), self.semantic_tokens, self.semantic_width)

    def _tokens(self, condition: torch.Tensor, semantic: torch.Tensor | None) -> torch.Tensor:
        """(B, N, condition width) and (B, semantic tokens, semantic width) or None -> (B, N [+ semantic
        tokens], cross_attention_dim)."""
        tokens = self.condition_proj(condition.float()) + self.condition_pos
        if semantic is not None:
            extra = self.semantic_proj(semantic.float())
            tokens = torch.cat([tokens, extra + self.semantic_pos if self.semantic_grid else extra], 1)
        return tokens.to(self.unet.dtype)

    def _context(self, condition: torch.Tensor, seen: torch.Tensor | bool = False) -> torch.Tensor:
        """(B, N, condition width) -> the UNet's cross-attention input (B, N [+ semantic tokens], cross_attention_dim);
        `seen` (a bool, or one per row) says the embeddings are a picture's, not the LLM's regression."""
        seen = torch.as_tensor(seen).expand(condition.shape[0])
        return self._tokens(condition, self._semantic(condition, seen) if self.semantic_width else None)

    def _null_context(self) -> torch.Tensor:
        """The learned "no condition" as a (1, N [+ semantic tokens], cross_attention_dim) context."""
        return self._tokens(self.null_condition[None], self.null_semantic[None] if self.semantic_width else None)

    def _denoise(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction for noisy latents at timesteps t, given the cross-attention context."""
        return self.unet(latents.to(self.unet.dtype), t, encoder_hidden_states=context).sample.float()

    def _check_condition(self, condition: torch.Tensor, what: str) -> None:
        n, width = self.num_queries, self.condition_width
        if condition.ndim != 3 or tuple(condition.shape[1:]) != (n, width):
            raise ValueError(f"{what} has shape {tuple(condition.shape)}; the decoder reads (batch, {n}, {width})")

    def diffusion_loss(self, pixels: torch.Tensor, condition: torch.Tensor, seen: torch.Tensor | bool = True) -> dict[str, torch.Tensor]:
        """The UNet's denoising loss on the frozen VAE's latents. `condition` (B, N, width) comes detached
        from the caller, `seen` says which rows are pictures' embeddings (the rest regressed); each row is
        swapped for the null condition with probability cfg.condition_dropout, which is what lets `sample`
        guide against it."""
        self._check_condition(condition, "condition")
        with torch.no_grad():
            latents = self.encode(pixels).float()
        b = latents.shape[0]
        dropped = torch.rand(b, device=latents.device) < self.cfg.condition_dropout
        context = torch.where(dropped[:, None, None], self._null_context(), self._context(condition, seen))
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        error = (self._denoise(noisy, t, context) - self.denoising_target(latents, noise, t)).pow(2).mean((1, 2, 3))
        return {"loss": (error * self._loss_weights(t)).mean(), "mse": error.mean()}

    def denoising_target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet should predict for these clean latents noised with `noise` at timesteps t: the
        noise, or the velocity for a v-predicting UNet (ours by default; SD 2.x at 768 px, whatever
        cfg.prediction_type says, since the scheduler a pretrained directory brings decides)."""
        if self.scheduler.config.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, t)
        return noise

    def _loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023): each timestep's loss, in terms of the clean latents, weighted
        by min(SNR, gamma). Plain epsilon loss weights it by SNR itself, so the noisy steps, where what the
        image shows is decided and only the condition can tell it, count for almost nothing."""
        if not self.cfg.snr_gamma:
            return torch.ones_like(t, dtype=torch.float32)
        alpha_bar = self.scheduler.alphas_cumprod.to(t.device)[t].float()
        snr = alpha_bar / (1 - alpha_bar)
        v = self.scheduler.config.prediction_type == "v_prediction"
        return snr.clamp(max=self.cfg.snr_gamma) / (snr + 1 if v else snr)

    # ------------------------------------------------------------------------- sampling

    def make_sampler(self):
        """The sampler cfg.sampler names, on the training schedule (betas, spacing, prediction type)."""
        if self.cfg.sampler == "ddim":
            return DDIMScheduler.from_config(self.scheduler.config, set_alpha_to_one=False)
        if self.cfg.sampler == "dpm":
            return DPMSolverMultistepScheduler.from_config(self.scheduler.config, algorithm_type="dpmsolver++")
        raise ValueError(f"decoder.sampler is '{self.cfg.sampler}'; set it to ddim or dpm")

    @torch.no_grad()
    def sample(
        self,
        condition: torch.Tensor,
        negative: torch.Tensor | None = None,
        guidance: float | None = None,
        steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seen: bool = False,
    ) -> torch.Tensor:
        """(B, N, width) embeddings -> (B, 3, H, W) images in [-1, 1]. `seen`: the embeddings are pictures'
        (reconstruction), not the LLM's regression.

        Classifier-free guidance: eps = eps(negative) + guidance x (eps(condition) - eps(negative)), the
        negative being regressed (B, N, width), or (1, N, width) for every row, or by default the learned null
        condition. Both go through one UNet call of batch 2B; guidance 1 is the conditional alone. A list
        of B generators makes row k depend only on generator k."""
        self._check_condition(condition, "condition")
        guidance = self.cfg.guidance if guidance is None else float(guidance)
        steps = self.cfg.sample_steps if steps is None else int(steps)
        b = condition.shape[0]
        device = self.null_condition.device
        context = self._context(condition.to(device), seen)
        guided = guidance != 1.0
        if guided:
            if negative is None:
                unconditional = self._null_context()
            else:
                self._check_condition(negative, "negative")
                if negative.shape[0] not in (1, b):
                    raise ValueError(f"negative has {negative.shape[0]} rows for {b} conditions; give 1 or {b}")
                unconditional = self._context(negative.to(device))
            context = torch.cat([unconditional.expand(b, -1, -1), context])

        sampler = self.make_sampler()
        with warnings.catch_warnings():
            # diffusers 0.42's DPM-Solver calls np.array() on a torch tensor here, which NumPy 2 flags as
            # deprecated on every call; the values are right, and the fix is diffusers' to make.
            warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword", DeprecationWarning)
            sampler.set_timesteps(steps, device=device)
        side = self.image_size // self.downsampling
        shape = (b, self.unet.config.in_channels, side, side)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * sampler.init_noise_sigma
        for i, t in enumerate(sampler.timesteps):
            x = sampler.scale_model_input(latents, t)
            x = torch.cat([x, x]) if guided else x
            out = self._denoise(x, t, context)
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance * (cond - uncond)
            latents = sampler.step(out, t, latents).prev_sample
            if not torch.isfinite(latents).all():
                raise DecoderSamplingError(
                    f"denoising step {i + 1} of {steps} (timestep {int(t)}) produced NaN or inf; the decoder's weights "
                    f"may have diverged or be corrupt: try a lower guidance than {guidance:g}, sampling in fp32, or "
                    "a decoder from an earlier checkpoint"
                )
        return self.decode(latents)

    # ------------------------------------------------------------------------- files

    def _condition_state(self) -> dict[str, torch.Tensor]:
        names = ("condition_proj.", "condition_pos", "null_condition", "readout_", "semantic_proj.", "null_semantic", "semantic_pos")
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k.startswith(names)}

    def save(self, path: str | Path) -> Path:
        """Write the decoder as a diffusers directory (module docstring), atomically: a crash leaves
        the previous directory or none, never half of one."""

        def fill(tmp: Path) -> None:
            self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            self.scheduler.save_pretrained(tmp / "scheduler")
            save_file(self._condition_state(), str(tmp / "condition.safetensors"),
                      metadata={"condition_width": str(self.condition_width), "num_queries": str(self.num_queries),
                                "semantic_width": str(self.semantic_width), "semantic_grid": str(self.semantic_grid)})

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomically(path, fill)

    @classmethod
    def load(cls, path: str | Path, cfg: DecoderConfig, condition_width: int, num_queries: int) -> VisualDecoder:
        """What `save` wrote."""
        path = Path(path)
        weights = path / "condition.safetensors"
        if not weights.is_file():
            raise DecoderDirError(
                f"decoder directory '{path}' has no condition.safetensors; give a directory written by VisualDecoder.save"
            )
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
        # Absent from decoders saved without the semantic token or its grid: they load with none, or one.
        semantic_width, semantic_grid = int(metadata.get("semantic_width", 0)), int(metadata.get("semantic_grid", 0))
        decoder = cls.from_pretrained_dir(path, cfg, condition_width, num_queries, semantic_width, semantic_grid)
        state = load_file(str(weights))
        if "null_semantic" in state and state["null_semantic"].dim() == 1:  # one token, saved before the grid
            state["null_semantic"] = state["null_semantic"][None]
        expected = decoder._condition_state()
        if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            raise DecoderDirError(
                f"'{weights}' holds {shapes}, not the condition weights of a decoder for {num_queries} embeddings of width "
                f"{condition_width}; load it with the config it was trained with"
            )
        decoder.load_state_dict(state, strict=False)
        return decoder

    @classmethod
    def from_pretrained_dir(
        cls, sd_dir: str | Path, cfg: DecoderConfig, condition_width: int, num_queries: int, semantic_width: int = 0,
        semantic_grid: int = 0,
    ) -> VisualDecoder:
        """A local diffusers directory in Stable Diffusion's layout (vae/ and unet/, model_index.json
        optional): its VAE and UNet, a new projection from our width to the UNet's cross-attention width
        (and semantic tokens of `semantic_width`, 0 for none, on a `semantic_grid`), and its scheduler/ as the training schedule
        when it has one. Nothing is downloaded."""
        root = Path(sd_dir)
        need = (
            "a diffusers Stable-Diffusion-style directory with vae/ (AutoencoderKL) and unet/ (UNet2DConditionModel), "
            "each holding config.json and its weights"
        )
        missing = [part for part in ("vae", "unet") if not (root / part / "config.json").is_file()]
        if not root.is_dir() or missing:
            problem = "does not exist" if not root.is_dir() else f"has no {' or '.join(m + '/config.json' for m in missing)}"
            raise DecoderDirError(f"decoder directory '{root}' {problem}; give {need}")
        try:
            vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True, low_cpu_mem_usage=False)
            unet = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, json.JSONDecodeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DecoderDirError(f"decoder directory '{root}' could not be read by diffusers ({reason}); give {need}") from err
        if vae.config.latent_channels != unet.config.in_channels:
            raise DecoderDirError(
                f"decoder directory '{root}' pairs a VAE with {vae.config.latent_channels}-channel latents and a UNet that "
                f"reads {unet.config.in_channels} channels; give {need}, made for each other"
            )
        extra = unet.config.addition_embed_type or unet.config.class_embed_type
        if extra or not isinstance(unet.config.cross_attention_dim, int):
            raise DecoderDirError(
                f"decoder directory '{root}' has a UNet that needs more than cross-attention to condition it (SDXL-style "
                "extra embeddings); give a Stable Diffusion 1.x/2.x-style directory"
            )
        # Without its own schedule, Stable Diffusion 1.x's: the same betas, predicting epsilon.
        scheduler = build_scheduler(dataclasses.replace(cfg, prediction_type="epsilon"))
        if (root / "scheduler" / "scheduler_config.json").is_file():
            try:
                scheduler = DDPMScheduler.from_pretrained(root / "scheduler", local_files_only=True)
            except (OSError, ValueError, TypeError, json.JSONDecodeError) as err:
                raise DecoderDirError(
                    f"decoder directory '{root}' has a scheduler/ that diffusers cannot read ({err}); fix or remove it"
                ) from err
        return cls(cfg, condition_width, num_queries, vae=vae, unet=unet, scheduler=scheduler,
                   semantic_width=semantic_width, semantic_grid=semantic_grid)
