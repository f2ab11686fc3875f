"""Why does a NAMM parameter file fail at some context lengths? Three diagnostics, press protocol.

    python benchmarks/namm_diagnose.py stats DIR TASKS.jsonl [TASKS.jsonl ...] [--n 8]
    python benchmarks/namm_diagnose.py kept TASKS.jsonl DIR [DIR ...] [--every 3] [--budget 0.25]
    python benchmarks/namm_diagnose.py rescaled-select TASKS.jsonl DIR --ref 1090 [--json OUT]

`stats`: the per-bin mean and standard deviation of the raw EMA spectrogram (the NAMM features
before normalisation) over the first N filler-task prompts of each file, next to the statistics
frozen in DIR. Shows which context length the frozen normalisation fits.

`kept`: per prompt and parameter file, the fraction of the needle tokens (what `memory_oracle.py`
marks after the chat-template head), of the head, and of the last 64 context tokens that the top-k
keeps, averaged over layers and KV heads (and the worst layer's needle fraction).

`rescaled-select`: `namm_select.py` with every query's attention row multiplied by (keys it
sees) / REF before the features are made, so that the features of a context of any length have the
scale of a REF-token one. A test of the idea that NAMM fails at other lengths only because the
attention, and so the features, scale like 1/length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from celeris.memory.evolve import PrefillStore  # noqa: E402
from celeris.memory.policies import make_policy, parse_budget  # noqa: E402
from celeris.memory.policies import namm as namm_module  # noqa: E402
from celeris.memory.tasks import load_tasks  # noqa: E402
from celeris.models import load_model  # noqa: E402
from memory_oracle import needle_mask  # noqa: E402

FILLER_KINDS = ("passkey", "multi_needle", "variable_tracking")


def _fmt(t: torch.Tensor) -> str:
    return " ".join(f"{x:.4f}" for x in t.tolist())


def stats(args) -> None:
    model, tok = load_model()
    frozen = make_policy(f"namm:{args.dir}")
    print(f"frozen in {args.dir}\n  mean {_fmt(frozen.norm_mean)}\n  std  {_fmt(frozen.norm_var.sqrt())}")
    for f in args.tasks:
        samples = [s for s in load_tasks(f) if s["task"] in FILLER_KINDS][:: max(1, args.every)][: args.n]
        p = make_policy(f"namm:{args.dir}")
        p.start_calibration()
        store = PrefillStore(model, tok, p)
        for s in samples:
            store.get(s)
            store.items.clear()
        p.finish_calibration()
        print(f"{f} ({len(samples)} prompts)\n  mean {_fmt(p.norm_mean)}\n  std  {_fmt(p.norm_var.sqrt())}")


def kept(args) -> None:
    from kvpress.presses.scorer_press import compute_n_kept

    model, tok = load_model()
    budget = parse_budget(args.budget)
    pols = {d: make_policy(f"namm:{d}") for d in args.dirs}
    store = PrefillStore(model, tok, make_policy(f"namm:{args.dirs[0]}"))
    for d, p in pols.items():
        if not (torch.equal(p.norm_mean, store.policy.norm_mean) and torch.equal(p.norm_var, store.policy.norm_var)):
            raise SystemExit(f"{d}: another feature normalisation than {args.dirs[0]}; run them separately")
    samples = [s for s in load_tasks(args.tasks) if s["task"] in FILLER_KINDS][:: max(1, args.every)]
    for s in samples:
        marked, split = needle_mask(s, tok)
        m = marked[:split]
        n_head = int((~m).nonzero()[0])
        head = torch.zeros_like(m)
        head[:n_head] = True
        needle = m & ~head
        line = f"{s['id']:<28} N={split:5d} needle={int(needle.sum()):3d} head={n_head:3d}"
        for d, p in pols.items():
            store.policy.set_params(p.params_vector)
            fr = {"needle": [], "head": [], "last64": []}
            for sc in store.layer_scores(s):
                sc = sc.float().clone()
                sc[:, -1] = float("inf")
                idx = sc.topk(compute_n_kept(split, min(max(1.0 - budget.fraction, 0.0), 0.99)), dim=-1).indices
                k = torch.zeros(sc.shape, dtype=torch.bool).scatter_(1, idx, True)
                fr["needle"].append(float(k[:, needle].float().mean()))
                fr["head"].append(float(k[:, head].float().mean()))
                fr["last64"].append(float(k[:, -64:].float().mean()))
            line += (f" | {Path(d).name}: needle {statistics.fmean(fr['needle']):.2f} (worst layer "
                     f"{min(fr['needle']):.2f}) head {statistics.fmean(fr['head']):.2f} "
                     f"last64 {statistics.fmean(fr['last64']):.2f}")
        print(line, flush=True)
        store.items.clear()
        store.stacked.clear()


def rescaled_select(args) -> None:
    original = namm_module.NAMM.features
    ref = float(args.ref)

    def features(self, layer, attention, positions, state):
        q = attention.shape[1]
        qpos = positions[:, -1:] - q + 1 + torch.arange(q)[None, :]  # [H, Q] absolute query positions
        return original(self, layer, attention * ((qpos + 1).float() / ref)[:, :, None], positions, state)

    namm_module.NAMM.features = features
    import namm_select

    sys.argv = ["namm_select.py", args.tasks, args.dir] + (["--json", args.json] if args.json else [])
    namm_select.main()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("stats")
    a.add_argument("dir")
    a.add_argument("tasks", nargs="+")
    a.add_argument("--n", type=int, default=8)
    a.add_argument("--every", type=int, default=6, help="take every k-th filler-task prompt")
    b = sub.add_parser("kept")
    b.add_argument("tasks")
    b.add_argument("dirs", nargs="+")
    b.add_argument("--every", type=int, default=3)
    b.add_argument("--budget", default="0.25")
    c = sub.add_parser("rescaled-select")
    c.add_argument("tasks")
    c.add_argument("dir")
    c.add_argument("--ref", type=float, required=True)
    c.add_argument("--json")
    args = ap.parse_args()
    {"stats": stats, "kept": kept, "rescaled-select": rescaled_select}[args.cmd](args)


if __name__ == "__main__":
    main()
