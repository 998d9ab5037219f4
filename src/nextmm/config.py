"""Dataclass configs, named presets (YAML files in model_configs/), YAML files and dotted overrides.

Fields are grouped by the part they configure (`vision`, `resampler`, `emu`, `llm`, `clip_text`, then one
training config per stage) so that an override such as `pretrain.lr=3e-4` reads like a path.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nextmm.errors import UserError


PRECISIONS = ("auto", "bf16", "fp32")
SHARDINGS = ("ddp", "fsdp")
RESAMPLER_SEEDS = ("regions", "none")
RESAMPLER_KINDS = ("causal", "t5")
VISION_KINDS = ("vit", "clip", "siglip", "eva")
VISION_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
REGRESSION_SPACES = ("resampler", "llm")
SAMPLERS = ("ddim", "dpm")
NEGATIVES = ("null", "empty")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TUNE_SAVES = ("merged", "adapter")


class ConfigError(UserError):
    """A user-facing configuration mistake: unknown preset, unknown key, value of the wrong type."""


@dataclass
class VisionConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 2  # on the conv stem; 4 cost several times the stem per step and learn shape slower
    heads: int = 4
    mlp_ratio: float = 4.0
    stem: str = "conv"  # conv: hybrid-ViT convolutional stem (learns fast from scratch); patch: linear, as EVA-CLIP
    video_frames: int = 0  # frames of a video the model sees: 0 = all, else this many evenly spaced from first to last
    # The tower's family (models/vision.VISION_KINDS): nextmm's own `vit`, trained from scratch, or the layout
    # of a pretrained tower that convert/ loads: `clip` (HF CLIPVisionModel), `siglip` (HF SiglipVisionModel),
    # `eva` (EVA-CLIP, Emu's tower), whose patch embedding is always linear (`stem` is vit's). The converters
    # (convert/hf_vision.py, convert/eva_clip.py) fill in every field below from the checkpoint.
    kind: str = "vit"
    # Which tokens the tower returns, indexed as HF's `hidden_states`: 0 the embeddings, i the output of block
    # i, -1 the last block's, -2 the penultimate (LLaVA's read of CLIP). Blocks after it are not built.
    feature_layer: int = -1
    # Whether the tower's own final LayerNorm (CLIP's and SigLIP's post_layernorm, EVA's `norm`) follows the
    # read tokens. Emu reads EVA's tokens without it and applies its own `ln_visual`.
    final_norm: bool = True
    eps: float = 1e-5  # every LayerNorm's epsilon
    act: str = "gelu"  # the MLP's activation (models/vision.ACTIVATIONS): gelu, gelu_tanh or quick_gelu
    # The tower reads ((pixels + 1) / 2 - mean) / std per channel from nextmm's [-1, 1] pixels: its own
    # training normalisation. 0.5 and 0.5 leave [-1, 1] as it is.
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    @property
    def cls_tokens(self) -> int:
        """How many tokens precede the patch grid in the tower's output: SigLIP has no CLS token."""
        return 0 if self.kind == "siglip" else 1

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + self.cls_tokens


@dataclass
class ResamplerConfig:
    """Emu's causal transformer: N learned queries read the patch features; `width` is the visual
    embedding size that the LLM regresses."""

    num_queries: int = 8
    width: int = 128
    layers: int = 1  # a second block slows shape learning a lot, even identity-initialised
    # One of RESAMPLER_SEEDS. regions: each query starts from the max over its own region of the patch
    # grid (see models/resampler.py); none: Emu's plain learned queries, as its released weights expect.
    seed: str = "regions"
    # With seed=regions: each seed also carries where its region's content lies (models/resampler.py).
    region_coords: bool = True
    heads: int = 4
    mlp_ratio: float = 4.0
    # Which causal transformer (nextmm.models.resampler_t5.resampler_for): "causal", nextmm's own pre-norm
    # blocks (models/resampler.py); "t5", a T5 decoder stack like the official Emu1 checkpoint's cformer
    # (models/resampler_t5.py), which reads its learned queries alone and so needs seed=none.
    kind: str = "causal"
    # kind=t5 only. The width of each attention head (T5's d_kv); 0 means width // heads.
    head_width: int = 0
    # kind=t5 only: T5's relative position buckets and the distance from which all share the last bucket.
    relative_buckets: int = 32
    relative_max_distance: int = 128


@dataclass
class LLMConfig:
    vocab_size: int = 0  # taken from the tokenizer when the model is built
    width: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 0  # 0 means as many as `heads` (no grouped-query attention)
    mlp_hidden: int = 0  # 0 means LLaMA's rule: 2/3 of 4 x width, rounded up to a multiple of 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    # The output layer shares the input embeddings (GPT-2); LLaMA's are separate. Tied, caption training
    # aligns an image token's state with the word it names, where a question's word can find it, though
    # whether that helps reading is not established; it costs nothing and saves the output matrix.
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    # The fields below describe pretrained LLMs (convert/hf_llm.py); their defaults are the plain LLaMA above.
    head_dim: int = 0  # 0 means width // heads; Qwen3 sets its own
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head's q and k before the rotation (Qwen3)
    # Rotary frequency scaling for long contexts, as Hugging Face writes it: {} (none), {"rope_type": "linear",
    # "factor": F} or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} (models/llm.py, ROPE_TYPES).
    rope_scaling: dict = field(default_factory=dict)
    sliding_window: int = 0  # each query sees the latest this many keys, itself included (Mistral); 0: all

    @property
    def head_size(self) -> int:
        return self.head_dim or self.width // self.heads

    @property
    def ffn_hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return -(-int(8 * self.width / 3) // 64) * 64


@dataclass
class HeadsConfig:
    """Extra heads beside the paper's Emu (heads/, each behind heads/base.py's interface). All off, the model is
    the paper's composition; the demo's presets switch them on."""

    # The location tokens' logits come from heads/location.py's LocationHead (a parabola over the bins, peaked
    # where one linear read of the hidden state points); false: from their lm_head rows, like any token.
    # Near bins are nearly as likely, so boxes land closer to their objects than with a row per bin.
    location: bool = True
    # With location: its place also comes from pointing into the latest image's patch grid
    # (heads/location.py's PatchPointer), not only from what the LLM carried to the box, whose hidden state
    # knows poorly where an object is.
    pointer: bool = True
    # With pointer: the pointer's question also comes from the words since the latest image or box
    # (their embeddings, gated and summed; heads/words.py), not only from the hidden state where the box is written.
    pointer_words: bool = True
    # With pointer: a box's x0 y0 x1 y1 start at the pointed place's x or y, moved out by half a
    # side, by their order in the box (heads/location.py, PatchPointer.half_side), rather than learned.
    pointer_roles: bool = True
    # The next token may also be copied from the context: one that followed an earlier position like this one
    # (heads/copy.py, CopyHead, a pointer-generator). In-context binding needs it: from binding documents alone
    # the 4-layer LLM chooses a made-up word at chance.
    copy: bool = True
    # With pointer_words: whether the phrase just read is in the latest picture, read off its visual embeddings,
    # joins each word's input (heads/presence.py, PresenceProbe). Without it the LLM answers "is there a red
    # square?" and image-text matching at chance.
    presence: bool = True
    # With presence: a running soft minimum of the probe's reads since the latest picture, each weighed by a
    # learned gate on its word, joins each word's input and final hidden state: whether all that was said holds
    # there (heads/agreement.py). With it the LLM answers `is there a {colour} {shape}?` from the picture and
    # knows better whether a caption fits, though where it puts its yes-no threshold still varies by run.
    agreement: bool = True
    # With pointer_words: the prompt's words regress the image's N embeddings too, straight from their embeddings
    # (heads/words_to_visual.py: the word bag at `[IMG]`, a linear map per embedding), beside the LLM's hidden
    # state. Off by default: it may lift one-object regression retrieval and cost ITM, detection and region
    # captions, and neither is yet told from chance (docs/notebook.md).
    words_to_visual: bool = False


@dataclass
class EmuConfig:
    """How the parts join. `regress_in`: the space the LLM regresses and the visual decoder reads — the causal
    transformer's output (`resampler`), or that output projected to the LLM's width (`llm`, the official Emu1
    checkpoint's layout: its regression head maps the LLM's width onto itself). `visual_norm`: a LayerNorm on
    the tower's tokens before the causal transformer (Emu1's `ln_visual`), for towers read before their own
    final norm."""

    regress_in: str = "resampler"
    visual_norm: bool = False


@dataclass
class CLIPTextConfig:
    width: int = 128
    layers: int = 2
    heads: int = 4
    max_len: int = 32
    embed_dim: int = 128


MIN_SEMANTIC_PICTURES = 16  # fewer captioned pictures than this cannot fit the semantic token's read-outs


@dataclass
class DecoderConfig:
    """The visual decoder: a diffusers AutoencoderKL (the latent space) and a UNet2DConditionModel whose
    cross-attention reads the N visual embeddings (models/decoder.py)."""

    # A local diffusers-format directory holding vae/ and unet/ (Stable Diffusion's layout) to start
    # from; empty: build the small ones below and train them from scratch.
    pretrained: str = ""
    image_size: int = 64
    latent_channels: int = 4
    # One halving per block after the first. Narrow: the VAE trains from scratch in the demo's minute,
    # where [32, 64, 64] manages about a tenth as many steps (models/decoder.py).
    vae_channels: list[int] = field(default_factory=lambda: [8, 16, 32])
    # [32, 64] took 236 steps in the demo's 150 s where [64, 128] took 110, and learned more in them.
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])
    unet_layers_per_block: int = 1
    unet_head_dim: int = 32
    condition_dropout: float = 0.1  # training drops the condition this often, so guidance has an unconditional
    # The share of captioned training images whose condition is what the frozen LLM regresses from the
    # caption instead of the image's own embeddings (train/decoder_stage.training_condition); 0 is Emu's rule.
    regressed_condition: float = 0.5
    # One more cross-attention token: the N embeddings read out onto the CLIP stage's image space (models/
    # decoder.py), fitted at the start of stage 2 on `semantic_pictures` captioned pictures. With it the UNet
    # draws one-object prompts right about twice as often.
    semantic_token: bool = True
    semantic_pictures: int = 1024
    # And one token per cell of a grid x grid split of the picture (0: the whole picture's alone), so the
    # UNet is told which colour goes with which shape: read out per cell, swapping a two-object caption's
    # colours moves its regression nearly as far as replacing one, pooled about half as far.
    semantic_grid: int = 2
    # What a from-scratch UNet predicts, epsilon (SD 1.x) or v_prediction, and Min-SNR-gamma loss weighting
    # (0: off). Early in training an epsilon UNet samples confetti at any guidance, where a v one with
    # gamma 5 draws blobs on a clean background, its loss far more dependent on the condition.
    prediction_type: str = "v_prediction"  # one of PREDICTION_TYPES
    snr_gamma: float = 5.0
    train_timesteps: int = 1000
    sampler: str = "dpm"  # one of SAMPLERS: ddim, or dpm (DPM-Solver++ multistep)
    sample_steps: int = 25
    guidance: float = 3.0
    # What guidance steers away from when `draw` is not told: one of NEGATIVES. null: the decoder's learned
    # no-condition; empty: the embeddings the LLM regresses from an empty prompt (Emu's). With a decoder
    # trained on regressed conditions too, null draws more one-object prompts right.
    negative: str = "null"


@dataclass
class TokenizerConfig:
    vocab_size: int = 512
    location_bins: int = 64


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    precision: str = "auto"  # one of PRECISIONS; auto times both (bf16 is slower on CPUs without native bf16)
    time_budget_s: float = 0.0  # 0 = no budget; otherwise stop (and save) when it runs out
    log_every: int = 10
    ckpt_every: int = 200


@dataclass
class ClipTrainConfig(TrainConfig):
    # NegCLIP-style negatives: each caption with one word swapped makes CLIP read every word, not only
    # the few (colour, size) that already tell most captions in a batch apart.
    hard_negatives: bool = True
    # Train only on pairs whose caption has at most this many words (0: all). A pooled image feature
    # cannot say which colour belongs to which shape, and on Shapes World's 1-3 object captions the
    # tower learns shape slowly, where one-object captions teach it quickly.
    max_caption_words: int = 0


@dataclass
class PretrainConfig(TrainConfig):
    # lambda in loss = CE + lambda * L2; Emu never published its value. At 1.0 the L2 term kept the tiny
    # LLM from learning to read its images (colour from captions 0.31 vs 1.0 at 0.0, 200 steps).
    regression_weight: float = 0.1
    # A location token's target spreads over neighbouring bins with this sigma (in bins; 0: one-hot), so a
    # box a pixel off is nearly right (heads/location.py, location_token_loss), the shape LocationHead predicts.
    location_sigma: float = 1.5
    # Where a box is written, the location head's PatchPointer is also told which patches the box covers:
    # this weight x the cross-entropy of its attention against each patch's share of the box
    # (heads/location.py, LocationHead.pointer_loss). At 0 the pointer learns only from the bins' loss, which reaches it
    # through a read around its attention's peak: on tests/test_model.py's toy task it then never found the object.
    # The other heads' own loss terms (the presence probe's, the agreement judge's) take the same weight.
    pointer_weight: float = 1.0
    # The text loss goes through the LM head this many labelled rows at a time, each chunk's logits recomputed in
    # the backward pass (models/chunked_ce.py), so a large vocabulary's fp32 logits never all sit in memory: about
    # a third more LM-head compute for a fraction of its memory. 0: all rows at once. Used where no head changes
    # the scores and the location tokens take no soft targets (location_sigma 0 or no bins).
    ce_chunk: int = 0
    # Lays each batch's samples end to end in rows of at most this many tokens, attention kept within each sample
    # (data/packing.py), instead of one right-padded row per sample; samples longer are skipped and counted.
    # 0 (off) by default: rows of one sample need no mask, which keeps GPUs on the flash kernel (it takes no mask).
    pack_len: int = 0
    # With pointer_weight > 0: a VQA question about one object, and a one-object caption, also tell the pointer
    # that object's patches at their last token (worlds/shapes/generator.py, named_object), so it learns which object
    # words name from the many reading batches, not only from the few grounding ones. They train the pointer
    # alone (LocationHead.pointer_loss): reaching the LLM they held off its reading, which came by step 100 without.
    point_at_named: bool = True
    # With pointer_weight > 0: every object of a one-image sample's scene (worlds/shapes/generator.py, object_regions) also
    # tells the pointer its patches and box, asked by the object's phrase alone (LocationHead.region_loss), with no
    # LLM pass: dozens of region-phrase pairs a batch, where texts name one object in a few samples.
    point_at_objects: bool = True
    regression_reaches_visual: bool = False  # true lets L2 train vision/resampler, which can collapse them
    target_ema: float = 0.0  # with the above true: targets from an EMA of the visual stack (e.g. 0.995)
    # The stage-0 tower is fine-tuned gently: at the full rate the first steps' gradients, sent back
    # through an LLM that cannot read yet, wipe out shape it has learned; at x0.1 it keeps as much as frozen.
    vision_lr_scale: float = 0.1
    # With the tower frozen (vision_lr_scale 0), its outputs for pictures seen before come from a cache of this many
    # GiB of CPU memory instead of its forward pass (train/tower_cache.py): from the second epoch on, most of a
    # large frozen tower's cost. 0: no cache.
    tower_cache_gb: float = 0.0
    # The causal transformer (with the projection) and the LLM at their own rates too: a pretrained LLM is
    # usually fine-tuned gently while the fresh causal transformer learns at the full rate. 0 freezes a part.
    resampler_lr_scale: float = 1.0
    llm_lr_scale: float = 1.0
    # The copy head's gate (both its layers) learns this much faster. It must open where a binding answer
    # starts, and a demo sees few binding batches: at x1 it stays nearly shut and no bound word is written.
    # The whole head at x10 opens the gate as far, but its attention loses the right picture.
    copy_gate_lr_scale: float = 10.0
    # The presence probe's query, keys and calibration (heads/presence.py, PresenceProbe) learn this much faster;
    # trained by their own loss alone, at x1 they tell no phrase apart within a demo's stage 1. The agreement
    # judge's gate and calibration (heads/agreement.py), trained by their own loss alone too, take the same.
    presence_lr_scale: float = 10.0
    # The directions the presence probe and the agreement judge add to the LLM's input (presence.found,
    # agreement.holds), which the text loss alone trains, learn this much faster.
    told_lr_scale: float = 1.0
    # At 8 frames each a video batch costs several caption batches, so videos weigh little and captions much:
    # more stage-1 steps and better captions, with video scores no lower.
    # text_to_image: the caption pairs read caption-first, the image regressed (stages.text_first). At any share
    # from 1 to 3 a demo's stage 1 sees too few of them to regress embeddings nearer the prompt's object than
    # chance (eval/images.regression_retrieval), so a share this size leaves room for the OFA tasks.
    # ground, region_caption, itm, detect: OFA's tasks as instructions (worlds/shapes/generator.py), boxes as <bin_k>.
    # They come in lightly, for longer runs to raise: heavier, a demo still makes too few grounding batches
    # to write a box, and captions worse. binding at 0.5 rather than 0.3: more bound words are written and
    # the copy gate opens fully.
    # conversation: instruction tuning's data (`nextmm data shapes --count conversation=N`), which a source not
    # named here would join at weight 1; stage 1 leaves it out unless given a weight.
    mix: dict[str, float] = field(
        default_factory=lambda: {
            "caption": 3.0, "vqa": 3.0, "video_caption": 0.25, "video_qa": 0.5,
            "story": 0.3, "edit": 0.2, "binding": 0.5, "text_to_image": 1.5,
            "ground": 0.25, "itm": 0.25, "region_caption": 0.25, "detect": 0.25, "conversation": 0.0,
        }
    )
    # Sources held back until this many batches have been drawn: captions first, videos last. With VQA
    # from the first step the LLM never learned to read colour from its images (0.17 after 240 steps of
    # captions + VQA); with VQA joining at batch 100 it does. With the named boxes kept from the LLM
    # (PretrainConfig.point_at_named) it reads by batch 100, so the others join at 120: against joining at
    # 200, far more bound words are written at 4 shots, for slightly worse captions. An 8-frame batch costs
    # about 8 image batches, and motion cannot be learned before the images are read.
    join_at: dict[str, int] = field(default_factory=lambda: {
        "vqa": 120, "story": 120, "edit": 120, "binding": 120, "video_caption": 170, "video_qa": 170, "text_to_image": 120,
        "ground": 120, "itm": 120, "region_caption": 120, "detect": 120,
    })
    # How several processes hold the model (one process ignores it): ddp keeps a whole copy in each; fsdp shards the
    # LLM blocks' and the rest's parameters, gradients and optimizer state among them (FSDP2), for a model too large
    # for one device's memory.
    sharding: str = "ddp"
    # Recompute the activations of every k-th transformer block (LLM and vision tower) in the backward pass rather
    # than keep them: 1 every block, 0 none. Less memory for about a third more compute in the blocks it covers.
    activation_checkpointing: int = 0
    # Compile each LLM block with torch.compile (inductor): faster steps after a first step that spends its time
    # compiling. Only with regression_reaches_visual (one backward pass; see _check).
    compile: bool = False


@dataclass
class TuneConfig(TrainConfig):
    """Instruction tuning (`nextmm tune`, train/tune.py) on conversations, with stage 1's loss learned on the
    assistant's turns alone: LoRA on the LLM's linear layers through peft, as Emu-I (r=16, alpha=16 on q, k, v and
    o), or full fine-tuning of the LLM."""

    lora_rank: int = 16
    lora_alpha: int = 16  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.05
    # Names of linear layers in the LLM's blocks (models/llm.py); peft adapts each block's layers of these names.
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Every weight of the LLM and its regression head learns, rather than LoRA adapters beside the frozen weights.
    full: bool = False
    # The causal transformer (with the layer norm before it and its projection to the LLM) learns too, all of its weights.
    train_resampler: bool = False
    # One of TUNE_SAVES. merged: the adapters folded into the weights, an ordinary model directory; adapter: peft's
    # adapter folder (adapter_config.json naming the base model's directory, adapter_model.safetensors), which
    # `nextmm.load` applies to that base model.
    save: str = "merged"


@dataclass
class DataConfig:
    """How much Shapes World `nextmm demo` and `nextmm data shapes` generate (per kind)."""

    seed: int = 0
    counts: dict[str, int] = field(
        default_factory=lambda: {
            "caption": 6000, "vqa": 3000, "video_caption": 1000, "video_qa": 800,
            "story": 500, "edit": 500, "binding": 800, "ground": 800, "itm": 1000, "region_caption": 500, "detect": 400,
        }
    )
    shard_size: int = 2000


@dataclass
class Config:
    preset: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    emu: EmuConfig = field(default_factory=EmuConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    clip_text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipTrainConfig = field(default_factory=lambda: ClipTrainConfig(steps=1500, batch_size=64, lr=2e-3, time_budget_s=100))
    # Stage 1 has 400 s: runs of under ~500 steps often lose their reading, and 400 s makes ~530 or
    # more even on a slower AVX2 EPYC, with the demo and its minute of instruction tuning within 15 minutes.
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(steps=3000, batch_size=32, lr=1.5e-3, time_budget_s=400))
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # Stage 2: the decoder's autoencoder on pixels, then its UNet on the frozen visual embeddings.
    # Small batches for the autoencoder: more steps in its minute, and its images are alike anyway. lr 2e-3
    # rebuilds held-out one- and two-object scenes right more often than 1e-3; 3e-3 is no better and fails worse.
    autoencoder: TrainConfig = field(default_factory=lambda: TrainConfig(steps=5000, batch_size=8, lr=2e-3, time_budget_s=60))
    diffusion: TrainConfig = field(default_factory=lambda: TrainConfig(steps=6000, batch_size=32, lr=2e-3, time_budget_s=150))
    # Instruction tuning, on top of a trained model (`nextmm tune`); no weight decay, as LLaVA fine-tunes.
    tune: TuneConfig = field(default_factory=lambda: TuneConfig(steps=1000, batch_size=16, lr=2e-4, warmup_steps=30, weight_decay=0.0, ckpt_every=100))
    seed: int = 0

    @property
    def visual_width(self) -> int:
        """The width of the visual embeddings the LLM regresses and the visual decoder reads."""
        return self.llm.width if self.emu.regress_in == "llm" else self.resampler.width

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


PRESET_DIR = Path(__file__).parent / "model_configs"


def presets() -> list[str]:
    """The named architectures: one YAML file each in model_configs/."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def preset_values(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(presets())}")
    return yaml.safe_load(path.read_text()) or {}


def _merge(target: Any, updates: dict[str, Any], path: str = "") -> None:
    for key, value in updates.items():
        where = f"{path}{key}"
        if not hasattr(target, key):
            if path == "llm." and key in HEAD_SWITCHES_IN_LLM:
                raise ConfigError(f"config key '{where}' is now 'heads.{HEAD_SWITCHES_IN_LLM[key]}'; set that instead")
            fields = ", ".join(f.name for f in dataclasses.fields(target))
            raise ConfigError(f"unknown config key '{where}'; valid keys here are: {fields}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}' is a section; give it a mapping, not {value!r}")
            _merge(current, value, where + ".")
        elif isinstance(current, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}' needs a mapping, not {value!r}")
            setattr(target, key, dict(value))
        else:
            setattr(target, key, _coerce(value, current, where))


def _coerce(value: Any, current: Any, where: str) -> Any:
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
    elif isinstance(current, (int, float)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and not isinstance(value, bool):
            return int(number) if isinstance(current, int) and number.is_integer() else number
    elif isinstance(current, str):
        return str(value)
    elif isinstance(current, list) and isinstance(value, (list, tuple)) and value:
        sample = current[0] if current else value[0]
        return [_coerce(item, sample, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ConfigError(f"config key '{where}' expects a {type(current).__name__}, got {value!r}")


def parse_override(text: str) -> dict[str, Any]:
    """`pretrain.lr=3e-4` -> {"pretrain": {"lr": 3e-4}} (the value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. pretrain.lr=3e-4")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    tree: dict[str, Any] = {}
    node = tree
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def make_config(preset: str = "tiny", yaml_path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """A preset, then a YAML file on top, then dotted overrides on top of that."""
    base = preset
    file_values: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; give the path of a YAML config")
        try:
            file_values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML ({err.__class__.__name__}); fix its syntax") from err
        if not isinstance(file_values, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, not {type(file_values).__name__}")
        base = file_values.pop("preset", preset)
    config = Config(preset=base)
    _merge(config, preset_values(base))
    _merge(config, file_values)
    return apply_overrides(config, overrides)


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Dotted overrides (`diffusion.lr=1e-3`) on top of a config, checked as a new one is."""
    for text in overrides:
        _merge(config, _into_mapping(config, text))
    _check(config)
    return config


def _into_mapping(config: Config, text: str) -> dict[str, Any]:
    """An override that reaches into a mapping (`pretrain.mix.ground=1`) changes that one entry; a whole
    mapping given (`pretrain.mix={caption: 1}`, or in YAML) still replaces it."""
    tree = parse_override(text)
    *parents, entry = text.split("=", 1)[0].strip().split(".")
    node, branch = config, tree
    for depth, key in enumerate(parents, 1):
        node = getattr(node, key, None) if dataclasses.is_dataclass(node) else None
        if isinstance(node, dict):
            if depth < len(parents):
                where = ".".join(parents[:depth])
                raise ConfigError(f"config key '{where}' maps names to values; set one entry as {where}.NAME=VALUE")
            branch[key] = {**node, entry: branch[key][entry]}
        branch = branch[key]
    return tree


CHOICES = {
    "vision.kind": VISION_KINDS, "vision.act": VISION_ACTIVATIONS, "resampler.seed": RESAMPLER_SEEDS, "resampler.kind": RESAMPLER_KINDS, "emu.regress_in": REGRESSION_SPACES, "decoder.sampler": SAMPLERS, "decoder.negative": NEGATIVES,
    "decoder.prediction_type": PREDICTION_TYPES, "pretrain.sharding": SHARDINGS, "tune.save": TUNE_SAVES,
    **{f"{stage}.precision": PRECISIONS for stage in ("clip", "pretrain", "autoencoder", "diffusion", "tune")},
}


def _check(config: Config) -> None:
    """Value checks that types alone cannot make, done before any long work starts."""
    for key, choices in CHOICES.items():
        part, name = key.split(".")
        value = getattr(getattr(config, part), name)
        if value not in choices:
            raise ConfigError(f"config key '{key}' is '{value}'; set it to one of {', '.join(choices)}")
    if config.vision.video_frames < 0:
        raise ConfigError(f"config key 'vision.video_frames' is {config.vision.video_frames}; set it to 0 (every frame) or a positive count")
    if config.decoder.snr_gamma < 0:
        raise ConfigError(f"config key 'decoder.snr_gamma' is {config.decoder.snr_gamma}; set it to 0 (off) or a positive number such as 5")
    if config.pretrain.pointer_weight < 0:
        raise ConfigError(f"config key 'pretrain.pointer_weight' is {config.pretrain.pointer_weight}; set it to 0 (off) or a positive weight such as 1")
    for scale in ("vision_lr_scale", "resampler_lr_scale", "llm_lr_scale", "copy_gate_lr_scale", "presence_lr_scale", "told_lr_scale"):
        if getattr(config.pretrain, scale) < 0:
            raise ConfigError(f"config key 'pretrain.{scale}' is {getattr(config.pretrain, scale)}; set it to 0 (frozen) or a positive multiplier such as 10")
    if config.decoder.semantic_token and config.decoder.semantic_pictures < MIN_SEMANTIC_PICTURES:
        raise ConfigError(f"config key 'decoder.semantic_pictures' is {config.decoder.semantic_pictures}; fitting the semantic token's read-out needs {MIN_SEMANTIC_PICTURES} or more, such as 1024")
    side, grid = config.vision.image_size // config.vision.patch_size, config.decoder.semantic_grid
    if config.decoder.semantic_token and (grid < 0 or (grid and side % grid)):
        raise ConfigError(f"config key 'decoder.semantic_grid' is {grid}; set it to 0 (the whole picture alone) or a divisor of the vision tower's {side} patches a side, such as 2")
    if not 0 <= config.decoder.regressed_condition <= 1:
        raise ConfigError(f"config key 'decoder.regressed_condition' is {config.decoder.regressed_condition}; set it to a share from 0 (Emu's rule) to 1")
    if config.pretrain.ce_chunk < 0:
        raise ConfigError(f"config key 'pretrain.ce_chunk' is {config.pretrain.ce_chunk}; set it to 0 (all rows at once) or a row count such as 4096")
    if config.pretrain.tower_cache_gb < 0 or (config.pretrain.tower_cache_gb > 0 and config.pretrain.vision_lr_scale != 0):
        raise ConfigError(f"config key 'pretrain.tower_cache_gb' is {config.pretrain.tower_cache_gb}; the cache keeps a frozen tower's outputs, so set it "
                          "to 0 (no cache), or to a size in GiB such as 4 together with pretrain.vision_lr_scale=0")
    if not 0 <= config.pretrain.pack_len <= config.llm.max_seq_len:
        raise ConfigError(f"config key 'pretrain.pack_len' is {config.pretrain.pack_len}; set it to 0 (off) or a row length up to the model's context, llm.max_seq_len={config.llm.max_seq_len}")
    if config.pretrain.location_sigma < 0:
        raise ConfigError(f"config key 'pretrain.location_sigma' is {config.pretrain.location_sigma}; set it to 0 (one-hot) or a width in bins such as 1.5")
    if config.pretrain.compile and not config.pretrain.regression_reaches_visual:
        raise ConfigError("config key 'pretrain.compile' needs pretrain.regression_reaches_visual=true: the default backward takes two passes "
                          "over one graph, and compiled blocks give wrong gradients in the second; set one of them accordingly")
    if config.pretrain.activation_checkpointing < 0:
        raise ConfigError(f"config key 'pretrain.activation_checkpointing' is {config.pretrain.activation_checkpointing}; set it to 0 (off), 1 (every block) or k (every k-th block)")
    _check_tune(config.tune)


def _check_tune(t: TuneConfig) -> None:
    if t.lora_rank < 1:
        raise ConfigError(f"config key 'tune.lora_rank' is {t.lora_rank}; set it to a whole number of at least 1, such as 16")
    if t.lora_alpha <= 0:
        raise ConfigError(f"config key 'tune.lora_alpha' is {t.lora_alpha}; set it to a positive scale such as 16 (the update is scaled by lora_alpha / lora_rank)")
    if not 0 <= t.lora_dropout < 1:
        raise ConfigError(f"config key 'tune.lora_dropout' is {t.lora_dropout}; set it to a probability from 0 up to (not including) 1, such as 0.05")
    if not t.full and not t.lora_targets:
        raise ConfigError("config key 'tune.lora_targets' is empty; name the LLM's linear layers to adapt, such as [q_proj, k_proj, v_proj, o_proj], or set tune.full=true")
    if t.full and t.save == "adapter":
        raise ConfigError("config key 'tune.save' is 'adapter', but tune.full=true changes every weight of the LLM, which no adapter holds; set tune.save=merged")


# Model parts added after models were first saved, on by default: a config.json without the key has no such part.
ADDED_LATER = (("resampler", "region_coords"), ("heads", "location"), ("heads", "pointer"), ("heads", "pointer_words"), ("heads", "pointer_roles"), ("heads", "copy"), ("heads", "presence"), ("heads", "agreement"))
# Where config.json files written before the `heads` section kept its switches: llm.<old> -> heads.<new>.
HEAD_SWITCHES_IN_LLM = {"location_head": "location", "location_pointer": "pointer", "pointer_words": "pointer_words", "pointer_roles": "pointer_roles",
                        "copy_head": "copy", "presence": "presence", "agreement": "agreement", "regress_from_words": "words_to_visual"}


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a saved config (config.json) exactly, without re-applying its preset."""
    values = dict(values)
    if "heads" not in values and "llm" in values:
        llm = dict(values["llm"])
        values["heads"] = {new: llm.pop(old) for old, new in HEAD_SWITCHES_IN_LLM.items() if old in llm}
        values["llm"] = llm
    config = Config(preset=values.get("preset", "tiny"))
    for part, key in ADDED_LATER:
        if part in values and key not in values[part]:
            setattr(getattr(config, part), key, False)  # saved before that part existed: it has none
    _merge(config, values)
    return config
