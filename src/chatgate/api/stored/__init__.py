"""Stored responses of the Responses API (`store`, `previous_response_id`, `GET` / `DELETE
/v1/responses/{id}`, replay, `background` and `cancel`): `store.py` owns who sees what,
`backend.py` the interface and the in-memory backend, `sqlite.py` (the default) and
`redis_backend.py` the durable ones, `background.py` the responses run after the reply, and
`opening.py` which backend the settings choose."""
