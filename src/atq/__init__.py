"""ATQ: adaptive ternary quantization of HuggingFace causal language models.

Public API (names are load-bearing: docs, notebooks and checks use them)::

    from atq import QuantConfig, quantize, perplexity, save_quantized, load_quantized, quantize_model
"""

__version__ = "0.1.0"

from .config import Calibration, EndToEnd, MixedPrecision, QuantConfig, Reconstruction
from .evaluate import evaluate, perplexity
from .hf import load_quantized  # registers ATQ's quantizer with transformers
from .io import ArtifactError, save_quantized
from .layers import PackedTernaryLinear, TernaryLinear
from .models import load_model, smollm2
from .ptq import quantize, quantize_model
from .quantizers import ternarize
from .ternary import PackedTernary, TernaryTensor

__all__ = [
    "ArtifactError",
    "Calibration",
    "EndToEnd",
    "MixedPrecision",
    "PackedTernary",
    "PackedTernaryLinear",
    "QuantConfig",
    "Reconstruction",
    "TernaryLinear",
    "TernaryTensor",
    "evaluate",
    "load_model",
    "load_quantized",
    "perplexity",
    "quantize",
    "quantize_model",
    "save_quantized",
    "smollm2",
    "ternarize",
]
