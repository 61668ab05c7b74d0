"""Provider of echo_models: any key is accepted but ``wrong``, which fails as a bad key would."""

from dify_plugin import ModelProvider
from dify_plugin.errors.model import CredentialsValidateFailedError


def check_key(credentials: dict) -> None:
    if credentials.get("api_key") == "wrong":
        raise CredentialsValidateFailedError("api_key 'wrong' was rejected")


class EchoModelsProvider(ModelProvider):
    def validate_provider_credentials(self, credentials: dict) -> None:
        check_key(credentials)
