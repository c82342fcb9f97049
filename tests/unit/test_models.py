"""Single-process (tp=pp=1) numerics against open_clip and Hugging Face, fp32.

Tolerance: max abs diff of image/text embeddings <= 1e-5 (measured ~1e-6: the same math in
a different op order). Adapter round trips are exact.
"""
import pytest
import torch

import peers
from trainer.config import Config, ParallelConfig
from trainer.models import convert


def build(model_cfg, full, layout):
    from trainer.models.clip import CLIP
    from trainer.models.state import load_full_state_dict

    model = CLIP(model_cfg, ParallelConfig())
    load_full_state_dict(model, full, layout)
    return model.eval()


def test_qkv_layout_roundtrip():
    w = torch.randn(3 * 12, 5)
    m = convert.qkv_stacked_to_megatron(w, heads=4)
    assert torch.equal(m[:3], w[:3]) and torch.equal(m[3:6], w[12:15])  # head 0: q0, k0
    assert torch.equal(convert.qkv_megatron_to_stacked(m, heads=4), w)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_embeddings_and_roundtrip(dist1, quick_gelu):
    from trainer.models.state import full_state_dict

    oc, oc_cfg = peers.make_open_clip(seed=3, quick_gelu=quick_gelu)
    cfg = convert.config_from_open_clip(oc_cfg)
    assert cfg.vision.act == ("quick_gelu" if quick_gelu else "gelu")
    model = build(cfg, convert.from_open_clip(oc.state_dict(), cfg), dist1)
    images, text = peers.sample_inputs()
    ref_i, ref_t = peers.open_clip_features(oc, images, text)
    with torch.no_grad():
        assert (model.encode_image(images) - ref_i).abs().max() <= 1e-5
        assert (model.encode_text(text) - ref_t).abs().max() <= 1e-5
        # forward(): normalised features and exp(logit_scale), like open_clip's
        out = model(images, text)
        i, t, scale = out["image_features"], out["text_features"], out["logit_scale"]
        oi, ot, oscale = oc(images, text)
    assert (i - oi).abs().max() <= 1e-5 and (t - ot).abs().max() <= 1e-5
    assert torch.allclose(scale, oscale)
    back = convert.to_open_clip(full_state_dict(model, dist1), cfg)
    sd = oc.state_dict()
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_embeddings_and_roundtrip(dist1, act):
    from trainer.models.state import full_state_dict

    hf, hf_cfg = peers.make_hf(seed=4, act=act)
    cfg = convert.config_from_hf(hf_cfg)
    model = build(cfg, convert.from_hf(hf.state_dict(), cfg), dist1)
    images, text = peers.sample_inputs()
    ref_i, ref_t = peers.hf_features(hf, images, text)
    with torch.no_grad():
        assert (model.encode_image(images) - ref_i).abs().max() <= 1e-5
        assert (model.encode_text(text) - ref_t).abs().max() <= 1e-5
    back = convert.to_hf(full_state_dict(model, dist1), cfg)
    sd = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_unsupported_open_clip_config_is_named():
    from trainer.config import ConfigError

    cfg = peers.open_clip_config()
    cfg["vision_cfg"]["attentional_pool"] = True
    with pytest.raises(ConfigError, match="vision_cfg.attentional_pool"):
        convert.config_from_open_clip(cfg)


def test_missing_tensor_is_named(dist1):
    oc, oc_cfg = peers.make_open_clip(seed=0)
    sd = oc.state_dict()
    del sd["visual.ln_post.weight"]
    with pytest.raises(KeyError, match="visual.ln_post.weight"):
        convert.from_open_clip(sd, convert.config_from_open_clip(oc_cfg))


def test_bf16_forward_close_to_fp32(dist1):
    """One small bf16 case (bf16 matmul is slow on these CPUs)."""
    oc, oc_cfg = peers.make_open_clip(seed=5)
    cfg = convert.config_from_open_clip(oc_cfg)
    full = convert.from_open_clip(oc.state_dict(), cfg)
    ref = build(cfg, full, dist1)
    cfg.params_dtype = "bfloat16"
    model = build(cfg, full, dist1)
    images, text = peers.sample_inputs(n=2)
    with torch.no_grad():
        a = ref.encode_image(images)
        b = model.encode_image(images.bfloat16()).float()
    assert model.visual.conv1.weight.dtype == torch.bfloat16
    assert (a - b).abs().max() <= 0.05 * a.abs().max()  # bf16: ~3 significant digits


def _embeddings_and_grads(model, images, text, layout):
    """Image and text embeddings and every parameter's gradient of a fixed linear readout."""
    from trainer.models.state import full_state_dict

    model.zero_grad(set_to_none=True)
    i, t = model.encode_image(images), model.encode_text(text)
    g = torch.Generator().manual_seed(9)
    ((i * torch.randn(i.shape, generator=g)).sum()
     + (t * torch.randn(t.shape, generator=g)).sum()).backward()
    return i.detach(), t.detach(), full_state_dict(model, layout, grads=True)


def test_sdpa_equals_unfused_attention(dist1):
    """model.attention=sdpa (torch SDPA) vs =unfused (megatron's DotProductAttention), same
    weights, fp32: both towers' embeddings (vision bidirectional, text causal) within 1e-5 max
    abs (measured ~1e-6), every gradient within 1e-5 relative L2 error per tensor (measured
    ~7e-7; its max abs diff, ~2e-5 on gradients of magnitude ~37, is a few fp32 ulps)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from trainer.config import ATTENTIONS
    from trainer.models.attention import SDPAttention
    from trainer.models.layer_spec import CORE_ATTENTION

    assert tuple(CORE_ATTENTION) == ATTENTIONS  # config's names are the layer spec's table
    oc, oc_cfg = peers.make_open_clip(seed=6)
    cfg = convert.config_from_open_clip(oc_cfg)
    full = convert.from_open_clip(oc.state_dict(), cfg)
    images, text = peers.sample_inputs()
    out = {}
    for attention, kind in (("unfused", DotProductAttention), ("sdpa", SDPAttention)):
        cfg.attention = attention
        model = build(cfg, full, dist1)
        for tower in (model.visual, model.text):
            assert all(type(layer.self_attention.core_attention) is kind
                       for layer in tower.transformer.layers)
        out[attention] = _embeddings_and_grads(model, images, text, dist1)
    (ui, ut, ug), (si, st, sg) = out["unfused"], out["sdpa"]
    assert (ui - si).abs().max() <= 1e-5 and (ut - st).abs().max() <= 1e-5
    assert set(ug) == set(sg) and all(g is not None for g in sg.values())
    worst = max(float((ug[k] - sg[k]).norm() / ug[k].norm().clamp_min(1e-12)) for k in ug)
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("groups", [4, 2])
def test_sdpa_core_attention_matches_megatron(dist1, groups):
    """The core-attention module alone, against DotProductAttention: causal and bidirectional,
    a boolean padding mask (megatron's: True = masked out), grouped-query heads, a softmax
    scale and query-key layer scaling."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig
    from trainer.models.attention import SDPAttention

    tcfg = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4,
                             num_query_groups=groups, attention_dropout=0.0,
                             apply_query_key_layer_scaling=True, masked_softmax_fusion=False,
                             use_cpu_initialization=True)
    g = torch.Generator().manual_seed(0)
    s, b, hn = 7, 3, 16
    q = torch.randn(s, b, 4, hn, generator=g)
    k, v = (torch.randn(s, b, groups, hn, generator=g) for _ in range(2))
    pad = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    pad[0, ..., 5:] = True                   # sample 0: its last two keys are padding
    for mask_type, mask, scale in ((AttnMaskType.causal, None, None),
                                   (AttnMaskType.no_mask, None, 0.3),
                                   (AttnMaskType.padding, pad, None)):
        ref, ours = (cls(tcfg, layer_number=3, attn_mask_type=mask_type,
                         attention_type="self", softmax_scale=scale)
                     for cls in (DotProductAttention, SDPAttention))
        a = ref(q, k, v, mask, attn_mask_type=mask_type)
        o = ours(q, k, v, mask, attn_mask_type=mask_type)
        assert o.shape == a.shape == (s, b, 4 * hn)
        assert (a - o).abs().max() <= 1e-6, (mask_type, float((a - o).abs().max()))


def test_sdpa_attention_dropout_only_in_training(dist1):
    """Attention dropout: applied in training only, drawn from megatron's model-parallel RNG
    stream (the same stream state gives the same draws)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig
    from trainer.models.attention import SDPAttention

    tcfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2,
                             attention_dropout=0.5, use_cpu_initialization=True)
    attn = SDPAttention(tcfg, layer_number=1, attn_mask_type=AttnMaskType.no_mask,
                        attention_type="self")
    q, k, v = (torch.randn(5, 2, 2, 16) for _ in range(3))
    plain = attn.eval()(q, k, v, None)
    assert torch.equal(plain, SDPAttention(tcfg, 1, AttnMaskType.no_mask, "self",
                                           attention_dropout=0.0)(q, k, v, None))
    attn.train()
    tracker = get_cuda_rng_tracker()
    state = tracker.get_states()
    a = attn(q, k, v, None)
    tracker.set_states(state)
    assert not torch.allclose(a, plain) and torch.equal(a, attn(q, k, v, None))
