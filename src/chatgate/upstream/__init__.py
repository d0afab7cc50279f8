"""The `openai` engine: a worker backend that forwards to any OpenAI-compatible server."""
