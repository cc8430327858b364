"""verispec: lossless speculative decoding."""

from verispec.config import RuntimeConfig, SamplingParams
from verispec.errors import ContextOverflowError, InvalidInputError, ModelLoadError, VerispecError

__all__ = ["ContextOverflowError", "InvalidInputError", "ModelLoadError", "RuntimeConfig", "SamplingParams",
           "VerispecError"]
__version__ = "0.1.0"
