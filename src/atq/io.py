"""Save and load quantized models: safetensors + JSON + sha256 of every file, atomic writes, no pickle.

An artifact directory holds
  ``model.safetensors``  packed uint8 codes (``<layer>.packed``), fp16 scales (``<layer>.scales``), biases and
                         every tensor that stays floating point (tied tensors once, their aliases in the JSON);
  tokenizer files        when a tokenizer is given, so the artifact evaluates without its source;
  ``atq_config.json``    format version, package version, QuantConfig, the HF model config, per-layer
                         packed-weight metadata and precision, and the sha256 and size of every other file.
The model is rebuilt from the stored HF config, so loading needs neither the hub nor the original files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .files import atomic_directory, sha256_file
from .layers import PackedTernaryLinear
from .surgery import set_module
from .ternary import PackedTernary

FORMAT_VERSION = 1
ARTIFACT_CONFIG = "atq_config.json"
WEIGHTS_FILE = "model.safetensors"


class ArtifactError(ValueError):
    """A missing, truncated, altered or incompatible artifact file."""


def _package_version() -> str:
    from . import __version__

    return __version__


def save_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write ``model`` (after ``quantize``) to ``directory`` atomically; returns the directory.

    Everything is written into a temporary sibling directory first and swapped in at the end, so an
    interrupted save leaves any previous artifact at ``directory`` untouched.
    """
    from safetensors.torch import save_file

    config: QuantConfig | None = getattr(model, "atq_config", None)
    if config is None:
        raise ValueError("save_quantized: the model has not been quantized (call atq.quantize first)")
    directory = Path(directory)
    tensors, aliases = unique_state_dict(model)
    layers = {
        name: {"precision": "ternary", **m.weight.metadata(), "bias": m.bias is not None, "activations": m.activations}
        for name, m in model.named_modules() if isinstance(m, PackedTernaryLinear)
    }
    for row in getattr(model, "atq_report", []):
        layers.setdefault(row["name"], {"precision": row["precision"]})

    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "atq", "format_version": str(FORMAT_VERSION)})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = {
            str(f.relative_to(tmp)): {"sha256": sha256_file(f), "bytes": f.stat().st_size}
            for f in sorted(tmp.rglob("*")) if f.is_file()
        }
        meta = {
            "format_version": FORMAT_VERSION,
            "atq_version": _package_version(),
            "quant_config": config.to_dict(),
            "model_class": type(model).__name__,
            "model_config": model.config.to_dict(),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "dtype": str(_fp_dtype(model)).removeprefix("torch."),
            "source": getattr(model, "atq_source", None),
            "layers": layers,
            "tied": aliases,
            "files": files,
        }
        (tmp / ARTIFACT_CONFIG).write_text(json.dumps(meta, indent=2, default=str))
    return directory


def unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared storage once (safetensors refuses aliases); returns (tensors, alias->name)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, aliases


def _fp_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def read_artifact_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``atq_config.json`` and the checksum of every file it lists."""
    directory = Path(directory)
    path = directory / ARTIFACT_CONFIG
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; not an ATQ artifact directory")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path}: not valid JSON ({error}); the file is truncated or corrupted") from error
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: written with artifact format version {version!r}; this ATQ ({_package_version()}) reads "
            f"version {FORMAT_VERSION}. Re-quantize the model with this version."
        )
    for name, expected in meta.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            raise ArtifactError(f"{file}: missing (listed in {ARTIFACT_CONFIG})")
        if file.stat().st_size != expected["bytes"]:
            raise ArtifactError(
                f"{file}: {file.stat().st_size} bytes, expected {expected['bytes']}; the file is truncated or altered"
            )
        if sha256_file(file) != expected["sha256"]:
            raise ArtifactError(f"{file}: sha256 mismatch; the file was altered or corrupted")
    if WEIGHTS_FILE not in meta.get("files", {}):
        raise ArtifactError(f"{path}: lists no {WEIGHTS_FILE}")
    return meta


def load_quantized(directory: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the quantized model saved in ``directory``; its logits equal the saved model's bit for bit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    meta = read_artifact_config(directory)
    model_config = dict(meta["model_config"])
    hf_config = AutoConfig.for_model(model_config.pop("model_type"), **model_config)
    kwargs = {"attn_implementation": meta["attn_implementation"]} if meta.get("attn_implementation") else {}
    model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
    if type(model).__name__ != meta["model_class"]:
        raise ArtifactError(f"{directory}: config builds {type(model).__name__}, artifact holds {meta['model_class']}")
    model.to(getattr(torch, meta["dtype"]))
    dtype = getattr(torch, meta["dtype"])
    for name, layer in meta["layers"].items():
        if layer["precision"] == "ternary":
            bias = torch.zeros(layer["out_features"], dtype=dtype) if layer["bias"] else None
            frame = PackedTernary.from_metadata({"packing": layer.get("layout", "2bit"), **layer})  # 'layout': <= 0.1
            set_module(model, name, PackedTernaryLinear(frame, bias,
                                                        layer.get("activations", "fp")))
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except SafetensorError as error:
        raise ArtifactError(f"{directory / WEIGHTS_FILE}: unreadable safetensors file ({error})") from error
    for name, module in model.named_modules():
        if isinstance(module, PackedTernaryLinear):
            PackedTernary(tensors[f"{name}.packed"], tensors[f"{name}.scales"], module.group_size,
                          module.in_features, module.packing).check(f"{WEIGHTS_FILE}:{name}.packed")
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys) - set(meta["tied"])
    if missing or result.unexpected_keys:
        raise ArtifactError(
            f"{directory / WEIGHTS_FILE}: does not match the model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]})"
        )
    state = model.state_dict(keep_vars=True)
    for alias, target in meta["tied"].items():
        if state[alias].data_ptr() != state[target].data_ptr():
            with torch.no_grad():
                state[alias].copy_(state[target])
    model.atq_config = QuantConfig.from_dict(meta["quant_config"])
    model.atq_report = [{"name": n, **v} for n, v in meta["layers"].items()]
    model.atq_source = meta.get("source")
    return model.to(device or "cpu").eval()
