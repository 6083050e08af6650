"""QuantConfig: the one description of how a model is ternarised.

It is frozen and validated on construction so that a bad value fails where the user typed it, naming the
field and the allowed range, instead of deep inside a quantizer. Every artifact stores it (``to_dict``), so a
loaded model always knows the recipe that made it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MODES = ("sparsity", "magnitude", "mse")
GRANULARITIES = ("tensor", "row", "group")


@dataclass(frozen=True)
class QuantConfig:
    """How to ternarise each selected linear layer.

    mode:
        ``sparsity``  zero the ``sparsity`` fraction of smallest-|w| weights in each scale group;
        ``magnitude`` zero |w| <= ``threshold`` (absolute) or, when ``threshold`` is None, |w| <= ``alpha``·std(W);
        ``mse``       the threshold minimising ||W - α·T||² exactly, per scale group.
    granularity: one scale per ``tensor``, per output ``row``, or per ``group`` of ``group_size`` inputs.
    include / exclude: regular expressions matched (``re.search``) against module names; the output
        embedding (LM head) is never ternarised unless ``quantize_head`` is set.
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
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

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

    @classmethod
    def seed(cls) -> QuantConfig:
        """The seed project's recipe (one scale per tensor, threshold 0.7·std(W), scale = mean kept |w|).

        Kept for comparison rows: it is what gave perplexity 110,062 on GPT-2.
        """
        return cls(mode="magnitude", alpha=0.7, threshold=None, granularity="tensor")

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
