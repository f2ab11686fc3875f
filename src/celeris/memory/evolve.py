"""Evolving NAMM's scorer with CMA-ES (pycma), as in evo-memory: no gradients, one shared vector.

Fitness of a parameter vector = mean over task kinds of (its score on a batch of training prompts) /
(the full cache's score on the same prompts); where the full cache scores 0 the raw score is used
(the spec's guard against dividing by ~0). The search starts at 0 (every score 0 = keep everything),
step size 0.065, and runs in incremental stages, each adding task kinds and starting from the
previous stage's mean. Before the first generation a calibration pass with the zero vector (which
keeps everything, so it is also the full-cache reference) collects the per-bin normalisation
statistics, which are then frozen. Every generation is checkpointed atomically (JSON + safetensors);
the same command resumes. Resume restores the mean, step size and diagonal covariance; pycma's
evolution paths restart from zero.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from celeris.errors import CelerisError
from celeris.io import atomic_dir, load_tensors, read_json, save_tensors, write_json
from celeris.memory.evaluate import check_protocol, reference_ids, run_policy_on_sample, sample_hash
from celeris.memory.policies import NAMM, Budget, NammConfig, parse_budget
from celeris.memory.presses import (
    ContextPrefill,
    answer_prefill,
    compress_prefill,
    prefill_context,
    reference_logprobs,
)
from celeris.memory.runner import attention_for
from celeris.memory.tasks import build_prompt, check_not_held_out, score_answer


@dataclass
class EvolveConfig:
    stages: list[list[str]]  # task kinds per stage (each stage adds kinds)
    generations: list[int]  # generations per stage
    population: int = 8
    sigma: float = 0.065
    budget: str = "0.25"  # 'threshold' for NAMM's native rule
    batch_per_task: int = 2  # prompts per task kind per generation
    max_new_tokens: int = 24
    seed: int = 0
    diagonal: bool = True  # sep-CMA-ES: full covariance on 4,172 dims is slow on a shared CPU
    protocol: str = "chunked"  # or "press": one-shot compression of the context (kvpress's protocol)
    fitness: str = "score"  # or "likelihood" / "both": see `fitness`
    cfg: dict = field(default_factory=lambda: asdict(NammConfig()))
    init: str | None = None  # start from these NAMM parameters (and their frozen normalisation) instead of 0


def parse_stages(text: str) -> tuple[list[list[str]], list[int]]:
    """'passkey:3;passkey,kv_uuid:2' -> ([[passkey], [passkey, kv_uuid]], [3, 2])."""
    stages, gens = [], []
    for part in text.split(";"):
        if not part.strip():
            continue
        kinds, _, g = part.partition(":")
        try:
            n = int(g) if g else 1
        except ValueError:
            raise CelerisError(f"bad stage {part!r}: expected KIND[,KIND...]:GENERATIONS") from None
        if n < 1:
            raise CelerisError(f"bad stage {part!r}: generations must be >= 1")
        stages.append([k.strip() for k in kinds.split(",") if k.strip()])
        gens.append(n)
    if not stages:
        raise CelerisError("no stages given")
    return stages, gens


FITNESS = ("score", "likelihood", "both")


class PrefillStore:
    """Each training sample's context, prefilled once for the whole evolution (press protocol only).

    In the press protocol the context is prefilled under full attention and compressed afterwards, so
    its keys, values and NAMM features do not depend on the parameters being tried (the features use
    the normalisation frozen before the first generation). Each candidate then costs a top-k over its
    BAM scores and the question + answer forward over the pruned cache, instead of a full prefill with
    attention weights and spectrograms: the same numbers (`test_prefill_store_gives_the_press_run`)."""

    def __init__(self, model, tok, policy: NAMM) -> None:
        self.model, self.tok, self.policy = model, tok, policy
        self.norm = (policy.norm_mean.clone(), policy.norm_var.clone())
        self.items: dict[str, ContextPrefill] = {}
        self.stacked: dict[str, torch.Tensor] = {}  # every layer's BAM input, `[layers * H, N, d_in]`

    def get(self, sample: dict) -> ContextPrefill:
        if not (torch.equal(self.norm[0], self.policy.norm_mean) and torch.equal(self.norm[1], self.policy.norm_var)):
            raise RuntimeError("NAMM normalisation changed after the prefills were recorded")
        key = sample_hash(sample)
        if key not in self.items:
            ids, split = build_prompt(sample, self.tok)
            self.items[key] = prefill_context(self.model, ids, split,
                                              lambda i, k, v, att, pos: self.policy.features(i, att, pos, {}))
        return self.items[key]

    def layer_scores(self, sample: dict) -> list[torch.Tensor]:
        """Each layer's NAMM scores `[H, N]` under the current parameters (every layer in one BAM call)."""
        pre = self.get(sample)
        key = sample_hash(sample)
        if key not in self.stacked:
            self.stacked[key] = torch.cat(pre.features)
        return list(self.policy.score_features(self.stacked[key]).split([x.shape[0] for x in pre.features]))

    def run(self, sample: dict, budget: Budget, max_new_tokens: int, eos, reference_ids=None) -> tuple[list[int], dict]:
        """What `run_policy_on_sample(..., protocol="press")` answers, from the stored prefill."""
        pre = self.get(sample)
        cache = compress_prefill(self.model, pre, self.layer_scores(sample), budget.fraction)
        return answer_prefill(self.model, pre, cache, max_new_tokens, eos, reference_ids)

    @torch.inference_mode()
    def likelihoods(self, sample: dict, vectors: list[torch.Tensor], budget: Budget, reference_ids) -> list[float]:
        """Per parameter vector, the probability of the reference answer (`_run_samples`' "p"), all in one
        batched forward: every vector keeps the same number of tokens, so their caches stack."""
        from transformers import DynamicCache

        pre = self.get(sample)
        caches = []
        for v in vectors:
            self.policy.set_params(v)
            caches.append(compress_prefill(self.model, pre, self.layer_scores(sample), budget.fraction))
        cache = DynamicCache(config=self.model.config)
        for i in range(len(pre.keys)):
            cache.update(torch.cat([c.layers[i].keys for c in caches]), torch.cat([c.layers[i].values for c in caches]), i)
        with attention_for(self.model, False):  # as `answer_prefill`
            lps = reference_logprobs(self.model, cache, pre.question, pre.split, reference_ids)
        return [math.exp(lp) for lp in lps]


def _run_samples(model, tok, policy, samples, budget, config: EvolveConfig, n_up, eos,
                 store: PrefillStore | None = None) -> list[dict]:
    """Per sample: {"score": task score of the greedy answer, "p": per-token probability of the reference}."""
    out = []
    for s in samples:
        rec = {}
        if store is not None:
            if config.fitness in ("score", "both"):
                new, _ = store.run(s, budget, min(config.max_new_tokens, int(s.get("max_new_tokens", config.max_new_tokens))), eos)
                rec["score"] = score_answer(tok.decode(new, skip_special_tokens=True), s["answers"], s["metric"])
            if config.fitness in ("likelihood", "both"):
                rec["p"] = math.exp(store.run(s, budget, 0, eos, reference_ids(tok, s))[1]["answer_logprob"])
            out.append(rec)
            continue
        if config.fitness in ("score", "both"):  # the shorter of the sample's answer length and the config's
            n = min(config.max_new_tokens, int(s.get("max_new_tokens", config.max_new_tokens)))
            r = run_policy_on_sample(model, tok, {**s, "max_new_tokens": n}, policy, budget, config.protocol, n_up, n, eos)
            rec["score"] = score_answer(tok.decode(r.new_ids, skip_special_tokens=True), s["answers"], s["metric"])
        if config.fitness in ("likelihood", "both"):
            r = run_policy_on_sample(model, tok, s, policy, budget, config.protocol, n_up, eos=eos, likelihood=True)
            rec["p"] = math.exp(r.extra["answer_logprob"])
        out.append(rec)
    return out


def validation_score(model, tok, policy: NAMM, samples: list[dict], budget: Budget, protocol: str, n_up: int,
                     max_new_tokens: int, eos) -> dict:
    """Greedy task score of `policy` on held-out `samples`, as `memory eval` reports it: the mean over task kinds
    of each kind's mean score (`per_task`). Each sample answers with its own `max_new_tokens`. In the press
    protocol one prefill per sample is pruned (`PrefillStore`, the same answers as a press run) and dropped."""
    per: dict[str, list[float]] = defaultdict(list)
    for i, s in enumerate(samples):
        n = int(s.get("max_new_tokens", max_new_tokens))
        if protocol == "press":
            store = PrefillStore(model, tok, policy)
            new = store.run(s, budget, n, eos)[0]
        else:
            new = run_policy_on_sample(model, tok, s, policy, budget, protocol, n_up, n, eos, seed=i).new_ids
        per[s["task"]].append(score_answer(tok.decode(new, skip_special_tokens=True), s["answers"], s["metric"]))
    per_task = {k: statistics.fmean(v) for k, v in sorted(per.items())}
    return {"mean_score": statistics.fmean(per_task.values()), "per_task": per_task}


def _digest(samples: list[dict]) -> str:
    return hashlib.sha256("".join(sorted(sample_hash(s) for s in samples)).encode()).hexdigest()[:16]


def fitness(scores: dict[str, list[dict]], full: dict[str, list[dict]]) -> float:
    """Mean over tasks of score / full-cache score on the same prompts (raw score where full is 0).

    Records come from `_run_samples`: "score" is the task score (the spec's fitness), "p" the
    geometric-mean probability of the reference answer's tokens (teacher-forced), whose ratio to the full
    cache's is a dense signal where 0/1 scores on a few prompts give CMA-ES none. With both, fitness is
    the mean of the two ratios."""
    vals = []
    for task, recs in scores.items():
        refs = full[task]
        parts = []
        for key in ("score", "p"):
            if key in recs[0]:
                got, ref = statistics.fmean(r[key] for r in recs), statistics.fmean(r[key] for r in refs)
                parts.append(got / ref if ref > 1e-7 else got)
        vals.append(statistics.fmean(parts))
    return statistics.fmean(vals)


def _save_checkpoint(out: Path, state: dict, tensors: dict[str, torch.Tensor], policy: NAMM, extra: dict) -> None:
    with atomic_dir(out / "checkpoint") as tmp:
        write_json(tmp / "evolve.json", state)
        save_tensors(tmp / "evolve.safetensors", tensors)
    policy.save(out, extra)


def evolve(model, tok, samples: list[dict], out_dir: str | Path, config: EvolveConfig, progress: bool = True,
           stop_after: int | None = None, reuse_prefill: bool = True, val_samples: list[dict] | None = None,
           val_every: int = 10) -> dict:
    """Run (or resume) the evolution; writes OUT/namm.json + namm.safetensors (the CMA-ES mean).

    In the press protocol each training context is prefilled once and reused by every candidate
    (`PrefillStore`; `reuse_prefill=False` prefills again for each, the slow way, same fitness).

    With `val_samples` (held out from the training samples), the mean is scored on them every `val_every`
    generations and after the last one (`validation_score`), and the best so far (the earliest of equals) is
    written to OUT/best/. A few training prompts per generation make a noisy fitness, so the last mean is
    often not the best one; the validation file chooses. Validation does not steer the search: a resumed
    run may add it, but not change the file."""
    import cma

    from celeris.generation import eos_token_ids

    check_not_held_out(samples, "training")
    check_not_held_out(val_samples or [], "validation")
    out = Path(out_dir)
    cfg = NammConfig(**config.cfg)
    budget = parse_budget(config.budget)
    check_protocol(config.protocol, budget)
    if config.fitness not in FITNESS:
        raise CelerisError(f"unknown fitness {config.fitness!r}; valid: {', '.join(FITNESS)}")
    eos = eos_token_ids(model, tok)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_task[s["task"]].append(s)
    for kinds in config.stages:
        for k in kinds:
            if k not in by_task:
                raise CelerisError(f"stage task {k!r} is not in the task file (has: {', '.join(sorted(by_task))})")
    used = [s for k in sorted({k for st in config.stages for k in st}) for s in by_task[k]]
    policy = NAMM(cfg=cfg)
    start = None
    if config.init is not None:
        start = NAMM.load(config.init)
        if start.cfg != cfg:
            raise CelerisError(f"--init {config.init}: its feature layout {asdict(start.cfg)} is not this evolution's "
                               f"{asdict(cfg)}")
    ck = out / "checkpoint"
    if (ck / "evolve.json").is_file():
        state = read_json(ck / "evolve.json", "evolution checkpoint")
        if state["config"] != asdict(config):
            raise CelerisError(f"{out} holds an evolution with other settings; use another --out or the same options")
        t = load_tensors(ck / "evolve.safetensors", "evolution checkpoint")
        policy.norm_mean, policy.norm_var = t["norm_mean"], t["norm_var"]
        mean, stds, sigma = t["mean"].double().numpy(), t["stds"].double().numpy(), float(state["sigma"])
        full = state["full_scores"]
    else:
        # Calibration: the zero vector keeps everything, so this pass is also the full-cache reference.
        policy.start_calibration()
        t0 = time.perf_counter()
        # Chunked: threshold mode with the zero vector keeps everything. Press: a calibrating policy's
        # press scores (collecting statistics) but compresses nothing.
        keep_all = None if config.protocol == "chunked" else Budget(fraction=1.0)
        full = {s["id"]: v for s, v in zip(used, _run_samples(model, tok, policy, tqdm(used, desc="calibration (full cache)",
                                                                                       disable=not progress, leave=False),
                                                              keep_all, config, cfg.n_up, eos), strict=False)}
        policy.finish_calibration()
        if start is not None:  # the starting parameters were tuned on their own frozen statistics: keep them
            policy.norm_mean, policy.norm_var = start.norm_mean.clone(), start.norm_var.clone()
        state = {"config": asdict(config), "generation": 0, "stage": 0, "stage_generation": 0, "history": [],
                 "full_scores": full, "calibration_seconds": time.perf_counter() - t0}
        mean = np.zeros(cfg.n_params) if start is None else start.params_vector.double().numpy().copy()
        stds, sigma = np.ones(cfg.n_params), config.sigma
    if val_samples:
        train = {sample_hash(s) for s in samples} | set(getattr(start, "meta", {}).get("train_sample_hashes", []))
        both = [s["id"] for s in val_samples if sample_hash(s) in train]
        if both:
            raise CelerisError(f"{len(both)} validation samples (e.g. {both[0]}) are training samples of this evolution "
                               "or of its --init; make the validation file with another --seed")
        done = state.get("validation")
        if done and done["file_digest"] != _digest(val_samples):
            raise CelerisError(f"{out} was validated on another file; resume with the same --val (or none)")
    store = PrefillStore(model, tok, policy) if reuse_prefill and config.protocol == "press" else None
    total = sum(config.generations)
    bar = tqdm(total=total, initial=state["generation"], desc="evolve", disable=not progress)
    done_now = 0
    while state["stage"] < len(config.stages):
        st = state["stage"]
        kinds = config.stages[st]
        if state["stage_generation"] >= config.generations[st]:
            state["stage"] += 1
            state["stage_generation"] = 0
            continue
        es = cma.CMAEvolutionStrategy(mean, sigma, {"popsize": config.population, "CMA_diagonal": config.diagonal,
                                                    "CMA_stds": stds, "seed": config.seed + 1 + state["generation"],
                                                    "verbose": -9})
        rng = random.Random(f"{config.seed}-{state['generation']}")
        batch = {k: rng.sample(by_task[k], min(config.batch_per_task, len(by_task[k]))) for k in kinds}
        t0 = time.perf_counter()
        cands = es.ask()
        fits = []
        xs = cands + [es.mean.copy()]  # the mean is evaluated too (evo-memory's prefer_mean_to_best)
        refs = {k: [full[s["id"]] for s in b] for k, b in batch.items()}
        if store is not None and config.fitness == "likelihood":  # every candidate in one forward per sample
            vecs = [torch.tensor(x, dtype=torch.float32) for x in xs]
            ps = {k: [store.likelihoods(s, vecs, budget, reference_ids(tok, s)) for s in b] for k, b in batch.items()}
            fits = [fitness({k: [{"p": p[j]} for p in v] for k, v in ps.items()}, refs) for j in range(len(xs))]
        for x in xs if not fits else []:
            policy.set_params(torch.tensor(x, dtype=torch.float32))
            scores = {k: _run_samples(model, tok, policy, b, budget, config, cfg.n_up, eos, store) for k, b in batch.items()}
            fits.append(fitness(scores, refs))
        es.tell(cands, [-f for f in fits[:-1]])  # pycma minimises
        mean, sigma = es.mean.copy(), float(es.sigma)
        stds = np.sqrt(es.sm.variances) if config.diagonal else np.sqrt(np.diag(es.sm.C))
        state["generation"] += 1
        state["stage_generation"] += 1
        state["sigma"] = sigma
        rec = {"generation": state["generation"], "stage": st + 1, "tasks": kinds, "mean_fitness_of_population":
               statistics.fmean(fits[:-1]), "best_fitness": max(fits[:-1]), "fitness_of_mean": fits[-1],
               "seconds": time.perf_counter() - t0}
        state["history"].append(rec)
        policy.set_params(torch.tensor(mean, dtype=torch.float32))
        if val_samples and (state["generation"] % val_every == 0 or state["generation"] == total):
            _validate(model, tok, policy, val_samples, budget, config, cfg.n_up, eos, state, out, used, start)
            bar.set_description(f"evolve (best val {state['validation']['best']['mean_score']:.3f})")
        _save_checkpoint(out, state, {"mean": torch.tensor(mean), "stds": torch.tensor(stds),
                                      "norm_mean": policy.norm_mean, "norm_var": policy.norm_var}, policy,
                         _extra(state, config, used, start))
        bar.update(1)
        bar.set_postfix(fit=f"{rec['best_fitness']:.3f}", mean_fit=f"{rec['fitness_of_mean']:.3f}",
                        s_per_gen=f"{rec['seconds']:.0f}")
        done_now += 1
        if stop_after is not None and done_now >= stop_after:
            break
    bar.close()
    if done_now == 0 and state["history"]:  # a finished run: rewrite OUT/namm.* from the checkpoint
        policy.set_params(torch.tensor(mean, dtype=torch.float32))
        policy.save(out, _extra(state, config, used, start))
    return state


def _validate(model, tok, policy: NAMM, val_samples, budget, config: EvolveConfig, n_up, eos, state: dict, out: Path,
              used, start) -> None:
    """Score the current mean on the validation samples; record it in `state`; keep the best in OUT/best/."""
    v = state.setdefault("validation", {"file_digest": _digest(val_samples), "samples": len(val_samples),
                                        "history": [], "best": None})
    if "full" not in v:  # the full cache on the same samples, once
        v["full"] = validation_score(model, tok, NAMM(cfg=policy.cfg), val_samples, Budget(fraction=1.0), "press", n_up,
                                     config.max_new_tokens, eos)
    rec = {"generation": state["generation"], **validation_score(model, tok, policy, val_samples, budget,
                                                                 config.protocol, n_up, config.max_new_tokens, eos)}
    v["history"].append(rec)
    if v["best"] is None or rec["mean_score"] > v["best"]["mean_score"]:
        v["best"] = rec
        with atomic_dir(out / "best") as tmp:
            policy.save(tmp, _extra(state, config, used, start))


def _extra(state: dict, config: EvolveConfig, used: list[dict], start: NAMM | None = None) -> dict:
    """What namm.json records besides the parameters: provenance, the held-out guard, the history.

    With `init`, the starting parameters' training samples join the held-out guard and their own record is kept."""
    hashes = {sample_hash(s) for s in used}
    extra: dict = {}
    if start is not None:
        meta = getattr(start, "meta", {})
        hashes |= set(meta.get("train_sample_hashes", []))
        extra["init"] = {"path": str(config.init), **{k: meta[k] for k in ("generation", "budget", "protocol", "fitness",
                                                                           "stages") if k in meta}}
    if "validation" in state:
        extra["validation"] = state["validation"]
    return {"train_sample_hashes": sorted(hashes), "generation": state["generation"],
            "budget": config.budget, "protocol": config.protocol, "fitness": config.fitness,
            "history": state["history"], "stages": config.stages, **extra}
