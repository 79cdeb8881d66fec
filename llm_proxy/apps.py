from django.apps import AppConfig


class LlmProxyConfig(AppConfig):
    name = "llm_proxy"
    verbose_name = "LLM proxy"
