from django.apps import AppConfig


class LlmProxyConfig(AppConfig):
    name = "llm_proxy"
    verbose_name = "LLM proxy"

    def ready(self) -> None:
        # Every log record carries the id of the request it was written for.
        from otari.logging import install_record_factory

        install_record_factory()

        # A configured alias or routing policy that cannot work refuses startup, naming
        # it and why (docs/ROUTING.md), rather than failing the requests that name it.
        from llm_proxy.routing.registry import check_config

        check_config()
