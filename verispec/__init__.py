"""verispec: lossless speculative decoding."""

from verispec.config import RuntimeConfig, SamplingParams
from verispec.errors import (ContextOverflowError, InvalidInputError, ModelLoadError, TokenizerMismatchError,
                             VerispecError)

__all__ = ["ContextOverflowError", "InvalidInputError", "ModelLoadError", "RuntimeConfig", "SamplingParams",
           "TokenizerMismatchError", "VerispecError"]
__version__ = "0.1.0"
