"""Watermark settings (`[watermark]` in the config, `SERVER_WATERMARK__*` in the environment).

The scheme, gamma, delta and width configured here apply to keys created from now on: each key stores
the parameters it was created with, so texts generated under a retired key stay detectable after the
configuration changes. Changing them rotates the deployment key at the next start
(`WatermarkKeyring.ensure_default_key`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

SchemeName = Literal["auto", "gumbel", "kgw-selfhash", "kgw-lefthash"]


class WatermarkSettings(BaseModel):
    """Deployment-wide watermark configuration."""

    model_config = {"extra": "forbid"}

    enabled: bool = True
    # auto (default; "gumbel" is a synonym): sampled requests (temperature > 0) get Gumbel-max inside vLLM's
    # sampler, an exact sample of the distribution they asked for; greedy requests get kgw-gated, which
    # biases only positions where the model is unsure. kgw-selfhash | kgw-lefthash: KGW on every request
    # and position (changes greedy answers; for compatibility). docs/watermark.md has the measurements.
    scheme: SchemeName = "auto"
    gamma: float = Field(default=0.25, gt=0.0, lt=1.0)  # KGW green-list fraction
    # KGW logit bias. For kgw-gated (greedy requests under auto keys) it is also the near-tie window: a
    # position is biased only if the runner-up lies within delta nats of the top token, and then only
    # tokens in that window can win. 3.0 is from the trade-off measured in docs/watermark.md; for the
    # kgw-selfhash / kgw-lefthash schemes (every position) 2.0 is the literature's value.
    delta: float = Field(default=3.0, gt=0.0, le=20.0)
    # kgw-gated: positions whose top probability is at least `gate` are never biased (1.0: the near-tie
    # window alone decides), nor are the first `warmup` tokens of an answer (short factual answers stay
    # exactly what the model says).
    gate: float = Field(default=1.0, gt=0.0, le=1.0)
    warmup: int = Field(default=32, ge=0, le=256)
    # Context window hashed per token; 0 means the scheme's default (lefthash 1, selfhash 4, gumbel 4).
    width: int = Field(default=0, ge=0, le=8)
    # Detection: the family-wise false-positive bound (Bonferroni over every key and scheme tried).
    # 1e-4 leaves a 10x margin under the 1e-3 FPR target (see docs/watermark.md for measured rates).
    detect_p_threshold: float = Field(default=1e-4, gt=0.0, lt=0.5)
    detect_min_tokens: int = Field(default=16, ge=1)
    detect_max_tokens: int = Field(default=8192, ge=16)
    # The detector is an oracle (an attacker can edit a text until the verdict flips): every call is charged
    # to the caller's user AND organization (never per API key: minting keys buys nothing), per sliding
    # minute and per UTC day, in the shared limit store (`admission.store_url`), so replicas share them.
    detect_requests_per_minute: int = Field(default=30, ge=1)  # per user
    detect_requests_per_day: int = Field(default=500, ge=1)  # per user
    detect_org_requests_per_minute: int = Field(default=120, ge=1)
    detect_org_requests_per_day: int = Field(default=2000, ge=1)
    # Probing: `detect_probe_threshold` near-identical queries (token-shingle overlap >= similarity, exact
    # repeats excepted) within the window, from one organization or across organizations, are a security
    # event; the caller (and its organization, when several users took part) is then refused for the
    # cool-down and loses the rest of the day's budget on every replica. See docs/watermark.md, Detection.
    detect_probe_similarity: float = Field(default=0.6, gt=0.0, le=1.0)
    detect_probe_threshold: int = Field(default=8, ge=2)
    detect_probe_window_seconds: float = Field(default=3600.0, gt=0.0, le=7 * 86_400.0)
    detect_probe_cooldown_seconds: float = Field(default=3600.0, ge=0.0, le=7 * 86_400.0)
    # How long a replica trusts its cached keys and exemptions before re-reading the database.
    cache_seconds: float = Field(default=10.0, ge=0.0, le=300.0)
