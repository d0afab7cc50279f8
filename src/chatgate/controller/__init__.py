"""The controller: FastChat's registry of workers. `app.py` wires it, `routes.py` serves the
endpoints, `registry.py` keeps who serves what, `dispatch.py` picks a worker."""
