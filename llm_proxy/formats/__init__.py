"""Client API formats."""

from llm_proxy.formats.base import ApiFormat
from llm_proxy.formats.chat import ChatFormat
from llm_proxy.formats.embeddings import EmbeddingsFormat
from llm_proxy.formats.messages import MessagesFormat
from llm_proxy.formats.responses import ResponsesFormat

CHAT = ChatFormat()
MESSAGES = MessagesFormat()
RESPONSES = ResponsesFormat()
EMBEDDINGS = EmbeddingsFormat()

FORMATS: dict[str, ApiFormat] = {fmt.name: fmt for fmt in (CHAT, MESSAGES, RESPONSES, EMBEDDINGS)}

__all__ = ["CHAT", "EMBEDDINGS", "FORMATS", "MESSAGES", "RESPONSES", "ApiFormat"]
