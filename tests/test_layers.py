import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from atq import PackedTernaryLinear, QuantConfig, TernaryLinear, ternarize


def test_packed_forward_matches_float64_reference():
    torch.manual_seed(0)
    weight, bias = torch.randn(12, 70), torch.randn(12)
    tensor = ternarize(weight, QuantConfig(group_size=32))
    layer = PackedTernaryLinear.from_ternary(tensor, bias)
    x = torch.randn(5, 70)
    scales16 = tensor.scales.to(torch.float16).double()  # the layer stores fp16 scales
    dense = tensor.codes.double() * scales16.repeat_interleave(32, dim=1)[:, :70]
    expected = x.double() @ dense.T + bias.double()
    assert torch.allclose(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.ternary().codes, tensor.codes)


def test_packed_layer_buffers_are_what_is_stored():
    layer = PackedTernaryLinear.from_ternary(ternarize(torch.randn(4, 9), QuantConfig(group_size=4)))
    assert layer.packed.dtype == torch.uint8 and layer.packed.shape == (4, 3)
    assert layer.scales.dtype == torch.float16 and layer.scales.shape == (4, 3)
    assert layer.bias is None


def test_ternary_linear_forward_uses_the_ternary_weight():
    torch.manual_seed(1)
    config = QuantConfig(mode="sparsity", sparsity=0.4, granularity="row")
    layer = TernaryLinear(torch.randn(6, 10), torch.randn(6), config)
    x = torch.randn(3, 10)
    expected = F.linear(x, ternarize(layer.weight, config).dequantize(), layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_straight_through_gradient_reaches_the_latent_weight_unchanged():
    torch.manual_seed(2)
    config = QuantConfig(mode="mse", granularity="group", group_size=4)
    layer = TernaryLinear(torch.randn(5, 8), None, config)
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
    layer = PackedTernaryLinear.from_ternary(ternarize(linear_weight(conv), QuantConfig.seed()), conv.bias)
    dense = layer.dequantize()
    assert dense.shape == (6, 10)
    assert torch.allclose(layer(x), x @ dense.T + conv.bias, atol=1e-6)


def test_to_packed_equals_direct_packing():
    torch.manual_seed(4)
    config = QuantConfig()
    layer = TernaryLinear(torch.randn(4, 70), torch.randn(4), config)
    packed, direct = layer.to_packed().ternary(), ternarize(layer.weight, config)
    assert torch.equal(packed.codes, direct.codes)
    assert torch.equal(packed.scales, direct.scales.half().float())  # stored as fp16
