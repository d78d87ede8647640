"""Model facade: from_pretrained / from_config / generate / chat / save_pretrained on the core engine."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from deepseek_ce import Model
from deepseek_core import ModelConfig, Tokenizer, load_model
from deepseek_core.errors import ModelNotFoundError

from .conftest import micro_config

PROMPT = "AI发展的关键因素是"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A micro model with the session tokenizer, saved by the facade."""
    model = Model.from_config(micro_config(512), tokenizer=Tokenizer.from_pretrained(tokenizer_dir), seed=1)
    out = tmp_path_factory.mktemp("facade") / "model"
    model.save_pretrained(out)
    return out


def test_from_pretrained_generate_chinese_prompt_with_max_length(checkpoint: Path) -> None:
    model = Model.from_pretrained(checkpoint)
    prompt_ids = model.tokenizer.encode(PROMPT)
    assert model.tokenizer.decode(prompt_ids) == PROMPT  # byte-level BPE covers these characters
    text = model.generate(PROMPT, max_length=50)
    assert isinstance(text, str)
    # max_length counts the prompt: at most 50 - len(prompt) new tokens (greedy so the count is checkable).
    greedy = model.generate(PROMPT, max_length=50, temperature=0.0)
    direct = model._engine().generate(
        [prompt_ids], model._params(len(prompt_ids), 50, None, {"temperature": 0.0})
    )[0]
    assert greedy == direct.text
    assert len(direct.token_ids) <= 50 - len(prompt_ids)
    assert direct.finish_reason == "stop" or len(direct.token_ids) == 50 - len(prompt_ids)
    with pytest.raises(ValueError, match="max_length=5 leaves no room"):
        model.generate(PROMPT, max_length=5)


def test_batch_stream_and_token_id_prompts(checkpoint: Path) -> None:
    model = Model.from_pretrained(checkpoint)
    prompts = ["def fibonacci(n):", PROMPT]
    batch = model.generate(prompts, max_new_tokens=12, temperature=0.0)
    assert isinstance(batch, list) and len(batch) == 2
    alone = [model.generate(p, max_new_tokens=12, temperature=0.0) for p in prompts]
    assert batch == alone
    pieces = list(model.generate(prompts[0], max_new_tokens=12, temperature=0.0, stream=True))
    assert "".join(pieces) == alone[0]
    ids = model.tokenizer.encode(prompts[0])
    assert model.generate(ids, max_new_tokens=12, temperature=0.0) == alone[0]
    with pytest.raises(ValueError, match="stream=True takes one prompt"):
        model.generate(prompts, stream=True)
    a = model.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=3)
    assert a == model.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=3)


def test_chat_uses_the_chat_template(checkpoint: Path) -> None:
    model = Model.from_pretrained(checkpoint)
    reply = model.chat([{"role": "user", "content": "你好"}], max_new_tokens=8, temperature=0.0)
    assert isinstance(reply, str)
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=True)
    expected = model.generate(list(ids), max_new_tokens=8, temperature=0.0)
    assert reply == expected.strip()
    assert model.chat("你好", max_new_tokens=8, temperature=0.0) == reply


def test_from_config_follows_the_tokenizer_and_saves_a_loadable_checkpoint(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    model = Model.from_config("deepseek-tiny", tokenizer=tokenizer_dir, seed=0, num_hidden_layers=1)
    assert model.config.vocab_size == tok.vocab_size == 512 and model.config.num_hidden_layers == 1
    assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    again = Model.from_config("deepseek-tiny", tokenizer=tok, seed=0, num_hidden_layers=1)
    assert torch.equal(model.module.lm_head.weight, again.module.lm_head.weight)  # seeded init
    with pytest.raises(ValueError, match="vocab_size=100 is smaller than the tokenizer"):
        Model.from_config(ModelConfig.from_preset("deepseek-tiny", vocab_size=100), tokenizer=tok)
    path = model.save_pretrained(tmp_path / "saved")
    assert (path / "tokenizer.json").is_file() and (path / "config.json").is_file()
    reloaded = load_model(path)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.module.model.embed_tokens.weight)
    ids = torch.tensor([tok.encode("def f(x):")])
    with torch.no_grad():
        assert torch.equal(model(ids), Model.from_pretrained(path)(ids))


def test_weights_changed_after_training_reach_the_engine(tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    model = Model.from_config(micro_config(512, tie_word_embeddings=False), tokenizer=tok, seed=2)
    before = model.generate(PROMPT, max_new_tokens=8, temperature=0.0)
    with torch.no_grad():
        torch.manual_seed(9)
        model.module.lm_head.weight.normal_(0.0, 0.5)
    model.reset_engine()  # what Trainer.fit does after training
    after = model.generate(PROMPT, max_new_tokens=8, temperature=0.0)
    fresh = Model(copy.deepcopy(model.module), tok).generate(PROMPT, max_new_tokens=8, temperature=0.0)
    assert after == fresh and after != before


def test_unknown_model_and_missing_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="nonexistent-model"):
        Model.from_pretrained("nonexistent-model")
    model = Model.from_config(micro_config(64), seed=0)
    with pytest.raises(ValueError, match="no tokenizer"):
        model.generate("hello")
    assert isinstance(model.generate([1, 2, 3], max_new_tokens=3, temperature=0.0), str)
