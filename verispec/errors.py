"""Typed exceptions: every bad input names the value and what is allowed."""


class VerispecError(Exception):
    """Base of every error verispec raises on purpose."""


class InvalidInputError(VerispecError, ValueError):
    """A value from the user (a sampling parameter, a prompt, a flag) is outside what is allowed."""


class ModelLoadError(VerispecError):
    """A model file or folder is missing, truncated, corrupt or of an unsupported kind."""


class ContextOverflowError(InvalidInputError):
    """A prompt (or prompt plus the requested tokens) does not fit in the model's context."""


class TokenizerMismatchError(InvalidInputError):
    """A draft model whose tokenizer differs from the target's: its token ids would mean other text."""
