"""Rotate a Llama-family model by orthogonal matrices that leave its function unchanged (QuaRot / SpinQuant's
R1 and R2, fused into the weights offline), so that its linear layers are easier to ternarise.

Why: a few large weights and input channels set each group's scale, and everything smaller rounds to zero.
Mixing every input channel with every other through a random orthogonal Q spreads those outliers over the
group ("incoherence processing", QuIP), while the model's output stays the same up to float rounding:

* the residual stream inside the decoder is rotated, h -> h·Q: every layer that reads it becomes W·Q (q/k/v,
  gate/up), every layer that writes it Qᵀ·W (o, down). RMSNorm commutes with Q once its gain has been folded
  into the layers after it (rms(h·Q) = rms(h)), so the blocks' gains become 1;
* the stream is rotated where it enters (embeddings · Q) and un-rotated where it leaves (after the final norm,
  · Qᵀ, then the norm's original gain): two d x d products per token, by forward hooks, so the embedding and the
  head stay one tied tensor, unrotated. (Folding Q into them instead would untie the head: a second FP copy of
  the embedding.) Q and the gain are buffers of the model (``model.model.atq_rotation``), saved with it; the
  norm's own gain becomes 1, in the rotated basis, as it would with the gain folded into the head;
* each attention head's values are rotated by a second R (head_dim wide): v_proj's rows per key-value head
  Rᵀ·W_v, o_proj's columns per head W_o·R; attention mixes value vectors linearly, so R passes through.

down_proj's input is not rotated: that needs an online rotation at inference (QuaRot's online Hadamard).

Gemma (norms after each sub-layer too: ``h + post_norm(attn(input_norm(h)))``) is rotated in another form: the
stream stays as it is, and the input of each reading sub-layer is rotated at run time instead, a forward hook on
``input_layernorm`` and ``pre_feedforward_layernorm`` taking their output (gain applied) times Q, with q/k/v and
gate/up becoming W·Q (values per head by R as above; o and down unchanged: they write into a post-norm, whose gain
does not commute with Q). Why not the stream form: it folds each pre-norm's gain into the readers, and Gemma's
gains are wild (a median |1 + w| of 7.7, with exact zeros on the channels that carry its massive activations:
97% of a normalised token's energy in 2 of 640 channels of Gemma 3 270M). Folded, a zero gain must be reproduced
by ternary codes, which cannot: calibrated one-plane PTQ of Gemma 3 270M reached output errors above 1 and
perplexity 1.4e12 (unrotated: 721; the inputs form: 385; experiments/gemma_rotation_forms.py, CPU). Two d x d
products per block and token, and no folding for a runtime without hooks.

Rotations: ``hadamard`` (a Hadamard matrix times random signs, scaled to be orthogonal: the flattest mixing,
which SpinQuant found better than random orthogonal) for widths with a construction (``atq.orthogonal``: 2^k, 12·2^k,
144·2^k; SmolLM2's 576 = 144·4), else ``orthogonal`` (QR of a Gaussian matrix), both from a fixed seed.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .config import ROTATIONS
from .layers import FixedDtypeBuffers
from .orthogonal import random_rotation
from .surgery import LLAMA_LINEARS, decoder_blocks

_NORM_SUFFIX = "RMSNorm"
_PROJECTIONS = tuple(LLAMA_LINEARS)
_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")  # Gemma: after each sub-layer
_GEMMA_NORMS = ("input_layernorm", *_POST_NORMS, "pre_feedforward_layernorm")
_READER_NORMS = ("input_layernorm", "pre_feedforward_layernorm")  # Gemma: their outputs feed q/k/v and gate/up


def _post_normed(layer: nn.Module) -> bool:
    """Whether ``layer`` normalises each sub-layer's output before the residual add (Gemma 2 and 3)."""
    return hasattr(layer, "post_feedforward_layernorm")


def _one_plus(norm: nn.Module) -> bool:
    """Whether ``norm`` scales by 1 + weight (Gemma's RMSNorm) rather than by weight."""
    return type(norm).__name__.startswith("Gemma")


def _gain(norm: nn.Module) -> torch.Tensor:
    """The norm's effective gain in float64."""
    weight = norm.weight.detach().double()
    return 1.0 + weight if _one_plus(norm) else weight


def _unit_gain(norm: nn.Module) -> None:
    norm.weight.fill_(0.0 if _one_plus(norm) else 1.0)


def _llama_parts(model: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """(base model, decoder layers, head) of a Llama-style model, or a ValueError naming what is missing."""
    base = getattr(model, "model", None)
    try:
        layers = decoder_blocks(model)[1]
    except ValueError:
        layers = None
    head = getattr(model, "lm_head", None)
    required = ("input_layernorm", "post_attention_layernorm", *_PROJECTIONS)
    if layers and _post_normed(layers[0]):
        required = (*_GEMMA_NORMS, *_PROJECTIONS)
    problem = None
    if base is None or layers is None or head is None or not hasattr(base, "embed_tokens") or not hasattr(base, "norm"):
        problem = "no model.embed_tokens / model.layers / model.norm / lm_head"
    else:
        for layer in layers:
            missing = [p for p in required if not _has(layer, p)]
            if missing:
                problem = f"a decoder layer lacks {missing}"
                break
        if problem is None:
            names = _GEMMA_NORMS if _post_normed(layers[0]) else ("input_layernorm", "post_attention_layernorm")
            norms = [base.norm] + [layer.get_submodule(name) for layer in layers for name in names]
            if not all(type(m).__name__.endswith(_NORM_SUFFIX) for m in norms):
                problem = "its norms are not RMSNorm (a LayerNorm subtracts the mean, which a rotation does not keep)"
            elif len({_post_normed(layer) for layer in layers}) > 1:
                problem = "some decoder layers have post-norms and some do not"
    if problem is not None:
        raise ValueError(f"rotation supports Llama-family models (RMSNorm, q/k/v/o and gate/up/down projections); "
                         f"{type(model).__name__}: {problem}")
    return base, list(layers), head


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def check_rotatable(model: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """Raise ValueError if ``rotate_model`` cannot rotate ``model``; touches nothing. Returns (base model,
    decoder layers, head)."""
    base, layers, head = _llama_parts(model)
    if hasattr(base, "atq_rotation"):
        raise ValueError("the model is already rotated (model.model.atq_rotation): rotate an FP model once")
    for layer in layers:
        if not all(isinstance(layer.get_submodule(p), nn.Linear) for p in _PROJECTIONS):
            raise ValueError("rotation needs FP nn.Linear projections: rotate before quantizing, not after")
    return base, layers, head


def _set(weight: nn.Parameter, value: torch.Tensor) -> None:
    weight.data.copy_(value.to(weight.dtype))


@torch.no_grad()
def rotate_model(model: nn.Module, kind: str = "hadamard", seed: int = 0) -> None:
    """Rotate ``model`` in place (see the module docstring); its logits stay those of the original model."""
    if kind not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {kind!r}")
    if kind == "none":
        return
    base, layers, _ = check_rotatable(model)
    hidden = base.embed_tokens.weight.shape[1]
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    device = base.embed_tokens.weight.device
    q = random_rotation(hidden, kind, seed).to(device)
    r = random_rotation(head_dim, kind, seed + 1).to(device)

    def reads(linear: nn.Linear, gain: torch.Tensor | None) -> None:  # W -> (W·diag(gain))·Q, or W·Q
        weight = linear.weight.double()
        _set(linear.weight, (weight if gain is None else weight * gain) @ q)

    def writes(linear: nn.Linear) -> None:  # W -> Qᵀ·W, b -> b·Q
        _set(linear.weight, q.T @ linear.weight.double())
        if linear.bias is not None:
            _set(linear.bias, linear.bias.double() @ q)

    inputs_form = any(_post_normed(layer) for layer in layers)  # Gemma: the readers' inputs are rotated
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        mlp_norm = layer.pre_feedforward_layernorm if inputs_form else layer.post_attention_layernorm
        for norm, readers in ((layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj)),
                              (mlp_norm, (mlp.gate_proj, mlp.up_proj))):
            gain = None if inputs_form else _gain(norm)  # inputs form: the gain stays in the norm
            for linear in readers:
                reads(linear, gain)
            if not inputs_form:
                _unit_gain(norm)
        v_heads = attention.v_proj.weight.shape[0] // head_dim
        v = attention.v_proj.weight.double().reshape(v_heads, head_dim, hidden)
        _set(attention.v_proj.weight, torch.einsum("hd,khi->kdi", r, v).reshape(-1, hidden))
        if attention.v_proj.bias is not None:
            _set(attention.v_proj.bias, (attention.v_proj.bias.double().reshape(v_heads, head_dim) @ r).reshape(-1))
        o = attention.o_proj.weight.double().reshape(attention.o_proj.weight.shape[0], -1, head_dim)
        _set(attention.o_proj.weight, (o @ r).reshape(attention.o_proj.weight.shape[0], -1))
        if not inputs_form:
            writes(attention.o_proj)
            writes(mlp.down_proj)
    if inputs_form:
        attach_stream_rotation(model, kind, seed, torch.ones(hidden))
    else:
        attach_stream_rotation(model, kind, seed, _gain(base.norm).float())
        _unit_gain(base.norm)


class StreamRotation(FixedDtypeBuffers, nn.Module):
    """Q and the final norm's original gain g (both fp32 whatever the model's dtype) for the two hooks. The norm
    itself keeps a gain of 1 in the rotated basis, as when g is folded into the head: tuning trains that.
    Q is rebuilt from (kind, seed) rather than stored: a d x d matrix is as large as 40 of SmolLM2's layers.
    ``form``: ``stream`` or ``inputs`` (Gemma; g is 1, unused), set by ``attach_stream_rotation``."""

    fixed_dtype_buffers = ("matrix", "gain")

    def __init__(self, kind: str, seed: int, gain: torch.Tensor) -> None:
        super().__init__()
        self.kind, self.seed, self.form = kind, seed, "stream"
        self.register_buffer("gain", gain)
        self.register_buffer("matrix", self.build(), persistent=False)

    def build(self) -> torch.Tensor:
        """Q on the gain's device (a meta skeleton gets a meta Q; ``materialize`` fills it once loaded)."""
        return self.factor(self.gain.device)

    def materialize(self) -> None:
        self.matrix = self.build()

    def apply(self, hidden: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``hidden``·Q (entering) or ``hidden``·Qᵀ·diag(gain) (leaving), whatever autocast is on: the rotation is
        a change of basis, exact in the FP model, so bf16 autocast (tuning and QAT on a GPU) must not round it.

        Entering, the product is taken in float64 and rounded once: exactly the rows of the table E·Q that a
        model with the rotation folded into its embedding stores, so calibration sees the same inputs whether
        the rotation is folded (llama.cpp's GGUF, ATQ before the stream rotation) or hooked. GPTQ's rounding
        decisions flip under 1e-7 input differences, so an fp32 product here moved the recipes' results.
        Leaving, fp32 suffices: no rounding decision follows it."""
        matrix = self.matrix.T if transpose else self.matrix
        dtype = torch.promote_types(hidden.dtype, matrix.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            if transpose:
                return (hidden.to(dtype) @ matrix.to(dtype) * self.gain.to(dtype)).to(hidden.dtype)
            return (hidden.double() @ self.rotation64()).to(hidden.dtype)

    def rotation64(self) -> torch.Tensor:
        """Q in float64 on Q's device: the entering product's factor."""
        return self.factor(self.matrix.device, exact=True)

    def factor(self, device: torch.device, exact: bool = False) -> torch.Tensor:
        """Q on ``device``, float64 (``exact``) or fp32, built from (kind, seed) once per device and kept. Built,
        not copied from ``matrix``: under onloading Gemma's input hooks run inside a block on the GPU while this
        module stays home, possibly a meta skeleton's."""
        factors = self.__dict__.setdefault("_factors", {})
        key = (torch.device(device), exact)
        if key not in factors:
            with torch.device("cpu"):
                q = random_rotation(self.gain.shape[0], self.kind, self.seed)
            factors[key] = (q if exact else q.float()).to(device)
        return factors[key]


def _enter(rotation: StreamRotation, base: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the base model: its embeddings (looked up here, or given) enter rotated."""
    kwargs = dict(kwargs)
    ids = args[0] if args else kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = base.get_input_embeddings()(ids)
    kwargs["inputs_embeds"] = rotation.apply(embeds)
    return ((None, *args[1:]) if args else ()), kwargs


def _rotate_input(rotation: StreamRotation, norm: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a reading sub-layer's pre-norm (Gemma's ``inputs`` form): its output, gain applied, times Q
    on the output's device, in fp32, or in float64 with the float64 Q the weights were rotated by (a float64
    model then computes the original's function exactly)."""
    q = rotation.factor(output.device, exact=output.dtype == torch.float64)
    with torch.autocast(output.device.type, enabled=False):
        return (output.to(q.dtype) @ q).to(output.dtype)


def _leave(rotation: StreamRotation, norm: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the final norm: its output leaves un-rotated, times the original gain."""
    return rotation.apply(output, transpose=True)


def attach_stream_rotation(model: nn.Module, kind: str, seed: int, gain: torch.Tensor) -> str:
    """Attach Q = random_rotation(width, kind, seed) by hooks and return the form. Llama (``stream``): the stream
    is rotated where it enters the decoder and un-rotated after the final norm, then times ``gain``. Gemma
    (``inputs``, post-norms): the output of each reading sub-layer's pre-norm is rotated. Also what loading a
    rotated artifact calls, with a gain the file fills."""
    base = model.model
    if hasattr(base, "atq_rotation"):
        raise ValueError("the model is already rotated")
    base.atq_rotation = StreamRotation(kind, seed, gain.to(base.norm.weight.device))
    layers = decoder_blocks(model)[1]
    if any(_post_normed(layer) for layer in layers):
        base.atq_rotation.form = "inputs"
        for layer in layers:
            for name in _READER_NORMS:
                layer.get_submodule(name).register_forward_hook(functools.partial(_rotate_input, base.atq_rotation))
    else:
        base.register_forward_pre_hook(functools.partial(_enter, base.atq_rotation), with_kwargs=True)
        base.norm.register_forward_hook(functools.partial(_leave, base.atq_rotation))
    return base.atq_rotation.form


def folded_stream(model: nn.Module, embedding: torch.Tensor | None = None,
                  head: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embedding, head, final-norm gain) with the stream rotation folded in (E·Q, (W·diag(g))·Q, the norm's own
    gain), for runtimes that cannot run the hooks (llama.cpp); the plain weights when ``model`` is not rotated.
    ``embedding``/``head``: their dense weights where the modules hold them otherwise (block-quantized)."""
    base = model.model
    embedding = base.get_input_embeddings().weight.detach() if embedding is None else embedding
    head = model.get_output_embeddings().weight.detach() if head is None else head
    gain = base.norm.weight.detach()
    if not hasattr(base, "atq_rotation"):
        return embedding, head, gain
    if any(_post_normed(layer) for layer in decoder_blocks(model)[1]):
        raise ValueError("a rotated model with post-norms (Gemma) rotates each sub-layer's input at run time: no "
                         "folding into its embedding and head removes that; quantize with rotation='none' to export")
    q, original = base.atq_rotation.rotation64(), base.atq_rotation.gain.double()
    return ((embedding.double() @ q).to(embedding.dtype), ((head.double() * original) @ q).to(head.dtype), gain)
