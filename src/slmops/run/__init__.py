"""Run: a model folder answering (ORT GenAI sessions, chat, the OpenAI-compatible server, structured output, tools)."""
