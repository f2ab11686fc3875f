"""Training a RecurrentDrafter by local distillation (spec §5), offline.

1. `distill_data`: the target answers the training prompts with its own greedy continuations,
   batched (left-padded), and we keep for each response position t the final-norm hidden state h_t
   that produced token y_t. Since the labels are the target's own T = 0 continuations, plain
   teacher-forced CE on them is the paper's "local distillation" objective (spec §5, shortcut).
2. The draft vocabulary = the most frequent response tokens (mapped back to target ids).
3. `drafter_loss`: the 5-step teacher-forced objective: s_1 = rnn(0, y_t), s_i = rnn(s_{i-1}, y_{t+i-1}),
   head([h_t, s_i]) predicts y_{t+i}, i = 1..5, equally weighted CE (labels outside the draft
   vocabulary are ignored; they count as misses in the acceptance metric).
4. `celeris.trainer.Trainer` runs it: target frozen (only its cached hidden states are used),
   validation, early stopping, checkpoints, resume. Validation per-position top-1 acceptance
   (`acceptance_metrics`) is computed on the held-out prompts' responses and saved with the drafter.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from celeris.attention import gqa_sdpa
from celeris.errors import CelerisError
from celeris.generation import eos_token_ids
from celeris.io import check_run_dir, load_tensors, read_json, run_dir, save_tensors, write_json
from celeris.speculative.drafter import RecurrentDrafter, new_drafter, signature_mismatch, target_signature

DRAFT_STEPS = 5
# What makes a `drafter train` folder worth keeping: distilled shards, a started trainer, a drafter.
DRAFTER_RUN_FILES = ("data/*.safetensors", "run/log.jsonl", "run/checkpoint", "drafter/drafter.json")


@torch.inference_mode()
def distill_data(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 16,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """Greedy responses of the target, batched. Returns h `[N, T, H]` (fp16), y `[N, T]` (−100 = none)
    and the prompt ids p `[N, P]` (left-padded with −100; the chat-formatted prompt the answer follows).

    h[n, t] is the target's final-norm hidden state that produced y[n, t].
    """
    with gqa_sdpa(model):  # left padding needs a mask; without this HF copies every K/V head per layer and step
        return _distill(model, tokenizer, prompts, max_new_tokens, batch_size, progress)


def _distill(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, progress: bool):
    from transformers import DynamicCache

    eos = torch.tensor(eos_token_ids(model, tokenizer), dtype=torch.long)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos[0]) if eos.numel() else 0
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    H = model.config.hidden_size
    hs, ys, ps = [], [], []
    start = time.perf_counter()
    for b0 in range(0, len(prompts), batch_size):
        chunk = prompts[b0 : b0 + batch_size]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                 if getattr(tokenizer, "chat_template", None) else p for p in chunk]
        enc = [tokenizer(t, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"][-384:] for t in texts]
        T = max(len(e) for e in enc)
        ids = torch.tensor([[pad_id] * (T - len(e)) + e for e in enc])
        mask = torch.tensor([[0] * (T - len(e)) + [1] * len(e) for e in enc])
        B = len(chunk)
        cache = DynamicCache(config=model.config)
        h_out = torch.zeros(B, max_new_tokens, H, dtype=torch.float16)
        y_out = torch.full((B, max_new_tokens), -100, dtype=torch.long)
        alive = torch.ones(B, dtype=torch.bool)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        h = out.last_hidden_state[:, -1]
        for t in range(max_new_tokens):
            tok = head(h).argmax(-1)
            h_out[:, t] = torch.where(alive[:, None], h, 0).half()
            y_out[:, t] = torch.where(alive, tok, -100)
            alive = alive & ~torch.isin(tok, eos)
            if not bool(alive.any()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
            pos = pos[:, -1:] + 1
            out = decoder(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            h = out.last_hidden_state[:, -1]
        hs.append(h_out)
        ys.append(y_out)
        ps.append(torch.where(mask[:, :T].bool(), ids, -100))
        if progress:
            done = min(b0 + batch_size, len(prompts))
            print(f"distill: {done}/{len(prompts)} prompts, {time.perf_counter() - start:.0f} s", flush=True)
    return {"h": torch.cat(hs), "y": torch.cat(ys), "p": _cat_left_padded(ps)}


def _cat_left_padded(parts: list[torch.Tensor], fill: int = -100) -> torch.Tensor:
    """Concatenate `[n_i, T_i]` id tensors along dim 0, left-padding each to the longest T with `fill`."""
    T = max(p.shape[1] for p in parts)
    return torch.cat([torch.cat([torch.full((p.shape[0], T - p.shape[1]), fill, dtype=p.dtype), p], 1) for p in parts])


def distill_to_shards(model, tokenizer, prompts: list[str], directory: Path, name: str, max_new_tokens: int,
                      batch_size: int, shard_prompts: int = 64, progress: bool = True) -> dict[str, torch.Tensor]:
    """`distill_data` in shards of `shard_prompts` prompts, each saved as `directory/{name}-DIGEST.safetensors`,
    DIGEST a hash of the shard's own prompts.

    A shard already on disk is loaded instead of regenerated, so an interrupted distillation resumes
    where it stopped, and a prompt list that extends an earlier one reuses every full shard it shares
    with it. Returns the concatenation of all shards.
    """
    from tqdm.auto import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    parts, n_tokens = [], 0
    starts = range(0, len(prompts), shard_prompts)
    bar = tqdm(total=len(prompts), desc=f"distil {name}", unit="prompt", disable=not progress)
    for b0 in starts:
        chunk = prompts[b0 : b0 + shard_prompts]
        path = directory / f"{name}-{_digest(chunk)}.safetensors"
        if path.is_file():
            part = load_tensors(path, "distillation shard")
        else:
            part = distill_data(model, tokenizer, chunk, max_new_tokens, batch_size, progress=False)
            save_tensors(path, part)
        parts.append(part)
        n_tokens += int((part["y"] >= 0).sum())
        bar.update(len(chunk))
        bar.set_postfix(tokens=n_tokens)
    bar.close()
    return {"h": torch.cat([q["h"] for q in parts]), "y": torch.cat([q["y"] for q in parts]),
            "p": _cat_left_padded([q["p"] for q in parts])}


def _digest(prompts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def distillation_data(model, tokenizer, out_dir: Path, max_new_tokens: int = 128, max_prompts: int | None = None,
                      gen_batch_size: int = 16, seed: int = 0, progress: bool = True, require_existing: bool = False):
    """The (train, validation) distillation sets in `out_dir/data`, generated (resumably) if needed.

    Shards are named by a digest of their own prompts, so other prompts (another `max_prompts` or
    `seed`) get shards of their own and never overwrite or delete existing ones, and shards shared with
    an earlier run's prompts are reused. `require_existing` refuses to generate anything (for reusing
    another run's data).
    """
    from celeris.speculative.prompts import evaluation_prompts, missing_stdlib_modules, training_prompts

    tp, vp = training_prompts(max_prompts, seed), evaluation_prompts()
    if max_prompts is not None:
        vp = vp[: max(8, max_prompts // 8)]
    if set(tp) & set(vp):
        raise CelerisError("training and evaluation prompts overlap")
    data_dir = out_dir / "data"
    meta_path = data_dir / "meta.json"
    split_digest = {"train": _digest(tp), "validation": _digest(vp)}
    want = {"target": target_signature(model), "max_new_tokens": max_new_tokens,
            "splits": {k: {"prompts": split_digest[k], "n": len(ps)} for k, ps in (("train", tp), ("validation", vp))}}
    record = {**want, "missing_stdlib_modules": missing_stdlib_modules()}  # why the prompts differ between machines
    meta = read_json(meta_path, "distillation data info") if meta_path.is_file() else None
    if meta is not None and (signature_mismatch(meta.get("target") or {}, want["target"])
                             or meta.get("max_new_tokens") != want["max_new_tokens"]):
        raise CelerisError(f"{data_dir} holds distillation data for another model or --max-new-tokens; "
                           "use another --out or delete it")
    if require_existing and (meta is None or meta.get("splits") != want["splits"]):
        raise CelerisError(f"the distillation data in {data_dir} was made from other prompts or none at all; pass the "
                           "same --max-prompts and --seed as the `celeris drafter train` run that made it")
    data_dir.mkdir(parents=True, exist_ok=True)
    write_json(meta_path, record)
    timing_path = data_dir / "timing.json"
    timing = read_json(timing_path, "distillation timing") if timing_path.is_file() else {}
    t0 = time.perf_counter()
    train = distill_to_shards(model, tokenizer, tp, data_dir, "train", max_new_tokens,
                              gen_batch_size, progress=progress)
    val = distill_to_shards(model, tokenizer, vp, data_dir, "validation", max_new_tokens,
                            gen_batch_size, progress=progress)
    # seconds accumulate over resumed runs (a run that only loads shards adds next to nothing)
    write_json(timing_path, {"seconds": float(timing.get("seconds", 0.0)) + time.perf_counter() - t0,
                             "train_prompts": len(tp), "eval_prompts": len(vp), "train_tokens": int((train["y"] >= 0).sum()),
                             "validation_tokens": int((val["y"] >= 0).sum())})
    return train, val


def draft_vocabulary(y: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent target ids among the labels `y` (ties by id), padded with low ids if needed."""
    counts = torch.bincount(y[y >= 0], minlength=vocab_size).float()
    counts += torch.linspace(1e-3, 0, vocab_size)  # deterministic tie-break toward low ids
    return counts.topk(min(size, vocab_size)).indices.sort().values


def vocabulary_coverage(y: torch.Tensor, draft_to_target: torch.Tensor) -> float:
    """Fraction of label tokens that the draft vocabulary can express."""
    labels = y[y >= 0]
    return float(torch.isin(labels, draft_to_target).float().mean()) if labels.numel() else 0.0


def _teacher_forced_logits(drafter: RecurrentDrafter, h: torch.Tensor, y: torch.Tensor, steps: int):
    """Logits `[steps, B, T, Vd]` and draft-vocabulary labels `[steps, B, T]` (−100 = ignored)."""
    B, T = y.shape
    yy = torch.cat([y, torch.full((B, steps), -100, dtype=y.dtype, device=y.device)], dim=1)
    h = h.float()
    state = None
    logits, labels = [], []
    for i in range(1, steps + 1):
        inp = yy[:, i - 1 : i - 1 + T]  # y_{t+i-1}: the last token the state has seen
        state = drafter.rnn_step(state, inp.clamp(min=0))
        logits.append(drafter(h, state))
        tgt = yy[:, i : i + T]
        lab = torch.where(tgt >= 0, drafter.target_to_draft[tgt.clamp(min=0)], -100)
        lab = torch.where(inp >= 0, lab, -100)
        labels.append(torch.where(lab >= 0, lab, -100))
    return torch.stack(logits), torch.stack(labels)


def drafter_loss(drafter: RecurrentDrafter, batch: dict[str, torch.Tensor], teacher: torch.Tensor | None = None,
                 kd_weight: float = 0.0, teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the 5 draft positions of the mean CE (ReDrafter's equally weighted objective).

    With `teacher` (the target's output-layer rows for the draft vocabulary, `[Vd, H]`) and `kd_weight`
    α > 0, each position's term is (1 − α)·CE + α·KL(q ‖ p): q is the target's own next-token
    distribution at that position, softmax(h_{t+i} · teacherᵀ) over the draft vocabulary, read from the
    cached hidden state that produced y_{t+i}. It also teaches positions whose greedy token the draft
    vocabulary cannot express."""
    logits, labels = _teacher_forced_logits(drafter, batch["h"], batch["y"], DRAFT_STEPS)
    ce = [F.cross_entropy(logits[i].flatten(0, 1), labels[i].flatten(), ignore_index=-100)
          if bool((labels[i] >= 0).any()) else None for i in range(DRAFT_STEPS)]
    if teacher is None or kd_weight <= 0:
        return torch.stack([c for c in ce if c is not None]).sum()
    y, h = batch["y"], batch["h"].float()
    B, T = y.shape
    pad = lambda x, fill: torch.cat([x, torch.full((B, DRAFT_STEPS, *x.shape[2:]), fill, dtype=x.dtype)], 1)  # noqa: E731
    teacher_logits = h @ teacher.t().float() + (teacher_bias.float() if teacher_bias is not None else 0.0)
    yy, teacher_logp = pad(y, -100), pad(teacher_logits.log_softmax(-1), 0.0)
    terms = []
    for i in range(1, DRAFT_STEPS + 1):
        valid = (yy[:, i : i + T] >= 0) & (yy[:, i - 1 : i - 1 + T] >= 0)
        if not bool(valid.any()):
            continue
        log_q = teacher_logp[:, i : i + T][valid]
        kl = (log_q.exp() * (log_q - logits[i - 1][valid].log_softmax(-1))).sum(-1).mean()
        c = ce[i - 1]
        terms.append(kd_weight * kl + ((1 - kd_weight) * c if c is not None else 0.0))
    return torch.stack(terms).sum()


@torch.no_grad()
def acceptance_metrics(drafter: RecurrentDrafter, data: dict[str, torch.Tensor], batch_size: int = 16) -> dict[str, Any]:
    """Per-position top-1 accuracy and the W = 1 acceptance (all of positions 1..i right) on `data`.

    Positions count from 1 = the first drafted token after the guaranteed one; labels the draft
    vocabulary cannot express count as misses. `expected_tokens_per_step_w1` = 1 + Σ_i acceptance_i.
    """
    was = drafter.training
    drafter.eval()
    hit, total, run, base_n = torch.zeros(DRAFT_STEPS), torch.zeros(DRAFT_STEPS), torch.zeros(DRAFT_STEPS), 0.0
    for b0 in range(0, len(data["y"]), batch_size):
        h, y = data["h"][b0 : b0 + batch_size], data["y"][b0 : b0 + batch_size]
        logits, _ = _teacher_forced_logits(drafter, h, y, DRAFT_STEPS)
        B, T = y.shape
        yy = torch.cat([y, torch.full((B, DRAFT_STEPS), -100, dtype=y.dtype)], dim=1)
        pred = drafter.draft_to_target[logits.argmax(-1)]  # [steps, B, T] target ids
        tgt = torch.stack([yy[:, i + 1 : i + 1 + T] for i in range(DRAFT_STEPS)])  # y_{t+i}
        base = y >= 0  # a guaranteed token exists at t
        exists = (tgt >= 0) & base
        ok = exists & (pred == tgt)
        hit += ok.flatten(1).sum(1).float()
        total += exists.flatten(1).sum(1).float()
        run += (ok.int().cumprod(0).bool() & base).flatten(1).sum(1).float()
        base_n += float(base.sum())
    drafter.train(was)
    accept = (run / max(base_n, 1.0)).tolist()
    return {"top1_per_position": (hit / total.clamp(min=1)).tolist(), "acceptance_w1": accept,
            "expected_tokens_per_step_w1": 1 + sum(accept)}


def train_drafter(
    out_dir: str | Path,
    model=None,
    tokenizer=None,
    model_name: str | None = None,
    draft_vocab_size: int = 4096,
    exit_dim: int | None = None,
    num_layers: int = 1,
    max_new_tokens: int = 128,
    max_prompts: int | None = None,
    gen_batch_size: int = 16,
    config=None,
    seed: int = 0,
    progress: bool = True,
    kd_weight: float = 0.0,
) -> dict[str, Any]:
    """Distil the target's greedy answers into a RecurrentDrafter; write it to `out_dir` (resumable).

    The distillation data is cached in `out_dir/data/` so a resumed run does not regenerate it.
    Returns a summary: training result, acceptance metrics, vocabulary coverage, sizes.
    """
    from celeris.models import load_model
    from celeris.trainer import TrainConfig

    # Every option is checked before the disk is touched: a rejected value never leaves a folder behind.
    if not 0.0 <= kd_weight <= 1.0:
        raise CelerisError(f"kd_weight must be in [0, 1], got {kd_weight}")
    cfg = config or TrainConfig(max_steps=400, batch_size=8, lr=1e-3, warmup_steps=40, weight_decay=0.0,
                                eval_every=25, eval_batches=4, patience=4, seed=seed, desc="drafter")
    cfg.validate()
    out_dir = Path(out_dir)
    check_run_dir(out_dir, DRAFTER_RUN_FILES)
    objective = out_dir / "objective.json"  # a resumed run must keep its loss (runs without the file used CE only)
    if (out_dir / "run" / "checkpoint" / "state.json").is_file():
        before = float(read_json(objective, "drafter objective").get("kd_weight", 0.0)) if objective.is_file() else 0.0
        if before != kd_weight:
            raise CelerisError(f"{out_dir} holds a run trained with kd_weight {before:g}, not {kd_weight:g}; "
                               "resume it with the same --kd-weight or use another --out")
    if model is None:
        model, tokenizer = load_model(model_name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # Stopped before anything worth resuming exists (Ctrl-C before the first distilled shard, an error):
    # a folder this call created goes away again; an older one keeps its marker and resumes.
    with run_dir(out_dir, evidence=DRAFTER_RUN_FILES):
        return _train_drafter(out_dir, model, tokenizer, draft_vocab_size, exit_dim, num_layers, max_new_tokens,
                              max_prompts, gen_batch_size, cfg, seed, progress, kd_weight)


def _train_drafter(out_dir: Path, model, tokenizer, draft_vocab_size, exit_dim, num_layers, max_new_tokens, max_prompts,
                   gen_batch_size, cfg, seed, progress, kd_weight) -> dict[str, Any]:
    from celeris.trainer import Trainer

    objective = out_dir / "objective.json"
    sig = target_signature(model)
    train, val = distillation_data(model, tokenizer, out_dir, max_new_tokens, max_prompts, gen_batch_size, seed, progress)
    train, val = {k: train[k] for k in ("h", "y")}, {k: val[k] for k in ("h", "y")}
    d2t = draft_vocabulary(train["y"], draft_vocab_size, sig["vocab_size"])
    coverage = {"train": vocabulary_coverage(train["y"], d2t), "validation": vocabulary_coverage(val["y"], d2t)}
    for k in (1024, 2048, 4096, 8192, 16384):  # the draft-vocabulary trade-off, for the report
        coverage[f"validation@{k}"] = vocabulary_coverage(val["y"], draft_vocabulary(train["y"], k, sig["vocab_size"]))
    drafter = new_drafter(model, d2t, exit_dim=exit_dim, num_layers=num_layers, seed=seed)

    n_tokens = lambda batch: int((batch["y"] >= 0).sum())  # noqa: E731
    per_token = 2 * drafter.num_parameters() * DRAFT_STEPS  # forward MACs·2 for the 5 heads
    if kd_weight > 0:  # the target's draft-vocabulary logits, once per token (no backward)
        per_token += 2 * sig["hidden_size"] * int(d2t.numel()) / 3.0

    from celeris.compute import FlopsPerToken

    fpt = FlopsPerToken(drafter.num_parameters(), drafter.num_parameters(), 3.0 * per_token, 0.0)
    head = model.get_output_embeddings()
    teacher = head.weight.detach()[d2t].float().contiguous() if kd_weight > 0 else None
    bias = head.bias.detach()[d2t].float() if kd_weight > 0 and getattr(head, "bias", None) is not None else None
    loss_fn = functools.partial(drafter_loss, teacher=teacher, kd_weight=kd_weight, teacher_bias=bias)
    trainer = Trainer(drafter, train, val, out_dir / "run", cfg, loss_fn=loss_fn, flops_per_token=fpt,
                      tokens_fn=n_tokens, export_fn=None, run_info={"target": sig, "coverage": coverage,
                                                                       "kd_weight": kd_weight})
    write_json(objective, {"kd_weight": kd_weight})
    result = trainer.train(resume=True)
    best = out_dir / "run" / "best.safetensors"
    if best.is_file():
        from safetensors.torch import load_model as st_load_model

        st_load_model(drafter, str(best))
    drafter.eval()
    metrics = acceptance_metrics(drafter, val)
    summary = {"train": result.to_dict(), "acceptance": metrics, "coverage": coverage,
               "train_sequences": int(len(train["y"])), "validation_sequences": int(len(val["y"])),
               "train_tokens": int((train["y"] >= 0).sum()), "parameters": drafter.num_parameters(),
               "draft_vocab_size": int(d2t.numel())}
    drafter.save(out_dir / "drafter", extra={"training": {k: v for k, v in summary.items() if k != "train"}
                                             | {"steps": result.steps, "stop_reason": result.stop_reason,
                                                "best_val_loss": result.best_val_loss, "seconds": result.seconds}})
    write_json(out_dir / "summary.json", summary)
    if not math.isfinite(result.best_val_loss or 0.0):
        raise CelerisError("drafter training diverged")
    return summary
