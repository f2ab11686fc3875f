"""Upper bound for a 25 % KV budget on the filler-haystack tasks: an oracle that knows where the needles are.

    python benchmarks/memory_oracle.py TASKS.jsonl [--budget 0.25] [--json OUT]

The oracle keeps, in the press protocol (one-shot compression of the context after a full-attention
prefill, like every kvpress press), the chat-template head and every context sentence that is not one
of the task generator's filler sentences (the instruction, the pass key, the needles, the variable
assignments), then fills the rest of the budget with the most recent tokens. It is not a policy anyone
can deploy: it reads the task text. It answers one question: does the model still answer when the
right 25 % is kept? If it does, the gap between a policy and the full cache is the policy's, not the
budget's. kv_uuid has no filler and is skipped.
"""

from __future__ import annotations

import argparse
import re
import statistics

import torch

from celeris.generation import eos_token_ids
from celeris.io import write_json
from celeris.memory.evaluate import run_policy_on_sample
from celeris.memory.policies import parse_budget
from celeris.memory.policies.base import MemoryPolicy
from celeris.memory.tasks import build_prompt, load_tasks, score_answer
from celeris.models import load_model

FILLER = {"The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."}


class NeedleOracle(MemoryPolicy):
    """Score 1 for marked tokens, then recency (ties broken towards the newest)."""

    name = "needle-oracle"

    def __init__(self) -> None:
        self.marked = torch.zeros(0, dtype=torch.bool)

    def score(self, layer, keys, values, attention, positions, state) -> torch.Tensor:
        pos = positions.long()
        return (self.marked[pos].float() + 1e-6 * pos.float()).expand(keys.shape[0], -1)


def needle_mask(sample: dict, tok) -> tuple[torch.Tensor, int]:
    ids, split = build_prompt(sample, tok)
    text = tok.decode(ids[0])
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    if enc["input_ids"] != ids[0].tolist():
        raise SystemExit(f"{sample['id']}: the prompt does not re-tokenise to the same ids")
    c0 = text.index(sample["context"])
    spans = [(0, c0)] + [(c0 + m.start(), c0 + m.end()) for m in re.finditer(r"[^.]*\.", sample["context"])
                         if m.group().strip() and m.group().strip() not in FILLER]
    marked = torch.tensor([any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]])
    return marked, split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tasks")
    ap.add_argument("--budget", default="0.25")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, tok = load_model(None)
    eos = eos_token_ids(model, tok)
    oracle, budget = NeedleOracle(), parse_budget(args.budget)
    rows = []
    for s in load_tasks(args.tasks):
        if s["task"] == "kv_uuid":
            continue
        oracle.marked, split = needle_mask(s, tok)
        r = run_policy_on_sample(model, tok, s, oracle, budget, protocol="press", eos=eos)
        pred = tok.decode(r.new_ids, skip_special_tokens=True)
        rows.append({"id": s["id"], "task": s["task"], "score": score_answer(pred, s["answers"], s["metric"]),
                     "marked_context_tokens": int(oracle.marked[:split].sum()), "context_tokens": split,
                     "kv_bytes_ratio": r.kv_bytes_ratio, "prediction": pred[:60], "answers": s["answers"]})
        print(f"{s['id']:<32} marked {rows[-1]['marked_context_tokens']:>4}/{split:<5} score {rows[-1]['score']:.0f}  "
              f"{pred[:40]!r}", flush=True)
    by_task = {t: statistics.fmean(r["score"] for r in rows if r["task"] == t) for t in sorted({r["task"] for r in rows})}
    print("per kind:", {t: round(v, 3) for t, v in by_task.items()})
    if args.json:
        write_json(args.json, {"budget": args.budget, "protocol": "press", "per_task": by_task, "samples": rows})


if __name__ == "__main__":
    main()
