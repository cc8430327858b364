"""The OpenAI-compatible HTTP server (FastAPI): thin over the scheduler; no algorithm here."""
