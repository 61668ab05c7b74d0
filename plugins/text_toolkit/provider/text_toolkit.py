"""Provider for text_toolkit: there are no credentials, so validation always passes."""

from typing import Any

from dify_plugin import ToolProvider


class TextToolkitProvider(ToolProvider):
    """Accepts any credentials; the tools need none."""

    def _validate_credentials(self, credentials: dict[str, Any]) -> None:
        return None
