"""The model worker: one engine behind FastChat's worker protocol. `service.py` is what a worker
does (transport-free, also called in-process by `chatgate serve`); `app.py` wires the HTTP
process, `routes.py` serves the endpoints, `heartbeat.py` keeps it registered."""
