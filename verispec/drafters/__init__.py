"""Proposers of draft tokens (DESIGN.md: propose / observe / reset; finish for cross-request ones)."""

from verispec.drafters.base import DraftProposal, Drafter
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.drafters.ngram import NgramDrafter
from verispec.drafters.suffix import SuffixDrafter

__all__ = ["DraftModelDrafter", "DraftProposal", "Drafter", "NgramDrafter", "SuffixDrafter"]
