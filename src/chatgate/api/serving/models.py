"""`/v1/models` entries: each served name, with what its model can do when a worker says."""

from __future__ import annotations

from chatgate.api.workers.base import WorkerPool
from chatgate.api.workers.failover import with_failover
from chatgate.errors import ChatgateError
from chatgate.protocol.openai import Capability, ModelCard
from chatgate.protocol.worker import ModelDetails


def capabilities(details: ModelDetails) -> list[Capability]:
    """The endpoints a model with these details serves."""
    served: list[Capability] = ["chat", "completions"] if details.generates else []
    if details.embedding_dim:
        served.append("embeddings")
    return served


async def model_card(pool: WorkerPool, name: str) -> ModelCard:
    """The card of a served model; without capabilities when no worker can be asked now."""
    try:
        details = await with_failover(pool, name, lambda worker: worker.model_details())
    except ChatgateError:
        # Listing models must not fail because one worker is down; the card just says less.
        return ModelCard(id=name)
    return ModelCard(id=name, capabilities=capabilities(details))
