"""Client API formats."""

from llm_proxy.formats.base import ApiFormat
from llm_proxy.formats.chat import ChatFormat

CHAT = ChatFormat()

__all__ = ["CHAT", "ApiFormat"]
