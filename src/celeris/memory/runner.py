"""One runner for every memory policy: chunked prefill + decoding with eviction every `n_up` tokens.

The prompt is fed in chunks of `n_up` tokens aligned to absolute positions; whenever the absolute
token count reaches a multiple of `n_up` (in prefill and in decoding alike) the policy scores each
layer's cached tokens and the runner physically removes the losers from the Hugging Face
`DynamicCache` tensors (a `gather` along the sequence axis, per KV head). Keys stay rotated at their
original absolute positions; new tokens get explicit `position_ids` (absolute, for RoPE) and
`cache_position` (physical slots, so the causal mask is built over the compressed cache).
Works on unmodified HF models: attention weights come from a forward hook on each `self_attn`
(eager attention), nothing in the modeling code is replaced.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from celeris.errors import CelerisError
from celeris.memory.policies.base import Budget, MemoryPolicy


@dataclass
class MemoryResult:
    """One answer with its memory accounting (bytes are physical tensor storage of K and V)."""

    new_ids: list[int]
    prompt_tokens: int
    peak_kv_bytes: int
    end_kv_bytes: int
    full_peak_kv_bytes: int  # what the full cache would hold at its peak for the same tokens
    kept_fraction: float  # cached tokens at the end / tokens processed (mean over layers and heads)
    seconds: float
    evictions: int = 0
    extra: dict = field(default_factory=dict)
    cache: object = field(default=None, repr=False)  # the final DynamicCache (only with keep_cache=True)
    positions: list | None = field(default=None, repr=False)  # absolute positions per layer `[kv_heads, N]`

    @property
    def kv_bytes_ratio(self) -> float:
        return self.peak_kv_bytes / max(1, self.full_peak_kv_bytes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("cache", "positions")}
        d["kv_bytes_ratio"] = self.kv_bytes_ratio
        return d


def attention_layers(model) -> list[torch.nn.Module]:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise CelerisError(f"{type(model).__name__} is not supported: memory policies need model.model.layers[i].self_attn")
    return [layer.self_attn for layer in layers]


def kv_bytes(cache) -> int:
    """Physical bytes of every key and value tensor in the cache."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


_WARNED_ATTENTION: set[tuple[str, str, str]] = set()  # (model class, kept, asked): warn once each


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Temporarily run `model` with attention `name` ("eager", "sdpa", ...) and yield the name actually
    in use: a model that cannot switch to it (an architecture without SDPA) keeps its own, with one
    warning per model class."""
    old = model.config._attn_implementation
    if old == name:
        yield name
        return
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError) as e:
        if name == "eager":
            raise
        key = (type(model).__name__, str(old), name)
        if key not in _WARNED_ATTENTION:
            _WARNED_ATTENTION.add(key)
            warnings.warn(f"{key[0]} cannot switch to {name} attention ({e}); running with {old} instead", stacklevel=3)
        yield old
        return
    try:
        yield name
    finally:
        model.set_attn_implementation(old)


def eager_attention(model):
    """Temporarily switch to eager attention (the only kind that returns attention weights)."""
    return attention_implementation(model, "eager")


def attention_for(model, needs_weights: bool):
    """Eager attention where attention weights are read, SDPA (4x faster on a 4k-token CPU prefill)
    everywhere else, whatever the model was loaded with."""
    return attention_implementation(model, "eager" if needs_weights else "sdpa")


def gqa_mean(weights: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Post-softmax attention `[1, heads, q, N]` -> `[n_kv, q, N]`, averaged over each KV group's query heads."""
    _, h, q, n = weights.shape
    return weights[0].float().view(n_kv, h // n_kv, q, n).mean(1)


class AttentionRecorder:
    """Forward hooks that keep, per layer, the post-softmax attention rows since the last update,
    averaged over each GQA group: a list of `[kv_heads, q, N_at_that_time]`."""

    def __init__(self, model, n_kv_heads: int) -> None:
        self.buffers: list[list[torch.Tensor]] = []
        self.handles = []
        self.n_kv = n_kv_heads
        for i, attn in enumerate(attention_layers(model)):
            self.buffers.append([])
            self.handles.append(attn.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(module, args, output):
            w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if w is None:
                raise CelerisError("this policy needs attention weights: load the model with attn_implementation='eager'")
            self.buffers[i].append(gqa_mean(w, self.n_kv))
        return hook

    def window(self, i: int) -> torch.Tensor:
        """`[kv_heads, Q, N]`: the buffered rows, right-padded with zeros (later tokens were not yet there)."""
        rows = self.buffers[i]
        n = rows[-1].shape[-1]
        out = torch.cat([F.pad(r, (0, n - r.shape[-1])) for r in rows], dim=1)
        self.buffers[i] = []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def answer_logprob(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean log-probability of `reference` `[R]` under `logits` `[R, V]` (row i predicts token i)."""
    return float(torch.log_softmax(logits.float(), dim=-1).gather(1, reference[:, None]).mean())


def _evict(backend, layer: int, scores: torch.Tensor, keep: int, positions: list[torch.Tensor], states: list[dict]) -> None:
    n = positions[layer].shape[1]
    if keep >= n:
        return
    # Per-head top-k, re-sorted so the cache stays oldest -> newest (NAMM's BAM relies on that order).
    idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # [H, keep]
    backend.keep(layer, idx)
    positions[layer] = positions[layer].gather(1, idx)
    for name, t in states[layer].items():
        if t.shape[1] == n:
            states[layer][name] = t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))


class _HFCache:
    """The runner's view of an unmodified HF model over a `DynamicCache`: evictions are gathers into new tensors."""

    def __init__(self, model):
        from transformers import DynamicCache

        self.model, self.cache = model, DynamicCache(config=model.config)
        self.n_layers, self.n_kv = len(attention_layers(model)), model.config.num_key_value_heads

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, all_logits: bool) -> torch.Tensor:
        phys = self.cache.get_seq_length()
        out = self.model(input_ids=ids, position_ids=positions, cache_position=torch.arange(phys, phys + ids.shape[1]),
                         past_key_values=self.cache, use_cache=True, logits_to_keep=0 if all_logits else 1)
        return out.logits[0] if all_logits else out.logits[0, -1]

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        cl = self.cache.layers[layer]
        return cl.keys[0], cl.values[0]  # [H, N, D]

    def keep(self, layer: int, idx: torch.Tensor) -> None:
        cl = self.cache.layers[layer]
        gidx = idx[..., None].expand(-1, -1, cl.keys.shape[-1])
        cl.keys = cl.keys[0].gather(1, gidx)[None].contiguous()
        cl.values = cl.values[0].gather(1, gidx)[None].contiguous()

    def done_evicting(self, kept: int) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return kv_bytes(self.cache)

    def attention(self, needs_weights: bool):
        return attention_for(self.model, needs_weights)


class _EngineCache:
    """The runner's view of a `celeris.engine.Engine`: its static cache, compacted in place after each eviction
    (each K/V head's kept slots moved to the front), so it never grows past the budget plus one chunk's bucket."""

    def __init__(self, engine):
        self.engine = engine
        self.n_layers = len(engine.cache.layers)
        self.n_kv = engine.cache.layers[0].keys.shape[1]
        engine.reset_cache()  # allocated bytes grow from the smallest bucket, as far as the policy lets them

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, all_logits: bool) -> torch.Tensor:
        self.hidden, logits = self.engine.append(ids, positions, all_logits=all_logits)  # hidden: a drafter's input
        return logits[0]

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        cl, n = self.engine.cache.layers[layer], self.engine.filled
        return cl.keys[0, :, :n], cl.values[0, :, :n]

    def keep(self, layer: int, idx: torch.Tensor) -> None:
        self.engine.compact(layer, idx)

    def done_evicting(self, kept: int) -> None:
        self.engine.filled = kept

    @property
    def nbytes(self) -> int:
        """Allocated bytes (the static cache's bucket); `held_bytes` is what its filled slots take."""
        return self.engine.kv_bytes

    @property
    def held_bytes(self) -> int:
        return self.engine.kv_bytes * self.engine.filled // self.engine.cache.max_len

    @contextlib.contextmanager
    def attention(self, needs_weights: bool):
        from celeris.attention import engine_attention_weights

        with engine_attention_weights() if needs_weights else contextlib.nullcontext():
            yield "celeris_engine" + ("+weights" if needs_weights else "")


class MemorySession:
    """A policy over one sequence's cache: `feed` tokens (prompt chunks or decoding steps, on an HF model or an
    engine), and the policy evicts whenever the absolute token count reaches the next multiple of `n_up`
    (`evict_at`, if given, lists the counts instead: another decoder's schedule replayed).

    A decoder that commits several tokens per step (ReDrafter on the engine) runs its own forward and reports
    what it kept with `committed`; evictions then happen at its step boundaries."""

    def __init__(self, model, policy: MemoryPolicy, budget: Budget | None, n_up: int = 128, seed: int = 0,
                 evict_at: list[int] | None = None):
        if n_up < 1:
            raise CelerisError(f"n_up must be >= 1, got {n_up}")
        if budget is None and not policy.supports_threshold:
            raise CelerisError(f"policy {policy.name!r} has no threshold mode: give a budget")
        cfg = getattr(policy, "cfg", None)
        if cfg is not None and cfg.n_up != n_up:
            n_up = cfg.n_up  # NAMM's features are defined for its own update interval
        if getattr(policy, "keeps_all", False):
            budget = None  # the full cache ignores the budget: it is the reference
        policy.reset(seed)
        self.policy, self.budget, self.n_up = policy, budget, n_up
        self.on_engine = hasattr(model, "decode_step")
        self.backend = _EngineCache(model) if self.on_engine else _HFCache(model)
        self.n_layers, self.n_kv = self.backend.n_layers, self.backend.n_kv
        self.positions = [torch.empty(self.n_kv, 0, dtype=torch.long) for _ in range(self.n_layers)]
        self.states: list[dict] = [{} for _ in range(self.n_layers)]
        self.recorder = AttentionRecorder(model.model if self.on_engine else model, self.n_kv) if policy.needs_attention else None
        self.seen = self.peak = self.held_peak = self.evictions = 0
        self.schedule: list[int] = []  # token counts at which evictions happened
        self.evict_at = sorted(evict_at) if evict_at is not None else None
        self._next = self._next_eviction()

    def _next_eviction(self) -> int:
        if self.evict_at is not None:
            return next((e for e in self.evict_at if e > self.seen), 1 << 62)
        return (self.seen // self.n_up + 1) * self.n_up

    def until_eviction(self) -> int:
        """Tokens still to commit before the next eviction (a multi-token decoder stops its step there)."""
        return self._next - self.seen

    def attention(self):
        """The context to run forwards in: attention that returns weights where the policy reads them."""
        return self.backend.attention(self.policy.needs_attention)

    def feed(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run `ids` `[1, q]` at the next positions; logits of the last (or every) token; evicts when due."""
        q = ids.shape[1]
        logits = self.backend.forward(ids, torch.arange(self.seen, self.seen + q)[None], all_logits)
        self.committed(q)
        return logits

    def committed(self, q: int) -> None:
        """`q` tokens were added at the next positions (the cache's next slots); evict if due."""
        for i in range(self.n_layers):
            self.positions[i] = torch.cat([self.positions[i], torch.arange(self.seen, self.seen + q).expand(self.n_kv, q)], dim=1)
        self.seen += q
        self.peak = max(self.peak, self.backend.nbytes)
        self.held_peak = max(self.held_peak, getattr(self.backend, "held_bytes", self.peak))
        if self.seen >= self._next:
            self.evict()
        self._next = self._next_eviction()

    def evict(self) -> None:
        scores = []
        for i in range(self.n_layers):
            keys, values = self.backend.kv(i)
            att = self.recorder.window(i)[..., : keys.shape[1]] if self.recorder is not None else None
            s = self.policy.score(i, keys, values, att, self.positions[i], self.states[i]).float()
            s[:, -1] = float("inf")  # never drop the token that was just written
            scores.append(s)
        # HF builds one causal mask for all layers, so every layer keeps the same count. Threshold
        # mode extends NAMM's "least-evicting head" rule to layers: keep the largest count of
        # scores >= 0 over all layers and heads (each head then keeps its own top ones).
        keep = self.budget.keep(self.seen) if self.budget is not None else max(int((s >= 0).sum(-1).max()) for s in scores)
        for i in range(self.n_layers):
            _evict(self.backend, i, scores[i], keep, self.positions, self.states)
        self.backend.done_evicting(self.positions[0].shape[1])
        self.evictions += 1
        self.schedule.append(self.seen)

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()

    def result(self, new: list[int], prompt_tokens: int, seconds: float, extra: dict, keep_cache: bool = False) -> MemoryResult:
        end = self.backend.nbytes
        held = sum(p.shape[1] for p in self.positions)
        if self.on_engine:  # allocated buckets vs what a cache sized to its contents would hold
            extra["peak_held_kv_bytes"] = self.held_peak
            per_token = self.backend.held_bytes / max(1, held)
        else:
            per_token = end / max(1, held)  # bytes per (token, layer)
        extra["eviction_schedule"] = list(self.schedule)
        kept = held / (self.n_layers * max(1, self.seen))
        return MemoryResult(new, prompt_tokens, self.peak, end, int(round(per_token * self.n_layers * self.seen)), kept,
                            seconds, self.evictions, extra, getattr(self.backend, "cache", None) if keep_cache else None,
                            self.positions if keep_cache else None)


@torch.inference_mode()
def run_with_memory(
    model,
    input_ids: torch.Tensor,
    policy: MemoryPolicy,
    budget: Budget | None,
    n_up: int = 128,
    max_new_tokens: int = 32,
    eos_ids: list[int] | tuple[int, ...] = (),
    seed: int = 0,
    keep_cache: bool = False,
    reference_ids: torch.Tensor | None = None,
    evict_at: list[int] | None = None,
    on_commit=None,
) -> MemoryResult:
    """Greedy answer to `input_ids` `[1, T]` under `policy` at `budget` (None = threshold mode).

    `model` is an unmodified HF causal LM (its `DynamicCache` is rebuilt at each eviction) or a
    `celeris.engine.Engine` (its static cache is compacted in place; the allocated bytes are its buckets).
    With `reference_ids` `[1, R]` nothing is generated: the reference answer is fed after the prompt
    (same chunking and evictions) and `extra["answer_logprob"]` is its mean log-probability.
    `evict_at`: evict at these token counts instead of every `n_up` (see `MemorySession`). `on_commit(ids)` gets
    each new token as it is decided; an exception it raises stops decoding (a server's cancel or stop string)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise CelerisError("the memory runner takes one prompt of shape [1, T]")
    session = MemorySession(model, policy, budget, n_up, seed, evict_at)
    n_up, budget = session.n_up, session.budget
    eos = set(int(e) for e in eos_ids)
    new: list[int] = []
    start = time.perf_counter()
    extra = {"policy": policy.name, "budget": str(budget) if budget else "threshold", "n_up": n_up}
    try:
        with session.attention() as extra["attention"]:
            ids = input_ids if reference_ids is None else torch.cat([input_ids, reference_ids], dim=1)
            t, s = ids.shape[1], 0
            n_prompt = input_ids.shape[1]
            rows = []
            while s < t:
                e = min(t, (s // n_up + 1) * n_up)  # chunks end on multiples of n_up
                logits = session.feed(ids[:, s:e], all_logits=reference_ids is not None and e >= n_prompt)
                if reference_ids is not None and e >= n_prompt:
                    rows.append(logits[max(0, n_prompt - 1 - s):])
                s = e
            if reference_ids is not None:
                extra["answer_logprob"] = answer_logprob(torch.cat(rows)[:-1], reference_ids[0])
            while reference_ids is None and len(new) < max_new_tokens:
                tok = int(logits.argmax())
                new.append(tok)
                if on_commit is not None:
                    on_commit([tok])
                if tok in eos or len(new) == max_new_tokens:
                    break
                logits = session.feed(torch.tensor([[tok]]))
    finally:
        session.close()
    return session.result(new, int(input_ids.shape[1]), time.perf_counter() - start, extra, keep_cache)
