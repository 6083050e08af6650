"""QuantConfig: the one description of how a model is ternarised, stored with every artifact (``to_dict``).

The quantizer fields are flat; each optional stage of calibrated PTQ is a frozen dataclass where ``None`` means
off, so a setting exists only where it acts. Validated on construction (errors name the field and the range).
The stage fields' flat keywords (``reconstruct_steps=`` ...) stay: they are the README's recipes and CLI flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

from .checks import BOOL, PATTERNS, Check, choice, integer, real

MODES = ("sparsity", "magnitude", "mse", "absmean")
GRANULARITIES = ("tensor", "row", "group")
ROTATIONS = ("none", "hadamard", "orthogonal")  # "none" is stored as None
EMBEDDINGS = ("fp", "q8_0", "q4_0")  # embedding.py: llama.cpp's Q8_0 / Q4_0 blocks
COMPILE_MODES = ("off", "blocks", "model")  # TrainConfig.compile (qat.py)


def _field(default: Any, help: str, check: Check, **metadata: Any) -> Any:
    """A field with its help (the CLI's), its check and, in a stage, its flat ``keyword``; a stage's switch also
    has the keyword value that turns the stage ``off`` and how to turn it ``on``."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, **metadata})


class _Stage:
    def __post_init__(self) -> None:
        _validate(self)


@dataclass(frozen=True)
class Calibration(_Stage):
    """Calibrated PTQ: GPTQ on each decoder block's input Hessian, blocks in order on propagated inputs."""

    source: str | None = _field(  # None: quantize(calibration=windows) gets the windows
        "wikitext2_valid", "calibrate on wikitext2_valid, a text file, or generated (text sampled from the FP "
        "model); default: no calibration", Check(lambda v: v is None or (isinstance(v, str) and v != ""),
        "None, 'wikitext2_valid', 'generated' or a text file path"), keyword="calibration", off=None,
        on="calibration=SOURCE")
    windows: int = _field(128, "calibration windows", integer(1), keyword="calibration_windows")
    seq_len: int = _field(2048, "tokens per calibration window", integer(2), keyword="calibration_seq_len")
    compensation: bool = _field(True, "GPTQ error compensation: push each column's error onto the columns not "
                                "yet quantized through the inverse Hessian", BOOL, keyword="compensation")
    damp: float = _field(0.01, "Hessian dampening, a fraction of its mean diagonal", real(0, strict=True),
                         keyword="damp")
    block_size: int = _field(128, "columns per lazy GPTQ update", integer(1), keyword="block_size")


@dataclass(frozen=True)
class Reconstruction(_Stage):
    """Block-wise reconstruction after GPTQ: tune each decoder block's scales against the FP output."""

    steps: int = _field(96, "Adam steps of block-wise reconstruction per decoder block (0: off)", integer(1),
                        keyword="reconstruct_steps", off=0, on="reconstruct_steps=N (N > 0)")
    lr: float = _field(1e-3, "learning rate of block-wise reconstruction", real(0, strict=True),
                       keyword="reconstruct_lr")
    target: str = _field("fp", "fp: the FP model's own activations (a block also undoes the drift of the blocks "
                         "before it); block: the FP block applied to the quantized inputs", choice(("fp", "block")),
                         keyword="reconstruct_target")
    weight_lr: float = _field(0.0, "also train latent weights (straight-through) at this rate, so codes can "
                              "change (0: scales only)", real(0), keyword="reconstruct_weight_lr")


@dataclass(frozen=True)
class EndToEnd(_Stage):
    """End-to-end tuning of every scale so the model's next-token distribution matches the FP model's."""

    steps: int = _field(128, "steps tuning all scales against the FP model's logits (KL, codes fixed; 0: off)",
                        integer(1), keyword="end_to_end_steps", off=0, on="end_to_end_steps=N (N > 0)")
    lr: float = _field(1e-4, "learning rate of end-to-end tuning (norms at a tenth)", real(0, strict=True),
                       keyword="end_to_end_lr")


@dataclass(frozen=True)
class MixedPrecision(_Stage):
    """Keep the most sensitive selected layers in floating point; scoring them needs calibration windows."""

    fp_fraction: float = _field(0.2, "fraction of layers kept FP, the most sensitive (needs calibration; 0: off)",
                                real(0, 1, strict=True), keyword="fp_fraction", off=0.0, on="fp_fraction=F > 0")
    sensitivity: str = _field("gradient", "gradient: E[|g * dW|] from backward passes; measured: loss increase "
                              "with that layer alone ternarised", choice(("gradient", "measured")),
                              keyword="sensitivity")


_STAGES = {"calibration": Calibration, "reconstruction": Reconstruction, "end_to_end": EndToEnd,
           "mixed_precision": MixedPrecision}


def _stage(cls: type) -> dict[str, Any]:  # metadata of a QuantConfig field holding an optional stage
    return {"help": cls.__doc__, "check": Check(lambda v: v is None or isinstance(v, cls), f"None or {cls.__name__}")}


@dataclass(frozen=True, init=False)
class QuantConfig:
    """How to ternarise each selected linear layer, and which optional stages of calibrated PTQ run.

    Keywords: the fields and the stage fields' flat keywords (``keywords()``); ``calibration`` also takes a source
    string. Calibrated, ``sparsity`` mode keeps its per-group zero fraction; the other modes round to the nearest
    level of the group's grid. Stages needing windows may get them from ``quantize(calibration=windows)``.
    """

    mode: str = _field("mse", "sparsity: zero the smallest |w| of each scale group; magnitude: |w| <= threshold "
                       "or alpha*std(W); mse: the threshold minimising ||W - a*T||^2; absmean: BitNet b1.58",
                       choice(MODES))
    sparsity: float = _field(0.5, "fraction of zeros per scale group (mode sparsity)", real(0, 1))
    threshold: float | None = _field(None, "absolute cutoff (mode magnitude; default: alpha*std(W))",
                                     real(0, optional=True))
    alpha: float = _field(0.7, "cutoff = alpha*std(W) (mode magnitude without threshold)", real(0))
    granularity: str = _field("group", "one scale per tensor, per output row, or per group of group_size inputs",
                              choice(GRANULARITIES))
    group_size: int = _field(64, "inputs per scale group", integer(1))
    include: tuple[str, ...] = _field((), "regexes (re.search) of linear layer names to ternarise", PATTERNS)
    exclude: tuple[str, ...] = _field((), "regexes of linear layer names to keep FP", PATTERNS)
    quantize_head: bool = _field(False, "also ternarise the output embedding (LM head)", BOOL)
    planes: int = _field(1, "trit-planes per weight, W = sum of a_k*T_k; each costs its codes and scales",
                         integer(1, 4))
    packing: str = _field("2bit", "2bit: 4 trits a byte (fast to unpack); base3: 5 trits a byte (1.6 bits a "
                          "trit)", choice(("2bit", "base3")))
    activations: str = _field("fp", "fp, or int8: each ternary layer's input quantized per token (absmax), as "
                              "BitNet runtimes do", choice(("fp", "int8")))
    embedding: str = _field("fp", "fp, or q8_0 / q4_0: the embedding and LM head in llama.cpp's 8 / 4-bit blocks",
                            choice(EMBEDDINGS))
    rotation: str | None = _field(None, "rotate a Llama-family or Gemma model first by orthogonal matrices fused "
                                  "into its weights (same function, outliers spread over every group)",
                                  choice(ROTATIONS, optional=True))
    calibration: Calibration | None = dataclasses.field(default=None, metadata=_stage(Calibration))
    reconstruction: Reconstruction | None = dataclasses.field(default=None, metadata=_stage(Reconstruction))
    end_to_end: EndToEnd | None = dataclasses.field(default=None, metadata=_stage(EndToEnd))
    mixed_precision: MixedPrecision | None = dataclasses.field(default=None, metadata=_stage(MixedPrecision))

    def __init__(self, **keywords: Any) -> None:
        self._set(_resolve({f.name: f.default for f in dataclasses.fields(self)}, keywords))

    def replace(self, **keywords: Any) -> QuantConfig:
        """A copy with ``keywords`` applied on top of this config's stages (a stage's other fields are kept)."""
        config = object.__new__(type(self))
        config._set(_resolve({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, keywords))
        return config

    def _set(self, values: dict[str, Any]) -> None:
        # lists from JSON or the CLI become tuples, so the config stays hashable; rotation 'none' is None
        values.update({name: tuple(values[name]) for name in ("include", "exclude") if isinstance(values[name], list)})
        values["rotation"] = None if values["rotation"] == "none" else values["rotation"]
        for name, value in values.items():
            object.__setattr__(self, name, value)
        _validate(self)
        if self.mode == "sparsity" and self.planes != 1 and self.calibration is not None:
            raise ValueError(f"QuantConfig.planes must be 1 when a calibrated run targets a sparsity "
                             f"(mode='sparsity'), got {self.planes!r}")

    @classmethod
    def seed(cls) -> QuantConfig:
        """The seed project's recipe (one scale per tensor, cut at 0.7·std(W), scale = mean kept |w|): the baseline
        row every comparison starts from; its numbers are in results/ptq_smollm2.json."""
        return cls(mode="magnitude", alpha=0.7, threshold=None, granularity="tensor")

    @classmethod
    def bitnet(cls) -> QuantConfig:
        """BitNet b1.58 (W1.58·A8): one absmean scale per tensor, int8 activations: what transformers' BitNet
        integration holds exactly (``atq export --format hf``)."""
        return cls(mode="absmean", granularity="tensor", activations="int8")

    @staticmethod
    def keywords() -> tuple[Keyword, ...]:
        """The flat keywords (quantizer fields, then each stage field's keyword), in field order: the CLI's flags."""
        return tuple(KEYWORDS.values())

    def to_dict(self) -> dict[str, Any]:  # JSON-safe and nested: each stage a dict, or None when off
        data = dataclasses.asdict(self)
        data["include"], data["exclude"] = list(self.include), list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Read ``to_dict``'s form, or the flat form stored by artifacts and results written before the stages
        existed (there a switch at its off value, e.g. ``reconstruct_steps: 0``, drops its stage's fields)."""
        data = _known(cls, dict(data), extra=KEYWORDS)
        for stage, stage_class in _STAGES.items():
            if isinstance(data.get(stage), dict):
                data[stage] = stage_class(**_known(stage_class, data[stage]))
            switch = _SWITCHES[stage][0]
            if _is_off(data.get(switch.name, data.get(stage)), switch.default):
                for name in [k.name for k in KEYWORDS.values() if k.stage == stage and k is not switch]:
                    data.pop(name, None)
        return cls(**data)


class Keyword(NamedTuple):
    """One keyword of QuantConfig (and one ``atq quantize`` flag: ``--`` + name with dashes)."""

    name: str
    type: type  # int, float, str, bool, or tuple (of str)
    default: Any  # its value when not given; for a stage's switch, the value that means "off"
    help: str
    stage: str | None  # the QuantConfig field of the stage it sets; None: a quantizer field
    field: str  # the field it sets, in the stage or in QuantConfig
    choices: tuple | None


def _keyword_table() -> tuple[dict[str, Keyword], dict[str, tuple[Keyword, str]]]:
    """The keywords from the fields' metadata, and each stage's switch with how to turn it on."""
    types = {"int": int, "float": float, "str": str, "bool": bool}
    table, switches = {}, {}
    for outer in dataclasses.fields(QuantConfig):
        stage = outer.name if outer.name in _STAGES else None
        for f in dataclasses.fields(_STAGES[stage]) if stage else [outer]:
            meta = f.metadata
            name = meta.get("keyword", f.name)
            table[name] = Keyword(name, types.get(f.type.split(" |")[0], tuple), meta.get("off", f.default),
                                  meta["help"], stage, f.name, meta["check"].choices)
            if "on" in meta:
                switches[stage] = (table[name], meta["on"])
    return table, switches


KEYWORDS, _SWITCHES = _keyword_table()


def _is_off(value: Any, off: Any) -> bool:
    return value is None or (off is not None and not isinstance(value, bool) and value == off)


def _resolve(base: dict[str, Any], keywords: dict[str, Any]) -> dict[str, Any]:
    """QuantConfig's field values: ``base`` with ``keywords`` (fields or flat stage keywords) applied on top."""
    values, flat = dict(base), {}
    for key, value in keywords.items():
        if key == "calibration" and not isinstance(value, (str, Calibration, type(None))):
            raise TypeError(f"QuantConfig: calibration is a data name (e.g. 'wikitext2_valid') or a Calibration stage, "
                            f"got {type(value).__name__}; token windows go to quantize(model, config, "
                            "calibration=windows)")
        if key in values and not (key == "calibration" and isinstance(value, str)):
            values[key] = value
        elif key in KEYWORDS:
            flat[key] = value
        else:
            raise TypeError(f"QuantConfig: unknown keyword {key!r}; known: {sorted(set(values) | set(KEYWORDS))}")
    for stage, stage_class in _STAGES.items():
        given = {k.name: flat[k.name] for k in KEYWORDS.values() if k.stage == stage and k.name in flat}
        switch, turn_on = _SWITCHES[stage]
        off = _is_off(given[switch.name], switch.default) if switch.name in given else values[stage] is None
        others = [name for name in given if name != switch.name]
        if off and others:
            raise ValueError(f"QuantConfig: {others[0]} sets the {stage} stage, which is off: give {turn_on}")
        if given:
            fields = {KEYWORDS[name].field: value for name, value in given.items()}
            values[stage] = None if off else dataclasses.replace(values[stage] or stage_class(), **fields)
    return values


def _validate(obj: Any) -> None:
    """Check every field against its metadata; the error names the field (and its flat keyword) and the range."""
    owner = type(obj).__name__
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if not meta["check"].ok(value):
            where = f"{owner}.{f.name}" + (f" (QuantConfig.{meta['keyword']})" if "keyword" in meta else "")
            off = f" (QuantConfig.{meta['keyword']}={meta['off']!r} turns the stage off)" if "on" in meta else ""
            raise ValueError(f"{where} must be {meta['check'].allowed}{off}, got {value!r}")


def _known(cls: type, data: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``data`` if every key is a field of ``cls`` (or in ``extra``: legacy flat keywords), else a clear error."""
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(fields) - set(extra or ()))
    if unknown:
        legacy = f" and the flat keywords {[k for k in extra if k not in fields]}" if extra else ""
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {fields}{legacy}")
    return data
