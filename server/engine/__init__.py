"""Engines: the `Engine` interface, the vLLM implementation (the only module importing vLLM), a
deterministic in-process engine for fast tests, and the hub that runs one engine per configured model."""
