"""Command-line flags: ``atq quantize``'s config flags, generated from QuantConfig's keyword table so that every
keyword has exactly one flag, with the help text that lives beside the field (``--preset`` is the base the given
flags override); ``with_defaults`` for wrapper scripts that preset flags."""

from __future__ import annotations

import argparse

from .config import QuantConfig

PRESETS = {"seed": QuantConfig.seed, "bitnet": QuantConfig.bitnet}


def flag(keyword_name: str) -> str:
    """The command-line flag of a QuantConfig keyword: ``calibration_windows`` -> ``--calibration-windows``."""
    return "--" + keyword_name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per QuantConfig keyword. No flag has a default of its own (argparse.SUPPRESS): only the flags
    given reach the config, on top of the preset's or QuantConfig's defaults."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="the base config that the other flags override; seed: the seed project's recipe; "
                             "bitnet: per-tensor absmean, int8 activations (W1.58A8)")
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


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    """The preset (or QuantConfig's defaults) with the keyword flags that were given applied on top."""
    base = PRESETS[args.preset]() if getattr(args, "preset", None) else QuantConfig()
    given = {k.name: getattr(args, k.name) for k in QuantConfig.keywords() if hasattr(args, k.name)}
    return base.replace(**given)


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
