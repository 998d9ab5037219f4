import pytest
import torch
from torch import nn
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Stack

from nextmm.config import ConfigError, ResamplerConfig
from nextmm.convert.common import copy_into
from nextmm.convert.emu1 import cformer_state
from nextmm.models.resampler import CausalResampler
from nextmm.models.resampler_t5 import T5Resampler, resampler_for

# 20 queries reach past the exact buckets (4) and past the max distance (16): every bucket kind is used.
# Heads x head width (4 x 12) differs from the width (32), as T5 allows.
CFG = ResamplerConfig(kind="t5", seed="none", num_queries=20, width=32, layers=3, heads=4, head_width=12, mlp_ratio=2.0, relative_buckets=8, relative_max_distance=16)


def hf_stack() -> T5Stack:
    config = T5Config(
        vocab_size=8, d_model=CFG.width, d_kv=CFG.head_width, num_heads=CFG.heads, d_ff=int(CFG.width * CFG.mlp_ratio),
        num_layers=CFG.layers, relative_attention_num_buckets=CFG.relative_buckets,
        relative_attention_max_distance=CFG.relative_max_distance, dropout_rate=0.0, feed_forward_proj="relu",
        is_decoder=True, use_cache=False, layer_norm_epsilon=1e-6,
    )
    torch.manual_seed(0)
    stack = T5Stack(config).eval()
    with torch.no_grad():  # norms start at one; random ones check that each lands where it belongs
        for name, param in stack.named_parameters():
            if "layer_norm" in name:
                param.uniform_(0.5, 1.5)
    return stack


def as_official(stack: T5Stack, queries: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stack's weights under the names the official Emu1 checkpoint gives them."""
    state = {f"cformer.cformer.{k}": v for k, v in stack.state_dict().items()}
    return state | {"cformer.causal_tokens": queries[None]}


def run_hf(stack: T5Stack, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    embeds = queries.expand(features.shape[0], -1, -1)
    with torch.no_grad():
        return stack(inputs_embeds=embeds, encoder_hidden_states=features, use_cache=False).last_hidden_state


def test_matches_transformers_t5_decoder_stack():
    stack, queries, features = hf_stack(), torch.randn(CFG.num_queries, CFG.width), torch.randn(3, 10, CFG.width)
    ours = T5Resampler(CFG, CFG.width).eval()
    copy_into(ours, cformer_state(as_official(stack, queries)), "T5Stack")
    with torch.no_grad():
        out = ours(features)
    assert out.shape == (3, CFG.num_queries, CFG.width)
    torch.testing.assert_close(out, run_hf(stack, queries, features), rtol=0, atol=1e-5)


def test_cross_attention_reads_a_narrower_tower_as_t5_reads_it_zero_padded():
    """A tower narrower than the stack, against transformers (which needs them equal): zero-padding the
    features and the key and value columns to the stack's width leaves T5's keys and values unchanged."""
    stack, queries, narrow = hf_stack(), torch.randn(CFG.num_queries, CFG.width), 20
    official = as_official(stack, queries)
    # The state dict shares storage with the stack: the zeroed columns are zero in transformers' model too.
    for key in list(official):
        if ".EncDecAttention.k." in key or ".EncDecAttention.v." in key:
            official[key][:, narrow:] = 0
            official[key] = official[key][:, :narrow].clone()
    features = torch.randn(2, 7, narrow)
    ours = T5Resampler(CFG, narrow).eval()
    copy_into(ours, cformer_state(official), "T5Stack")
    with torch.no_grad():
        out = ours(features)
    padded = torch.cat([features, torch.zeros(2, 7, CFG.width - narrow)], dim=-1)
    torch.testing.assert_close(out, run_hf(stack, queries, padded), rtol=0, atol=1e-5)


def test_cross_attention_reads_a_wider_tower():
    """A tower wider than the stack (Emu-14B: 1408 into 768): one cross-attention against its formula,
    softmax(q k^T) v per head with no scaling, keys and values projected from the tower's width."""
    wide = 48
    ours = T5Resampler(CFG, wide).eval()
    attn = ours.blocks[0].cross_attn
    assert (attn.k.in_features, attn.v.in_features, attn.q.in_features) == (wide, wide, CFG.width)
    x, features = torch.randn(2, 5, CFG.width), torch.randn(2, 9, wide)
    h, d = CFG.heads, CFG.head_width
    q = (x @ attn.q.weight.T).view(2, 5, h, d)
    k = (features @ attn.k.weight.T).view(2, 9, h, d)
    v = (features @ attn.v.weight.T).view(2, 9, h, d)
    weights = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 5, h * d) @ attn.o.weight.T
    with torch.no_grad():
        torch.testing.assert_close(attn(x, features), expected, rtol=0, atol=1e-5)
        assert ours(features).shape == (2, CFG.num_queries, CFG.width)


def test_query_sees_only_itself_and_earlier_queries():
    ours = T5Resampler(CFG, CFG.width).eval()
    features = torch.randn(1, 6, CFG.width)
    with torch.no_grad():
        before = ours(features)
        ours.queries[5] += 1.0
        after = ours(features)
    assert torch.equal(before[:, :5], after[:, :5]) and not torch.allclose(before[:, 5:], after[:, 5:])


def test_factory_builds_the_kind_the_config_names():
    causal = ResamplerConfig(num_queries=4, width=16, heads=2)
    built = resampler_for(causal, 24)
    assert type(built) is CausalResampler
    torch.manual_seed(0)
    assert built.state_dict().keys() == CausalResampler(causal, 24).state_dict().keys()
    assert isinstance(resampler_for(CFG, 24), T5Resampler)


@pytest.mark.parametrize(
    "changes, named",
    [({"kind": "perceiver"}, "resampler.kind"), ({"seed": "regions"}, "resampler.seed"), ({"head_width": 0, "width": 30}, "resampler.width")],
)
def test_factory_names_a_config_it_cannot_build(changes, named):
    cfg = ResamplerConfig(**{**CFG.__dict__, **changes})
    with pytest.raises(ConfigError, match=named):
        resampler_for(cfg, 16)


def test_t5_init_keeps_scores_near_unit_scale():
    """No 1/sqrt(d) on the scores: the query projection's init carries it, so fresh attention is not peaked."""
    cfg = ResamplerConfig(**{**CFG.__dict__, "width": 256, "heads": 4, "head_width": 64})
    attn = T5Resampler(cfg, 256).blocks[0].self_attn
    x = nn.functional.rms_norm(torch.randn(64, 256), (256,))
    scores = (attn.q(x).view(64, 4, 64) * attn.k(x).view(64, 4, 64)).sum(-1)
    assert 0.5 < scores.std().item() < 2.0
