"""An LLM that answers "echo: <last user message>" one word per chunk, with usage at the end.

Deterministic and offline, so tests can assert every chunk. ``max_tokens`` cuts the answer
(finish reason ``length``); a prompt of ``raise rate limit`` fails as a rate-limited API would.

It also answers by polling, as a vendor's batch API would: starting returns the prompt as the
state to hand back, the first check says it is still running, the second gives the answer; a
prompt of ``fail`` ends in the failed state, and ``wait N`` makes starting take N seconds (at
most 300), as a slow vendor would.
"""

import time
from collections.abc import Generator

from dify_plugin import LargeLanguageModel
from dify_plugin.entities.model.llm import (
    LLMPollingResult,
    LLMPollingStatus,
    LLMResult,
    LLMResultChunk,
    LLMResultChunkDelta,
)
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


def _last_prompt(messages: list[PromptMessage]) -> str:
    last = _text(messages[-1]) if messages else ""
    if last == "raise rate limit":
        raise EchoRateLimited("echo-llm allows no more requests now")
    return last


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
        last = _last_prompt(prompt_messages)
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

    def _start_polling(
        self,
        model: str,
        credentials: dict,
        prompt_messages: list[PromptMessage],
        model_parameters: dict,
        **_: object,
    ) -> LLMPollingResult:
        last = _last_prompt(prompt_messages)
        if last.startswith("wait "):
            time.sleep(min(float(last.removeprefix("wait ")), 300.0))
        state = {"prompt": last, "prompt_tokens": _count(prompt_messages), "checks": 0}
        return LLMPollingResult(
            status=LLMPollingStatus.RUNNING, plugin_state=state, next_check_after_seconds=1
        )

    def _check_polling(
        self, model: str, credentials: dict, plugin_state: dict, user: str | None = None
    ) -> LLMPollingResult:
        prompt = str(plugin_state.get("prompt", ""))
        checks = int(plugin_state.get("checks", 0)) + 1
        if prompt == "fail":
            return LLMPollingResult(status=LLMPollingStatus.FAILED, error="echo-llm gave up on this prompt")
        if checks < 2:
            return LLMPollingResult(
                status=LLMPollingStatus.RUNNING, plugin_state={**plugin_state, "checks": checks}
            )
        answer = ["echo:", *prompt.split()]
        tokens = int(plugin_state.get("prompt_tokens", 0))
        usage = self._calc_response_usage(model, credentials, tokens, len(answer))
        message = AssistantPromptMessage(content=" ".join(answer))
        result = LLMResult(model=model, message=message, usage=usage)
        return LLMPollingResult(status=LLMPollingStatus.SUCCEEDED, result=result)

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
