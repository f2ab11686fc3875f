"""Model loading: the default model's GGUF cache, local directories, and every error case."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import celeris.models as models
from celeris.api import generate
from celeris.errors import CelerisError
from celeris.generation import decode, encode_prompt, eos_token_ids
from celeris.lm import train_tokenizer
from celeris.models import load_model


def _save_tiny(tmp_path: Path, tiny_llama) -> Path:
    d = tmp_path / "tiny"
    tiny_llama.save_pretrained(d)
    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "hello world, hello tokens"], vocab_size=300)
    tok.save_pretrained(d)
    return d


def test_local_directory_loads_same_weights(tmp_path, tiny_llama):
    d = _save_tiny(tmp_path, tiny_llama)
    model, tok = load_model(str(d))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_llama(ids).logits)
    assert tok.pad_token is not None


@pytest.mark.integration
def test_default_model_is_smollm2_from_safetensors_cache(default_model):
    model, tok = default_model
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (
        30, 576, 9, 3, 49152)
    cache = models.default_model_dir()
    assert models.is_converted(cache) and (cache / "model.safetensors").is_file()
    # GGUF metadata names <|im_start|> as EOS; the cache must agree with the model config (<|im_end|>).
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg.eos_token_id


@pytest.mark.integration
def test_greedy_output_identical_to_hf_generate_on_default_model(default_model):
    model, tok = default_model
    for prompt in ["Name three primary colours.", "def fibonacci(n):"]:
        ids = encode_prompt(tok, prompt)
        ours = decode(model, ids, 40, eos_ids=eos_token_ids(model, tok))
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
        assert ours.tolist() == ref[0, ids.shape[1]:].tolist()
    res = generate(model, tok, "Name three primary colours.", max_new_tokens=40)
    assert res.new_tokens == len(res.token_ids) > 0 and res.text.strip()


def test_greedy_output_identical_to_hf_generate_on_tiny_model(tiny_llama):
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    ours = decode(tiny_llama, ids, 30)
    ref = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                              min_new_tokens=30, pad_token_id=0)
    assert ours.tolist() == ref[0, ids.shape[1]:].tolist()


def test_sampling_is_reproducible_per_seed(tiny_llama):
    ids = torch.tensor([[1, 2, 3]])
    runs = [decode(tiny_llama, ids, 20, temperature=1.0, generator=torch.Generator().manual_seed(s)).tolist() for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.integration
def test_gguf_conversion_is_atomic_and_refuses_corrupt_files(tmp_path, monkeypatch):
    gguf = models.default_gguf_path()
    # A truncated GGUF: a clear error and no cache entry, not even a temporary one.
    bad = tmp_path / "truncated.gguf"
    with open(gguf, "rb") as fh:
        bad.write_bytes(fh.read(1 << 20))
    monkeypatch.setenv("CELERIS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CelerisError, match="cannot read GGUF file"):
        load_model(str(bad))
    models_dir = tmp_path / "cache" / "models"
    assert not models_dir.exists() or not any(models_dir.iterdir())
    # A conversion interrupted after the weights were written leaves nothing behind either
    # (weights stubbed with a tiny model to skip the 25 s dequantization; the write path is real).
    import transformers
    from transformers import PreTrainedTokenizerBase

    tiny = models.new_model("nano", vocab_size=49152)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (tiny, {}) if k.get("output_loading_info") else tiny)

    def interrupted(self, directory, *a, **k):
        assert (Path(directory) / "model.safetensors").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(gguf, progress=False)
    assert not any(models_dir.iterdir())


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CelerisError, match="model path does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(CelerisError, match="model path does not exist"):
        load_model("./no/such/model.gguf")


def test_directory_without_model_is_a_clear_error(tmp_path):
    with pytest.raises(CelerisError, match="config.json is missing"):
        load_model(str(tmp_path))


def test_non_causal_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForSequenceClassification"]}))
    with pytest.raises(CelerisError, match="not a causal language model"):
        load_model(str(tmp_path))


def test_corrupt_weights_are_a_clear_error(tmp_path, tiny_llama):
    d = _save_tiny(tmp_path, tiny_llama)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CelerisError, match="could not load model weights"):
        load_model(str(d))


def test_plain_file_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 10)
    with pytest.raises(CelerisError, match="is a file"):
        load_model(str(f))


def test_stale_conversion_leftovers_are_removed(tmp_path):
    target = tmp_path / "models" / "m-123"
    target.parent.mkdir(parents=True)
    dead = target.parent / f".{target.name}.tmp-999999999-abcd1234"
    dead.mkdir()
    mine = target.parent / f".{target.name}.tmp-{os.getpid()}-abcd1234"
    mine.mkdir()
    models._remove_stale_tmp(target)
    assert not dead.exists() and mine.exists()
    shutil.rmtree(mine)


def test_saved_tiny_model_loads_with_plain_transformers(tmp_path, tiny_llama):
    d = _save_tiny(tmp_path, tiny_llama)
    m = AutoModelForCausalLM.from_pretrained(d)
    got, want = m.state_dict(), tiny_llama.state_dict()
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_resolve_device():
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(CelerisError, match="unknown device 'gpu0'"):
        models.resolve_device("gpu0")
    with pytest.raises(CelerisError, match="not supported"):
        models.resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(CelerisError, match="sees no CUDA GPU"):
            models.resolve_device("cuda:0")
