"""The worker seam, shaped like httpx's transports: how the API server reaches workers.

- `base.py`: the interface: `Worker` (generate, count tokens, embed, model details) and
  `WorkerPool` (which worker serves model M; readiness and load), plus `PoolSource`.
- `local.py`: workers in this process (`chatgate serve`): `LocalWorker`, `LocalPool`.
- `http.py`: `HttpWorker`, FastChat's worker protocol to a chatgate or FastChat worker.
- `controller.py`: `ControllerPool`, workers a controller knows (`chatgate api`).
- `failover.py`: retrying on another worker, written once on top of any pool.
"""
