"""verispec: lossless speculative decoding.

`from verispec import LLM, SamplingParams` as in vLLM; LLM (and with it torch) loads on first use,
so importing the package, its config and its errors stays light.
"""

from typing import TYPE_CHECKING, Any

from verispec.config import RuntimeConfig, SamplingParams
from verispec.errors import (ContextOverflowError, InvalidInputError, ModelLoadError, NumericsError,
                             TokenizerMismatchError, VerispecError)

if TYPE_CHECKING:
    from verispec.llm import LLM

__all__ = ["LLM", "ContextOverflowError", "InvalidInputError", "ModelLoadError", "NumericsError", "RuntimeConfig",
           "SamplingParams", "TokenizerMismatchError", "VerispecError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from verispec.llm import LLM

        return LLM
    raise AttributeError(f"module 'verispec' has no attribute {name!r}")
