"""Answers with what it received: method, path, query, body, the hook headers and the settings."""

import json
from collections.abc import Mapping

from dify_plugin import Endpoint
from werkzeug import Request, Response

SHOWN_HEADERS = ("Content-Type", "Dify-Hook-Id", "Dify-Hook-Url", "Host", "X-Custom")


class EchoEndpoint(Endpoint):
    def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
        answer = {
            "method": r.method,
            "path": r.path,
            "query": {key: r.args.getlist(key) for key in r.args},
            "body": r.get_data(as_text=True),
            "headers": {name: r.headers.get(name) for name in SHOWN_HEADERS if name in r.headers},
            "greeting": settings.get("greeting"),
            "api_key_length": len(settings.get("api_key") or ""),
        }
        status = int(r.args.get("status", "200"))
        return Response(
            json.dumps(answer),
            status=status,
            content_type="application/json",
            headers={"X-Echo-Greeting": str(settings.get("greeting", ""))},
        )
