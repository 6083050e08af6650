"""transformers integration: ``quant_method: "atq"`` registered with transformers' public quantizer registry, so
``AutoModelForCausalLM.from_pretrained(artifact)`` (and ``pipeline``, ``generate``, ``save_pretrained``) work
after ``import atq``, like any other weight quantizer's checkpoints.

Loading a checkpoint only: ATQ quantizes through ``atq.quantize`` (calibration needs more than a load call).
"""

from __future__ import annotations

import logging
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import QuantConfig
from .io import (
    CHECKSUMS,
    FORMAT_VERSION,
    ArtifactError,
    build_skeleton,
    check_consistent,
    check_loaded,
    verify_checksums,
)
from .layers import PackedTernaryLinear

log = logging.getLogger(__name__)
METHOD = "atq"
# The directory load_quantized has just verified, so the quantizer it calls does not hash every file again.
_VERIFIED: ContextVar[Path | None] = ContextVar("atq_verified_directory", default=None)


class AtqConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an ATQ checkpoint (io.quantization_config writes its fields)."""

    def __init__(self, modules: dict[str, Any] | None = None, format_version: int | None = None, **fields: Any):
        self.quant_method = METHOD
        if format_version != FORMAT_VERSION:
            raise ArtifactError(f"quantization_config: ATQ format version {format_version!r}; this ATQ reads "
                                f"{FORMAT_VERSION}. Quantize the source model again with this version.")
        if not isinstance(modules, dict):
            raise ArtifactError("quantization_config.modules: missing or not a mapping of module names")
        self.format_version, self.modules = format_version, modules
        for key, value in fields.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}


class AtqHfQuantizer(HfQuantizer):
    """Builds the packed skeleton before transformers loads the tensors, checks them after."""

    requires_calibration = True  # pre-quantized checkpoints only

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        pass

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        files = kwargs.get("checkpoint_files") or []
        self.checkpoint_files = list(files)
        directory = Path(files[0]).parent if files else None
        if directory is not None and (directory / CHECKSUMS).is_file():  # corruption first, then consistency
            if _VERIFIED.get() != directory.resolve():  # load_quantized hashed the files a moment ago
                verify_checksums(directory)
        elif directory is not None:
            log.warning("%s has no %s (written by save_pretrained?): its files are not verified", directory, CHECKSUMS)
        for file in files:
            check_consistent(self.quantization_config.to_dict(), file)
        try:
            build_skeleton(model, self.quantization_config.to_dict())
        except ArtifactError:  # already names the field and the fix
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"quantization_config does not describe a loadable model: {error!r}") from error

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        check_loaded(model, getattr(self, "checkpoint_files", []))
        qconfig = self.quantization_config
        model.atq_config = QuantConfig.from_dict(getattr(qconfig, "recipe", {}))
        model.atq_report = ([{"name": n, "precision": "ternary", **m} for n, m in qconfig.modules.items()]
                            + [{"name": n, "precision": "fp"} for n in getattr(qconfig, "fp_layers", [])])
        model.atq_source = getattr(qconfig, "source", None)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register ATQ with transformers once (importing atq does it)."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(AtqConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(AtqHfQuantizer)


def load_quantized(directory: str | os.PathLike, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Load the ATQ artifact in ``directory`` after checking every file's checksum; ``dtype`` (default: the
    stored one) is the dtype of the FP parts and activations (ternary scales stay fp16)."""
    from transformers import AutoModelForCausalLM

    verify_checksums(directory)  # before transformers parses config.json, so a corrupt one is named as such
    register()
    token = _VERIFIED.set(Path(directory).resolve())
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or "auto")
    finally:
        _VERIFIED.reset(token)
    if not any(isinstance(m, PackedTernaryLinear) for m in model.modules()):
        raise ArtifactError(f"{directory}: config.json has no ATQ quantization_config")
    return model.to(device or "cpu").eval()


register()
