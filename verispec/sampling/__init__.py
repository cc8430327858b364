"""logits -> distributions -> tokens; speculative verification."""

from verispec.sampling.distribution import probabilities, sample
from verispec.sampling.rejection import (verify, verify_batch, verify_greedy, verify_reference, verify_tree,
                                        verify_tree_greedy, verify_tree_reference)
from verispec.sampling.sampler import Sampler

__all__ = ["Sampler", "probabilities", "sample", "verify", "verify_batch", "verify_greedy", "verify_reference",
           "verify_tree", "verify_tree_greedy", "verify_tree_reference"]
