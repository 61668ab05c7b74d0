"""Provider for fastproto: there are no credentials, so validation always passes."""

from __future__ import annotations

from typing import Any

PROVIDER = "fastproto"


def validate_credentials(provider: str, credentials: dict[str, Any]) -> dict[str, bool]:
    """Answer like the SDK: {"result": true}, or ValueError for a provider we do not have."""
    if provider != PROVIDER:
        raise ValueError(f"Provider `{provider}` not found")
    return {"result": True}
