import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from atq import PackedTernaryLinear, QuantConfig, TernaryLinear, ternarize
from atq.ternary import PackedTernary


def test_packed_forward_matches_float64_reference():
    torch.manual_seed(0)
    weight, bias = torch.randn(12, 70), torch.randn(12)
    tensor = ternarize(weight, QuantConfig(group_size=32))
    layer = PackedTernaryLinear(PackedTernary.pack(tensor), bias)
    x = torch.randn(5, 70)
    scales16 = tensor.scales.to(torch.float16).double()  # the layer stores fp16 scales
    dense = tensor.codes.double() * scales16.repeat_interleave(32, dim=1)[:, :70]
    expected = x.double() @ dense.T + bias.double()
    assert torch.allclose(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.ternary().codes, tensor.codes)


def test_packed_layer_buffers_are_what_is_stored():
    layer = PackedTernaryLinear(PackedTernary.pack(ternarize(torch.randn(4, 9), QuantConfig(group_size=4))))
    assert layer.packed.dtype == torch.uint8 and layer.packed.shape == (4, 3)
    assert layer.scales.dtype == torch.float16 and layer.scales.shape == (4, 3)
    assert layer.bias is None


def test_ternary_linear_forward_uses_the_ternary_weight():
    torch.manual_seed(1)
    config = QuantConfig(mode="sparsity", sparsity=0.4, granularity="row")
    layer = TernaryLinear.from_weight(torch.randn(6, 10), torch.randn(6), config)
    x = torch.randn(3, 10)
    expected = F.linear(x, ternarize(layer.weight, config).dequantize(), layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_straight_through_gradient_reaches_the_latent_weight_unchanged():
    torch.manual_seed(2)
    config = QuantConfig(mode="mse", granularity="group", group_size=4)
    layer = TernaryLinear.from_weight(torch.randn(5, 8), None, config)
    x = torch.randn(7, 8, dtype=torch.float32)
    upstream = torch.randn(7, 5)
    (layer(x) * upstream).sum().backward()
    # d/dW of sum(upstream * x W_q^T) with dW_q/dW = identity (STE) is upstream^T x
    assert torch.allclose(layer.weight.grad.double(), upstream.double().T @ x.double(), atol=1e-5)


def test_conv1d_orientation_through_surgery_helper():
    from atq.surgery import linear_weight

    torch.manual_seed(3)
    conv = Conv1D(nf=6, nx=10)  # weight (in=10, out=6)
    x = torch.randn(2, 10)
    layer = PackedTernaryLinear(PackedTernary.pack(ternarize(linear_weight(conv), QuantConfig.seed())), conv.bias)
    dense = layer.dequantize()
    assert dense.shape == (6, 10)
    assert torch.allclose(layer(x), x @ dense.T + conv.bias, atol=1e-6)


def test_to_packed_equals_direct_packing():
    torch.manual_seed(4)
    config = QuantConfig()
    layer = TernaryLinear.from_weight(torch.randn(4, 70), torch.randn(4), config)
    packed, direct = layer.freeze().ternary(), ternarize(layer.weight, config)
    assert torch.equal(packed.codes, direct.codes)
    assert torch.equal(packed.scales, direct.scales.half().float())  # stored as fp16


def test_learned_scales_get_the_lsq_gradient_and_pack_exactly():
    torch.manual_seed(0)
    config = QuantConfig(granularity="group", group_size=8)
    layer = TernaryLinear.from_weight(torch.randn(6, 16), None, config, learned_scales=True)
    assert torch.allclose(layer.scales.detach(), ternarize(layer.weight.detach(), config).scales)
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    # d/dα of α·round(clamp(w/α)) with the STE: round(r) − r inside [-1, 1], sign(r) outside, summed over the group
    upstream = torch.ones(5, 6).T @ x  # dL/dŴ
    ratio = (layer.weight / layer.scales.half().float().repeat_interleave(8, 1)).detach()
    inside = ratio.abs() <= 1
    per_weight = torch.where(inside, ratio.round() - ratio, ratio.sign()) * upstream
    assert torch.allclose(layer.scales.grad, per_weight.reshape(6, 2, 8).sum(-1), atol=1e-5)
    assert torch.allclose(layer.weight.grad, upstream * inside, atol=1e-6)  # clipped weights get no STE gradient
    with torch.no_grad():
        assert torch.allclose(layer.freeze()(x), layer(x), atol=1e-5)


def test_a_learned_scale_driven_to_zero_stays_finite():
    """An LSQ step can push α through 0; below fp16's smallest normal it would round to 0 in the forward, and a
    zero weight over a zero scale is 0/0 = NaN. The scale is held at that smallest normal instead."""
    config = QuantConfig(granularity="group", group_size=8)
    weight = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    weight[0] = 0.0
    layer = TernaryLinear.from_weight(weight, None, config, learned_scales=True)
    with torch.no_grad():
        layer.scales[0] = 1e-9
        layer.scales[1] = -1e-12
    x = torch.randn(3, 16)
    layer(x).sum().backward()
    assert torch.isfinite(layer(x)).all() and torch.isfinite(layer.scales.grad).all()
    assert torch.isfinite(layer.weight.grad).all()
    with torch.no_grad():
        assert torch.isfinite(layer.freeze()(x)).all() and bool((layer.freeze().scales > 0).all())


def test_dead_zone_bias_gives_zero_coded_weights_a_gradient_and_folds_into_a_bias():
    torch.manual_seed(1)
    config = QuantConfig(granularity="row")
    plain = TernaryLinear.from_weight(torch.randn(4, 12), None, config)
    tequila = TernaryLinear.from_weight(plain.weight.detach(), None, config, dead_zone_bias=True)
    x = torch.randn(3, 12)
    for layer in (plain, tequila):
        layer(x).sum().backward()  # a linear loss: the same upstream gradient for both layers
    dead = plain.quantized_weight().detach() == 0
    assert dead.any()
    # the extra gradient of a dead weight is λ·Σ_t dL/dy_t for its row: real signal, not just the STE's
    extra = (tequila.weight.grad - plain.weight.grad)[dead]
    assert torch.allclose(extra, tequila.dead_zone.detach() * len(x) * torch.ones_like(extra))
    assert tequila.dead_zone.grad is not None
    assert torch.allclose((tequila.weight.grad - plain.weight.grad)[~dead], torch.zeros(1), atol=1e-6)
    with torch.no_grad():
        # recomputed scales are fp32 in training and fp16 once packed: equal to fp16 precision
        assert torch.allclose(tequila.freeze()(x), tequila(x), rtol=2e-3, atol=1e-4)
