"""The OpenAI-compatible HTTP API: one folder per endpoint (protocol, serving, router)."""
