"""logits -> distributions -> tokens."""

from verispec.sampling.distribution import probabilities, sample

__all__ = ["probabilities", "sample"]
