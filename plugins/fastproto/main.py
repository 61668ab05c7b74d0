"""fastproto: the dify_plugin stdio protocol on the standard library alone.

It starts in milliseconds and handles thousands of invocations per second, so
benchmarks measure the daemon rather than the SDK. Start-up faults come from
fault.json in the working directory and/or the FASTPROTO_FAULT env var (JSON,
its keys win): start_delay_s, exit_during_start, no_heartbeat,
heartbeat_interval_s, close_stdout_after_s, stderr_bytes, stderr_newlines,
stall_stdin.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from provider.fastproto import PROVIDER, validate_credentials
from tools import emit, word_stats
from wire import Backwards, Output, Session, ToolStream

Tool = Callable[[Session, dict[str, Any]], ToolStream]
TOOLS: dict[str, Tool] = {
    "word_stats": word_stats.invoke,
    "emit": emit.invoke,
    "plain": emit.invoke,
}

_LABEL = "Fast Protocol"
_DESCRIPTION = (
    "A stdlib-only plugin that speaks the dify_plugin stdio protocol, for benchmarks and fault tests."
)


def i18n(text: str) -> dict[str, str]:
    """The SDK's I18nObject fills every language from en_US, in this key order."""
    return {"zh_Hans": text, "pt_BR": text, "ja_JP": text, "en_US": text}


# Same shape as the SDK's PluginConfiguration dump of manifest.yaml (keep both in step).
MANIFEST: dict[str, Any] = {
    "version": "0.1.0",
    "type": "plugin",
    "author": "demo",
    "name": "fastproto",
    "repo": None,
    "description": i18n(_DESCRIPTION),
    "icon": "icon.svg",
    "icon_dark": None,
    "label": i18n(_LABEL),
    "created_at": "2025-01-01T00:00:00Z",
    "resource": {
        "memory": 268435456,
        "permission": {
            "tool": None,
            "model": None,
            "node": None,
            "endpoint": None,
            "app": None,
            "storage": {"enabled": True, "size": 1048576},
        },
    },
    "plugins": {
        "tools": ["provider/fastproto.yaml"],
        "models": [],
        "endpoints": [],
        "agent_strategies": [],
        "datasources": [],
        "triggers": [],
    },
    "meta": {
        "version": "0.0.1",
        "arch": ["amd64", "arm64"],
        "runner": {"language": "python", "version": "3.11", "entrypoint": "main"},
        "minimum_dify_version": None,
    },
}


def load_faults() -> dict[str, Any]:
    """fault.json, then FASTPROTO_FAULT on top; absent means a well-behaved plugin."""
    faults: dict[str, Any] = {}
    if os.path.exists("fault.json"):
        with open("fault.json", encoding="utf-8") as fh:
            faults.update(json.load(fh))
    env = os.environ.get("FASTPROTO_FAULT")
    if env:
        faults.update(json.loads(env))
    return faults


def run_tool(session: Session, data: dict[str, Any]) -> None:
    """Dispatch like the SDK router: unknown actions answer with a bare end."""
    out, sid = session.out, session.session_id
    if data.get("type") != "tool":
        if FAULTS.get("echo_other_kinds"):  # a test hook: show the daemon's envelope for every kind
            out.session(sid, "stream", {"echo": data})
        return
    action = data.get("action")
    if action == "validate_tool_credentials":
        result = validate_credentials(str(data["provider"]), dict(data["credentials"]))
        out.session(sid, "stream", result)
    elif action == "invoke_tool":
        provider, name = str(data["provider"]), str(data["tool"])
        if provider != PROVIDER:
            raise ValueError(f"Provider `{provider}` not found")
        tool = TOOLS.get(name)
        if tool is None:
            raise ValueError(f"Tool `{name}` not found for provider `{provider}`")
        for message_type, message in tool(session, dict(data.get("tool_parameters") or {})):
            out.stream(sid, message_type, message)


def serve(session: Session, data: dict[str, Any]) -> None:
    """Run one request on its own thread; error then end, exactly as the SDK's executor does."""
    out, sid = session.out, session.session_id
    try:
        run_tool(session, data)
    except Exception as exc:
        error = {
            "error_type": getattr(exc, "error_type", type(exc).__name__),
            "message": str(exc),
            "args": {"traceback": traceback.format_exc()},
        }
        out.session(sid, "error", error)
    out.session(sid, "end", {})


def write_stderr(total: int, newlines: bool) -> None:
    """A stderr flood: ``total`` bytes, as 100-byte lines or as one line without a newline."""
    block = (b"x" * 99 + b"\n") * 640 if newlines else b"x" * 64000
    written = 0
    while written < total:
        written += os.write(2, block[: total - written])


def heartbeat(out: Output, interval: float, stopped: threading.Event) -> None:
    """First beat at once (it means ready), then every interval until stopped."""
    while not stopped.is_set():
        out.heartbeat()
        stopped.wait(interval)


def watch_parent() -> None:
    """Like the SDK: an orphan (re-parented to PID 1) exits instead of lingering."""
    while True:
        time.sleep(0.5)
        if os.getppid() == 1:
            os._exit(255)


def start_thread(target: Callable[..., None], *args: Any) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()


class Workers:
    """A thread per running request, reusing idle threads: starting one costs ~3x a request.

    Never bounded, so a hanging session cannot starve the others: every submit either
    reserves an idle thread or spawns a new one.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Session, dict[str, Any]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, session: Session, data: dict[str, Any]) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._jobs.put((session, data))
        if spawn:
            start_thread(self._work)

    def _work(self) -> None:
        while True:
            serve(*self._jobs.get())
            with self._lock:
                self._idle += 1


FAULTS: dict[str, Any] = {}


def main() -> None:
    faults = load_faults()
    FAULTS.update(faults)
    if faults.get("start_delay_s"):
        time.sleep(float(faults["start_delay_s"]))

    out = Output()
    out.raw(json.dumps(MANIFEST, ensure_ascii=False, separators=(",", ":")) + "\n\n")
    out.log(f"Installed tool: {PROVIDER}")
    if faults.get("stderr_bytes"):
        write_stderr(int(faults["stderr_bytes"]), bool(faults.get("stderr_newlines")))
    if faults.get("exit_during_start") is not None:
        sys.stderr.write(f"fastproto: exiting during start-up with code {faults['exit_during_start']}\n")
        sys.stderr.flush()
        os._exit(int(faults["exit_during_start"]))

    stopped = threading.Event()
    if faults.get("no_heartbeat"):
        stopped.set()
    interval = float(faults.get("heartbeat_interval_s") or os.environ.get("HEARTBEAT_INTERVAL", 10))
    start_thread(heartbeat, out, interval, stopped)
    start_thread(watch_parent)
    if faults.get("close_stdout_after_s") is not None:
        timer = threading.Timer(float(faults["close_stdout_after_s"]), out.close)
        timer.daemon = True
        timer.start()

    backwards = Backwards(out)
    workers = Workers()
    if faults.get("stall_stdin"):
        stopped.wait()  # heartbeats go on, stdin is never read
    for raw in sys.stdin.buffer:
        line = raw.strip()
        if not line:
            continue
        try:
            message = json.loads(line)
            event, data = message["event"], message["data"]
            if event == "request":
                context = message.get("context")
                session = Session(
                    str(message["session_id"]),
                    out,
                    backwards,
                    stopped,
                    context if isinstance(context, dict) else None,
                )
                workers.submit(session, data)
            elif event == "backwards_response":
                backwards.route(data)
            else:
                raise ValueError(f"'{event}' is not a valid PluginInStreamEvent")
        except Exception as exc:
            out.event("error", None, {"error": str(exc)})
    os._exit(0)  # stdin closed: the daemon is gone (the SDK would spin here instead)


if __name__ == "__main__":
    main()
