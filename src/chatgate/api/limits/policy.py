"""What each API key may do: the `--api-keys-file` (YAML or JSON) and its policies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class KeyPolicy(BaseModel):
    """One key's name and limits; a limit left out is no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    rpm: int | None = Field(None, ge=1, description="Requests per minute (sliding window).")
    tpm: int | None = Field(None, ge=1, description="Prompt plus completion tokens per minute.")
    max_parallel_requests: int | None = Field(None, ge=1)
    models: frozenset[str] | None = Field(None, description="Models the key may use; all if left out.")
    # Under `--scheduling-policy priority` a lower `priority` runs first and preempts: without a
    # floor, any key could put itself ahead of every other.
    min_priority: int | None = Field(
        None, description="The most urgent (lowest) `priority` the key may ask for, and the one its "
        "requests that ask for none run at; any if left out.",
    )

    def limited(self) -> bool:
        """Whether any counter applies to this key."""
        return any(v is not None for v in (self.rpm, self.tpm, self.max_parallel_requests))

    def allows(self, model: str) -> bool:
        """Whether the key may use `model`."""
        return self.models is None or model in self.models

    def label(self) -> str:
        """How messages name the key (never the key itself)."""
        return f"key '{self.name}'" if self.name else "this API key"


def load_keys_file(path: Path) -> dict[str, KeyPolicy]:
    """Key → policy, from a YAML or JSON mapping (a key with no settings maps to null or {})."""
    text = path.read_text(encoding="utf-8")
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of API key to its settings")
    policies = {}
    for key, settings in data.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{path}: API keys must be non-empty strings")
        try:
            policies[key] = KeyPolicy.model_validate(settings or {})
        except ValidationError as exc:
            name = settings.get("name") if isinstance(settings, dict) else None
            raise ValueError(f"{path}: settings of key '{name or key[:6] + '…'}': {exc}") from None
    return policies
