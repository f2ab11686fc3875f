"""Several sequences decoded together: one model, one `RowCache` row per sequence, one forward per step.

    engine = BatchEngine(model, tokenizer, rows=4)
    row = engine.free_row()                    a free row (None: all taken)
    logits = engine.prefill(row, ids)          the prompt [1, T] alone into that row; last logits [1, V]
    logits = engine.decode_step(tokens)        tokens [B] for rows 0..B−1, each at its own next slot; logits [B, V]
    engine.release(row)                        the row is free again (its slots are overwritten by the next prompt)

Prompts prefill one row at a time, so there is no left padding: row b's step attends exactly its own slots
0..filled_b (a per-row boolean mask), at its own positions. A row's logits therefore depend on the other rows
only through kernel reduction order (a matrix product of B rows may block differently from one row); greedy
output agrees with the batch-1 `Engine` token for token in tests/test_engine.py. Sequences join (prefill) and
leave (release) between steps: continuous batching. A step runs rows 0..B−1 where B is one past the highest
row in use (free rows below it run as one-slot dummies), so a lone sequence in row 0 runs at batch 1.
Compiled (`compile=True`), one graph per (B, cache bucket); prefills run eager.
"""

from __future__ import annotations

import torch

from celeris.engine.cache import RowCache, bucket
from celeris.engine.engine import (
    EngineInfo,
    _compiled,
    model_forward,
    run_step,
    use_engine_attention,
    weight_bytes,
)
from celeris.errors import CelerisError


class BatchEngine:
    """A causal LM over a `RowCache` of `rows` rows, `[rows, kv_heads, slots, head_dim]` per layer.

    `filled[b]` is row b's committed length (0 for a free row); `live[b]` whether a sequence holds it."""

    def __init__(self, model, tokenizer, rows: int, max_len: int | None = None, compile: bool = False,
                 info: EngineInfo | None = None, progress: bool = True):
        if rows < 1:
            raise CelerisError(f"a batch engine needs at least 1 row, got {rows}")
        self.model, self.tokenizer, self.rows = model, tokenizer, rows
        p = next(p for p in model.parameters() if p.is_floating_point())
        self.device, self.dtype = p.device, p.dtype
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_len = min(max_len or limit, limit)
        self.cache = RowCache(model.config, bucket(1, self.max_len), self.dtype, self.device, rows)
        self.filled = [0] * rows
        self.live = [False] * rows
        self.progress = progress
        self.info = info or EngineInfo("none", str(self.dtype).replace("torch.", ""), compile, torch.get_num_threads(),
                                       weight_bytes(model))
        self.info.compiled = compile
        use_engine_attention(model)  # the batch-1 engine's attention (matmuls for one-token steps)
        self._step = self._forward
        self._seen: set[tuple[int, int]] = set()
        if compile:
            self._step = _compiled(self._forward)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                 last_only: bool = False):
        return model_forward(self.model, self.cache, ids, pos, slots, mask, last_only)

    def reserve(self, n: int) -> None:
        """Make every row hold at least `n` slots (rounded up to a bucket; never past the context limit)."""
        if n > self.cache.max_len:
            self.cache.grow(bucket(n, self.max_len))
            self._seen.clear()  # new cache tensors: every step retraces, through `run_step`'s first-call path

    @property
    def kv_bytes(self) -> int:
        """Bytes of the allocated KV cache (all rows)."""
        return self.cache.nbytes

    @property
    def width(self) -> int:
        """Rows a step runs: one past the highest live row (0 when none is live)."""
        return max((b + 1 for b in range(self.rows) if self.live[b]), default=0)

    def free_row(self) -> int | None:
        """The lowest free row (keeps steps narrow), or None."""
        return next((b for b in range(self.rows) if not self.live[b]), None)

    def release(self, row: int) -> None:
        self.live[row], self.filled[row] = False, 0

    @torch.inference_mode()
    def prefill(self, row: int, ids: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
        """Start a sequence in free row `row`: the prompt `[1, T]` fills its slots 0..T−1 (batch 1, in chunks of
        `chunk`). Returns the last position's float32 logits `[1, V]`."""
        if not 0 <= row < self.rows or self.live[row]:
            raise CelerisError(f"row {row} is not a free row of this {self.rows}-row engine")
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise CelerisError("a prefill takes one sequence (input ids [1, T])")
        T = ids.shape[1]
        if T < 1:
            raise CelerisError("the prompt is empty")
        if T >= self.max_len:
            raise CelerisError(f"the prompt has {T} tokens; the engine holds at most {self.max_len - 1} before the first new one")
        logits = None
        self.cache.set_row(row)
        try:
            for s in range(0, T, chunk):
                part = ids[:, s : s + chunk].to(self.device)
                k = part.shape[1]
                span = bucket(s + k, self.max_len)
                self.reserve(span)
                self.cache.set_span(span)
                mask = torch.zeros(k, span, dtype=torch.bool, device=self.device)
                mask[:, :s] = True
                mask[:, s : s + k] = torch.ones(k, k, dtype=torch.bool, device=self.device).tril()
                pos = torch.arange(s, s + k, device=self.device)
                _, logits = self._forward(part, pos[None], pos, mask[None, None], last_only=True)
        finally:
            self.cache.set_row(-1)
        self.filled[row], self.live[row] = T, True
        return logits[:, -1]

    @torch.inference_mode()
    def adopt(self, row: int, engine) -> None:
        """Start a sequence in free row `row` from a batch-1 `Engine` over the same model: its committed slots
        0..filled−1 are copied into the row (a request that began alone, drafting, and goes on batched). The
        next `decode_step` feeds the row's pending token at slot `engine.filled`."""
        if not 0 <= row < self.rows or self.live[row]:
            raise CelerisError(f"row {row} is not a free row of this {self.rows}-row engine")
        n = engine.filled
        if not 0 < n < self.max_len:
            raise CelerisError(f"a row takes 1..{self.max_len - 1} committed tokens, the engine holds {n}")
        self.reserve(bucket(n + 1, self.max_len))
        for mine, theirs in zip(self.cache.layers, engine.cache.layers, strict=True):
            mine.keys[row, :, :n] = theirs.keys[0, :, :n]
            mine.values[row, :, :n] = theirs.values[0, :, :n]
        self.filled[row], self.live[row] = n, True

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run (compiled: compile, or load from inductor's disk cache) the step of every width 1..rows at the first
        cache bucket, so that the first requests do not wait for it. Only before any row is live: the dummy
        tokens land in slot 0 of free rows, which the next prefill overwrites."""
        if any(self.live):
            raise CelerisError("warm_up runs before any sequence joins")
        for B in range(1, self.rows + 1):
            self.decode_step(torch.zeros(B, dtype=torch.long))

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row `[B]` for rows 0..B−1 (B ≥ `width`), row b's at slot and position `filled[b]`,
        attending its slots 0..filled[b]; then each live row's `filled` grows by one. A free row's token is a
        dummy at slot 0 (its logits are meaningless). Returns float32 logits `[B, V]`."""
        B = tokens.shape[0]
        if not self.width <= B <= self.rows:
            raise CelerisError(f"a step runs rows 0..B−1 with {self.width} ≤ B ≤ {self.rows}, got B = {B}")
        full = [b for b in range(B) if self.live[b] and self.filled[b] >= self.max_len]
        if full:
            raise CelerisError(f"the context is full in rows {full}: the engine holds {self.max_len} tokens")
        span = bucket(max(self.filled[:B]) + 1, self.max_len)
        self.reserve(span)
        self.cache.set_span(span)
        at = torch.tensor(self.filled[:B], dtype=torch.long, device=self.device)
        mask = torch.arange(span, device=self.device)[None] <= at[:, None]  # row b: its slots 0..filled[b]
        ids = tokens.view(B, 1).to(self.device)
        _, logits = run_step(self, (B, span), ids, at[:, None], at, mask[:, None, None])
        for b in range(B):
            self.filled[b] += self.live[b]
        return logits[:, -1]
