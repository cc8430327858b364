"""EAGLE-3 heads: the head, its training data and its training."""
