"""QuantConfig: the one description of how a model is ternarised.

It is frozen and validated on construction so that a bad value fails where the user typed it, naming the
field and the allowed range, instead of deep inside a quantizer. Every artifact stores it (``to_dict``), so a
loaded model always knows the recipe that made it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MODES = ("sparsity", "magnitude", "mse", "absmean")
GRANULARITIES = ("tensor", "row", "group")
ROTATIONS = ("none", "hadamard", "orthogonal")
COMPILE_MODES = ("off", "blocks", "model")  # TrainConfig.compile (qat.py)


@dataclass(frozen=True)
class QuantConfig:
    """How to ternarise each selected linear layer.

    mode:
        ``sparsity``  zero the ``sparsity`` fraction of smallest-|w| weights in each scale group;
        ``magnitude`` zero |w| <= ``threshold`` (absolute) or, when ``threshold`` is None, |w| <= ``alpha``·std(W);
        ``mse``       the threshold minimising ||W - α·T||² exactly, per scale group;
        ``absmean``   BitNet b1.58: α = mean |w| of the group, codes round(clamp(w/α, -1, 1)).
    granularity: one scale per ``tensor``, per output ``row``, or per ``group`` of ``group_size`` inputs.
    include / exclude: regular expressions matched (``re.search``) against module names; the output
        embedding (LM head) is never ternarised unless ``quantize_head`` is set.
    planes: trit-planes per weight, W ≈ Σ_k α_k·T_k (PTQTP); each plane costs its codes plus its scales.
    packing: ``2bit`` (4 trits a byte, fast to unpack) or ``base3`` (5 trits a byte, 1.6 bits a trit).
    activations: ``fp``, or ``int8``: every ternary layer's input is quantized to int8 per token (absmax), as
        BitNet runtimes do (transformers' BitLinear); the accuracy then is the one such runtimes give.

    With calibration, ``sparsity`` mode keeps its per-group zero fraction (thresholds refitted on the compensated
    weights); the other modes round each column to the nearest level of the group's fitted grid.

    Calibration (used when ``quantize`` gets calibration windows, or ``calibration`` names a source):
    calibration: ``wikitext2_valid``, a text file, or ``generated`` (text sampled from the FP model);
    calibration_windows x calibration_seq_len tokens; ``compensation`` pushes each column's error onto the
    columns not yet quantized through the inverse Hessian (GPTQ) with ``damp`` (fraction of the mean diagonal),
    lazy updates every ``block_size`` columns; ``reconstruct_steps`` > 0 then tunes
    every decoder block's scales against the FP block's output (block-wise reconstruction) at ``reconstruct_lr``;
    ``reconstruct_target`` ``fp``: the FP model's own activations (a block also learns to undo the drift of
    the blocks before it), ``block``: the FP block applied to the quantized inputs; ``reconstruct_weight_lr``
    > 0 also trains latent weights through the straight-through estimator, so codes can change (Block-AP);
    ``end_to_end_steps`` > 0 finally tunes all scales (norms at a tenth of the rate) at ``end_to_end_lr`` so the
    whole model's next-token distribution matches the FP model's on the calibration windows (KL, codes fixed).

    rotation: ``hadamard`` or ``orthogonal`` first rotates a Llama-family model by random orthogonal matrices
        fused into its weights (rotation.py: same function, outliers spread over every group), ``none`` not.

    Mixed precision: ``fp_fraction`` of the selected layers, the most sensitive by the ``sensitivity`` score
    (``gradient``: E[|g ⊙ ΔW|]; ``measured``: loss increase with that layer alone ternarised), stay FP.
    Scoring needs calibration windows.
    """

    mode: str = "mse"
    sparsity: float = 0.5
    threshold: float | None = None
    alpha: float = 0.7
    granularity: str = "group"
    group_size: int = 64
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    quantize_head: bool = False
    planes: int = 1
    packing: str = "2bit"
    activations: str = "fp"
    calibration: str | None = None
    calibration_windows: int = 128
    calibration_seq_len: int = 2048
    compensation: bool = True
    damp: float = 0.01
    block_size: int = 128
    reconstruct_steps: int = 0
    reconstruct_lr: float = 1e-3
    reconstruct_target: str = "fp"
    reconstruct_weight_lr: float = 0.0
    end_to_end_steps: int = 0
    end_to_end_lr: float = 1e-4
    rotation: str = "none"
    fp_fraction: float = 0.0
    sensitivity: str = "gradient"

    def __post_init__(self) -> None:
        # Lists from JSON or the CLI become tuples so the config stays hashable and immutable.
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        _check(self.mode in MODES, "mode", f"one of {MODES}", self.mode)
        _check(self.granularity in GRANULARITIES, "granularity", f"one of {GRANULARITIES}", self.granularity)
        _check(_is_real(self.sparsity) and 0.0 <= self.sparsity < 1.0, "sparsity", "[0, 1)", self.sparsity)
        _check(_is_real(self.alpha) and self.alpha >= 0.0, "alpha", "a finite number >= 0", self.alpha)
        _check(
            self.threshold is None or (_is_real(self.threshold) and self.threshold >= 0.0),
            "threshold", "None or a finite number >= 0", self.threshold,
        )
        _check(
            isinstance(self.group_size, int) and not isinstance(self.group_size, bool) and self.group_size >= 1,
            "group_size", "an integer >= 1", self.group_size,
        )

        for name, low in (("planes", 1), ("calibration_windows", 1), ("calibration_seq_len", 2), ("block_size", 1),
                          ("reconstruct_steps", 0), ("end_to_end_steps", 0)):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= low, name,
                   f"an integer >= {low}", value)
        _check(_is_real(self.fp_fraction) and 0.0 <= self.fp_fraction < 1.0, "fp_fraction", "[0, 1)",
               self.fp_fraction)
        _check(self.sensitivity in ("gradient", "measured"), "sensitivity", "one of ('gradient', 'measured')",
               self.sensitivity)
        _check(self.reconstruct_target in ("fp", "block"), "reconstruct_target", "one of ('fp', 'block')",
               self.reconstruct_target)
        _check(self.rotation in ROTATIONS, "rotation", f"one of {ROTATIONS}", self.rotation)
        _check(self.packing in ("2bit", "base3"), "packing", "one of ('2bit', 'base3')", self.packing)
        _check(self.activations in ("fp", "int8"), "activations", "one of ('fp', 'int8')", self.activations)
        _check(self.mode != "sparsity" or self.planes == 1 or self.calibration is None, "planes",
               "1 when a calibrated run targets a sparsity (mode='sparsity')", self.planes)
        _check(self.planes <= 4, "planes", "an integer in [1, 4]", self.planes)
        _check(_is_real(self.damp) and self.damp > 0, "damp", "a finite number > 0", self.damp)
        _check(_is_real(self.reconstruct_lr) and self.reconstruct_lr > 0, "reconstruct_lr", "a finite number > 0",
               self.reconstruct_lr)
        _check(_is_real(self.end_to_end_lr) and self.end_to_end_lr > 0, "end_to_end_lr", "a finite number > 0",
               self.end_to_end_lr)
        _check(_is_real(self.reconstruct_weight_lr) and self.reconstruct_weight_lr >= 0, "reconstruct_weight_lr",
               "a finite number >= 0", self.reconstruct_weight_lr)
        _check(self.calibration is None or (isinstance(self.calibration, str) and self.calibration != ""),
               "calibration", "None, 'wikitext2_valid', 'generated' or a text file path", self.calibration)

    @classmethod
    def seed(cls) -> QuantConfig:
        """The seed project's recipe (one scale per tensor, threshold 0.7·std(W), scale = mean kept |w|).

        Kept for comparison rows: it is what gave perplexity 110,062 on GPT-2.
        """
        return cls(mode="magnitude", alpha=0.7, threshold=None, granularity="tensor")

    @classmethod
    def bitnet(cls) -> QuantConfig:
        """BitNet b1.58 (W1.58·A8): one absmean scale per tensor, int8 per-token activations. The layout that
        transformers' BitNet integration holds exactly (``atq export --format hf``); usable in PTQ and QAT."""
        return cls(mode="absmean", granularity="tensor", activations="int8")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["include"] = list(self.include)
        data["exclude"] = list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"QuantConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **changes)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"QuantConfig.{name} must be {allowed}, got {value!r}")
