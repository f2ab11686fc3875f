"""Plain autoregressive decoding: the baseline every faster engine is measured against.

`decode` is prefill + one forward per new token over a Hugging Face `DynamicCache`; greedy output is
token-identical to `model.generate(..., do_sample=False)`. `generate` wraps it for text in, text out,
with the chat template applied when the tokenizer has one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from celeris.errors import CelerisError


@dataclass
class GenerationResult:
    """Text and token ids of one generation, with timing (prefill included in `seconds`)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("token_ids")
        d["tokens_per_second"] = self.tokens_per_second
        if not d["stats"]:
            d.pop("stats")
        return d


def eos_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the generation config's (possibly several), else the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, list | tuple) else [ids])]


def encode_prompt(tokenizer, prompt: str, chat: bool | None = None) -> torch.Tensor:
    """Token ids `[1, T]` for a prompt; `chat=None` applies the chat template when there is one."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise CelerisError("the prompt is empty")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise CelerisError("--chat was asked for, but this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling's cut of probs `[batch, vocab]`: the smallest set of most likely tokens whose mass reaches
    `top_p` keeps its probabilities (the most likely token always), the rest get 0. Not renormalised
    (`torch.multinomial` does not need it)."""
    if top_p >= 1:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # the mass before this token already reaches top_p
    drop[..., 0] = False
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))


def sample_next(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
                top_p: float = 1.0) -> torch.Tensor:
    """Next token `[batch]` from last-position logits `[batch, vocab]`: argmax at T=0, else sampled (from the
    `top_p` nucleus when top_p < 1)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_loop(first_logits: torch.Tensor, step, max_new_tokens: int, temperature: float,
                  eos_ids: list[int] | tuple[int, ...], generator: torch.Generator | None,
                  top_p: float = 1.0) -> torch.Tensor:
    """The one plain-decoding loop: sample from `first_logits` `[1, V]`, feed the token to `step(tok [1, 1])`
    (which returns the next logits `[1, V]`), until `max_new_tokens` or after the first end-of-sequence token
    (kept, as `model.generate` does). Returns the new ids `[n]`."""
    device = first_logits.device
    new = torch.empty(max_new_tokens, dtype=torch.long, device=device)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    logits, n = first_logits, 0
    while n < max_new_tokens:
        tok = sample_next(logits, temperature, generator, top_p)
        new[n] = tok[0]
        n += 1
        if n == max_new_tokens or (eos.numel() and bool(torch.isin(tok, eos).any())):
            break
        logits = step(tok[:, None])
    return new[:n]


@torch.inference_mode()
def decode(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_ids: list[int] | tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generate up to `max_new_tokens` after `input_ids` `[1, T]` over a Hugging Face `DynamicCache`;
    returns the new ids `[n]` (see `sampling_loop`)."""
    from transformers import DynamicCache

    if input_ids.shape[0] != 1:
        raise CelerisError("plain decoding takes one prompt at a time")
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

    def step(tok: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1]

    return sampling_loop(out.logits[:, -1], step, max_new_tokens, temperature, eos_ids, generator)


@torch.inference_mode()
def engine_decode(
    engine,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_ids: list[int] | tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`decode` on a `celeris.engine.Engine`: prefill, then one `decode_step` per token; the new ids `[n]`.

    The token budget is cut to what the engine's cache holds (a caller checks the context limit first)."""
    if input_ids.shape[0] != 1:
        raise CelerisError("plain decoding takes one prompt at a time")
    _, logits = engine.prefill(input_ids)
    max_new_tokens = min(max_new_tokens, engine.max_len - engine.filled + 1)
    return sampling_loop(logits, engine.decode_step, max_new_tokens, temperature, eos_ids, generator)


def sync_device(device: torch.device) -> None:
    """GPU work is asynchronous: wait for it before reading a timer."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
