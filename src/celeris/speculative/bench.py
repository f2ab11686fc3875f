"""`celeris bench speculative`: ReDrafter against Hugging Face's own decoders, side by side in one process.

Engines (greedy, batch 1, the same prompts, in the same process):
- `hf-generate`: `model.generate(do_sample=False)`, the reference for `speedup`;
- `hf-prompt-lookup`: `model.generate(prompt_lookup_num_tokens=10, max_matching_ngram_size=2)`;
- `hf-assisted`: `model.generate(assistant_model=...)`, only when `--assistant` names a same-tokenizer model;
- `hf-prompt-lookup+skinny`, `hf-assisted+skinny`: the same HF calls inside `celeris.skinny.skinny_linear`, the
  CPU matmul form ReDrafter's verify uses, so the comparison with them isolates the drafting algorithm;
- `celeris-plain`: `celeris.generation.decode`, our own loop over the same cache (the overhead floor);
- `redrafter-w{W}-l{L}`: `redrafter_decode` at each requested beam width W and length L;
- `redrafter-w1-l{L}-adaptive`: one beam drafted L long, each step verifying the prefix length that
  `choose_length` picks (the CPU default of `celeris generate --drafter`).

`hf-generate` and `celeris-plain` always run (the two plain-decoding baselines every ratio is taken against).
Each engine answers every prompt once as warm-up (and the identity check), then `repeats` times (default 5),
interleaved: prompt by prompt, every engine in turn, the order rotated per prompt, so load drift on
the machine falls on all engines alike. tokens/s is total new tokens over total seconds per repeat; the JSON
gives the median, min, max and every repeat's figure, and each ratio (`speedup` over hf-generate,
`vs_celeris_plain`) repeat by repeat, as a median with min–max. Target steps are counted with a forward hook
(prefill excluded); every output is compared with plain greedy decoding. The JSON carries the environment
record (commit, machine, versions, sha256 of the model, drafter and prompt files).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch

from celeris.errors import CelerisError
from celeris.io import iter_jsonl
from celeris.report import REPEATS, check_repeats, environment, format_spread, ratio, spread
from celeris.skinny import skinny_linear
from celeris.validate import check_messages


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Lines `{"prompt": "..."}` or `{"messages": [...]}`; a clear error names the bad line."""
    path = Path(path)
    rows = []
    for n, obj in iter_jsonl(path, "prompt file"):
        if not (isinstance(obj.get("prompt"), str) and obj["prompt"].strip()
                or isinstance(obj.get("messages"), list) and obj["messages"]):
            raise CelerisError(f"{path}:{n}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}")
        if "messages" in obj:
            check_messages(obj["messages"], f"{path}:{n}")
        rows.append(obj)
    if not rows:
        raise CelerisError(f"the prompt file {path} is empty")
    return rows


def encode_row(tokenizer, row: dict[str, Any]) -> torch.Tensor:
    from celeris.generation import encode_prompt

    if "messages" in row:
        if not getattr(tokenizer, "chat_template", None):
            raise CelerisError("a prompt line has 'messages' but this tokenizer has no chat template")
        text = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return encode_prompt(tokenizer, row["prompt"])


class _ForwardCounter:
    """Counts forwards of the target's decoder (prefill included; subtract one per prompt)."""

    def __init__(self, model) -> None:
        self.n = 0
        self.handle = model.get_decoder().register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.n += 1

    def close(self) -> None:
        self.handle.remove()


def run_speculative_benchmark(
    model,
    tokenizer,
    prompts: list[dict[str, Any]],
    drafter=None,
    configs: list[tuple[int, int] | tuple[int, int, bool]] = ((1, 5), (2, 5), (4, 5)),
    max_new_tokens: int = 128,
    repeats: int = REPEATS,
    assistant=None,
    engines: list[str] | None = None,
    progress: bool = True,
    artifacts: dict[str, Any] | None = None,
    prompt_source: str = "given by the caller",
) -> dict[str, Any]:
    """Run every engine on every prompt; returns `{"engines": [...], "settings": {...}, "environment": {...}}`.

    `artifacts` (`{name: path}`, e.g. the drafter directory and the prompt file) are hashed into the environment
    record next to the target model; `prompt_source` names the prompt split in the settings."""
    from celeris.generation import decode, eos_token_ids, sync_device
    from celeris.speculative.decoding import SpeculativeStats, check_beam_settings, redrafter_decode

    configs = [(c[0], c[1], bool(c[2]) if len(c) > 2 else False) for c in configs]
    for w, l_, _ in configs:
        check_beam_settings(w, l_)
    check_repeats(repeats)
    eos = eos_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    inputs = [encode_row(tokenizer, r).to(device) for r in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)

    def hf(extra, skinny: bool = False):
        def run(ids):
            with contextlib.ExitStack() as stack:
                if skinny:  # the same CPU matmul form ReDrafter's verify uses, for HF's own verify forwards
                    for m in (model, extra.get("assistant_model")):
                        if m is not None:
                            stack.enter_context(skinny_linear(m))
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad, eos_token_id=eos or None, **extra)
            return out[0, ids.shape[1]:], None
        return run

    def plain(ids):
        return decode(model, ids, max_new_tokens, eos_ids=eos), None

    def redrafter(w, l_, adaptive):
        def run(ids):
            st = SpeculativeStats()
            return redrafter_decode(model, drafter, ids, max_new_tokens, beam_width=w, beam_length=l_, eos_ids=eos, stats=st,
                                    adaptive=adaptive)[0], st
        return run

    lookup = {"prompt_lookup_num_tokens": 10, "max_matching_ngram_size": 2}
    on_cpu = device.type == "cpu" and next(model.parameters()).dtype == torch.float32  # where the skinny form applies
    table: list[tuple[str, Any]] = [("hf-generate", hf({})), ("hf-prompt-lookup", hf(lookup))]
    table += [("hf-prompt-lookup+skinny", hf(lookup, skinny=True))] if on_cpu else []
    skipped = {} if on_cpu else {"+skinny engines": "the skinny matmul form is for CPU float32 only; here they would equal the plain HF engines"}
    if assistant is not None:
        table.append(("hf-assisted", hf({"assistant_model": assistant})))
        table += [("hf-assisted+skinny", hf({"assistant_model": assistant}, skinny=True))] if on_cpu else []
    else:
        skipped["hf-assisted"] = "no same-tokenizer draft model given (--assistant); not run"
    table.append(("celeris-plain", plain))
    if drafter is not None:
        table += [(engine_name(w, l_, a), redrafter(w, l_, a)) for w, l_, a in configs]
    if engines:  # the two plain-decoding baselines always run: every ratio is taken against them
        table = [t for t in table if t[0] in engines or t[0] in ("hf-generate", "celeris-plain")]

    with torch.inference_mode():
        reference = [decode(model, ids, max_new_tokens, eos_ids=eos) for ids in inputs]  # plain greedy
    from tqdm.auto import tqdm

    names = [name for name, _ in table]
    identical = dict.fromkeys(names, True)
    bar = tqdm(total=len(table) * len(inputs) * (1 + repeats), desc="bench speculative", unit="run", disable=not progress)
    with torch.inference_mode():
        for name, fn in table:  # warm-up, and the identity check
            bar.set_postfix(stage="warm-up", engine=name)
            for ids, ref in zip(inputs, reference, strict=True):
                out, _ = fn(ids)
                identical[name] &= torch.equal(out.cpu(), ref.cpu())
                bar.update()
    # Timed runs interleaved: prompt by prompt, every engine in turn (the order rotated per prompt), so a
    # change in the machine's load during the run falls on all engines alike.
    acc = {n: {"secs": [0.0] * repeats, "tokens": [0] * repeats, "steps": 0, "draft": 0.0, "verify": 0.0,
               "packed": 0, "unpacked": 0} for n in names}
    counter = _ForwardCounter(model)
    try:
        with torch.inference_mode():
            for r in range(repeats):
                bar.set_postfix(stage=f"repeat {r + 1}/{repeats}")
                for i, ids in enumerate(inputs):
                    k = (i + r) % len(table)
                    for name, fn in table[k:] + table[:k]:
                        a = acc[name]
                        counter.n = 0
                        sync_device(device)
                        t0 = time.perf_counter()
                        out, st = fn(ids)
                        sync_device(device)
                        a["secs"][r] += time.perf_counter() - t0
                        a["tokens"][r] += out.numel()
                        a["steps"] += counter.n - 1  # the prefill is not a step
                        if st is not None:
                            a["draft"] += st.draft_seconds
                            a["verify"] += st.verify_seconds
                            a["packed"] += st.packed_tokens
                            a["unpacked"] += st.unpacked_tokens
                        bar.update()
    finally:
        counter.close()
        bar.close()
    results = []
    for name in names:
        a = acc[name]
        rates = [n / s for n, s in zip(a["tokens"], a["secs"], strict=True)]
        new_tokens, total_s, steps = sum(a["tokens"]), sum(a["secs"]), a["steps"]
        rec = {"name": name, "tokens_per_second": spread(rates),
               # every step commits ≥ 1 token and the prefill's token is the first one
               "tokens_per_step": (new_tokens - repeats * len(inputs)) / steps if steps else None,
               "identical_to_greedy": bool(identical[name]), "new_tokens_per_repeat": new_tokens // repeats}
        if a["unpacked"]:
            rec.update(draft_seconds=a["draft"] / repeats, verify_seconds=a["verify"] / repeats,
                       draft_fraction=a["draft"] / total_s, verify_fraction=a["verify"] / total_s,
                       packed_tokens=a["packed"] // repeats, unpacked_tokens=a["unpacked"] // repeats,
                       packing_saving=1 - a["packed"] / a["unpacked"])
        results.append(rec)
        if progress:
            click.echo(f"  {name}: {format_spread(rec['tokens_per_second'])} tokens/s, identical={identical[name]}", err=True)
    base = results[0]["tokens_per_second"]
    plain_rate = next(r["tokens_per_second"] for r in results if r["name"] == "celeris-plain")
    for r in results:  # repeat by repeat: the engines were timed in the same passes
        r["speedup"] = ratio(r["tokens_per_second"], base)
        r["vs_celeris_plain"] = ratio(r["tokens_per_second"], plain_rate)
    return {"environment": environment({"model": model, **(artifacts or {})}), "engines": results, "skipped": skipped,
            "settings": {"max_new_tokens": max_new_tokens, "repeats": repeats, "warmup_passes": 1, "prompts": len(prompts),
                         "prompt_source": prompt_source, "batch_size": 1,
                         "greedy": True, "threads": torch.get_num_threads(), "configs": [list(c) for c in configs],
                         "peer_settings": {"hf-prompt-lookup": lookup, "hf-assisted": "the assistant's own generation config "
                                           "(transformers' defaults: num_assistant_tokens 20, schedule constant)"},
                         "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                         "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}}


def format_table(res: dict[str, Any]) -> str:
    n = res["settings"]["repeats"]
    lines = [f"median (min-max) of {n} repeat{'s' * (n > 1)} after a warm-up; ratios repeat by repeat",
             f"{'engine':<26}{'tokens/s':>20}{'vs hf-generate':>20}{'vs celeris-plain':>20}{'tok/step':>10}"
             f"{'packed/unpacked':>17}{'draft%':>8}  identical"]
    for r in res["engines"]:
        tps = f"{r['tokens_per_step']:.2f}" if r.get("tokens_per_step") is not None else "-"
        pk = f"{r['packed_tokens']}/{r['unpacked_tokens']}" if "packed_tokens" in r else "-"
        dr = f"{100 * r['draft_fraction']:.0f}%" if "draft_fraction" in r else "-"
        lines.append(f"{r['name']:<26}{format_spread(r['tokens_per_second']):>20}{format_spread(r['speedup'], 2):>20}"
                     f"{format_spread(r['vs_celeris_plain'], 2):>20}{tps:>10}{pk:>17}{dr:>8}  {r['identical_to_greedy']}")
    for k, why in res.get("skipped", {}).items():
        lines.append(f"{k:<22}skipped: {why}")
    return "\n".join(lines)


def not_identical(res: dict[str, Any]) -> list[str]:
    """Engines whose greedy output must equal plain decoding and did not, on some prompt.

    Celeris guarantees identity for `hf-generate`, `celeris-plain` and every ReDrafter engine; HF's prompt
    lookup and assisted generation (and their `+skinny` forms) are reported but not held to it: they verify
    several tokens per forward, whose float rounding can flip a near tie (docs/speculative.md).
    """
    return [e["name"] for e in res["engines"] if not e["identical_to_greedy"]
            and (e["name"] in ("hf-generate", "celeris-plain") or e["name"].startswith("redrafter-"))]


def engine_name(w: int, l_: int, adaptive: bool = False) -> str:
    return f"redrafter-w{w}-l{l_}" + ("-adaptive" if adaptive else "")


def parse_configs(text: str) -> list[tuple[int, int, bool]]:
    """'1x5,4x5,1x6a' -> [(1, 5, False), (4, 5, False), (1, 6, True)] (beam width x beam length; a trailing
    'a' makes the length adaptive, up to L, one beam only)."""
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        adaptive = p.endswith("a")
        try:
            w, l_ = (int(x) for x in p.removesuffix("a").split("x"))
        except ValueError:
            raise CelerisError(f"bad --configs entry {part!r}: expected WxL or WxLa (adaptive), e.g. 4x5 or 1x6a") from None
        if adaptive and w != 1:
            raise CelerisError(f"bad --configs entry {part!r}: an adaptive length needs beam width 1")
        out.append((w, l_, adaptive))
    return out


@click.command()
@click.option("--model", "-m", default=None, help="Target model (default: SmolLM2-135M-Instruct).")
@click.option("--drafter", "drafter_dir", default=None, help="Drafter directory (default: the shipped one for the default model).")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(path_type=Path),
              help="JSONL of {\"prompt\"} or {\"messages\"} lines (default: the built-in held-out prompts).")
@click.option("--max-new-tokens", "-n", default=128, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--configs", default="1x6a,1x3,1x4,2x3", show_default=True,
              help="ReDrafter beam width x length settings; a trailing 'a' (e.g. 1x6a) adapts the length per step, up to L.")
@click.option("--repeats", default=REPEATS, show_default=True, type=click.IntRange(1, 1000),
              help="Timed passes after the warm-up pass; figures are their median with min-max.")
@click.option("--assistant", default=None, help="A same-tokenizer draft model for hf-assisted (directory or id).")
@click.option("--limit", default=None, type=click.IntRange(1, 10**6), help="Use only the first N prompts.")
@click.option("--engines", default=None, help="Comma-separated subset of engines to run (hf-generate and celeris-plain always run): "
              "hf-prompt-lookup, hf-prompt-lookup+skinny, hf-assisted, hf-assisted+skinny, celeris-plain, and "
              "redrafter-wW-lL[-adaptive] for each --configs entry.")
@click.option("--device", default="auto", show_default=True, help="auto (the GPU when there is one), cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True, help="Weights of the target, assistant and drafter: float32, bfloat16 or float16.")
@click.option("--json", "json_out", default=None, type=click.Path(path_type=Path), help="Write the results here.")
def bench_speculative(model, drafter_dir, prompts_file, max_new_tokens, configs, repeats, assistant, limit, engines,
                      device, dtype, json_out) -> None:
    """ReDrafter vs HF generate, prompt lookup and assisted generation (greedy, batch 1, one process).

    Exits with status 1 when HF generate, celeris-plain or a ReDrafter engine is not token-identical to plain
    greedy decoding on every prompt (after printing the table and writing --json).
    """
    from celeris.io import check_output_path, save_results
    from celeris.models import check_context_limit, load_model, parse_dtype, resolve_device
    from celeris.speculative.decoding import check_beam_settings
    from celeris.speculative.drafter import load_drafter
    from celeris.speculative.prompts import EVAL_PROMPTS

    cfgs = parse_configs(configs)
    for w, l_, _ in cfgs:
        check_beam_settings(w, l_)
    if json_out is not None:
        check_output_path(json_out, "file", "--json", inputs=[prompts_file])
    if engines is not None:
        known = ["hf-generate", "hf-prompt-lookup", "hf-prompt-lookup+skinny", "hf-assisted", "hf-assisted+skinny",
                 "celeris-plain", *(engine_name(w, l_, a) for w, l_, a in cfgs)]
        unknown = [e for e in engines.split(",") if e.strip() not in known]
        if unknown:
            raise CelerisError(f"unknown engine(s) {', '.join(map(repr, unknown))} in --engines; valid: {', '.join(known)}")
    rows = load_prompts(prompts_file) if prompts_file else [{"prompt": p} for p in EVAL_PROMPTS]
    rows = rows[:limit] if limit else rows
    dev, dt = resolve_device(device), parse_dtype(dtype)
    m, tok = load_model(model, dtype=dt, device=dev)
    for i, r in enumerate(rows, 1):  # before any compute: every prompt + its answer fits the context
        try:
            check_context_limit(m.config, encode_row(tok, r).shape[1], max_new_tokens)
        except CelerisError as exc:
            raise CelerisError(f"prompt {i}: {exc}") from None
    d = load_drafter(drafter_dir or default_drafter_dir(), m).to(dt)
    a = load_model(assistant, dtype=dt, device=dev)[0] if assistant else None
    drafter_path = Path(drafter_dir) if drafter_dir else default_drafter_dir()
    source = (f"the prompt file {prompts_file}" if prompts_file else
              "benchmark split (celeris.speculative.prompts.EVAL_PROMPTS), disjoint from the validation prompts settings are chosen on")
    res = run_speculative_benchmark(m, tok, rows, d, cfgs, max_new_tokens, repeats, a,
                                    engines=[e.strip() for e in engines.split(",")] if engines else None,
                                    artifacts={"drafter": drafter_path, "assistant": a, "prompts": prompts_file},
                                    prompt_source=source + (f", first {limit}" if limit else ""))
    click.echo(format_table(res))
    if json_out:
        save_results(json_out, res)
        click.echo(f"wrote {json_out}", err=True)
    bad = not_identical(res)
    if bad:
        click.echo(f"error: not identical to plain greedy decoding: {', '.join(bad)}", err=True)
        sys.exit(1)


def default_drafter_dir() -> Path:
    """The drafter shipped for the default model."""
    return Path(__file__).resolve().parent.parent / "artifacts" / "speculative"
