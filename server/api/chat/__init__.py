"""Chat completions endpoint."""
