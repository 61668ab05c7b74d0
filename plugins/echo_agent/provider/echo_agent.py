"""Provider of echo_agent: nothing to configure."""

from dify_plugin import AgentProvider


class EchoAgentProvider(AgentProvider):
    pass
