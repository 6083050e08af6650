"""Command-line flags: ``atq quantize``'s config flags, generated from QuantConfig's keyword table so that every
keyword has exactly one flag, with the help text that lives beside the field. ``--preset`` is the base the given
flags override; the default, ``auto``, picks by device (``gpu`` on CUDA, else ``cpu``), so that ``atq quantize``
with no options gives a usable model. ``with_defaults`` for wrapper scripts that preset flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .config import QuantConfig
from .models import resolve_device


class Preset(NamedTuple):
    build: Callable[[], QuantConfig]
    why: str


PRESETS = {
    "gpu": Preset(lambda: QuantConfig(calibration="wikitext2_valid", planes=2, packing="base3", group_size=128,
                                      rotation="hadamard", reconstruct_steps=256, end_to_end_steps=128,
                                      embedding="q8_0"),
                  "the best two-plane recipe that fits the GPU time budget: GPTQ, block reconstruction and "
                  "end-to-end tuning; the embedding in Q8_0 blocks (small files at no measurable cost)"),
    "cpu": Preset(lambda: QuantConfig(calibration="wikitext2_valid", calibration_windows=16, calibration_seq_len=512,
                                      planes=2, packing="base3", group_size=128, rotation="hadamard",
                                      embedding="q8_0"),
                  "calibrated GPTQ on two planes, short windows, no tuning stages (their backward passes "
                  "are what a CPU cannot afford): usable within the CPU time budget"),
    "data-free": Preset(QuantConfig, "QuantConfig(): no data, seconds, but small models lose most of their quality"),
    "seed": Preset(QuantConfig.seed, "the seed project's recipe: one scale per tensor, cut at 0.7*std(W)"),
    "bitnet": Preset(QuantConfig.bitnet, "per-tensor absmean scales, int8 activations (W1.58A8)"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTO = "auto"  # the default preset: gpu when the device is a CUDA GPU, else cpu


def device_description(device: str) -> str:
    """``cpu``, or the GPU's name (what results record as the device a number was measured on)."""
    return torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "cpu"


def add_quantize_parser(commands: argparse._SubParsersAction) -> None:
    """``atq quantize``: the model, output and evaluation options, then ``--preset`` and the config flags."""
    q = commands.add_parser("quantize", help="ternarise a model and save a packed artifact")
    q.add_argument("--model", default="smollm2", help="hub id, local dir, .gguf file, or smollm2 (default)")
    q.add_argument("--out", default=None, help="artifact directory (default out/<model>-atq); an existing one is "
                   "replaced only if it is an ATQ artifact")
    q.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an ATQ artifact")
    q.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the FP parts and activations")
    q.add_argument("--eval", action="store_true", help="perplexity of the FP model and of the saved artifact")
    q.add_argument("--json", default=None, help="also write the run's numbers and recipe to this JSON file")
    add_eval_options(q)
    add_config_flags(q)


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    """The evaluation options that ``atq quantize --eval`` and ``atq eval`` share."""
    parser.add_argument("--data", default="wikitext2", help="evaluation text: wikitext2 or a file path")
    parser.add_argument("--seq-len", type=int, default=2048, help="evaluation window length (tokens)")
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def flag(keyword_name: str) -> str:
    """The command-line flag of a QuantConfig keyword: ``calibration_windows`` -> ``--calibration-windows``."""
    return "--" + keyword_name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--preset`` and one flag per QuantConfig keyword. No keyword flag has a default of its own
    (argparse.SUPPRESS): only the flags given reach the config, on top of the preset's."""
    presets = "; ".join(f"{name}: {preset.why}" for name, preset in PRESETS.items()).replace("%", "%%")
    parser.add_argument("--preset", choices=[AUTO, *PRESETS], default=AUTO,
                        help=f"the base config that the other flags override; {AUTO} (default): gpu on a CUDA "
                             f"device, else cpu; {presets}")
    group = parser.add_argument_group("quantization config (QuantConfig keywords)")
    for keyword in QuantConfig.keywords():
        help = keyword.help.replace("%", "%%")
        if keyword.default not in (None, ()):
            help += f" (default: {keyword.default})"
        options = {"default": argparse.SUPPRESS, "help": help, "dest": keyword.name}
        if keyword.type is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif keyword.type is tuple:
            options.update(nargs="*", metavar="REGEX")
        else:
            options.update(type=keyword.type, choices=keyword.choices)
        group.add_argument(flag(keyword.name), **options)


def preset_name(args: argparse.Namespace) -> str:
    """The preset a run uses: ``--preset``, with ``auto`` resolved by ``--device`` (gpu on CUDA, else cpu)."""
    name = getattr(args, "preset", None) or AUTO
    if name != AUTO:
        return name
    return "gpu" if torch.device(resolve_device(getattr(args, "device", "auto"))).type == "cuda" else "cpu"


def given_keywords(args: argparse.Namespace) -> dict:
    """The QuantConfig keywords given as flags (those left out are not in ``args``)."""
    return {k.name: getattr(args, k.name) for k in QuantConfig.keywords() if hasattr(args, k.name)}


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The preset's config with the keyword flags that were given applied on top; when they clash with the preset,
    the error says which preset they were applied to and how to start from QuantConfig()'s defaults."""
    name = preset_name(args)
    try:
        return PRESETS[name].build().replace(**given_keywords(args))
    except ValueError as error:
        if name == "data-free":
            raise
        raise ValueError(f"{error} (the flags apply on top of --preset {name}; --preset data-free starts from "
                         "QuantConfig()'s defaults)") from error


def require_texts(config: QuantConfig, evaluation: str | None) -> None:
    """Fail now, naming the source, when the calibration or evaluation text cannot be read: before a model loads."""
    from .data import load_text

    calibration = config.calibration.source if config.calibration else None
    for source in (evaluation, calibration):
        if source not in (None, "generated"):
            load_text(source)


def preset_for_model(config: QuantConfig, model: nn.Module, args: argparse.Namespace) -> QuantConfig:
    """``config`` without the preset's parts that ``model`` cannot take, each with a note: a rotation (it fuses
    into Llama-family models only) and 8/4-bit embedding blocks (rows of whole 32-blocks only). What a flag asked
    for by name is kept, for quantize to refuse with its reason."""
    from .embedding import check_blockable
    from .rotation import check_rotatable

    given = given_keywords(args)
    if config.rotation is not None and "rotation" not in given:
        try:
            check_rotatable(model)
        except ValueError as error:
            print(f"atq: the preset's rotation is off for this model ({error})", flush=True)
            config = config.replace(rotation=None)
    if config.embedding != "fp" and "embedding" not in given:
        try:
            check_blockable(model)
        except ValueError as error:
            print(f"atq: the preset's {config.embedding} embedding is off for this model ({error})", flush=True)
            config = config.replace(embedding="fp")
    return config


def with_defaults(command: str, defaults: list[str], extra: list[str]) -> list[str]:
    """``[command, *defaults, *extra]`` minus the default options that ``extra`` sets itself: the command line of
    a thin wrapper script (experiments/) that presets options but lets every one be overridden."""
    given = {arg for arg in extra if arg.startswith("--")}
    kept, i = [], 0
    while i < len(defaults):
        takes_value = i + 1 < len(defaults) and not defaults[i + 1].startswith("--")
        if defaults[i] not in given:
            kept += defaults[i : i + 1 + takes_value]
        i += 1 + takes_value
    return [command, *kept, *extra]
