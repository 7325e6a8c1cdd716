"""Watermarking: per-deployment and per-organization keys, the batch logits processor, detection.

    settings   `WatermarkSettings` (scheme, gamma, delta, context width, detection knobs)
    types      `KeyMaterial` and the scheme names shared by every module below
    models     ORM tables: `WatermarkKey` (encrypted at rest), `WatermarkExemption`
    keys       `WatermarkKeyring`: default and per-org keys, rotation, exemptions (audited)
    transport  sealed key handles: how key material reaches vLLM's worker processes
    request    the `_wm` entry of `SamplingParams.extra_args` and the `X-Watermark` header
    processor  `BatchWatermarker`: the engine-independent logits processor (torch)
    detector   `detect`: exact binomial / Gamma tails, repeated contexts scored once (torch, scipy)
    routes     `POST /v1/watermark/detect`
    cli        `detect_cli` for `python -m server watermark detect`

Nothing here imports torch, scipy or vLLM at import time except `processor` and `detector`, which the
HTTP layer imports lazily; the vLLM adapter lives in `server.engine.vllm_engine`.
"""
