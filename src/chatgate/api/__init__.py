"""The API server: OpenAI's HTTP API (and FastChat's extra routes) over a pool of workers.

`app.py` wires it; `routes/` are thin HTTP adapters; `serving/` holds the request handling,
free of FastAPI (`generation.py` is the one request flow); `workers/` is the seam to the
workers, in-process or over HTTP; `errors.py` turns exceptions into OpenAI-shaped responses and
`middleware.py` adds request ids, the body cap and metrics around everything.
"""
