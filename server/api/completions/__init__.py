"""Text completions endpoint."""
