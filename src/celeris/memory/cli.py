"""CLI recipes: `celeris tasks make`, `celeris memory eval|evolve`, `celeris bench memory`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from celeris.errors import CelerisError
from celeris.report import REPEATS
from celeris.validate import FiniteFloatRange


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CelerisError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not out:  # an empty list would silently mean "the defaults"
        raise CelerisError(f"{what} needs at least one value, got {text!r}")
    return out


def _floats(text: str, what: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CelerisError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not out:
        raise CelerisError(f"{what} needs at least one value, got {text!r}")
    return out


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def _load(model):
    import torch

    from celeris.models import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_model(model, attn_implementation="eager")


def _check_context(model, tok, samples: list[dict], max_new_tokens: int, where: Path) -> None:
    """Every sample's prompt plus its answer budget must fit the model's context, checked before any compute."""
    from celeris.memory.tasks import build_prompt
    from celeris.models import check_context_limit

    for i, s in enumerate(samples, 1):
        try:
            check_context_limit(model.config, build_prompt(s, tok)[0].shape[1], int(s.get("max_new_tokens", max_new_tokens)))
        except CelerisError as exc:
            raise CelerisError(f"{where}: sample {i} ({s['task']}): {exc}") from None


def _samples(tasks: Path, limit: int | None, kinds: str | None = None):
    from celeris.memory.tasks import load_tasks

    samples = load_tasks(tasks)
    if kinds:
        keep = set(_names(kinds))
        samples = [s for s in samples if s["task"] in keep]
        if not samples:
            raise CelerisError(f"no samples of kinds {kinds} in {tasks}")
    if limit:  # the first `limit` samples of each kind
        seen: dict[str, int] = {}
        out = []
        for s in samples:
            if seen.get(s["task"], 0) < limit:
                out.append(s)
                seen[s["task"]] = seen.get(s["task"], 0) + 1
        samples = out
    return samples


@click.group("tasks")
def tasks_group() -> None:
    """The offline long-context task suites: the synthetic family (passkey, multi-needle, UUID key-value, variable
    tracking, code) and the held-out prose family (narrative facts, table lookup, stdlib docstrings)."""


@tasks_group.command("make")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output JSONL file.")
@click.option("--family", default="synthetic", show_default=True,
              help="synthetic (passkey, multi_needle, kv_uuid, variable_tracking, code; NAMM was evolved on it) or prose "
                   "(narrative_fact, table_lookup, docstring_qa; never used for evolution or selection).")
@click.option("--kinds", default=None, help="Comma-separated kinds of the family (default: all).")
@click.option("--lengths", default="1024,2048", show_default=True, help="Comma-separated context lengths in tokens.")
@click.option("--n", default=10, show_default=True, type=click.IntRange(1, 100_000), help="Samples per kind and length.")
@click.option("--seed", default=0, show_default=True)
def tasks_make(out, family, kinds, lengths, n, seed) -> None:
    """Write LongBench-layout samples with a "metric" field (deterministic per seed)."""
    from celeris.io import check_output_path
    from celeris.memory.tasks import make_tasks, write_tasks

    check_output_path(out, "file")
    samples = make_tasks(_names(kinds), _ints(lengths, "--lengths"), n, seed, family=family)
    write_tasks(out, samples)
    click.echo(f"wrote {len(samples)} samples to {out}")


@click.group("memory")
def memory_group() -> None:
    """KV-memory policies (full, streaming_llm, l2, h2o, random, namm): evaluate and evolve."""


@memory_group.command("eval")
@click.option("--model", "-m", default=None)
@click.option("--policy", "-p", required=True, help="NAME or namm:PATH (full, streaming_llm, l2, h2o, random, namm).")
@click.option("--budget", "-b", default="0.25", show_default=True,
              help="Fraction in (0, 1], a token count, or 'threshold' (NAMM's native score < 0 rule).")
@click.option("--tasks", "-t", required=True, type=click.Path(path_type=Path))
@click.option("--kinds", default=None, help="Only these task kinds.")
@click.option("--limit", default=None, type=click.IntRange(1), help="At most this many samples per kind.")
@click.option("--n-up", default=128, show_default=True, type=click.IntRange(16))
@click.option("--max-new-tokens", default=24, show_default=True, type=click.IntRange(1))
@click.option("--protocol", type=click.Choice(["chunked", "press"]), default=None,
              help="chunked: evict every n_up tokens during prefill and decoding (NAMM's protocol); press: compress the "
                   "context once after a full-attention prefill (kvpress's protocol). Default: the protocol NAMM "
                   "parameters were evolved in, else chunked.")
@click.option("--json", "json_out", default=None, type=click.Path(path_type=Path), help="Write the result here.")
def memory_eval(model, policy, budget, tasks, kinds, limit, n_up, max_new_tokens, protocol, json_out) -> None:
    """Score one policy at one budget on a task file."""
    from celeris.io import check_output_path, save_results
    from celeris.memory.evaluate import check_protocol, evaluate_policy, format_table
    from celeris.memory.policies import make_policy, parse_budget

    if json_out is not None:
        check_output_path(json_out, "file", "--json", inputs=[tasks])
    b = parse_budget(budget)
    pol = make_policy(policy)
    protocol = protocol or getattr(pol, "meta", {}).get("protocol", "chunked")
    if not getattr(pol, "keeps_all", False):
        check_protocol(protocol, b)
    samples = _samples(tasks, limit, kinds)
    m, tok = _load(model)
    _check_context(m, tok, samples, max_new_tokens, tasks)
    res = evaluate_policy(m, tok, samples, pol, b, n_up, max_new_tokens, name=policy, progress=True, protocol=protocol)
    click.echo(format_table([res]))
    if json_out:
        save_results(json_out, res)


@memory_group.command("evolve")
@click.option("--model", "-m", default=None)
@click.option("--tasks", "-t", required=True, type=click.Path(path_type=Path), help="Training tasks (disjoint from eval).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--population", default=8, show_default=True, type=click.IntRange(2))
@click.option("--generations", default=None, type=click.IntRange(1), help="Generations per stage (overrides the stage counts).")
@click.option("--stages", default="passkey:2;passkey,multi_needle:2", show_default=True,
              help="KIND[,KIND]:GENERATIONS;... each stage adds kinds and starts from the previous mean.")
@click.option("--budget", "-b", default="0.25", show_default=True, help="Budget used during evolution, or 'threshold'.")
@click.option("--batch-per-task", default=2, show_default=True, type=click.IntRange(1))
@click.option("--max-new-tokens", default=24, show_default=True, type=click.IntRange(1))
@click.option("--sigma", default=0.065, show_default=True, type=FiniteFloatRange(min=0, min_open=True))
@click.option("--full-covariance", is_flag=True, help="Full-covariance CMA-ES (default: diagonal, sep-CMA).")
@click.option("--protocol", type=click.Choice(["chunked", "press"]), default="chunked", show_default=True,
              help="chunked: evict every n_up tokens during prefill and decoding (NAMM's protocol); press: compress the "
                   "context once after a full-attention prefill (kvpress's protocol).")
@click.option("--fitness", type=click.Choice(["score", "likelihood", "both"]), default="score", show_default=True,
              help="score: task score / full-cache score (the spec's); likelihood: probability of the reference answer / "
                   "the full cache's (dense, teacher-forced, no generation); both: the mean of the two.")
@click.option("--seed", default=0, show_default=True)
@click.option("--init", default=None, help="Start from these NAMM parameters (a directory with namm.json, or 'default' "
                                             "for the shipped ones) instead of the zero vector; their normalisation is kept.")
@click.option("--val", "val_tasks", default=None, type=click.Path(path_type=Path),
              help="Held-out tasks: score the mean on them every --val-every generations and keep the best in OUT/best/.")
@click.option("--val-every", default=10, show_default=True, type=click.IntRange(1))
def memory_evolve(model, tasks, out, population, generations, stages, budget, batch_per_task, max_new_tokens, sigma,
                  full_covariance, protocol, fitness, seed, init, val_tasks, val_every) -> None:
    """Evolve NAMM's scorer with CMA-ES; checkpoints every generation; the same command resumes."""
    from celeris.io import check_output_path
    from celeris.memory.evaluate import check_protocol
    from celeris.memory.evolve import EvolveConfig, evolve, parse_stages
    from celeris.memory.policies import DEFAULT_NAMM, parse_budget
    from celeris.memory.tasks import check_not_held_out, load_tasks

    check_output_path(out, "dir")
    check_protocol(protocol, parse_budget(budget))
    st, gens = parse_stages(stages)
    if generations:
        gens = [generations] * len(st)
    cfg = EvolveConfig(stages=st, generations=gens, population=population, sigma=sigma, budget=budget,
                       batch_per_task=batch_per_task, max_new_tokens=max_new_tokens, seed=seed, diagonal=not full_covariance,
                       protocol=protocol, fitness=fitness, init=None if init is None else str(DEFAULT_NAMM if init == "default" else Path(init)))
    samples = load_tasks(tasks)
    val = load_tasks(val_tasks) if val_tasks is not None else None
    check_not_held_out(samples, "training")  # before the model loads; evolve() checks again
    check_not_held_out(val or [], "validation")
    if cfg.init is not None:
        from celeris.memory.policies import NAMM

        NAMM.load(cfg.init)  # a bad --init fails before the model loads
    m, tok = _load(model)
    _check_context(m, tok, samples, max_new_tokens, tasks)
    if val is not None:
        _check_context(m, tok, val, max_new_tokens, val_tasks)
    try:
        state = evolve(m, tok, samples, out, cfg, val_samples=val, val_every=val_every)
    except KeyboardInterrupt:
        click.echo(f"interrupted; the last finished generation is checkpointed in {out}; run the same command to resume", err=True)
        sys.exit(130)
    h = state["history"][-1] if state["history"] else {}
    click.echo(f"{state['generation']} generations; fitness of the mean {h.get('fitness_of_mean', float('nan')):.3f}; "
               f"parameters in {out}/namm.safetensors")
    best = state.get("validation", {}).get("best")
    if best:
        full = state["validation"]["full"]["mean_score"]
        click.echo(f"best on {val_tasks}: generation {best['generation']}, mean score {best['mean_score']:.3f} "
                   f"(full cache {full:.3f}); parameters in {out}/best/")


@click.command("memory")
@click.option("--model", "-m", default=None)
@click.option("--tasks", "-t", required=True, type=click.Path(path_type=Path))
@click.option("--budgets", default="0.5,0.25,0.1", show_default=True)
@click.option("--policies", default="streaming_llm,l2,h2o,random,namm", show_default=True,
              help="Celeris policies (NAME or namm:PATH); the full cache always runs.")
@click.option("--presses", default=None, help="kvpress presses (default: Knorm, SnapKV, StreamingLLM, ObservedAttention, TOVA, ExpectedAttention).")
@click.option("--kinds", default=None, help="Only these task kinds.")
@click.option("--limit", default=None, type=click.IntRange(1), help="At most this many samples per kind.")
@click.option("--n-up", default=128, show_default=True, type=click.IntRange(16))
@click.option("--max-new-tokens", default=24, show_default=True, type=click.IntRange(1))
@click.option("--protocols", default="press,chunked", show_default=True,
              help="Protocols for the Celeris policies: press (one-shot after a full-attention prefill, like every kvpress "
                   "press) and/or chunked (eviction every n_up tokens during prefill and decoding).")
@click.option("--repeats", default=REPEATS, show_default=True, type=click.IntRange(1, 1000),
              help="Timed runs of each sample after its scored run; tokens/s is their median with min-max.")
@click.option("--json", "json_out", default=None, type=click.Path(path_type=Path))
def bench_memory_cmd(model, tasks, budgets, policies, presses, kinds, limit, n_up, max_new_tokens, protocols, repeats,
                     json_out) -> None:
    """Every Celeris policy and kvpress press, same samples and budgets, in one run (table + JSON)."""
    from celeris.io import check_output_path, save_results
    from celeris.memory.evaluate import bench_memory, format_table

    if json_out is not None:
        check_output_path(json_out, "file", "--json", inputs=[tasks])
    samples = _samples(tasks, limit, kinds)
    m, tok = _load(model)
    _check_context(m, tok, samples, max_new_tokens, tasks)
    res = bench_memory(m, tok, samples, _floats(budgets, "--budgets"), _names(policies), _names(presses), n_up, max_new_tokens,
                       protocols=_names(protocols), repeats=repeats, artifacts={"tasks": tasks})
    click.echo(format_table(res["results"]))
    if json_out:
        save_results(json_out, res)


def register(cli: click.Group) -> None:
    if "tasks" not in cli.commands:
        cli.add_command(tasks_group, "tasks")
    else:
        cli.commands["tasks"].add_command(tasks_make, "make")
    cli.add_command(memory_group, "memory")
    cli.commands["bench"].add_command(bench_memory_cmd, "memory")
