"""The decoding engine every decoder calls into: one model, one static cache, one forward per step.

    engine.prefill(ids)                         the prompt's K/V into slots 0..T−1; last position's logits
    engine.verify_step(tokens, positions, tree) k tokens at slots filled..filled+k−1, attending to the
                                                filled past and to their tree ancestors; logits for all k
    engine.commit(slots)                        keep those step slots (accepted path), in order
    engine.decode_step(token)                   verify_step with k = 1, then commit it

Plain decoding is `decode_step`, i.e. `verify_step` with k = 1: a drafting decoder's verify of k tokens
runs the same function, so where every op is row-independent the two give the same logits by
construction (docs/engine.md lists which ops are). Steps run compiled (`torch.compile`, inductor) when
`compile=True`: one graph per cache bucket, traced with k symbolic (size 1 not specialised), so a verify
of k tokens runs the same generated loops as a plain step: inductor picks its loop order and
vectorisation per static shape, and graphs specialised per k gave rows that differ in the last bits
(enough to flip a greedy token). The prefill runs eager.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from celeris.engine.cache import SpanCache, bucket
from celeris.errors import CelerisError

MAX_VERIFY = 32  # tokens in one verify step


@dataclass
class EngineInfo:
    """What the engine runs: for `celeris info`, the JSON of benchmarks and `--json` outputs."""

    quantize: str  # int4-gguf, int8-gguf, int4-torchao, int8-torchao, none
    compute_dtype: str
    compiled: bool
    threads: int
    weight_bytes: int
    mapping: dict[str, Any] = field(default_factory=dict)
    compile_seconds: float = 0.0  # compilation time spent so far in this process (first calls of each graph)

    def to_dict(self) -> dict[str, Any]:
        return {"quantize": self.quantize, "compute_dtype": self.compute_dtype, "compiled": self.compiled,
                "threads": self.threads, "weight_bytes": self.weight_bytes, "mapping": self.mapping,
                "compile_seconds": round(self.compile_seconds, 2)}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a forward reads (packed buffers and parameters, shared ones once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


class Engine:
    """A causal LM (an unmodified HF model, its linear layers possibly swapped for packed ones) over a `SpanCache`.

    Batch 1. `filled` is the number of committed slots. Tensors returned are on the model's device.
    """

    def __init__(self, model, tokenizer, max_len: int | None = None, compile: bool = False,
                 info: EngineInfo | None = None, progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
        p = next(p for p in model.parameters() if p.is_floating_point())  # norms at least: the compute dtype
        self.device, self.dtype = p.device, p.dtype
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_len = min(max_len or limit, limit)  # the context limit
        # the cache starts at one bucket and grows by buckets as sequences need (`reserve`)
        self.cache = SpanCache(model.config, bucket(1, self.max_len), self.dtype, self.device)
        self.filled = 0
        self.progress = progress
        self.info = info or EngineInfo("none", str(self.dtype).replace("torch.", ""), compile, torch.get_num_threads(),
                                       weight_bytes(model))
        self.info.compiled = compile
        self._attn_setup()
        self._step = self._forward
        self._seen: set[tuple[int, int]] = set()
        if compile:
            self._step = _compiled(self._forward)

    def _attn_setup(self) -> None:
        use_engine_attention(self.model)

    # ---- the one forward ----------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                 last_only: bool = False):
        return model_forward(self.model, self.cache, ids, pos, slots, mask, last_only)

    def _run(self, ids: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor, step: bool, last_only: bool = False):
        """ids, pos `[1, k]` at slots filled..filled+k−1; `allowed` `[k, k]` bool among the new tokens."""
        k = ids.shape[1]
        if self.filled + k > self.max_len:
            raise CelerisError(f"the context is full: {self.filled} + {k} tokens exceed the engine's {self.max_len}")
        span = bucket(self.filled + k, self.max_len)
        self.reserve(span)
        self.cache.set_span(span)
        mask = torch.zeros(k, span, dtype=torch.bool, device=self.device)
        mask[:, : self.filled] = True
        mask[:, self.filled : self.filled + k] = allowed
        slots = torch.arange(self.filled, self.filled + k, device=self.device)
        if not step:
            return self._forward(ids, pos, slots, mask[None, None], last_only)
        mask = mask[None, None]
        # one graph for every k (of a cache bucket): rows computed alike whatever the step's size (module docstring)
        return run_step(self, (k, span), ids, pos, slots, mask, dynamic=((ids, 1), (pos, 1), (slots, 0), (mask, 2)))

    def reserve(self, n: int) -> None:
        """Make the cache hold at least `n` slots (rounded up to a bucket; never past the context limit)."""
        if n > self.cache.max_len:
            self.cache.grow(bucket(n, self.max_len))
            self._seen.clear()  # new cache tensors: every step retraces, through `run_step`'s first-call path

    def reset_cache(self) -> None:
        """Drop every committed slot and reallocate the cache at its smallest bucket, returning the rest of its
        memory: where a memory policy keeps a sequence's cache small, its allocated bytes start from here.
        Compiled steps recompile once for the new tensors."""
        self.cache = SpanCache(self.model.config, bucket(1, self.max_len), self.dtype, self.device)
        self.filled = 0
        self._seen.clear()

    @property
    def kv_bytes(self) -> int:
        """Bytes of the allocated KV cache."""
        return self.cache.nbytes

    # ---- public steps -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, chunk: int = 2048, all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a sequence: the prompt `[1, T]` fills slots 0..T−1 (in chunks of `chunk` tokens).

        Returns the last position's hidden state `[1, H]` and logits `[1, V]` (float32); with `all_logits`,
        the logits of every position `[1, T, V]` instead."""
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise CelerisError("the engine decodes one sequence at a time (input ids [1, T])")
        T = ids.shape[1]
        if T < 1:
            raise CelerisError("the prompt is empty")
        if T >= self.max_len:
            raise CelerisError(f"the prompt has {T} tokens; the engine holds at most {self.max_len - 1} before the first new one")
        self.filled = 0
        h = logits = None
        every = []
        for s in range(0, T, chunk):
            part = ids[:, s : s + chunk].to(self.device)
            k = part.shape[1]
            allowed = torch.ones(k, k, dtype=torch.bool, device=self.device).tril()
            pos = torch.arange(s, s + k, device=self.device)[None]
            h, logits = self._run(part, pos, allowed, step=False, last_only=not all_logits)
            self.filled += k
            if all_logits:
                every.append(logits)
        return h[:, -1], (torch.cat(every, dim=1) if all_logits else logits[:, -1])

    @torch.inference_mode()
    def verify_step(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                    tree: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run k tokens `[1, k]` at slots filled..filled+k−1 without committing them.

        positions `[1, k]` (default: filled + 0..k−1); tree `[k, k]` bool, True where token i may attend to
        token j of this step (default: causal). Returns hidden `[1, k, H]` and float32 logits `[1, k, V]`."""
        k = tokens.shape[1]
        if not 1 <= k <= MAX_VERIFY:
            raise CelerisError(f"a verify step takes 1..{MAX_VERIFY} tokens, got {k}")
        if positions is None:
            positions = torch.arange(self.filled, self.filled + k, device=self.device)[None]
        if tree is None:
            tree = torch.ones(k, k, dtype=torch.bool, device=self.device).tril()
        return self._run(tokens.to(self.device), positions.to(self.device), tree.to(self.device), step=True)

    def commit(self, keep: torch.Tensor | int) -> None:
        """Keep step slots `keep` (indices into the last verify step, ancestors first) as the next committed slots;
        an int n keeps the first n."""
        if isinstance(keep, int):
            self.filled += keep
            return
        keep = keep.to(self.device).flatten()
        if keep.numel() and not torch.equal(keep, torch.arange(keep.numel(), device=self.device)):
            self.cache.move(self.filled + keep, self.filled)
        self.filled += keep.numel()

    @torch.inference_mode()
    def decode_step(self, token: torch.Tensor) -> torch.Tensor:
        """One new token `[1, 1]` at the next position; returns its float32 logits `[1, V]`."""
        _, logits = self.verify_step(token.view(1, 1))
        self.commit(1)
        return logits[:, -1]

    @torch.inference_mode()
    def extend(self, ids: torch.Tensor, start: int, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """`prefill` of a prompt `[1, T]` whose first `start` tokens already sit in slots 0..start−1 (a prefix shared
        with the sequence before, as a server's next turn has): keeps those slots and runs only ids[:, start:].

        The caller vouches that the kept slots hold exactly ids[:, :start]. Returns what `prefill` returns for the
        last position. The kept K/V were computed in other chunks (or by steps), so logits agree with a full
        prefill to float tolerance, not bitwise."""
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise CelerisError("the engine decodes one sequence at a time (input ids [1, T])")
        T = ids.shape[1]
        if not 0 <= start < T or start > self.filled:
            raise CelerisError(f"extend keeps 0..{min(self.filled, T - 1)} committed slots of a {T}-token prompt, not {start}")
        if T >= self.max_len:
            raise CelerisError(f"the prompt has {T} tokens; the engine holds at most {self.max_len - 1} before the first new one")
        self.filled = start
        h = logits = None
        for s in range(start, T, chunk):
            part = ids[:, s : s + chunk].to(self.device)
            k = part.shape[1]
            allowed = torch.ones(k, k, dtype=torch.bool, device=self.device).tril()
            pos = torch.arange(s, s + k, device=self.device)[None]
            h, logits = self._run(part, pos, allowed, step=False, last_only=True)
            self.filled += k
        return h[:, -1], logits[:, -1]

    @torch.inference_mode()
    def append(self, ids: torch.Tensor, positions: torch.Tensor, all_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Commit `ids` `[1, k]` (any k) at slots filled..filled+k−1 with RoPE `positions` `[1, k]`, causal among
        themselves and attending to every filled slot: a memory policy's chunk, where slots (compacted after
        evictions) and positions differ. Runs the prompt path (eager). Returns the last token's hidden state
        `[1, H]` and float32 logits `[1, V]`, or the logits of every token `[1, k, V]` with `all_logits`."""
        k = ids.shape[1]
        allowed = torch.ones(k, k, dtype=torch.bool, device=self.device).tril()
        h, logits = self._run(ids.to(self.device), positions.to(self.device), allowed, step=False,
                              last_only=not all_logits)
        self.filled += k
        return h[:, -1], (logits if all_logits else logits[:, -1])

    def compact(self, layer: int, keep: torch.Tensor) -> None:
        """Keep, in layer `layer`, each K/V head's committed slots `keep` `[kv_heads, m]` (ascending), moved to
        slots 0..m−1 in that order (a memory policy's per-head eviction, in place). Every layer must keep the
        same m; set `filled` to m after the last layer."""
        cl = self.cache.layers[layer]
        m = keep.shape[1]
        idx = keep.to(self.device)[None, :, :, None]
        for t in (cl.keys, cl.values):
            t[:, :, :m] = t.gather(2, idx.expand(1, -1, -1, t.shape[-1]))



def use_engine_attention(model) -> None:
    """Attention through `celeris.attention.engine_attention_forward` (SDPA for prompts, matmuls for steps;
    shared K/V heads never copied). A model loaded for eager attention (scores read by a policy) keeps it."""
    from celeris.attention import ENGINE_NAME, NAME, _register

    if model.config._attn_implementation in ("sdpa", NAME, ENGINE_NAME):
        _register()
        model.config._attn_implementation = ENGINE_NAME


def model_forward(model, cache, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                  last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The one forward of every engine: the decoder over `cache` (slots `slots`, boolean mask `[B, 1, q, span]`),
    then the LM head. Returns hidden `[B, q, H]` and float32 logits `[B, q, V]` (q = 1 with `last_only`)."""
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, cache_position=slots,
                              past_key_values=cache, use_cache=True)
    h = out.last_hidden_state
    if last_only:
        h = h[:, -1:]
    return h, model.get_output_embeddings()(h).float()


def run_step(engine, key: tuple[int, int], *args, dynamic: tuple[tuple[torch.Tensor, int], ...] = ()):
    """`engine._step(*args)`; compiled, the first call of each shape `key` is timed into `engine.info.compile_seconds`
    and a compiler failure falls back to `engine._forward` for good (it must not cost the answer).

    `dynamic`: (tensor, dim) pairs traced as one symbolic size, size 1 included (not specialised), so that
    every size runs the same generated code."""
    fn = engine._step
    if not engine.info.compiled or key in engine._seen:
        return fn(*args)
    if engine.progress and not getattr(engine, "_told", False):
        engine._told = True
        print("compiling the decoding step (once per shape; cached for later processes) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        import torch._dynamo
        import torch.fx.experimental._config as fx_config

        for t, d in dynamic:
            torch._dynamo.mark_dynamic(t, d)
        # only the marked sizes are symbolic: a cache grown to a new length gets a graph of its own, static in that
        # length, rather than one dynamo makes generic after seeing two lengths (whose loops round differently)
        with fx_config.patch(backed_size_oblivious=bool(dynamic)), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            out = fn(*args)
    except Exception as exc:  # decode the same model eagerly
        from celeris.io import _first_line

        print(f"warning: torch.compile failed ({type(exc).__name__}: {_first_line(exc)}); decoding eagerly",
              file=sys.stderr, flush=True)
        engine._step, engine.info.compiled = engine._forward, False
        return engine._forward(*args)
    engine.info.compile_seconds += time.perf_counter() - t0
    engine._seen.add(key)
    return out


def _compiled(fn):
    """`torch.compile` (inductor) with its FX-graph cache under $CELERIS_CACHE, one graph per static shape."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.recompile_limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), 64)
    inductor_config.fx_graph_cache = True
    # Guards re-checked on every call cost milliseconds per step (hundreds of weight tensors). The model's
    # modules and weights never change after loading, so their guards are dropped; the cache's tensors and
    # its span (what changes between graphs) stay guarded.
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "cpp_wrapper": True}
    return torch.compile(fn, dynamic=False, fullgraph=False, options=options)


def set_compile_cache_dir() -> None:
    """Point inductor's caches under $CELERIS_CACHE/inductor (unless the user chose a place), before first use."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from celeris.models import cache_root

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")
