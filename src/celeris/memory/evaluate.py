"""`memory eval` and `bench memory`: every policy and press on the same samples, prompts and budgets.

Two protocols (spec, pitfall 2). `chunked` (NAMM's): chunked prefill, eviction every n_up tokens
through the whole prompt and the answer, so later chunks already see a compressed cache. `press`
(kvpress's): full-attention prefill of the context, compressed once, then question + answer over the
compressed cache. kvpress presses run only the press protocol; Celeris policies run both (in the
press protocol they are wrapped as a kvpress `ScorerPress` and go through the very same code). Scores use the task file's metric per sample;
`mean_score` is the mean over task kinds of the per-kind mean. A sample's own "max_new_tokens"
(LongBench's per-dataset answer length) overrides the command's default.

Speed: `tokens_per_second` (prompt + answer tokens over seconds, all samples together) is a spread
(`celeris.report.spread`). With `repeats` (what `bench memory` does, default 5), each sample's scored run is
the warm-up and the same run is timed `repeats` more times; figure k is all samples' tokens over their k-th
timed runs. Without (`memory eval`), it is the scored run alone: one run, and the spread says so.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import defaultdict
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from celeris.errors import CelerisError
from celeris.memory.policies import DEFAULT_NAMM, NAMM, Budget, make_policy, parse_budget
from celeris.memory.presses import PRESSES, make_press, policy_press, run_with_press
from celeris.memory.runner import MemoryResult, run_with_memory
from celeris.memory.tasks import build_prompt, score_answer
from celeris.report import REPEATS, check_repeats, environment, format_spread, spread


def sample_hash(sample: dict) -> str:
    return hashlib.sha1((sample["context"] + "\x00" + sample["input"]).encode("utf-8")).hexdigest()[:16]


def check_held_out(policy, samples: list[dict]) -> None:
    """NAMM parameters record the samples they were evolved on; evaluating on them is an error."""
    train = set(getattr(policy, "meta", {}).get("train_sample_hashes", []))
    used = [s["id"] for s in samples if sample_hash(s) in train]
    if used:
        raise CelerisError(f"{len(used)} evaluation samples (e.g. {used[0]}) were used to evolve these NAMM parameters; "
                           "evaluate on a task file made with another --seed")


def _summary(name: str, budget: str, kind: str, rows: list[dict]) -> dict:
    per_task: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        per_task[r["task"]].append(r["score"])
    per_task_mean = {k: statistics.fmean(v) for k, v in sorted(per_task.items())}
    tokens = sum(r["tokens"] for r in rows)
    timed = min((len(r.get("timed_seconds", ())) for r in rows), default=0)
    secs = ([sum(r["timed_seconds"][k] for r in rows) for k in range(timed)] if timed
            else [sum(r["seconds"] for r in rows)])
    return {"policy": name, "kind": kind, "budget": budget,
            "mean_score": statistics.fmean(per_task_mean.values()) if per_task_mean else 0.0,
            "kv_bytes_ratio": statistics.fmean(r["kv_bytes_ratio"] for r in rows),
            "per_task": per_task_mean,
            "kept_fraction": statistics.fmean(r["kept_fraction"] for r in rows),
            "peak_kv_bytes": statistics.fmean(r["peak_kv_bytes"] for r in rows),
            "tokens_per_second": spread([tokens / s if s > 0 else 0.0 for s in secs]),
            "timed_runs": timed or "the scored run only", "samples": len(rows), "per_sample": rows}


def _row(sample: dict, res: MemoryResult, tok) -> dict:
    pred = tok.decode(res.new_ids, skip_special_tokens=True)
    return {"id": sample["id"], "task": sample["task"], "score": score_answer(pred, sample["answers"], sample["metric"]),
            "prediction": pred, "kv_bytes_ratio": res.kv_bytes_ratio, "kept_fraction": res.kept_fraction,
            "peak_kv_bytes": res.peak_kv_bytes, "end_kv_bytes": res.end_kv_bytes, "seconds": res.seconds,
            "tokens": res.prompt_tokens + len(res.new_ids)}


PROTOCOLS = ("press", "chunked")


def check_protocol(protocol: str, budget: Budget | None = None, check_budget: bool = True) -> None:
    if protocol not in PROTOCOLS:
        raise CelerisError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)} "
                           "(chunked = NAMM's eviction every n_up tokens; press = kvpress's one-shot compression of the context)")
    if check_budget and protocol == "press" and (budget is None or budget.fraction is None):
        raise CelerisError("the press protocol compresses the context to a fraction: give --budget in (0, 1]")


def reference_ids(tok, sample: dict) -> torch.Tensor:
    """The first reference answer's tokens `[1, R]`, as the likelihood fitness feeds them."""
    return tok(" " + sample["answers"][0], add_special_tokens=False, return_tensors="pt")["input_ids"]


def run_policy_on_sample(model, tok, sample: dict, policy, budget: Budget | None, protocol: str = "chunked",
                         n_up: int = 128, max_new_tokens: int = 24, eos=(), seed: int = 0,
                         likelihood: bool = False) -> MemoryResult:
    """One sample under a Celeris policy, in either protocol (see the module docstring).

    `likelihood=True` feeds the first reference answer instead of generating (`extra["answer_logprob"]`)."""
    ids, split = build_prompt(sample, tok)
    ref = reference_ids(tok, sample) if likelihood else None
    new_tokens = int(sample.get("max_new_tokens", max_new_tokens))
    if protocol == "press":
        policy.reset(seed)
        press = None if getattr(policy, "keeps_all", False) else policy_press(policy, budget.fraction)
        return run_with_press(model, ids, split, press, new_tokens, eos, reference_ids=ref)
    return run_with_memory(model, ids, policy, budget, n_up=n_up, max_new_tokens=new_tokens, eos_ids=eos, seed=seed,
                           reference_ids=ref)


def evaluate_policy(model, tok, samples: list[dict], policy, budget: Budget | None, n_up: int = 128,
                    max_new_tokens: int = 24, name: str | None = None, progress: bool = False,
                    protocol: str = "chunked", repeats: int | None = None) -> dict:
    """Run one Celeris policy on every sample; returns the `eval` JSON object. `repeats`: time each sample's run
    that many more times after the scored one (see the module docstring)."""
    from celeris.generation import eos_token_ids

    if repeats is not None:
        check_repeats(repeats)
    if isinstance(policy, str):
        policy = make_policy(policy)
    check_protocol(protocol, budget if not getattr(policy, "keeps_all", False) else Budget(fraction=1.0))
    if isinstance(policy, NAMM):
        check_held_out(policy, samples)
    eos = eos_token_ids(model, tok)
    rows = []
    for i, s in enumerate(tqdm(samples, desc=f"{name or policy.name} ({protocol})", disable=not progress, leave=False)):
        res = run_policy_on_sample(model, tok, s, policy, budget, protocol, n_up, max_new_tokens, eos, seed=i)
        rows.append(_row(s, res, tok))
        if repeats:  # the same run again (seeded, greedy): only its time is kept
            rows[-1]["timed_seconds"] = [run_policy_on_sample(model, tok, s, policy, budget, protocol, n_up, max_new_tokens,
                                                              eos, seed=i).seconds for _ in range(repeats)]
    out = _summary(name or policy.name, str(budget) if budget else "threshold", "celeris", rows)
    out["protocol"] = protocol
    return out


def evaluate_press(model, tok, samples: list[dict], press_name: str, budget: float, max_new_tokens: int = 24,
                   progress: bool = False, repeats: int | None = None) -> dict:
    """One kvpress press (its own default settings, kvpress's protocol) on every sample; `repeats` as in
    `evaluate_policy`."""
    from celeris.generation import eos_token_ids

    if repeats is not None:
        check_repeats(repeats)
    eos = eos_token_ids(model, tok)
    rows = []
    for s in tqdm(samples, desc=press_name, disable=not progress, leave=False):
        ids, split = build_prompt(s, tok)
        n_new = int(s.get("max_new_tokens", max_new_tokens))
        res = run_with_press(model, ids, split, make_press(press_name, budget), n_new, eos)
        rows.append(_row(s, res, tok))
        if repeats:
            rows[-1]["timed_seconds"] = [run_with_press(model, ids, split, make_press(press_name, budget), n_new, eos).seconds
                                         for _ in range(repeats)]
    out = _summary(press_name, f"{budget:g}", "kvpress", rows)
    out["protocol"] = "press"
    return out


def bench_memory(model, tok, samples: list[dict], budgets: Iterable[float], policies: Iterable[str] | None = None,
                 presses: Iterable[str] | None = None, n_up: int = 128, max_new_tokens: int = 24,
                 progress: bool = True, protocols: Iterable[str] = PROTOCOLS, repeats: int | None = REPEATS,
                 artifacts: dict | None = None) -> dict:
    """The full cache once, then every policy (in each protocol) and press at every budget, on the same samples;
    each sample's run timed `repeats` more times after its scored run (`None`: the scored runs only, for the demo's
    time budget). The result carries the environment record with the model, every NAMM parameter directory used
    and `artifacts` (e.g. the task file) hashed."""
    if repeats is not None:
        check_repeats(repeats)
    budgets = [float(b) for b in budgets]
    protocols = list(protocols)
    for b in budgets:
        if not 0 < b <= 1:
            raise CelerisError(f"budgets must be fractions in (0, 1], got {b}")
    for pr in protocols:
        check_protocol(pr, check_budget=False)
    policies = list(policies if policies is not None else ["streaming_llm", "l2", "h2o", "random", "namm"])
    presses = list(presses if presses is not None else PRESSES)
    pols = {p: make_policy(p) for p in policies}  # fail early on a bad name
    for p in presses:
        if p not in PRESSES:
            raise CelerisError(f"unknown press {p!r}; valid: {', '.join(PRESSES)}")
    results = [evaluate_policy(model, tok, samples, "full", None, n_up, max_new_tokens, progress=progress, repeats=repeats)]
    results[0]["budget"] = "1"
    for b in budgets:
        for pr in protocols:
            for name, pol in pols.items():
                results.append(evaluate_policy(model, tok, samples, pol, parse_budget(b), n_up, max_new_tokens,
                                               name=name, progress=progress, protocol=pr, repeats=repeats))
        for p in presses:
            results.append(evaluate_press(model, tok, samples, p, b, max_new_tokens, progress=progress, repeats=repeats))
    namm_dirs = {f"namm ({p})": DEFAULT_NAMM if p == "namm" else p.split(":", 1)[1] for p in policies
                 if p == "namm" or p.startswith("namm:")}
    return {"environment": environment({"model": model, **namm_dirs, **(artifacts or {})}),
            "results": results, "samples": len(samples), "tasks": sorted({s["task"] for s in samples}),
            "budgets": budgets, "protocols": protocols, "n_up": n_up, "max_new_tokens": max_new_tokens,
            "repeats": repeats, "press_settings": "kvpress's own defaults; compression_ratio = 1 - budget"}


def format_table(results: list[dict]) -> str:
    kinds = sorted({k for r in results for k in r["per_task"]})
    head = f"{'method':<24}{'protocol':>9}{'budget':>9}{'mean':>7}{'kv/full':>9}{'tok/s (min-max)':>20}  " + " ".join(f"{k[:10]:>10}" for k in kinds)
    lines = [head, "-" * len(head)]
    for r in results:
        name = ("kvpress:" if r["kind"] == "kvpress" else "") + r["policy"]
        lines.append(f"{name:<24}{r.get('protocol', ''):>9}{r['budget']:>9}{r['mean_score']:>7.3f}{r['kv_bytes_ratio']:>9.3f}"
                     f"{format_spread(r['tokens_per_second']):>20}  " + " ".join(f"{r['per_task'].get(k, float('nan')):>10.3f}" for k in kinds))
    return "\n".join(lines)
