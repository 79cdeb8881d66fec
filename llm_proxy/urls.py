from django.urls import path

from llm_proxy import views

urlpatterns = [
    path("chat/completions", views.chat_completions, name="chat-completions"),
    path("messages", views.messages, name="messages"),
    path("messages/count_tokens", views.messages_count_tokens, name="messages-count-tokens"),
    path("responses", views.responses, name="responses"),
    path("embeddings", views.embeddings, name="embeddings"),
    path("models", views.models, name="models"),
]
