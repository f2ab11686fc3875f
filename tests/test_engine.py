"""The fast engine: GGUF blocks → packed kernels (codes bit-equal, stated rounding), the span cache,
verify steps and commits, identity with plain decoding, and the CLI's engine options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from celeris.engine import Engine
from celeris.engine import gguf_blocks as G
from celeris.engine.batch import BatchEngine
from celeris.engine.cache import RowLayer, bucket
from celeris.engine.quant import FusedPart, Int4Linear, Int8Linear
from celeris.errors import CelerisError
from celeris.generation import decode, engine_decode


def _q4_1_bytes(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random Q4_1 blocks as a GGUF file stores them: raw `[n, k/32·20]`, and their d, m, codes."""
    rng = np.random.default_rng(seed)
    nb = k // 32
    d = (rng.random((n, nb)) * 0.02 + 1e-3).astype(np.float16)
    m = (-rng.random((n, nb)) * 0.1).astype(np.float16)
    codes = rng.integers(0, 16, (n, nb, 32), dtype=np.uint8)
    qs = codes[:, :, :16] | (codes[:, :, 16:] << 4)  # element j: low nibble of byte j; j + 16: high nibble
    raw = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), qs], axis=-1)
    return raw.reshape(n, nb * 20), d, m, codes.reshape(n, k)


def _kernel_weight(layer: Int4Linear, scales_and_zeros: torch.Tensor | None = None) -> torch.Tensor:
    """The `[N, K]` weight the int4 kernel itself multiplies by (identity rows through the ATen op)."""
    sz = layer.scales_and_zeros if scales_and_zeros is None else scales_and_zeros
    eye = torch.eye(layer.in_features, dtype=torch.bfloat16)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.packed, layer.group_size, sz).t().float()


def _kernel_codes(layer: Int4Linear) -> torch.Tensor:
    """Read the packed codes back through the kernel: scale 1, zero 8 → W = q."""
    sz = torch.zeros_like(layer.scales_and_zeros)
    sz[..., 0], sz[..., 1] = 1, 8
    return _kernel_weight(layer, sz)


def test_q4_1_codes_are_bit_equal_after_packing_and_values_within_the_bf16_rounding():
    raw, d, m, codes = _q4_1_bytes(64, 128)
    q, scale, zero = G.q4_codes_and_affine(raw, "Q4_1", (64, 128))
    assert torch.equal(q, torch.from_numpy(codes.astype(np.int32)))
    layer = Int4Linear(q, scale, zero)
    assert torch.equal(_kernel_codes(layer), torch.from_numpy(codes).float())  # the file's codes, bit for bit
    # values: exact in fp32 (x = d·q + m), and through the bf16 kernel within the rounding of d and m + 8d
    exact = torch.from_numpy((d.astype(np.float32)[..., None] * codes.reshape(64, 4, 32) + m.astype(np.float32)[..., None]).reshape(64, 128))
    assert torch.equal(G.affine_values(q, scale, zero), exact)
    got = _kernel_weight(layer)
    dd, zz = scale.abs().repeat_interleave(32, 1), zero.abs().repeat_interleave(32, 1)
    bound = ((q - 8).abs() * dd + zz + got.abs()) * 2**-8  # bf16 rounding (unit roundoff 2⁻⁸) of scale, zero, output
    assert bool(((got - exact).abs() <= bound + 1e-7).all())
    assert (got - exact).abs().max() > 0  # the rounding is real: the bound is what is tested, not equality


def test_q4_0_maps_to_zero_offset_and_a_truncated_tensor_is_refused():
    rng = np.random.default_rng(1)
    d = (rng.random((8, 2)) * 0.01 + 1e-3).astype(np.float16)
    codes = rng.integers(0, 16, (8, 2, 32), dtype=np.uint8)
    raw = np.concatenate([d[..., None].view(np.uint8), codes[:, :, :16] | (codes[:, :, 16:] << 4)], axis=-1).reshape(8, 36)
    q, scale, zero = G.q4_codes_and_affine(raw, "Q4_0", (8, 64))
    assert torch.equal(zero, torch.zeros(8, 2))
    want = (codes.astype(np.float32) - 8) * d.astype(np.float32)[..., None]
    assert torch.equal(G.affine_values(q, scale, zero), torch.from_numpy(want.reshape(8, 64)))
    with pytest.raises(CelerisError, match="truncated or corrupt"):
        G.q4_codes_and_affine(raw[:, :-1], "Q4_0", (8, 64))
    with pytest.raises(CelerisError, match="blocks of 32"):
        G.q4_codes_and_affine(raw, "Q4_0", (8, 60))


def test_q8_0_per_row_requantisation_stays_within_half_a_step_and_reports_its_error():
    rng = np.random.default_rng(2)
    n, k = 16, 96
    d = (rng.random((n, 3)) * 0.01 + 1e-4).astype(np.float16)
    d[0] = d[0, 0]  # row 0: one scale for all its blocks, so its codes survive exactly
    qv = rng.integers(-127, 128, (n, 3, 32)).astype(np.int8)
    qv[0, 0, 0] = 127  # row 0 reaches the full range
    raw = np.concatenate([d[..., None].view(np.uint8), qv.view(np.uint8)], axis=-1).reshape(n, 3 * 34)
    q, s, err = G.q8_0_to_int8_rows(raw, (n, k), chunk=5)
    x = torch.from_numpy((qv.astype(np.float32) * d.astype(np.float32)[..., None]).reshape(n, k))
    approx = q.float() * s[:, None]
    assert bool(((approx - x).abs() <= s[:, None] / 2 + 1e-7).all())
    assert torch.equal(q[0], torch.from_numpy(qv[0].reshape(k)).to(torch.int8))
    ref = G.requantisation_error(x, approx)
    assert err["relative_rms"] == pytest.approx(ref["relative_rms"], rel=1e-4) and err["relative_rms"] > 0
    # and the kernel computes with exactly these int8 rows and scales (bf16 scales)
    layer = Int8Linear(q, s)
    xin = torch.randn(3, k)
    ref_out = xin.bfloat16().float() @ (q.float() * s.bfloat16().float()[:, None]).t()
    torch.testing.assert_close(layer(xin), ref_out, atol=2e-2, rtol=2e-2)


def test_int4_requantise_of_other_types_and_group_checks():
    w = torch.randn(8, 64)
    codes, scale, zero = G.int4_requantise(w)
    err = G.requantisation_error(w, G.affine_values(codes, scale, zero))
    assert 0 < err["relative_rms"] < 0.1
    assert bool(((G.affine_values(codes, scale, zero) - w).abs() <= scale.repeat_interleave(32, 1) / 2 + 1e-6).all())
    with pytest.raises(CelerisError, match="multiple of 32"):
        G.int4_requantise(torch.randn(4, 48))
    with pytest.raises(CelerisError, match="multiple of the group size"):
        Int4Linear(torch.zeros(4, 48, dtype=torch.int32), torch.ones(4, 1), torch.zeros(4, 1), group_size=32)


def test_dense_prompt_path_reads_the_packed_layout_and_matches_the_kernel():
    from celeris.engine.quant import DENSE_FROM_ROWS, _layout_ok

    assert _layout_ok()
    raw, _, _, _ = _q4_1_bytes(128, 96, seed=5)
    layer = Int4Linear(*G.q4_codes_and_affine(raw, "Q4_1", (128, 96)))
    w = _kernel_weight(layer)
    assert (layer.dense_weight().float() - w).abs().max() <= 2**-7 * w.abs().max()
    x = torch.randn(DENSE_FROM_ROWS, 96)
    torch.testing.assert_close(layer(x), x.bfloat16().float() @ w.t(), atol=0.05, rtol=0.02)


def test_buckets_cover_the_filled_length():
    assert bucket(1, 2048) == 128 and bucket(128, 2048) == 128 and bucket(129, 2048) == 256
    assert bucket(3000, 2048) == 2048 and bucket(5, 64) == 64


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_decoding_equals_dynamic_cache_decoding(context_llama, temperature):
    """The span cache, bucket changes (prompt + new tokens cross 128) and masks give plain decoding's tokens."""
    model = context_llama
    engine = Engine(model, None, max_len=512)
    prompt = torch.randint(0, 96, (1, 100), generator=torch.Generator().manual_seed(3))
    ref = decode(model, prompt, 60, temperature, generator=torch.Generator().manual_seed(5))
    got = engine_decode(engine, prompt, 60, temperature, generator=torch.Generator().manual_seed(5))
    assert len(set(ref.tolist())) >= 10  # a context-sensitive reference, not one repeated token
    assert got.tolist() == ref.tolist()


def test_verify_step_tree_gives_each_branch_its_plain_logits_and_commit_keeps_the_accepted_path(context_llama):
    model = context_llama
    engine = Engine(model, None, max_len=256)
    prompt = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(4))
    # a tree of 5 tokens: 0 → 1 → 2 and 0 → 3 → 4 (two branches sharing the root)
    tokens = torch.tensor([[7, 11, 13, 17, 19]])
    parent = [-1, 0, 1, 0, 3]
    tree = torch.eye(5, dtype=torch.bool)
    depth = []
    for i, p in enumerate(parent):
        j, d = p, 0
        while j >= 0:
            tree[i, j], j, d = True, parent[j], d + 1
        depth.append(d)
    engine.prefill(prompt)
    _, logits = engine.verify_step(tokens, positions=torch.tensor([[20 + x for x in depth]]), tree=tree)
    for branch in ([0, 1, 2], [0, 3, 4]):
        with torch.no_grad():
            ref = model(torch.cat([prompt, tokens[:, branch]], dim=1)).logits[0, 20:]
        torch.testing.assert_close(logits[0, branch], ref, atol=1e-4, rtol=1e-4)
    # accept the second branch (slots 0, 3, 4): the cache then continues exactly as after that plain prefix
    engine.commit(torch.tensor([0, 3, 4]))
    assert engine.filled == 23
    nxt = engine.decode_step(torch.tensor([[23]]))
    with torch.no_grad():
        ref = model(torch.cat([prompt, tokens[:, [0, 3, 4]], torch.tensor([[23]])], dim=1)).logits[0, -1]
    torch.testing.assert_close(nxt[0], ref, atol=1e-4, rtol=1e-4)


def test_commit_of_a_wrong_path_is_detected_by_the_next_step(context_llama):
    """Negative control for the gather: committing the other branch gives different next logits."""
    model = context_llama
    engine = Engine(model, None, max_len=256)
    prompt = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(4))
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    engine.prefill(prompt)
    engine.verify_step(torch.tensor([[7, 11, 17]]), positions=torch.tensor([[20, 21, 21]]), tree=tree)
    engine.commit(torch.tensor([0, 1]))  # the path 7 → 11, but we then compare with 7 → 17
    nxt = engine.decode_step(torch.tensor([[23]]))
    with torch.no_grad():
        ref = model(torch.cat([prompt, torch.tensor([[7, 17, 23]])], dim=1)).logits[0, -1]
    assert (nxt[0] - ref).abs().max() > 1e-2


def test_engine_refuses_a_full_context_and_too_long_steps(context_llama):
    engine = Engine(context_llama, None, max_len=64)
    with pytest.raises(CelerisError, match="at most 63"):
        engine.prefill(torch.zeros(1, 64, dtype=torch.long))
    engine.prefill(torch.zeros(1, 60, dtype=torch.long))
    with pytest.raises(CelerisError, match="context is full"):
        engine.verify_step(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(CelerisError, match="1..32 tokens"):
        engine.verify_step(torch.zeros(1, 33, dtype=torch.long))


def test_cli_engine_options_are_checked_before_any_work(capsys):
    from celeris.cli import main

    for argv, msg in ((["generate", "-p", "hi", "--threads", "0"], "--threads"),
                      (["generate", "-p", "hi", "--quantize", "int3"], "--quantize"),
                      (["generate", "-p", "hi", "--temperature", "nan"], "finite"),
                      (["generate", "-p", "hi", "--drafter", "default", "--memory", "namm", "--quantize", "none"],
                       "on the engine only")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


@pytest.mark.integration
def test_default_gguf_engine_weights_match_the_files_values(default_model):
    """Every Q4_1 matrix of the default GGUF: codes bit-equal, values within bf16 rounding of HF's fp32
    dequantisation (rows of Q/K in HF's order); the Q8_0 embedding within its reported per-row error."""
    from gguf import GGUFReader

    from celeris.engine import load_engine
    from celeris.engine.load import _reverse_permute_rows
    from celeris.models import default_gguf_path

    ref_model, _ = default_model
    engine = load_engine(progress=False)
    ref = dict(ref_model.named_parameters())
    mods = dict(engine.model.named_modules())
    tensors = {t.name: t for t in GGUFReader(default_gguf_path()).tensors}
    for name, gname, heads in (("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight", 9),
                               ("model.layers.7.self_attn.k_proj", "blk.7.attn_k.weight", 3),
                               ("model.layers.7.mlp.up_proj", "blk.7.ffn_up.weight", None),
                               ("model.layers.29.mlp.down_proj", "blk.29.ffn_down.weight", None)):
        layer, rows = mods[name], slice(None)
        if isinstance(layer, FusedPart):  # Q/K/V and gate/up run as one product: take this layer's rows of it
            owner = layer.owner[0]
            start = sum(owner.sizes[: layer.index])
            layer, rows = owner.fused, slice(start, start + owner.sizes[layer.index])
        t = tensors[gname]
        codes, _, _ = G.q4_codes_and_affine(t.data, "Q4_1", (int(t.shape[1]), int(t.shape[0])))
        if heads:
            codes = _reverse_permute_rows(codes, heads)
        assert torch.equal(_kernel_codes(layer)[rows], codes.float())
        w = ref[f"{name}.weight"].detach()
        got = _kernel_weight(layer)[rows]
        assert 0 < (got - w).abs().max() <= 2**-7 * w.abs().max()
        dense = layer.dense_weight().float()[rows]  # the prompt path's weight: one bf16 rounding more
        assert (dense - got).abs().max() <= 2**-7 * w.abs().max()
    assert isinstance(mods["model.layers.3.self_attn.v_proj"], FusedPart)  # the default engine fuses Q/K/V
    head = engine.model.lm_head
    err = engine.info.mapping["Q8_0 → int8 per row"]
    w = ref["model.embed_tokens.weight"].detach()
    approx = head.q.float() * head.scales.float()[:, None]
    rel = float((approx - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    assert rel == pytest.approx(err["relative_rms"], rel=0.02)  # bf16 scales add a little to the stated error


@pytest.mark.integration
def test_quantize_none_equals_hf_generate_on_the_real_model(default_model):
    from celeris.engine import load_engine
    from celeris.generation import encode_prompt
    from celeris.speculative.prompts import evaluation_prompts

    model, tok = default_model
    engine = load_engine(quantize="none", progress=False)
    for prompt in evaluation_prompts()[:2]:
        ids = encode_prompt(tok, prompt)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)[0, ids.shape[1]:]
        got = engine_decode(engine, ids, 48)
        assert got.tolist() == ref.tolist()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_torchao_quantizes_a_local_hf_model_for_the_engine(tmp_path, mode):
    """A model directory (not GGUF) goes through torchao; the engine's greedy output then follows its logits."""
    from transformers import PreTrainedTokenizerFast

    from celeris.engine import load_engine
    from celeris.models import new_model

    model = new_model("tiny", vocab_size=256, seed=0)
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0")),
                                  unk_token="t0", eos_token="t1")
    tok.save_pretrained(tmp_path)
    engine = load_engine(str(tmp_path), quantize=mode, progress=False)
    assert engine.info.quantize == f"{mode}-torchao"
    assert engine.info.weight_bytes < sum(p.numel() * 2 for p in model.parameters())  # smaller than bf16
    ids = torch.randint(2, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    _, logits = engine.prefill(ids, all_logits=True)
    with torch.no_grad():
        ref = model.to(torch.bfloat16)(ids).logits.float()
    assert (logits - ref).abs().max() < 0.1 * ref.abs().max() + (0.3 if mode == "int4" else 0.05)
    plain = load_engine(str(tmp_path), progress=False)
    assert plain.info.quantize == "none"  # auto on a non-GGUF model: the float model as loaded



def _batched_greedy(engine: BatchEngine, prompts: list[torch.Tensor], joins: list[int], n_new: int) -> list[list[int]]:
    """Greedy decoding of every prompt on `engine`, prompt i prefilled (joining the batch) at step joins[i] or as soon
    after as a row is free, leaving when it has `n_new` tokens: continuous batching, rows reused."""
    out: list[list[int]] = [[] for _ in prompts]
    waiting, row_of, step = list(range(len(prompts))), {}, 0
    while waiting or row_of:
        for i in [i for i in waiting if joins[i] <= step]:
            row = engine.free_row()
            if row is None:
                break
            out[i].append(int(engine.prefill(row, prompts[i]).argmax(-1)))
            row_of[i] = row
            waiting.remove(i)
        for i in [i for i, row in row_of.items() if len(out[i]) == n_new]:
            engine.release(row_of.pop(i))
        if row_of:
            tokens = torch.zeros(engine.width, dtype=torch.long)
            for i, row in row_of.items():
                tokens[row] = out[i][-1]
            nxt = engine.decode_step(tokens).argmax(-1)
            for i, row in row_of.items():
                out[i].append(int(nxt[row]))
        step += 1
    return out


def _batch_case(model) -> tuple[list[torch.Tensor], list[int], list[list[int]]]:
    """Six prompts of 3..100 tokens joining at different steps, and each one's greedy tokens on the batch-1 engine."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 96, (1, n), generator=g) for n in (7, 30, 3, 100, 18, 45)]
    joins = [0, 0, 4, 9, 10, 25]
    refs = [engine_decode(Engine(model, None, max_len=512), p, 36).tolist() for p in prompts]
    return prompts, joins, refs


def test_batched_greedy_equals_batch_one_greedy_as_sequences_join_and_leave(context_llama):
    """Three rows, six prompts of different lengths joining at different steps (rows freed and reused, the long
    prompt crossing the 128-slot bucket while short ones share its steps): each prompt's greedy tokens are the
    batch-1 engine's, token for token."""
    prompts, joins, refs = _batch_case(context_llama)
    engine = BatchEngine(context_llama, None, rows=3, max_len=512)
    got = _batched_greedy(engine, prompts, joins, 36)
    assert all(len(set(r)) >= 10 for r in refs)  # context-sensitive references
    assert len({tuple(r) for r in refs}) == len(refs)
    assert got == refs
    assert engine.width == 0 and engine.filled == [0, 0, 0]


def test_batched_decoding_catches_a_row_writing_at_another_rows_slot(context_llama, monkeypatch):
    """Negative control: a step that writes row b's K/V at row b+1's slot (same row, wrong length) decodes other
    tokens than the batch-1 engine."""
    prompts, joins, refs = _batch_case(context_llama)
    update = RowLayer.update

    def misplaced(self, k, v, cache_kwargs=None):
        if self._row[0] < 0 and k.shape[0] > 1:
            cache_kwargs = {**cache_kwargs, "cache_position": cache_kwargs["cache_position"].roll(1)}
        return update(self, k, v, cache_kwargs)

    monkeypatch.setattr(RowLayer, "update", misplaced)
    got = _batched_greedy(BatchEngine(context_llama, None, rows=3, max_len=512), prompts, joins, 36)
    assert sum(g != r for g, r in zip(got, refs, strict=True)) >= 3


def test_batched_decoding_catches_a_mask_one_slot_short(context_llama, monkeypatch):
    """Negative control: a mask that hides each row's newest slot (< instead of ≤ filled) changes the tokens."""
    import celeris.engine.batch as EB

    prompts, joins, refs = _batch_case(context_llama)
    forward = EB.BatchEngine._forward

    def short_mask(self, ids, pos, slots, mask, last_only=False):
        if ids.shape[1] == 1:
            mask = mask & (torch.arange(mask.shape[-1]) != slots[:, None])[:, None, None]
        return forward(self, ids, pos, slots, mask, last_only)

    monkeypatch.setattr(EB.BatchEngine, "_forward", short_mask)
    got = _batched_greedy(BatchEngine(context_llama, None, rows=3, max_len=512), prompts, joins, 36)
    assert sum(g != r for g, r in zip(got, refs, strict=True)) >= 3


def test_batch_engine_refuses_a_taken_row_a_narrow_step_and_a_full_context(context_llama):
    engine = BatchEngine(context_llama, None, rows=2, max_len=64)
    engine.prefill(1, torch.tensor([[1, 2, 3]]))
    assert engine.free_row() == 0 and engine.width == 2
    with pytest.raises(CelerisError, match="not a free row"):
        engine.prefill(1, torch.tensor([[1]]))
    with pytest.raises(CelerisError, match="B = 1"):
        engine.decode_step(torch.tensor([5]))
    with pytest.raises(CelerisError, match="at most 63"):
        engine.prefill(0, torch.zeros(1, 64, dtype=torch.long))
    for _ in range(61):
        engine.decode_step(torch.tensor([0, 5]))
    assert engine.filled == [0, 64]
    with pytest.raises(CelerisError, match="context is full in rows \\[1\\]"):
        engine.decode_step(torch.tensor([0, 5]))


@pytest.mark.slow
def test_compiled_steps_give_the_eager_engines_tokens(context_llama, tmp_path, monkeypatch):
    """The one compiled test: torch.compile'd steps (fresh inductor cache) decode what the eager engine decodes."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    prompt = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(6))
    eager = engine_decode(Engine(context_llama, None, max_len=256), prompt, 24)
    engine = Engine(context_llama, None, max_len=256, compile=True, progress=False)
    compiled = engine_decode(engine, prompt, 24)
    assert len(set(eager.tolist())) >= 8
    assert compiled.tolist() == eager.tolist()
    assert engine.info.compiled and engine.info.compile_seconds > 0


@pytest.mark.slow
def test_compiled_batched_steps_give_the_eager_batch_engines_tokens(context_llama, tmp_path, monkeypatch):
    """torch.compile'd batched steps (one graph per rows × bucket; fresh inductor cache) decode what eager does."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(0, 96, (1, n), generator=g) for n in (9, 20, 5)]
    joins = [0, 0, 6]
    eager = _batched_greedy(BatchEngine(context_llama, None, rows=2, max_len=256), prompts, joins, 16)
    engine = BatchEngine(context_llama, None, rows=2, max_len=256, compile=True, progress=False)
    engine.warm_up()  # a server's start: every width compiled before the first request
    assert engine._seen == {(1, 128), (2, 128)}
    compiled = _batched_greedy(engine, prompts, joins, 16)
    assert all(len(set(e)) >= 6 for e in eager)
    assert compiled == eager
    assert engine.info.compiled and engine._seen == {(1, 128), (2, 128)}


def test_a_warm_up_leaves_nothing_behind_and_runs_only_before_the_first_sequence(context_llama):
    """`warm_up` writes dummy tokens into free rows: the sequences after it decode the batch-1 engine's tokens."""
    prompts, joins, refs = _batch_case(context_llama)
    engine = BatchEngine(context_llama, None, rows=3, max_len=512)
    engine.warm_up()
    assert engine.filled == [0, 0, 0] and engine.width == 0
    assert _batched_greedy(engine, prompts, joins, 36) == refs
    engine.prefill(0, prompts[0])
    with pytest.raises(CelerisError, match="before any sequence"):
        engine.warm_up()


def test_a_compile_failure_falls_back_to_eager_with_one_warning(context_llama, monkeypatch, capsys):
    import celeris.engine.engine as E

    def broken(fn):
        def run(*args):
            raise RuntimeError("inductor exploded\nsecond line")
        return run

    monkeypatch.setattr(E, "_compiled", broken)
    prompt = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(7))
    engine = Engine(context_llama, None, max_len=128, compile=True, progress=False)
    got = engine_decode(engine, prompt, 10)
    assert got.tolist() == engine_decode(Engine(context_llama, None, max_len=128), prompt, 10).tolist()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: torch.compile failed (RuntimeError: inductor exploded); decoding eagerly"]
    assert not engine.info.compiled


def test_fused_projections_give_each_part_exactly_its_own_product():
    from torch import nn

    from celeris.engine.load import _fuse_projections

    def layer(n, seed):
        raw, _, _, _ = _q4_1_bytes(n, 64, seed=seed)
        return Int4Linear(*G.q4_codes_and_affine(raw, "Q4_1", (n, 64)))

    attn = nn.Module()
    attn.q_proj, attn.k_proj, attn.v_proj = layer(128, 1), layer(64, 2), layer(64, 3)
    alone = [attn.q_proj, attn.k_proj, attn.v_proj]
    assert _fuse_projections(attn) == 1 and isinstance(attn.k_proj, FusedPart)
    for rows in (1, 5):
        x = torch.randn(rows, 64)
        got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]  # the order a Llama attention calls them in
        assert all(torch.equal(g, ref(x)) for g, ref in zip(got, alone, strict=True))


# ---- ReDrafter on the engine -----------------------------------------------------------------------
def _oracle_search(truth: torch.Tensor, engine, seed: int):
    """Random beams plus the true continuation (cut at a random depth) on the last beam: long accepted runs."""
    g = torch.Generator().manual_seed(seed)

    def search(drafter, h, g0, W, L):
        beams = torch.randint(0, 96, (1, W, L), generator=g)
        beams[:, :, 0] = g0
        pos = engine.filled  # g0 sits at the next slot
        cont = torch.cat([truth[pos : pos + L], torch.zeros(L, dtype=torch.long)])[:L]
        k = int(torch.randint(1, L + 1, (1,), generator=g))
        beams[:, W - 1, :k] = cont[:k]
        return beams

    return search


@pytest.mark.parametrize(("width", "length", "oracle"), [(1, 4, False), (4, 4, False), (3, 5, True)])
def test_redrafter_on_the_engine_gives_plain_engine_decoding(context_llama, monkeypatch, width, length, oracle):
    import celeris.speculative.engine_decoding as ED
    from celeris.speculative import SpeculativeStats, new_drafter

    drafter = new_drafter(context_llama, torch.arange(96), seed=1)
    for seed in range(3):
        ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(seed))
        ref = engine_decode(Engine(context_llama, None, max_len=256), ids, 40)
        assert len(set(ref.tolist())) >= 8
        engine = Engine(context_llama, None, max_len=256)
        stats = SpeculativeStats()
        with monkeypatch.context() as m:
            if oracle:
                m.setattr(ED, "beam_search", _oracle_search(torch.cat([ids[0], ref]), engine, seed))
            got = ED.redrafter_engine_decode(engine, drafter, ids, 40, width, length, stats=stats)
        assert got.tolist() == ref.tolist()
        if oracle:
            assert stats.tokens_per_step > 2.0  # deep paths were accepted and gathered


def test_redrafter_on_the_engine_catches_a_wrong_commit(context_llama, monkeypatch):
    """Negative control: committing the slots one to the right of the accepted path changes the output."""
    import celeris.speculative.engine_decoding as ED
    from celeris.speculative import new_drafter

    drafter = new_drafter(context_llama, torch.arange(96), seed=1)
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    ref = engine_decode(Engine(context_llama, None, max_len=256), ids, 40)
    engine = Engine(context_llama, None, max_len=256)
    commit = engine.commit

    def shifted(keep):
        n = engine.cache.max_len - engine.filled
        return commit(torch.clamp(keep + 1, max=n - 1) if keep.numel() > 1 else keep)

    monkeypatch.setattr(ED, "beam_search", _oracle_search(torch.cat([ids[0], ref]), engine, 0))
    monkeypatch.setattr(engine, "commit", shifted)
    got = ED.redrafter_engine_decode(engine, drafter, ids, 40, 3, 5)
    assert got.tolist() != ref.tolist()


def test_a_packed_drafter_drafts_nearly_as_the_float_one_and_commits_the_same_tokens(context_llama):
    """`pack_drafter`: every linear layer int8 per row (bias kept); its logits stay within int8 rounding of the
    float drafter's, it proposes the same drafts on most steps, and what ReDrafter commits is plain decoding's."""
    import copy

    from celeris.speculative import new_drafter
    from celeris.speculative.engine_decoding import pack_drafter, redrafter_engine_decode
    from celeris.speculative.tree import beam_search

    drafter = new_drafter(context_llama, torch.arange(96), seed=1)
    packed = pack_drafter(copy.deepcopy(drafter))
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert packed.num_parameters() == drafter.num_parameters()
    h = torch.randn(16, context_llama.config.hidden_size)
    state = drafter.rnn_step(None, torch.arange(16))
    with torch.inference_mode():
        want, got = drafter(h, state), packed(h, packed.rnn_step(None, torch.arange(16)))
    assert ((got - want).norm() / want.norm()).item() < 0.02
    g0 = torch.arange(16)
    same = sum(torch.equal(beam_search(drafter, h[i : i + 1], g0[i : i + 1], 1, 4),
                           beam_search(packed, h[i : i + 1], g0[i : i + 1], 1, 4)) for i in range(16))
    assert same >= 12
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(4))
    ref = engine_decode(Engine(context_llama, None, max_len=256), ids, 40)
    got = redrafter_engine_decode(Engine(context_llama, None, max_len=256), packed, ids, 40, 1, 4)
    assert got.tolist() == ref.tolist()


def test_adaptive_length_picks_the_most_expected_tokens_per_cost():
    from celeris.speculative.engine_decoding import best_length, worth_drafting_deeper

    costs = torch.tensor([0.0, 1.0, 1.1, 1.4, 1.5])
    cum = torch.tensor([1.0, 0.9, 0.72, 0.072]).log()  # P(1..j right): 0.9, 0.72, 0.072
    # expected tokens 1, 1.9, 2.62, 2.692 -> per cost 1, 1.727, 1.871, 1.795
    assert best_length(cum, costs) == 3
    assert best_length(torch.tensor([1.0, 0.05]).log(), costs) == 1  # an unlikely draft is not worth verifying
    assert best_length(cum, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])) == 4  # free verifies: take them all
    assert worth_drafting_deeper(cum[:2], costs)  # 0.9 sure: deeper may pay
    assert not worth_drafting_deeper(torch.tensor([1.0, 0.01]).log(), costs)  # bound 1 + 3·0.01 < 1
    assert not worth_drafting_deeper(cum, costs)  # already at the longest draft


@pytest.mark.parametrize("oracle", [False, True])
def test_adaptive_redrafter_on_the_engine_gives_plain_engine_decoding(context_llama, monkeypatch, oracle):
    """Every length 1..L gets chosen (fixed costs, a drafter whose confidence varies); the output never changes."""
    import celeris.speculative.engine_decoding as ED
    from celeris.speculative import SpeculativeStats, new_drafter

    drafter = new_drafter(context_llama, torch.arange(96), seed=1)
    with torch.no_grad():
        drafter.lm_head.weight.mul_(8.0)  # a peaked drafter: confident on some steps, not on others
    monkeypatch.setattr(ED, "engine_step_costs", lambda *a, **k: torch.tensor([0.0, 1.0, 1.3, 1.6, 1.9, 2.2]))
    lengths: list[int] = []
    best = ED.best_length
    monkeypatch.setattr(ED, "best_length", lambda c, costs: lengths.append(best(c, costs)) or lengths[-1])
    for seed in range(3):
        ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(seed))
        ref = engine_decode(Engine(context_llama, None, max_len=256), ids, 40)
        engine = Engine(context_llama, None, max_len=256)
        stats = SpeculativeStats()
        got = ED.redrafter_engine_decode(engine, drafter, ids, 40, 1, 5, stats=stats, adaptive=True)
        assert got.tolist() == ref.tolist()
    assert {1, 2}.issubset(set(lengths)) and max(lengths) >= 3, lengths


def _verify_rows_against_steps(engine, prompt, n: int, k: int) -> float:
    """Greedy-decode n tokens with `decode_step`, then re-run them as verify steps of k tokens from the same
    slots: the largest difference between a verify row's logits and the plain step's at that position."""
    _, logits = engine.prefill(prompt)
    start = engine.filled
    tokens, plain = [], []
    token = logits.argmax(-1).view(1, 1)
    for _ in range(n):
        tokens.append(int(token))
        step = engine.decode_step(token)
        plain.append(step[0])
        token = step.argmax(-1).view(1, 1)
    assert len(set(tokens)) >= n // 3  # the reference varies
    engine.filled = start
    worst = 0.0
    for s in range(0, n, k):
        chunk = torch.tensor([tokens[s : s + k]])
        _, rows = engine.verify_step(chunk)
        engine.commit(chunk.shape[1])
        for j in range(chunk.shape[1]):
            worst = max(worst, (rows[0, j] - plain[s + j]).abs().max().item())
    return worst


def _packed_wide_model():
    """context_llama's recipe at the default model's width (576, 9 heads over 3 K/V heads, 4 layers), bf16,
    every linear layer packed for the engine's kernels (int4 groups of 32; the output layer int8 per row) as
    a GGUF load packs them: the kernels whose rows do not depend on the row count. (With the fixture's width
    64, or 2 layers, inductor's per-shape graphs happened to agree; dense bf16 linears at this width are not
    row-independent at all.)"""
    from torch import nn

    from celeris.models import new_model

    model = new_model("nano", vocab_size=96, max_position_embeddings=512, seed=1, initializer_range=0.3,
                      hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                      num_hidden_layers=4)
    model = model.eval().to(torch.bfloat16)

    def int4(lin: nn.Linear) -> Int4Linear:
        w = lin.weight.detach().float()
        n, k = w.shape
        g = w.view(n, k // 32, 32)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).view(n, k).int()
        return Int4Linear(codes, scale, lo + 8 * scale)  # W = (q − 8)·scale + zero

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, int4(child))
    w = model.lm_head.weight.detach().float()
    scales = w.abs().amax(1) / 127
    model.lm_head = Int8Linear((w / scales[:, None]).round().to(torch.int8), scales)
    return model


@pytest.mark.slow
def test_compiled_verify_rows_equal_compiled_plain_steps_bitwise(tmp_path, monkeypatch):
    """Compiled, a verify step of k tokens computes each row exactly as a plain step (k = 1) does: one graph
    traced with k symbolic. The negative control traces a graph per k (inductor's per-shape loop choices),
    as the engine once did, and the rows differ."""
    import celeris.engine.engine as E

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = _packed_wide_model()
    prompt = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(3))
    engine = Engine(model, None, max_len=128, compile=True, progress=False)
    assert all(_verify_rows_against_steps(engine, prompt, 12, k) == 0.0 for k in (3, 5))
    assert len(engine._seen) >= 3 and engine.info.compiled

    run_step = E.run_step
    monkeypatch.setattr(E, "run_step", lambda engine, key, *args, dynamic=(): run_step(engine, key, *args))
    torch._dynamo.reset()
    static = Engine(model, None, max_len=128, compile=True, progress=False)
    assert _verify_rows_against_steps(static, prompt, 12, 4) > 0


@pytest.mark.slow
def test_compiled_decoding_is_the_same_after_the_cache_grew(tmp_path, monkeypatch):
    """A compiled engine whose cache grew to a new bucket decodes a prompt as it did before the growth: steps
    retrace through `run_step`'s first-call path (k symbolic). The negative control keeps the seen shapes on
    growth, so the retrace happens outside that path (a graph dynamo makes generic), and the logits change."""
    from celeris.engine.cache import SpanCache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = _packed_wide_model()
    prompt = torch.randint(0, 96, (1, 100), generator=torch.Generator().manual_seed(5))

    def twice(engine) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of 40 greedy steps after the prompt, on a fresh cache and again after it grew."""
        runs = []
        for _ in range(2):
            _, logits = engine.prefill(prompt)
            steps = []
            for _ in range(40):  # crosses the 128-slot bucket: the cache grows during the first run
                logits = engine.decode_step(logits.argmax(-1).view(1, 1))
                steps.append(logits[0])
            runs.append(torch.stack(steps))
        assert engine.cache.max_len == 256 and len(set(runs[0].argmax(-1).tolist())) >= 10
        return runs[0], runs[1]

    first, again = twice(Engine(model, None, max_len=256, compile=True, progress=False))
    assert torch.equal(again, first)

    monkeypatch.setattr(Engine, "reserve", lambda self, n: n > self.cache.max_len and SpanCache.grow(
        self.cache, bucket(n, self.max_len)))
    torch._dynamo.reset()
    first, again = twice(Engine(model, None, max_len=256, compile=True, progress=False))
    assert not torch.equal(again, first)
