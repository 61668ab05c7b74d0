"""An LLM that answers "echo: <last user message>" one word per chunk, with usage at the end.

Deterministic and offline, so tests can assert every chunk. ``max_tokens`` cuts the answer
(finish reason ``length``); a prompt of ``raise rate limit`` fails as a rate-limited API would.
"""

from collections.abc import Generator

from dify_plugin import LargeLanguageModel
from dify_plugin.entities.model.llm import LLMResult, LLMResultChunk, LLMResultChunkDelta
from dify_plugin.entities.model.message import AssistantPromptMessage, PromptMessage, PromptMessageTool
from dify_plugin.errors.model import InvokeError, InvokeRateLimitError
from provider.echo_models import check_key


class EchoRateLimited(Exception):
    """What a vendor's client would raise for HTTP 429; mapped to Dify's InvokeRateLimitError."""


def _text(message: PromptMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    return " ".join(getattr(part, "data", "") for part in content or [])


def _count(messages: list[PromptMessage]) -> int:
    return sum(len(_text(m).split()) for m in messages)


class EchoLLM(LargeLanguageModel):
    def _invoke(
        self,
        model: str,
        credentials: dict,
        prompt_messages: list[PromptMessage],
        model_parameters: dict,
        tools: list[PromptMessageTool] | None = None,
        stop: list[str] | None = None,
        stream: bool = True,
        user: str | None = None,
    ) -> LLMResult | Generator[LLMResultChunk, None, None]:
        last = _text(prompt_messages[-1]) if prompt_messages else ""
        if last == "raise rate limit":
            raise EchoRateLimited("echo-llm allows no more requests now")
        words = ["echo:", *last.split()]
        limit = int(model_parameters.get("max_tokens") or len(words))
        answer, finish = words[:limit], "stop" if len(words) <= limit else "length"
        usage = self._calc_response_usage(model, credentials, _count(prompt_messages), len(answer))
        if not stream:
            message = AssistantPromptMessage(content=" ".join(answer))
            return LLMResult(model=model, prompt_messages=prompt_messages, message=message, usage=usage)
        return self._chunks(model, answer, finish, usage)

    def _chunks(
        self, model: str, answer: list[str], finish: str, usage
    ) -> Generator[LLMResultChunk, None, None]:
        for index, word in enumerate(answer):
            last = index == len(answer) - 1
            text = word if index == 0 else " " + word
            yield LLMResultChunk(
                model=model,
                delta=LLMResultChunkDelta(
                    index=index,
                    message=AssistantPromptMessage(content=text),
                    usage=usage if last else None,
                    finish_reason=finish if last else None,
                ),
            )

    def get_num_tokens(
        self,
        model: str,
        credentials: dict,
        prompt_messages: list[PromptMessage],
        tools: list[PromptMessageTool] | None = None,
    ) -> int:
        return _count(prompt_messages)

    def validate_credentials(self, model: str, credentials: dict) -> None:
        check_key(credentials)

    @property
    def _invoke_error_mapping(self) -> dict[type[InvokeError], list[type[Exception]]]:
        return {InvokeRateLimitError: [EchoRateLimited]}
