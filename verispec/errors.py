"""Typed exceptions: every bad input names the value and what is allowed."""


class VerispecError(Exception):
    """Base of every error verispec raises on purpose."""


class InvalidInputError(VerispecError, ValueError):
    """A value from the user (a sampling parameter, a prompt, a flag) is outside what is allowed;
    `param` names the field when there is one (the server's error JSON carries it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelLoadError(VerispecError):
    """A model file or folder is missing, truncated, corrupt or of an unsupported kind."""


class ContextOverflowError(InvalidInputError):
    """A prompt (or prompt plus the requested tokens) does not fit in the model's context."""


class TokenizerMismatchError(InvalidInputError):
    """A draft model whose tokenizer differs from the target's: its token ids would mean other text."""


class NumericsError(VerispecError):
    """Logits or probabilities became NaN or infinite: no token is emitted from them."""


class DraftProposalError(VerispecError, ValueError):
    """A drafter proposed something malformed (a tree whose parents do not precede their children,
    probabilities of the wrong shape): a bug in the drafter, refused before the target runs."""


class GrammarError(VerispecError, RuntimeError):
    """A response format's matcher failed mid-output (a refused token, a limit of the grammar
    library): the request fails rather than end as if its format were complete."""
