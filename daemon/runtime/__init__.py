"""The plugin runtime: transports, the protocol over them, backwards calls, supervision.

- :mod:`daemon.runtime.process`: a transport that is a child process (spawn, lines, send, kill).
- :mod:`daemon.runtime.connection`: the protocol over any transport (readiness, sessions,
  routing by ``session_id``, ending every session with the transport's cause).
- :mod:`daemon.runtime.backwards`: plugin -> daemon calls, bounded and owned by their session.
- :mod:`daemon.runtime.pool`: supervision with backoff, the ``failed`` state, least-busy routing.
"""

from daemon.runtime.connection import Connection, InstanceStartError, InstanceState
from daemon.runtime.pool import PluginPool, PluginUnavailable, Runtime
from daemon.runtime.process import plugin_environment

PluginInstance = Connection  # an instance is a connection, whatever carries it

__all__ = [
    "Connection",
    "InstanceStartError",
    "InstanceState",
    "PluginInstance",
    "PluginPool",
    "PluginUnavailable",
    "Runtime",
    "plugin_environment",
]
