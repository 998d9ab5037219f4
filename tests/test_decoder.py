import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from nextmm.config import DecoderConfig
from nextmm.data.transforms import to_pixels
from nextmm.errors import UserError
from nextmm.models.decoder import DecoderDirError, DecoderSamplingError, VisualDecoder, fit_ridge, norm_groups

WIDTH, N = 24, 3  # the embeddings' width and count: unlike every channel count below, to catch mix-ups


def tiny_config(**overrides) -> DecoderConfig:
    values = dict(vae_channels=[16, 16], unet_channels=[16, 32], unet_head_dim=8, sample_steps=2, guidance=3.0)
    return DecoderConfig(**{**values, **overrides})


@pytest.fixture()
def decoder() -> VisualDecoder:
    torch.manual_seed(0)
    return VisualDecoder(tiny_config(), WIDTH, N)


@pytest.fixture()
def pixels(scenes) -> torch.Tensor:
    return to_pixels([s.image() for s in scenes[:4]], 64)


def condition(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, N, WIDTH, generator=torch.Generator().manual_seed(seed))


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def test_norm_groups_divide_every_width():
    assert norm_groups([64, 128]) == 32  # Stable Diffusion's
    assert norm_groups([32, 64, 64]) == 16
    assert norm_groups([16, 32]) == 8


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_losses_train_the_right_parts_and_samples_are_images(sampler, pixels):
    torch.manual_seed(0)
    d = VisualDecoder(tiny_config(sampler=sampler), WIDTH, N)
    ae = d.autoencoder_loss(pixels)
    assert set(ae) == {"loss", "recon", "kl"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in ae.values())
    ae["loss"].backward()
    for part in (d.vae.encoder, d.vae.decoder):
        assert all(g is not None and g.abs().sum() > 0 for g in grads(part))
    assert all(g is None for g in grads(d.unet))

    d.zero_grad(set_to_none=True)
    out = d.diffusion_loss(pixels, condition(len(pixels)))
    assert set(out) == {"loss", "mse"} and out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(g is None for g in grads(d.vae))  # the VAE stays frozen
    assert sum(g is not None and g.abs().sum() > 0 for g in grads(d.unet)) > 0.9 * len(grads(d.unet))
    assert d.condition_pos.grad.abs().sum() > 0

    images = d.sample(condition(2), steps=2, generator=seeded(0, 1))
    assert images.shape == (2, 3, 64, 64)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1


def test_each_row_depends_only_on_its_generator(decoder):
    both = decoder.sample(condition(2), generator=seeded(5, 6))
    alone = decoder.sample(condition(2)[1:], generator=seeded(6))
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both[0], both[1])


def write_sd_dir(root, cross_attention_dim: int = 40, latent_channels: int = 4):
    """A tiny Stable-Diffusion-style directory (vae/, unet/, model_index.json); returns its VAE and UNet."""
    torch.manual_seed(1)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 16), latent_channels=latent_channels, norm_num_groups=8, sample_size=32,
    )
    unet = UNet2DConditionModel(  # Stable Diffusion's block layout, cross-attention at full latent size
        sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
    )
    vae.save_pretrained(root / "vae")
    unet.save_pretrained(root / "unet")
    index = {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
             "unet": ["diffusers", "UNet2DConditionModel"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return vae, unet


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_a_stable_diffusion_style_directory_loads_and_samples(tmp_path):
    vae, unet = write_sd_dir(tmp_path / "sd")
    d = VisualDecoder.from_pretrained_dir(tmp_path / "sd", tiny_config(), WIDTH, N)
    assert_same_weights(d.vae, vae)
    assert_same_weights(d.unet, unet)
    assert isinstance(d.condition_proj, torch.nn.Linear)
    assert (d.condition_proj.in_features, d.condition_proj.out_features) == (WIDTH, 40)
    assert d.image_size == 32  # the UNet's 16 latents x the VAE's one halving, not the config's 64
    assert tiny_config().prediction_type == "v_prediction"
    assert d.scheduler.config.prediction_type == "epsilon"  # no scheduler/ of its own: SD 1.x's
    images = d.sample(condition(1), steps=2, generator=seeded(0))
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    d.diffusion_loss(torch.zeros(2, 3, 32, 32), condition(2))["loss"].backward()
    assert d.condition_proj.weight.grad.abs().sum() > 0  # the bridge learns

    (tmp_path / "sd" / "model_index.json").unlink()  # optional
    assert_same_weights(VisualDecoder.from_pretrained_dir(tmp_path / "sd", tiny_config(), WIDTH, N).unet, unet)


def test_save_then_load_gives_the_same_decoder(decoder, pixels, tmp_path):
    with torch.no_grad():
        decoder.condition_pos.normal_()  # not their initial values, so loading them is tested
        decoder.null_condition.normal_()
    scale = decoder.calibrate_latent_scale(pixels)
    path = decoder.save(tmp_path / "decoder")
    for part in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "condition.safetensors"):
        assert (path / part).is_file(), part
    assert [p.name for p in tmp_path.iterdir()] == ["decoder"]  # no temporary directory left beside it

    loaded = VisualDecoder.load(path, tiny_config(), WIDTH, N)
    assert_same_weights(loaded, decoder)
    assert loaded.latent_scale == pytest.approx(scale)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(decoder.scheduler.config)
    same = [d.sample(condition(2), generator=seeded(3, 4)) for d in (loaded, decoder)]
    torch.testing.assert_close(*same, rtol=0, atol=0)


@pytest.mark.parametrize("samples", [400, 40])  # the primal form, then the dual (fewer samples than features)
def test_ridge_recovers_a_linear_map_in_either_form(samples):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 60, generator=g) * torch.linspace(0.1, 10, 60) + 3.0  # uneven scales and offsets
    true_weight, true_bias = torch.randn(5, 60, generator=g), torch.randn(5, generator=g)
    y = x @ true_weight.T + true_bias
    weight, bias = fit_ridge(x, y, ridge=1e-6)
    torch.testing.assert_close(x @ weight.T + bias, y, atol=1e-3, rtol=1e-3)
    if samples > 60:  # determined: the map itself comes back
        torch.testing.assert_close(weight, true_weight, atol=1e-3, rtol=1e-3)


def semantic_decoder(grid: int = 2) -> VisualDecoder:
    torch.manual_seed(0)
    d = VisualDecoder(tiny_config(), WIDTH, N, semantic_width=6, semantic_grid=grid)
    g = torch.Generator().manual_seed(1)
    # Read-outs that differ: a regression and a seen picture of the same numbers read out differently.
    features = torch.randn(50, d.semantic_tokens, 6, generator=g)
    d.fit_readouts(torch.randn(50, N, WIDTH, generator=g), torch.randn(50, N, WIDTH, generator=g), features)
    return d


def test_the_semantic_token_reads_out_each_kind_of_condition_its_own_way(pixels, tmp_path):
    d = semantic_decoder()
    assert d.semantic_tokens == 5  # the whole picture and a 2 x 2 grid's cells
    cond = condition(2)
    regressed, seen = d._context(cond), d._context(cond, seen=True)
    assert regressed.shape == seen.shape == (2, N + 5, d.unet.config.cross_attention_dim)
    torch.testing.assert_close(regressed[:, :N], seen[:, :N])  # the N embeddings' tokens are the same
    for token in range(N, N + 5):
        assert not torch.allclose(regressed[:, token], seen[:, token])
    mixed = d._context(cond, seen=torch.tensor([True, False]))
    torch.testing.assert_close(mixed, torch.stack([seen[0], regressed[1]]))
    assert d._null_context().shape == (1, N + 5, d.unet.config.cross_attention_dim)

    out = d.diffusion_loss(pixels, condition(len(pixels)), seen=torch.tensor([True, False, True, False]))
    out["loss"].backward()
    assert d.semantic_proj.weight.grad.abs().sum() > 0 and d.readout_seen_weight.grad is None  # fitted, not trained
    assert d.semantic_pos.grad.abs().sum(-1).gt(0).all()  # each cell's token learns where it is
    assert not any(name.startswith("readout_") for name, _ in d.named_parameters())
    with pytest.raises(ValueError, match=r"not \(5, 6\) per picture"):
        d.fit_readouts(cond, cond, torch.randn(2, 6))  # pooled features alone, for a decoder with a grid

    loaded = VisualDecoder.load(d.save(tmp_path / "decoder"), tiny_config(), WIDTH, N)
    assert (loaded.semantic_width, loaded.semantic_grid) == (6, 2)
    assert_same_weights(loaded, d)
    for kind in (False, True):
        same = [x.sample(cond, generator=seeded(3, 4), seen=kind) for x in (loaded, d)]
        torch.testing.assert_close(*same, rtol=0, atol=0)
    assert not torch.allclose(d.sample(cond, generator=seeded(3, 4)), d.sample(cond, generator=seeded(3, 4), seen=True))


def test_a_decoder_saved_before_the_grid_loads_with_its_one_semantic_token(tmp_path):
    d = semantic_decoder(grid=0)
    path = d.save(tmp_path / "decoder")
    weights = path / "condition.safetensors"
    state = load_file(str(weights))  # as session 14 wrote it: a 1-D null token, no semantic_grid in the metadata
    state["null_semantic"] = state["null_semantic"][0]
    save_file(state, str(weights), metadata={"condition_width": str(WIDTH), "num_queries": str(N), "semantic_width": "6"})
    loaded = VisualDecoder.load(path, tiny_config(), WIDTH, N)
    assert (loaded.semantic_tokens, loaded.semantic_grid) == (1, 0)
    assert_same_weights(loaded, d)


def test_a_bridged_decoder_round_trips(tmp_path):
    write_sd_dir(tmp_path / "sd")
    d = VisualDecoder.from_pretrained_dir(tmp_path / "sd", tiny_config(), WIDTH, N)
    loaded = VisualDecoder.load(d.save(tmp_path / "decoder"), tiny_config(), WIDTH, N)
    assert_same_weights(loaded, d)
    with pytest.raises(DecoderDirError, match="condition"):
        VisualDecoder.load(tmp_path / "decoder", tiny_config(), WIDTH + 1, N)  # made for another width


def count_unet_batches(d: VisualDecoder) -> list[int]:
    sizes = []
    d.unet.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    return sizes


def test_guidance_one_is_the_conditional_sample_and_the_negative_matters_above_it(decoder):
    cond, a, b = condition(2, 0), condition(1, 1), condition(2, 2)
    batches = count_unet_batches(decoder)
    plain = decoder.sample(cond, guidance=1.0, generator=seeded(0, 1))
    assert batches == [2, 2]  # no unconditional pass
    ignored = decoder.sample(cond, negative=a, guidance=1.0, generator=seeded(0, 1))
    torch.testing.assert_close(ignored, plain, rtol=0, atol=0)

    batches.clear()
    guided_a = decoder.sample(cond, negative=a, guidance=4.0, generator=seeded(0, 1))
    assert batches == [4, 4]  # condition and negative in one call
    guided_b = decoder.sample(cond, negative=b, guidance=4.0, generator=seeded(0, 1))
    assert (guided_a - guided_b).abs().max() > 1e-3
    # a negative equal to the condition cancels the guidance
    guided = lambda negative: decoder.sample(cond, negative=negative, guidance=4.0, generator=seeded(0, 1))  # noqa: E731
    torch.testing.assert_close(guided(cond), plain, atol=1e-4, rtol=0)
    # one negative row serves every condition
    torch.testing.assert_close(guided(a.expand(2, -1, -1)), guided_a)
    # the default negative is the learned null condition
    torch.testing.assert_close(guided(None), guided(decoder.null_condition[None].detach()))


def seeded_loss(d: VisualDecoder, pixels: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(7)
    with torch.no_grad():
        return d.diffusion_loss(pixels, cond)["loss"]


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_condition_dropout_swaps_in_the_null_condition(dropout, pixels):
    torch.manual_seed(0)
    d = VisualDecoder(tiny_config(condition_dropout=dropout), WIDTH, N)
    first, second = seeded_loss(d, pixels, condition(4, 0)), seeded_loss(d, pixels, condition(4, 1))
    if dropout == 1.0:  # the UNet only ever saw the null condition
        assert torch.equal(first, second)
        assert torch.equal(first, seeded_loss(d, pixels, d.null_condition.detach().expand(4, -1, -1)))
    else:
        assert not torch.equal(first, second)


def test_nan_in_sampling_names_the_step(decoder):
    with torch.no_grad():
        decoder.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(DecoderSamplingError, match=r"denoising step 1 of 2 .*NaN or inf.*guidance") as caught:
        decoder.sample(condition(1))
    assert isinstance(caught.value, UserError)


def test_a_directory_of_the_wrong_format_is_named(tmp_path):
    with pytest.raises(DecoderDirError, match="does not exist"):
        VisualDecoder.from_pretrained_dir(tmp_path / "missing", tiny_config(), WIDTH, N)

    (tmp_path / "only_vae" / "vae").mkdir(parents=True)
    (tmp_path / "only_vae" / "vae" / "config.json").write_text("{}")
    with pytest.raises(DecoderDirError, match=r"only_vae.*unet/config\.json.*vae/ .*unet/"):
        VisualDecoder.from_pretrained_dir(tmp_path / "only_vae", tiny_config(), WIDTH, N)

    bad = tmp_path / "bad"
    for part in ("vae", "unet"):
        (bad / part).mkdir(parents=True)
        (bad / part / "config.json").write_text("this is not json")
    with pytest.raises(DecoderDirError, match=r"'.*bad' could not be read by diffusers"):
        VisualDecoder.from_pretrained_dir(bad, tiny_config(), WIDTH, N)

    write_sd_dir(tmp_path / "mismatch", latent_channels=8)  # an 8-channel VAE for a 4-channel UNet
    with pytest.raises(DecoderDirError, match=r"mismatch.*8-channel latents.*reads 4"):
        VisualDecoder.from_pretrained_dir(tmp_path / "mismatch", tiny_config(), WIDTH, N)

    write_sd_dir(tmp_path / "sd")
    with pytest.raises(DecoderDirError, match=r"'.*sd' has no condition\.safetensors"):
        VisualDecoder.load(tmp_path / "sd", tiny_config(), WIDTH, N)  # a plain SD directory, not a saved decoder


def test_autoencoder_training_lowers_its_loss(decoder, pixels):
    def loss() -> float:
        torch.manual_seed(0)  # the same posterior noise each time
        with torch.no_grad():
            return decoder.autoencoder_loss(pixels)["loss"].item()

    before = loss()
    opt = torch.optim.Adam(decoder.vae.parameters(), lr=3e-3)
    for _ in range(6):
        opt.zero_grad()
        decoder.autoencoder_loss(pixels)["loss"].backward()
        opt.step()
    assert loss() < 0.8 * before


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weighs_each_step_by_its_clamped_snr(kind, pixels):
    torch.manual_seed(0)
    d = VisualDecoder(tiny_config(snr_gamma=5.0, prediction_type=kind), WIDTH, N)
    assert d.scheduler.config.prediction_type == kind
    t = torch.tensor([0, 200, 500, 999])
    alpha_bar = d.scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    # in terms of the clean latents, the plain loss weighs a step by snr (epsilon) or snr + 1 (v)
    plain = snr if kind == "epsilon" else snr + 1
    torch.testing.assert_close(d._loss_weights(t) * plain, snr.clamp(max=5.0))
    assert snr[0] > 5 > snr[-1]  # the clamp bites at the low-noise end only
    out = d.diffusion_loss(pixels, condition(len(pixels)))
    assert out["loss"] <= out["mse"]  # no weight is above 1
    unweighted = VisualDecoder(tiny_config(prediction_type=kind, snr_gamma=0.0), WIDTH, N)
    torch.testing.assert_close(unweighted._loss_weights(t), torch.ones(4))
