"""Provider of webhook_events: every request is one ``received`` event, sent by the user its
``X-Sender`` header names and answered 202 with the number of fields; subscriptions are local."""

import time
from collections.abc import Mapping
from typing import Any

from dify_plugin.entities.provider_config import CredentialType
from dify_plugin.entities.trigger import EventDispatch, Subscription, UnsubscribeResult
from dify_plugin.errors.trigger import TriggerProviderCredentialValidationError
from dify_plugin.interfaces.trigger import Trigger, TriggerSubscriptionConstructor
from werkzeug import Request, Response


class WebhookEventsTrigger(Trigger):
    def _dispatch_event(self, subscription: Subscription, request: Request) -> EventDispatch:
        payload = request.get_json(silent=True) or {}
        sender = request.headers.get("X-Sender", "")
        reply = Response(f"ok {len(payload)}", status=202, headers={"X-Events": "received"})
        return EventDispatch(user_id=sender, events=["received"], response=reply, payload=payload)


class WebhookEventsSubscriptions(TriggerSubscriptionConstructor):
    def _validate_api_key(self, credentials: Mapping[str, Any]) -> None:
        if not str(credentials.get("token") or "").startswith("tok-"):
            raise TriggerProviderCredentialValidationError("the token must start with 'tok-'")

    def _create_subscription(
        self,
        endpoint: str,
        parameters: Mapping[str, Any],
        credentials: Mapping[str, Any],
        credential_type: CredentialType,
    ) -> Subscription:
        return Subscription(
            expires_at=int(time.time()) + 3600,
            endpoint=endpoint,
            parameters=parameters,
            properties={"topic": parameters.get("topic", "all")},
        )

    def _delete_subscription(
        self, subscription: Subscription, credentials: Mapping[str, Any], credential_type: CredentialType
    ) -> UnsubscribeResult:
        return UnsubscribeResult(success=True, message=f"removed {subscription.endpoint}")

    def _refresh_subscription(
        self, subscription: Subscription, credentials: Mapping[str, Any], credential_type: CredentialType
    ) -> Subscription:
        return subscription.model_copy(update={"expires_at": int(time.time()) + 3600})
