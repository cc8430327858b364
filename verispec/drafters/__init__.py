"""Proposers of draft tokens (DESIGN.md: propose / observe / reset)."""

from verispec.drafters.base import DraftProposal, Drafter
from verispec.drafters.ngram import NgramDrafter

__all__ = ["DraftProposal", "Drafter", "NgramDrafter"]
