"""Shared fixtures: tiny random-weight models for fast unit tests, the real default model for the
one integration test per system (loaded once per test run)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct (converted from its GGUF once per machine), as `(model, tokenizer)`."""
    from celeris.models import load_model

    return load_model()


@pytest.fixture
def tiny_llama():
    """A random-weight 2-layer Llama with a 96-token vocabulary (seeded), in eval mode.

    Its greedy output is one token repeated whatever the prompt: fine for shapes, training and I/O, useless
    for output identity (a lost K/V entry or a wrong position changes nothing). Identity tests use `context_llama`.
    """
    from celeris.models import new_model

    model = new_model("nano", vocab_size=96, max_position_embeddings=256, seed=0)
    return model.eval()


@pytest.fixture
def context_llama():
    """A random-weight 2-layer Llama (96 tokens, seeded) whose greedy output depends on every cached token
    and on positions: the one model of every output-identity test (speculative, KV memory, engine).

    Initialised 15× wider than HF's default (std 0.3), so attention is sharp and next-token logits are far
    apart: 40 greedy tokens after a random 10-token prompt hold 20–32 distinct tokens, changing one prompt
    token changes most of them, and dropping one cached token or shifting the new tokens' positions by one
    changes about half of the next predictions. An eval-mode `LlamaForCausalLM`; an identity test should
    still assert that its reference output varies.
    """
    from celeris.models import new_model

    model = new_model("nano", vocab_size=96, max_position_embeddings=512, seed=1, initializer_range=0.3)
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_verify_costs(tmp_path, monkeypatch):
    """ReDrafter's measured verify-cost table goes to the test's own folder, never the user's cache."""
    import celeris.speculative.decoding as D

    monkeypatch.setattr(D, "_costs_file", lambda: tmp_path / "verify_costs.json")
