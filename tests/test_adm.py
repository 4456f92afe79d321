"""ADM encoder networks for Discriminator Guidance (aotdiff.guidance.adm): sizes, key names, maths, weight loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from aotdiff.guidance.adm import (
    ADM_TIME_SCALE,
    AttentionBlock,
    EncoderUNet,
    ResBlock,
    adm_classifier_32,
    dg_head,
    legacy_qkv_attention,
    load_adm_weights,
    qkv_attention,
    timestep_embedding,
)
from aotdiff.train.checkpoint import CheckpointError


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def randomized(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (zero-initialised layers would hide wiring mistakes), small enough to stay finite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net


@pytest.fixture(scope="module")
def classifier() -> EncoderUNet:
    torch.manual_seed(0)
    return adm_classifier_32().eval()


# --- sizes and key names (ref. aot-method.md 6.5, computed from the reference models) --------------------------------


@pytest.mark.parametrize(
    "factory, params, keys",
    [
        (lambda: dg_head(conditional=False), 2_883_841, 71),
        (lambda: dg_head(conditional=True), 3_395_841, 72),
    ],
)
def test_dg_head_sizes(factory, params: int, keys: int) -> None:
    net = factory()
    assert n_params(net) == params
    assert len(net.state_dict()) == keys


def test_classifier_size(classifier: EncoderUNet) -> None:
    assert n_params(classifier) == 47_771_112
    assert len(classifier.state_dict()) == 255
    # The 1000-way pooling head is 1,335,272 of them; the trunk (what DG uses) the other 46,435,840.
    assert sum(v.numel() for k, v in classifier.state_dict().items() if k.startswith("out.")) == 1_335_272


def test_guided_diffusion_key_names(classifier: EncoderUNet) -> None:
    sd = classifier.state_dict()
    expected_shapes = {
        "time_embed.0.weight": (512, 128),
        "time_embed.2.weight": (512, 512),
        "input_blocks.0.0.weight": (128, 3, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (128,),
        "input_blocks.1.0.in_layers.2.weight": (128, 128, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (256, 512),  # scale and shift
        "input_blocks.1.0.out_layers.0.weight": (128,),
        "input_blocks.1.0.out_layers.3.weight": (128, 128, 3, 3),
        "input_blocks.1.1.norm.weight": (128,),
        "input_blocks.1.1.qkv.weight": (384, 128, 1),
        "input_blocks.1.1.proj_out.weight": (128, 128, 1),
        "input_blocks.5.0.in_layers.2.weight": (128, 128, 3, 3),  # the first down-sampling block
        "input_blocks.6.0.skip_connection.weight": (256, 128, 1, 1),
        "input_blocks.14.1.qkv.weight": (1536, 512, 1),
        "middle_block.1.proj_out.bias": (512,),
        "middle_block.2.out_layers.3.bias": (512,),
        "out.0.weight": (512,),
        "out.2.positional_embedding": (512, 65),
        "out.2.qkv_proj.weight": (1536, 512, 1),
        "out.2.c_proj.weight": (1000, 512, 1),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    # Channel-changing 1x1 skips only where a level widens (the down-sampling blocks 5 and 10 keep their width).
    assert {k.split(".skip_connection")[0] for k in sd if "skip_connection" in k} == {
        "input_blocks.6.0",
        "input_blocks.11.0",
    }
    assert not any(k.startswith("input_blocks.15") for k in sd)
    head = dg_head(conditional=True).state_dict()
    assert tuple(head["label_emb.weight"].shape) == (1000, 512)
    assert tuple(head["input_blocks.0.0.weight"].shape) == (128, 512, 3, 3)
    assert tuple(head["out.2.positional_embedding"].shape) == (128, 65)
    assert tuple(head["out.2.c_proj.weight"].shape) == (1, 128, 1)
    assert "label_emb.weight" not in dg_head(conditional=False).state_dict()


def test_features_and_logits_shapes(classifier: EncoderUNet) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = classifier(x, torch.tensor([0.1, 0.9]), features=True)
        logits = classifier(x, 0.5)
    assert feats.shape == (2, 512, 8, 8)
    assert (classifier.feature_channels, classifier.feature_resolution) == (512, 8)
    assert logits.shape == (2, 1000)
    head = dg_head()
    assert head(feats, torch.tensor([0.1, 0.9])).shape == (2, 1)


# --- maths ----------------------------------------------------------------------------------------------------------


def test_timestep_embedding_closed_form() -> None:
    dim, half = 128, 64
    at_zero = timestep_embedding(torch.zeros(1), dim)
    assert torch.equal(at_zero, torch.cat([torch.ones(1, half), torch.zeros(1, half)], dim=1))
    steps = torch.tensor([0.0, 1.0, 500.0, 999.0], dtype=torch.float64)
    emb = timestep_embedding(steps, dim).double()
    i = torch.arange(half, dtype=torch.float64)
    args = steps[:, None] * 10000.0 ** (-i / half)[None]
    torch.testing.assert_close(emb, torch.cat([torch.cos(args), torch.sin(args)], dim=1), atol=2e-4, rtol=0)
    odd = timestep_embedding(torch.tensor([3.0]), 7)
    assert odd.shape == (1, 7) and odd[0, -1] == 0


def test_time_input_is_vp_time_times_999() -> None:
    net = dg_head()
    t = torch.tensor([0.0, 0.25, 1.0])
    with torch.no_grad():
        expected = net.time_embed(timestep_embedding(t * 999, 128))
        torch.testing.assert_close(net.embedding(t, 3), expected, atol=0, rtol=0)
        torch.testing.assert_close(net.embedding(0.25, 3), net.embedding(torch.full((3,), 0.25), 3))
    assert ADM_TIME_SCALE == 999.0


def _attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One head, channel-first [ch, T]: out[:, t] = sum_s softmax_s(q_t . k_s / sqrt(ch)) v[:, s]."""
    w = torch.softmax(q.T @ k / math.sqrt(q.shape[0]), dim=1)  # [T, S], rows sum to one
    return v @ w.T


def test_legacy_qkv_attention_is_per_head_softmax() -> None:
    g = torch.Generator().manual_seed(1)
    b, heads, ch, length = 2, 3, 4, 5
    qkv = torch.randn(b, heads * 3 * ch, length, generator=g, dtype=torch.float64)
    out = legacy_qkv_attention(qkv, heads)
    assert out.shape == (b, heads * ch, length)
    for i in range(b):
        for h in range(heads):
            block = qkv[i, h * 3 * ch : (h + 1) * 3 * ch]  # legacy layout: each head holds its own q;k;v
            q, k, v = block[:ch], block[ch : 2 * ch], block[2 * ch :]
            torch.testing.assert_close(out[i, h * ch : (h + 1) * ch], _attention_reference(q, k, v))


def test_new_order_qkv_attention_is_per_head_softmax() -> None:
    g = torch.Generator().manual_seed(2)
    b, heads, ch, length = 2, 2, 3, 6
    qkv = torch.randn(b, 3 * heads * ch, length, generator=g, dtype=torch.float64)
    out = qkv_attention(qkv, heads)
    c = heads * ch
    for i in range(b):
        for h in range(heads):
            sl = slice(h * ch, (h + 1) * ch)  # q block, then k block, then v block, heads inside each
            q, k, v = qkv[i, :c][sl], qkv[i, c : 2 * c][sl], qkv[i, 2 * c :][sl]
            torch.testing.assert_close(out[i, sl], _attention_reference(q, k, v))


def test_fresh_blocks_are_their_skip_path() -> None:
    torch.manual_seed(0)
    emb = torch.randn(2, 64)
    x = torch.randn(2, 32, 8, 8)
    widen = ResBlock(32, 64, out_channels=64)
    torch.testing.assert_close(widen(x, emb), widen.skip_connection(x), atol=0, rtol=0)
    same = ResBlock(32, 64)
    torch.testing.assert_close(same(x, emb), x, atol=0, rtol=0)
    attn = AttentionBlock(64, num_head_channels=32)
    y = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(attn(y), y, atol=0, rtol=0)


def test_down_resblock_halves_resolution() -> None:
    torch.manual_seed(0)
    block = ResBlock(32, 64, down=True)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 64)
    # Fresh: the residual branch is zero, so the output is the 2x2 average of the input.
    torch.testing.assert_close(block(x, emb), x.reshape(2, 32, 4, 2, 4, 2).mean(dim=(3, 5)))
    randomized(block)
    assert block(x, emb).shape == (2, 32, 4, 4)


def test_conditional_head_int_and_onehot_labels_agree() -> None:
    torch.manual_seed(0)
    head = randomized(dg_head(conditional=True)).eval()
    feats, t = torch.randn(3, 512, 8, 8), torch.tensor([0.2, 0.5, 0.8])
    labels = torch.tensor([0, 7, 999])
    with torch.no_grad():
        by_index = head(feats, t, labels=labels)
        by_onehot = head(feats, t, labels=torch.nn.functional.one_hot(labels, 1000).float())
        other = head(feats, t, labels=torch.tensor([1, 7, 998]))
    torch.testing.assert_close(by_index, by_onehot, atol=0, rtol=0)
    assert not torch.allclose(by_index[[0, 2]], other[[0, 2]])  # the label reaches the logit
    torch.testing.assert_close(by_index[1], other[1])
    with pytest.raises(ValueError, match="class-conditional"):
        head(feats, t)
    with pytest.raises(ValueError, match="unconditional"):
        dg_head()(feats, t, labels=labels)


def test_general_constructor_small_head_and_input_gradient() -> None:
    # A head on a SongUNet encoder's lowest-resolution map: 4 px, 256 channels; two levels down to 2 px.
    net = EncoderUNet(
        4, 256, 1, width=64, depth=1, channel_mult=(1, 2), attention_resolutions=(2,), num_head_channels=32
    )
    randomized(net)
    assert net.feature_resolution == 2 and net.feature_channels == 128
    x = torch.randn(3, 256, 4, 4, requires_grad=True)
    logit = net(x, torch.rand(3))
    assert logit.shape == (3, 1)
    (grad,) = torch.autograd.grad(logit.sum(), x)  # DG needs d logit / d input
    assert grad.shape == x.shape and grad.abs().sum() > 0
    rebuilt = EncoderUNet(**net.config)
    assert list(rebuilt.state_dict()) == list(net.state_dict())
    with pytest.raises(ValueError, match="resolution"):
        EncoderUNet(6, 3, 1, channel_mult=(1, 2, 4))
    with pytest.raises(ValueError, match="num_head_channels"):
        EncoderUNet(8, 3, 1, width=96, attention_resolutions=(8,), num_head_channels=64)


# --- loading published weights ---------------------------------------------------------------------------------------


def test_load_classifier_state_dict_strictly(classifier: EncoderUNet, tmp_path: Path) -> None:
    """A state dict in guided-diffusion's key names, saved with torch.save, loads strictly into a fresh network."""
    source = randomized(adm_classifier_32(), seed=3).eval()
    path = tmp_path / "32x32_classifier.pt"
    torch.save(source.state_dict(), path)
    target = load_adm_weights(classifier, path)
    assert target is classifier
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x, 0.3, features=True), source(x, 0.3, features=True), atol=0, rtol=0)


def test_load_head_with_dataparallel_prefix(tmp_path: Path) -> None:
    source = randomized(dg_head(conditional=True), seed=4)
    path = tmp_path / "discriminator_250.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    target = load_adm_weights(dg_head(conditional=True), path)
    assert torch.equal(target.label_emb.weight, source.label_emb.weight)


def _one_line_error(net: EncoderUNet, path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_adm_weights(net, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_load_errors(tmp_path: Path) -> None:
    head = dg_head()
    message = _one_line_error(head, tmp_path / "32x32_classifier.pt")
    assert "no such file" in message and "32x32_classifier.pt" in message and "never downloads" in message

    wrong_keys = tmp_path / "cond.pt"
    torch.save(dg_head(conditional=True).state_dict(), wrong_keys)
    message = _one_line_error(head, wrong_keys)
    assert "1 unexpected: label_emb.weight" in message

    renamed = tmp_path / "renamed.pt"
    torch.save({k.replace("input_blocks", "encoder"): v for k, v in head.state_dict().items()}, renamed)
    message = _one_line_error(head, renamed)
    assert "missing: input_blocks.0.0.weight" in message and "unexpected: encoder.0.0.weight" in message

    wrong_shape = tmp_path / "ten_classes.pt"
    torch.save(dg_head(conditional=True, num_classes=10).state_dict(), wrong_shape)
    message = _one_line_error(dg_head(conditional=True), wrong_shape)
    assert "wrong shape" in message and "label_emb.weight [10, 512] vs [1000, 512]" in message

    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    assert "not a state dict" in _one_line_error(head, not_a_dict)

    pickled_module = tmp_path / "module.pt"
    torch.save(head, pickled_module)  # a pickled object, not weights: refused, nothing runs
    assert "refused without running anything" in _one_line_error(head, pickled_module)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    assert "refused without running anything" in _one_line_error(head, garbage)

    truncated = tmp_path / "truncated.pt"
    torch.save(head.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])  # an interrupted download
    assert "not a readable torch file" in _one_line_error(head, truncated)


# --- forward passes written out from the paper's definitions (random weights: a zero layer hides wiring) -------------


def _group_norm(h: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """GroupNorm by hand: per sample and group of C/G channels, (h - mean) / sqrt(var + eps), then gamma, beta."""
    b, c, *rest = h.shape
    g = h.reshape(b, norm.num_groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + norm.eps)
    shape = (1, c) + (1,) * len(rest)
    return g.reshape(h.shape) * norm.weight.reshape(shape) + norm.bias.reshape(shape)


def _pool2(h: torch.Tensor) -> torch.Tensor:
    b, c, n, m = h.shape
    return h.reshape(b, c, n // 2, 2, m // 2, 2).mean(dim=(3, 5))


@pytest.mark.parametrize("down", [False, True])
def test_resblock_is_adagn_written_out(down: bool) -> None:
    """ADM's residual block (Dhariwal & Nichol 2021, sec. 3, AdaGN), every weight random:

    h = conv1(P(silu(GN1(x)))),  (s, b) = Linear(silu(emb)),  h = conv2(silu(GN2(h) * (1 + s) + b)),
    out = skip(P(x)) + h, with P the 2x2 average pool when down-sampling (before conv1, as guided-diffusion does)
    and the identity otherwise. Catches a swapped scale / shift, a missing "1 +" and a pool after the conv.
    """
    torch.manual_seed(0)
    block = randomized(ResBlock(32, 16, out_channels=64, down=down, norm_groups=8), seed=5)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    conv1, conv2 = block.in_layers[2], block.out_layers[3]
    h = F_silu(_group_norm(x, block.in_layers[0]))
    skip_in = x
    if down:
        h, skip_in = _pool2(h), _pool2(x)
    h = torch.nn.functional.conv2d(h, conv1.weight, conv1.bias, padding=1)
    e = torch.nn.functional.linear(F_silu(emb), block.emb_layers[1].weight, block.emb_layers[1].bias)
    scale, shift = e[:, :64, None, None], e[:, 64:, None, None]
    h = F_silu(_group_norm(h, block.out_layers[0]) * (1 + scale) + shift)
    h = torch.nn.functional.conv2d(h, conv2.weight, conv2.bias, padding=1)
    skip = block.skip_connection
    expected = torch.nn.functional.conv2d(skip_in, skip.weight, skip.bias) + h
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb), expected, rtol=1e-5, atol=1e-5)


def F_silu(x: torch.Tensor) -> torch.Tensor:  # noqa: N802 - reads like the functional op it spells out
    return x * torch.sigmoid(x)


def test_attention_pool_is_clip_pooling_written_out() -> None:
    """CLIP / ADM attention pooling: tokens z = [mean_p x_p, x_1..x_HW] + E (positional embedding), qkv = W z + c,
    per head (new layout) o_0 = sum_s softmax_s(q_0 . k_s / sqrt(ch)) v_s over all HW + 1 tokens, out = P o_0 + d.
    Only the mean token's output is returned; reading another token, or dropping the mean token, changes it."""
    torch.manual_seed(0)
    from aotdiff.guidance.adm import AttentionPool2d

    pool = randomized(AttentionPool2d(spatial=3, channels=8, num_head_channels=4, out_channels=5), seed=6).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    heads, ch = 2, 4
    with torch.no_grad():
        out = pool(x)
        for i in range(2):
            tokens = x[i].reshape(8, 9)
            z = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + pool.positional_embedding
            qkv = pool.qkv_proj.weight[:, :, 0] @ z + pool.qkv_proj.bias[:, None]
            q, k, v = qkv[:8], qkv[8:16], qkv[16:]
            o0 = torch.cat(
                [
                    _attention_reference(q[h * ch : (h + 1) * ch], k[h * ch : (h + 1) * ch], v[h * ch : (h + 1) * ch])[
                        :, 0
                    ]
                    for h in range(heads)
                ]
            )
            expected = pool.c_proj.weight[:, :, 0] @ o0 + pool.c_proj.bias
            torch.testing.assert_close(out[i], expected, rtol=1e-10, atol=1e-10)
