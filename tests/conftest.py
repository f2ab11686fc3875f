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
    """A random-weight 2-layer Llama with a 96-token vocabulary (seeded), in eval mode."""
    from celeris.models import new_model

    model = new_model("nano", vocab_size=96, max_position_embeddings=256, seed=0)
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_verify_costs(tmp_path, monkeypatch):
    """ReDrafter's measured verify-cost table goes to the test's own folder, never the user's cache."""
    import celeris.speculative.decoding as D

    monkeypatch.setattr(D, "_costs_file", lambda: tmp_path / "verify_costs.json")
