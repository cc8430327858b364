"""`verispec bench`: speculative decoding beside plain decoding (and transformers), per category."""
