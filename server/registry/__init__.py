"""Model registry: where each model comes from, what its bytes are, and which version they are."""
