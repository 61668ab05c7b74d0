"""An agent strategy that needs no model: a log round per word, then the words reversed.

A query of ``fail`` raises, as a strategy whose model call failed would.
"""

from collections.abc import Generator
from typing import Any

from dify_plugin import AgentStrategy
from dify_plugin.entities.agent import AgentInvokeMessage


class EchoStrategy(AgentStrategy):
    def _invoke(self, parameters: dict[str, Any]) -> Generator[AgentInvokeMessage, None, None]:
        query = str(parameters.get("query") or "")
        if query == "fail":
            raise RuntimeError("echo strategy was asked to fail")
        words = query.split()
        for index, word in enumerate(words):
            yield self.create_log_message(
                label=f"round {index + 1}",
                data={"word": word},
                status=AgentInvokeMessage.LogMessage.LogStatus.SUCCESS,
            )
        yield self.create_text_message(" ".join(reversed(words)))
        yield self.create_json_message({"rounds": len(words)})
