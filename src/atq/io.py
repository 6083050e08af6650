"""ATQ artifacts: a Hugging Face checkpoint directory plus ATQ's checksums.

``save_quantized`` writes
  ``config.json``          the model's HF config with a ``quantization_config`` (``quant_method: "atq"``): format
                           version, every ternary module's packed-weight metadata, the rotation, how the embedding
                           is stored, the recipe (QuantConfig), the layers kept FP and the model's source;
  ``model.safetensors``    packed uint8 codes (``<layer>.packed``), fp16 scales (``<layer>.scales``), and every
                           other tensor once, floating-point ones in the storage dtype (bf16 by default);
  ``generation_config.json`` and the tokenizer files, when the model and a tokenizer have them;
  ``atq_checksums.json``   sha256 and size of every other file, and a digest of its own list.
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads it after ``import atq`` (hf.py registers the
quantizer that builds the skeleton below); ``atq.load_quantized`` checks every checksum first.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .embedding import QuantizedEmbedding, quantized_embedding_frames
from .files import atomic_directory, sha256_file
from .layers import PackedTernaryLinear
from .rotation import attach_stream_rotation
from .surgery import set_module
from .ternary import PackedTernary

FORMAT_VERSION = 2
CHECKSUMS = "atq_checksums.json"
OLD_CONFIG = "atq_config.json"  # format 1 (ATQ 0.1): its own JSON instead of an HF config
WEIGHTS_FILE = "model.safetensors"
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ArtifactError(ValueError):
    """A missing, truncated, altered or incompatible artifact file."""


def _package_version() -> str:
    from . import __version__

    return __version__


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an ATQ artifact (this format or the old one): what a save may replace."""
    path = Path(path)
    return (path / CHECKSUMS).is_file() or (path / OLD_CONFIG).is_file()


def save_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None, *,
                   dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Write ``model`` (after ``quantize``) to ``directory`` as an HF checkpoint; returns the directory.

    ``dtype``: how floating-point tensors other than ternary scales are stored (``bfloat16``, ``float16``,
    ``float32``). The directory is published atomically; an existing one is replaced only if it is an ATQ
    artifact (or ``overwrite``), so a save never deletes what it did not write.
    """
    from safetensors.torch import save_file

    if getattr(model, "atq_config", None) is None:
        raise ValueError("save_quantized: the model has not been quantized (call atq.quantize first)")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"save_quantized: dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    tensors = stored_tensors(model, STORAGE_DTYPES[dtype])
    hf_config = model.config.__class__.from_dict(model.config.to_dict())
    hf_config.quantization_config = quantization_config(model, dtype)
    hf_config.dtype = dtype
    if isinstance(model.get_input_embeddings(), QuantizedEmbedding):
        hf_config.tie_word_embeddings = False  # the skeleton shares the blocks itself (quantization_config)
    with atomic_directory(directory, lambda path: overwrite or is_artifact(path)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        hf_config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            _compact_json(tmp / "tokenizer.json")
        write_checksums(tmp)
    return Path(directory)


def _compact_json(path: Path) -> None:
    """Rewrite a pretty-printed JSON file without the indentation: SmolLM2's tokenizer.json shrinks from 3.5 to
    1.6 MB, a sixth of its one-plane artifact, for the same content."""
    if path.is_file():
        path.write_text(json.dumps(json.loads(path.read_text(encoding="utf-8")), ensure_ascii=False,
                                   separators=(",", ":")), encoding="utf-8")


def quantization_config(model: nn.Module, dtype: str) -> dict[str, Any]:
    """The ``quantization_config`` of ``config.json``: everything the skeleton and the reports need."""
    modules = {name: {**m.qweight.metadata(), "bias": m.bias is not None, "activations": m.activations}
               for name, m in model.named_modules() if isinstance(m, PackedTernaryLinear)}
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    return {
        "quant_method": "atq", "format_version": FORMAT_VERSION, "atq_version": _package_version(),
        "modules": modules,
        "fp_layers": [r["name"] for r in getattr(model, "atq_report", []) if r["precision"] == "fp"],
        **_rotation(model),
        "embedding": embedding.kind if isinstance(embedding, QuantizedEmbedding) else dtype,
        "embedding_tied": getattr(head, "embedding", None) is embedding,
        "recipe": model.atq_config.to_dict(),
        "source": getattr(model, "atq_source", None),
    }


def _rotation(model: nn.Module) -> dict[str, Any]:
    rotation = getattr(getattr(model, "model", None), "atq_rotation", None)
    if rotation is None:
        return {"rotation": None}
    return {"rotation": rotation.kind, "rotation_seed": rotation.seed, "rotation_form": rotation.form}


def stored_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict once (tied aliases dropped), floating-point ones in ``dtype`` except those
    their module keeps in a fixed dtype (ternary and embedding scales in fp16, the rotation in fp32)."""
    modules = dict(model.named_modules())
    tensors, _ = unique_state_dict(model)
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        fixed = leaf in getattr(modules.get(owner), "fixed_dtype_buffers", ())
        if tensor.is_floating_point() and not fixed:
            tensors[name] = tensor.to(dtype)
    return tensors


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


def _digest(files: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_checksums(directory: Path) -> None:
    files = {str(f.relative_to(directory)): {"sha256": sha256_file(f), "bytes": f.stat().st_size}
             for f in sorted(directory.rglob("*")) if f.is_file() and f.name != CHECKSUMS}
    payload = {"format_version": FORMAT_VERSION, "files": files, "digest": _digest(files)}
    (directory / CHECKSUMS).write_text(json.dumps(payload, indent=2) + "\n")


def verify_checksums(directory: str | os.PathLike) -> None:
    """Raise ArtifactError naming the first missing, truncated or altered file (the checksum list included)."""
    directory = Path(directory)
    path = directory / CHECKSUMS
    if (directory / OLD_CONFIG).is_file() and not path.is_file():
        raise ArtifactError(
            f"{directory}: an artifact of ATQ 0.1 (format 1, {OLD_CONFIG}); this ATQ ({_package_version()}) reads "
            f"format {FORMAT_VERSION}, a Hugging Face checkpoint. Quantize the source model again with this version: "
            f"the recipe is the 'quant_config' of {OLD_CONFIG} (atq.QuantConfig.from_dict reads it).")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; not an ATQ artifact directory (atq.save_quantized writes one)")
    try:
        payload = json.loads(path.read_text())
        files = payload["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ArtifactError(f"{path}: unreadable ({error}); the file is truncated or corrupted") from error
    if payload.get("digest") != _digest(files):
        raise ArtifactError(f"{path}: its list of checksums was altered or corrupted")
    for name, expected in files.items():
        file = directory / name
        if not file.is_file():
            raise ArtifactError(f"{file}: missing (listed in {CHECKSUMS})")
        if file.stat().st_size != expected["bytes"]:
            raise ArtifactError(f"{file}: {file.stat().st_size} bytes, expected {expected['bytes']}; truncated or altered")
        if sha256_file(file) != expected["sha256"]:
            raise ArtifactError(f"{file}: sha256 mismatch; the file was altered or corrupted")


def check_consistent(qconfig: dict[str, Any], weights_file: str | os.PathLike) -> None:
    """Raise ArtifactError naming the field when ``quantization_config`` does not describe the tensors in
    ``weights_file`` (shapes from its header only): an edited config fails here, before anything loads."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_file), "pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise ArtifactError(f"{weights_file}: unreadable safetensors file ({error})") from error
    for name, layer in qconfig["modules"].items():
        try:
            frame = PackedTernary.from_metadata(layer, device="meta")
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(f"quantization_config.modules[{name!r}]: {error!r}") from error
        for key, expected in (("packed", frame.packed.shape), ("scales", frame.scales.shape)):
            stored = shapes.get(f"{name}.{key}")
            if stored != tuple(expected):
                raise ArtifactError(
                    f"quantization_config.modules[{name!r}] ({layer}) describes {key} of shape {tuple(expected)}, "
                    f"but {Path(weights_file).name} holds {stored}: the config was edited or belongs to other weights")


def build_skeleton(model: nn.Module, qconfig: dict[str, Any]) -> None:
    """Turn a freshly built (possibly meta-device) HF model into the frame the artifact's tensors load into:
    packed ternary layers, the stream rotation, the block-quantized embedding."""
    dtype = next(model.parameters()).dtype
    for name, layer in qconfig["modules"].items():
        bias = torch.zeros(layer["out_features"], dtype=dtype) if layer["bias"] else None
        set_module(model, name, PackedTernaryLinear(PackedTernary.from_metadata(layer), bias, layer["activations"]))
        # every tensor of the parent comes from the file: transformers' weight init (GPT-2's re-initialises its
        # c_proj.weight through the parent) must not touch it
        model.get_submodule(name.rpartition(".")[0])._is_hf_initialized = True
    if qconfig.get("rotation"):
        hidden = model.get_input_embeddings().embedding_dim
        form = attach_stream_rotation(model, qconfig["rotation"], qconfig["rotation_seed"], torch.zeros(hidden))
        # the form follows from the model's structure; a Gemma file without one was rotated in the stream form,
        # which folded its norm gains into ternary weights (perplexity 1e12 on Gemma 3 270M): never load it as
        # the inputs form, whose weights differ
        stored = qconfig.get("rotation_form", "stream")
        if stored != form:
            why = ("an earlier ATQ's rotated Gemma, which was broken" if form == "inputs" and stored == "stream"
                   else "the config was edited or belongs to another model")
            raise ArtifactError(f"quantization_config.rotation_form is {stored!r} but this model takes the {form!r} "
                                f"form ({why}): quantize the source model again with this version")
    if qconfig["embedding"] in ("q8_0", "q4_0"):
        quantized_embedding_frames(model, qconfig["embedding"], qconfig["embedding_tied"], dtype)


def check_loaded(model: nn.Module, weights_files: list[str | os.PathLike] = ()) -> None:
    """Finish a loaded model: rebuild the stream rotation's Q; raise if a tensor the model holds is in none of
    ``weights_files`` (transformers would have left it at random: a config.json edited to more layers), or if a
    packed layer holds codes no packing produces (what checksums cannot see where there are none)."""
    from safetensors import safe_open

    rotation = getattr(getattr(model, "model", None), "atq_rotation", None)
    if rotation is not None:
        rotation.materialize()
    if weights_files:
        stored = set()
        for file in weights_files:
            with safe_open(str(file), "pt") as handle:
                stored |= set(handle.keys())
        state = model.state_dict()
        present = {state[key].data_ptr() for key in stored if key in state}
        missing = [key for key, value in state.items() if key not in stored and value.data_ptr() not in present]
        if missing:
            raise ArtifactError(f"config.json describes tensors the weights file lacks ({missing[:3]}...): "
                                "the config was edited or belongs to other weights")
    for name, module in model.named_modules():
        if isinstance(module, PackedTernaryLinear):
            try:
                module.qweight.check(f"{WEIGHTS_FILE}:{name}.packed")
            except ValueError as error:
                raise ArtifactError(str(error)) from error
