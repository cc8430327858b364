"""The generation loop, requests and their statistics."""
