"""Secure, self-hosted, OpenAI-compatible model server on vLLM.

Importing this package is cheap and has no side effects: vLLM, torch and transformers load only when an
engine or a model conversion needs them.
"""

__version__ = "0.1.0"
