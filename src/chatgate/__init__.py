"""chatgate: an OpenAI-compatible LLM serving stack."""
