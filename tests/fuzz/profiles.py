"""How hard the fuzz tests push: a bounded ``ci`` profile for ``make test``, ``deep`` for ``make fuzz``.

``DOMUM_FUZZ_PROFILE`` picks the Hypothesis profile (``ci`` by default) and
``DOMUM_FUZZ_EXAMPLES`` the number of generated requests per API operation and mode for
the schemathesis run. The profiles are applied per test (``@FUZZ``), not loaded globally,
so they never change the settings of the rest of the suite.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["FUZZ", "PROFILE", "api_examples"]

settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "deep",
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

PROFILE = os.environ.get("DOMUM_FUZZ_PROFILE", "ci")
FUZZ = settings.get_profile(PROFILE)
"""Decorator: the chosen profile's settings for one ``@given`` test."""


def api_examples(default: int = 8) -> int:
    """Generated requests per API operation and generation mode (``DOMUM_FUZZ_EXAMPLES``)."""
    raw = os.environ.get("DOMUM_FUZZ_EXAMPLES", "")
    if not raw:
        return 200 if PROFILE == "deep" else default
    value = int(raw)
    if value < 1:
        raise ValueError("DOMUM_FUZZ_EXAMPLES must be a positive integer")
    return value
