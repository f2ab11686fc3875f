"""`generate`: one prompt in, text out, through whichever decoder the arguments name.

The one place that puts the layers together for a caller: plain decoding (`celeris.generation`) on a
Hugging Face model or the fast engine (`celeris.engine`), ReDrafter (`celeris.speculative`) on either,
a KV-memory policy (`celeris.memory`). Base modules never import the systems; this module and the CLI do.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from celeris.errors import CelerisError
from celeris.generation import (
    GenerationResult,
    decode,
    encode_prompt,
    engine_decode,
    eos_token_ids,
    sync_device,
)
from celeris.validate import check_temperature

ENGINE_MAX_DRAFT = 4  # longest draft on the engine: each verify length is a compiled graph


def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int | None = None,
    chat: bool | None = None,
    drafter=None,
    beam_width: int | None = None,
    beam_length: int | None = None,
    memory: str | None = None,
    budget: str | float | None = 0.25,
    truncate: str | None = None,
) -> GenerationResult:
    """Answer one prompt with plain decoding. Greedy at `temperature=0`.

    `model` is a Hugging Face causal LM or a `celeris.engine.Engine` (plain decoding only; its
    tokenizer is the engine's).

    With `drafter` (a `celeris.speculative.RecurrentDrafter` or its directory), decode with ReDrafter
    at `beam_width` x `beam_length` (default: `default_beam_settings` for the model's device; on a CPU,
    one beam whose length adapts per step up to 6, unless a length is given): the same output at
    temperature 0, the same distribution above.
    `memory` names a KV-memory policy (`celeris.memory`, greedy only) that evicts cached tokens down
    to `budget` during prefill and decoding; `stats` then holds its physical KV-byte accounting.
    A prompt that does not fit the model's context with `max_new_tokens` is refused before any compute,
    or cut from the left with `truncate="left"`.
    """
    if max_new_tokens < 1:
        raise CelerisError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    check_temperature(temperature, "temperature")
    engine = model if hasattr(model, "decode_step") else None
    from celeris.models import truncate_prompt

    device = engine.device if engine is not None else next(model.parameters()).device
    config = engine.model.config if engine is not None else model.config
    ids = truncate_prompt(encode_prompt(tokenizer, prompt, chat), config, max_new_tokens, side=truncate).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    if memory:
        if drafter is not None and engine is None:
            raise CelerisError("a drafter and a memory policy run together on the engine only; drop --quantize none")
        from celeris.memory import make_policy, parse_budget, run_with_memory

        if temperature > 0:
            raise CelerisError("--memory decodes greedily; use --temperature 0")
        pol, b = make_policy(memory), parse_budget(budget)
        eos = eos_token_ids(engine.model if engine is not None else model, tokenizer)
        if drafter is not None:
            from celeris.compose import redrafter_with_memory
            from celeris.speculative.engine_decoding import load_drafter_for_engine

            if not isinstance(drafter, torch.nn.Module):
                drafter = load_drafter_for_engine(drafter, engine)
            res = redrafter_with_memory(engine, drafter, ids, pol, b, max_new_tokens, beam_length or ENGINE_MAX_DRAFT,
                                        adaptive=beam_length is None, eos_ids=eos)
        else:
            res = run_with_memory(model, ids, pol, b, max_new_tokens=max_new_tokens, eos_ids=eos)
        stats = {k: v for k, v in res.to_dict().items() if k not in ("new_ids", "prompt_tokens", "seconds")}
        text = tokenizer.decode(res.new_ids, skip_special_tokens=True)
        return GenerationResult(text, res.new_ids, ids.shape[1], len(res.new_ids), res.seconds, stats)
    stats: dict[str, Any] = {}
    if drafter is not None and engine is not None:
        from celeris.speculative import SpeculativeStats
        from celeris.speculative.engine_decoding import load_drafter_for_engine, redrafter_engine_decode

        adaptive = beam_length is None and beam_width in (None, 1)
        beam_width = 1 if beam_width is None else beam_width
        beam_length = ENGINE_MAX_DRAFT if beam_length is None else beam_length
        if not isinstance(drafter, torch.nn.Module):
            drafter = load_drafter_for_engine(drafter, engine)
        spec = SpeculativeStats()
        start = time.perf_counter()
        new = redrafter_engine_decode(engine, drafter, ids, max_new_tokens, beam_width, beam_length, temperature,
                                      eos_token_ids(engine.model, tokenizer), gen, stats=spec, adaptive=adaptive)
        seconds = time.perf_counter() - start
        stats = {"engine": engine.info.to_dict(), "beam_width": beam_width, "beam_length": beam_length,
                 "adaptive_length": adaptive, **spec.to_dict()}
    elif drafter is not None:
        from celeris.speculative import SpeculativeStats, load_drafter, redrafter_decode
        from celeris.speculative.decoding import FIXED_CPU_LENGTH, default_beam_settings

        auto_w, auto_l, auto_adaptive = default_beam_settings(device)
        # the default length adapts per step where the default applies in full (one beam, no length given)
        adaptive = auto_adaptive and beam_length is None and beam_width in (None, 1)
        if beam_length is None and auto_adaptive and not adaptive:
            auto_l = FIXED_CPU_LENGTH  # several beams on a CPU: a fixed length, W x 6 would verify too many tokens
        beam_width = auto_w if beam_width is None else beam_width
        beam_length = auto_l if beam_length is None else beam_length
        if not isinstance(drafter, torch.nn.Module):
            drafter = load_drafter(drafter, model)
        spec = SpeculativeStats()
        start = time.perf_counter()
        new = redrafter_decode(model, drafter, ids, max_new_tokens, beam_width, beam_length, temperature,
                               eos_token_ids(model, tokenizer), gen, stats=spec, adaptive=adaptive)[0]
        sync_device(device)
        seconds = time.perf_counter() - start
        stats = {"beam_width": beam_width, "beam_length": beam_length, "adaptive_length": adaptive, **spec.to_dict()}
    elif engine is not None:
        start = time.perf_counter()
        new = engine_decode(engine, ids, max_new_tokens, temperature, eos_token_ids(engine.model, tokenizer), gen)
        sync_device(device)
        seconds = time.perf_counter() - start
        stats = {"engine": engine.info.to_dict()}
    else:
        start = time.perf_counter()
        new = decode(model, ids, max_new_tokens, temperature, eos_token_ids(model, tokenizer), gen)
        sync_device(device)
        seconds = time.perf_counter() - start
    token_ids = new.tolist()
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    return GenerationResult(text, token_ids, ids.shape[1], len(token_ids), seconds, stats)
