"""Provider for notes: storage needs no credentials, so validation always passes."""

from typing import Any

from dify_plugin import ToolProvider


class NotesProvider(ToolProvider):
    """Accepts any credentials; notes live in the daemon's plugin storage."""

    def _validate_credentials(self, credentials: dict[str, Any]) -> None:
        return None
