"""Provider for text_toolkit: the tools need no credentials."""

from typing import Any

from dify_plugin import ToolProvider
from dify_plugin.errors.tool import ToolProviderCredentialValidationError


class TextToolkitProvider(ToolProvider):
    """Accepts any credentials but a ``reject`` key, which fails the check as a wrong key would."""

    def _validate_credentials(self, credentials: dict[str, Any]) -> None:
        if "reject" in credentials:
            raise ToolProviderCredentialValidationError(f"credential rejected: {credentials['reject']}")
