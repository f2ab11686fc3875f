"""Choose among NAMM parameter files on a validation task file, one prefill per prompt.

    python benchmarks/namm_select.py VAL.jsonl DIR [DIR ...] [--budget 0.25] [--json OUT]

Each DIR holds namm.json + namm.safetensors (a `memory evolve` output or snapshot). In the press
protocol the context's prefill does not depend on the parameters, so each prompt is prefilled once
per feature normalisation (`PrefillStore`, as evolution does) and every parameter file answers from
it: the same greedy answers as `celeris memory eval --policy namm:DIR --protocol press`
(`test_prefill_store_gives_the_press_run`), at a fraction of the cost, which is what makes a
64-prompt validation file affordable on a CPU. The full cache answers the same prompts. Prints the
mean score per kind and over kinds (as `memory eval`), and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from celeris.errors import CelerisError
from celeris.generation import eos_token_ids
from celeris.io import write_json
from celeris.memory.evaluate import check_held_out, run_policy_on_sample
from celeris.memory.evolve import PrefillStore
from celeris.memory.policies import make_policy, parse_budget
from celeris.memory.tasks import check_not_held_out, load_tasks, score_answer
from celeris.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tasks")
    ap.add_argument("dirs", nargs="+", help="NAMM parameter directories")
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    budget = parse_budget(args.budget)
    model, tok = load_model()
    eos = eos_token_ids(model, tok)
    samples = load_tasks(args.tasks)
    check_not_held_out(samples, "selection")
    policies = {d: make_policy(f"namm:{d}") for d in args.dirs}
    stores: dict[bytes, PrefillStore] = {}
    for d, p in policies.items():  # one store per feature normalisation; its policy is a copy
        check_held_out(p, samples)
        p.store_key = p.norm_mean.numpy().tobytes() + p.norm_var.numpy().tobytes()
        if p.store_key not in stores:
            stores[p.store_key] = PrefillStore(model, tok, make_policy(f"namm:{d}"))
    rows: dict[str, list[dict]] = defaultdict(list)
    for s in tqdm(samples, desc="prompts"):
        new_tokens = int(s.get("max_new_tokens", args.max_new_tokens))
        answers = {"full": run_policy_on_sample(model, tok, s, make_policy("full"), budget, "press",
                                                max_new_tokens=new_tokens, eos=eos).new_ids}
        for d, p in policies.items():
            store = stores[p.store_key]
            store.policy.set_params(p.params_vector)
            answers[d] = store.run(s, budget, new_tokens, eos)[0]
        for store in stores.values():  # one prompt's caches at a time
            store.items.clear()
            store.stacked.clear()
        for name, new in answers.items():
            pred = tok.decode(new, skip_special_tokens=True)
            rows[name].append({"id": s["id"], "task": s["task"], "prediction": pred,
                               "score": score_answer(pred, s["answers"], s["metric"])})
    results = []
    kinds = sorted({s["task"] for s in samples})
    print(f"{'parameters':<40} {'mean':>6} " + " ".join(f"{k:>18}" for k in kinds))
    for name, rs in rows.items():
        per = {k: statistics.fmean(r["score"] for r in rs if r["task"] == k) for k in kinds}
        mean = statistics.fmean(per.values())
        results.append({"policy": name, "budget": args.budget, "mean_score": mean, "per_task": per, "per_sample": rs})
        print(f"{name:<40} {mean:>6.3f} " + " ".join(f"{per[k]:>18.3f}" for k in kinds))
    if args.json:
        write_json(args.json, {"tasks": args.tasks, "budget": args.budget, "protocol": "press", "results": results})


if __name__ == "__main__":
    try:
        main()
    except CelerisError as e:  # a missing parameter file, a malformed task line, evolved-on samples
        raise SystemExit(f"error: {e}") from None
