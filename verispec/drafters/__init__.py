"""Proposers of draft tokens (DESIGN.md: propose / observe / reset)."""

from verispec.drafters.base import DraftProposal, Drafter
from verispec.drafters.draft_model import DraftModelDrafter
from verispec.drafters.ngram import NgramDrafter

__all__ = ["DraftModelDrafter", "DraftProposal", "Drafter", "NgramDrafter"]
