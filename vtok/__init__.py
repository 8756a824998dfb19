"""vtok: visual tokenizers — images to tokens and back, one contract for every family."""

from vtok.errors import CheckpointError, ConfigError, InputError, VtokError
from vtok.models.registry import PRESETS, create, load
from vtok.models.tokenizer import Tokenizer, TokenizerInfo, TokenizerOutput
from vtok.quantizers.base import Quantizer, QuantizerOutput, build_quantizer
from vtok.tokens import TokenBatch

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "Quantizer",
    "QuantizerOutput",
    "TokenBatch",
    "Tokenizer",
    "TokenizerInfo",
    "TokenizerOutput",
    "VtokError",
    "__version__",
    "build_quantizer",
    "create",
    "load",
]
