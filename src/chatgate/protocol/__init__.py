"""Wire formats: `openai.py` (public, names as in OpenAI's spec, with the request validation),
`worker.py` (the internal FastChat-compatible worker protocol), `fastchat.py` (FastChat's extra
API) and `conversation.py` (FastChat conversation templates)."""
