"""Streams ``chunks`` lines, ``interval`` seconds apart, after ``delay`` seconds, as a generator body
(the SDK sends the status and headers first, then each chunk as it is made)."""

import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from dify_plugin import Endpoint
from werkzeug import Request, Response

MAX_CHUNKS = 1000
MAX_INTERVAL = 120.0
# Test fault: {"crash_after_chunks": N} makes the process exit after N chunks (never in the bundle).
FAULT = Path(__file__).resolve().parent.parent / "fault.json"


class StreamEndpoint(Endpoint):
    def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
        chunks = max(0, min(int(r.args.get("chunks", "3")), MAX_CHUNKS))
        interval = max(0.0, min(float(r.args.get("interval", "0")), MAX_INTERVAL))
        delay = max(0.0, min(float(r.args.get("delay", "0")), MAX_INTERVAL))
        fault = json.loads(FAULT.read_text()) if FAULT.exists() else {}
        crash_after = fault.get("crash_after_chunks")

        def body() -> Iterator[str]:
            time.sleep(delay)
            for n in range(chunks):
                if n and interval:
                    time.sleep(interval)
                yield f"{settings.get('greeting', '')} chunk {n}\n"
                if crash_after is not None and n + 1 >= crash_after:
                    time.sleep(0.5)  # let the chunk leave before the process does
                    os._exit(3)

        return Response(body(), status=200, content_type="text/plain", headers={"X-Chunks": str(chunks)})
