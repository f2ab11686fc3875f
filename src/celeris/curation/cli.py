"""`celeris curate` and `celeris bench data`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from celeris.curation.pipeline import RULES
from celeris.errors import CelerisError
from celeris.validate import FiniteFloatRange, option_given


def _rules(value: str | None) -> tuple[str, ...] | None:
    if not value or value == "all":
        return None
    return tuple(r.strip() for r in value.split(",") if r.strip())


@click.command("curate")
@click.argument("corpus", required=False)
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Output directory (corpus.jsonl, summary.json, audit.jsonl); never the input.")
@click.option("--rules", default="all", show_default=True, help=f"Comma-separated rules: {', '.join(RULES)}.")
@click.option("--eval", "eval_corpus", default=None,
              help="Evaluation text to decontaminate against (any corpus spec: file, directory, .jsonl, ...).")
@click.option("--threshold", default=0.8, show_default=True, type=FiniteFloatRange(),
              help="Near-duplicate Jaccard threshold, in (0, 1).")
@click.option("--num-perm", default=128, show_default=True, type=int, help="MinHash permutations.")
@click.option("--ngram", default=13, show_default=True, type=int, help="Decontamination n-gram size (words).")
@click.option("--min-matches", default=1, show_default=True, type=int,
              help="Shared evaluation n-grams that make a document contaminated.")
@click.option("--tokenizer", default="default", show_default=True,
              help="Count tokens with this model's tokenizer; 'words' counts whitespace words.")
@click.option("--report", is_flag=True, help="Also write DIR/report.html.")
@click.option("--executor", default="inprocess", show_default=True, type=click.Choice(["inprocess", "local", "slurm", "ray"]),
              help="Run on datatrove's executor of this kind (same kept set and audit as in-process).")
@click.option("--executor-config", default=None, type=click.Path(path_type=Path),
              help="JSON object of the executor's options (Slurm: partition, time, ...; Ray: address, cpus_per_task, ...).")
@click.option("--work-dir", default=None, type=click.Path(path_type=Path),
              help="datatrove's work folder, new, on a file system every node sees (needed for slurm; "
                   "local and ray: a temporary one by default).")
@click.option("--collect", is_flag=True,
              help="Write --out from the finished --work-dir of an earlier --executor run (Slurm: once its jobs end).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 4096), help="Tasks at once (datatrove).")
@click.option("--tasks", default=None, type=click.IntRange(1, 10**6), help="Shards of the corpus (datatrove; default: --workers).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def curate_cmd(ctx, corpus, out, rules, eval_corpus, threshold, num_perm, ngram, min_matches, tokenizer, report, executor,
               executor_config, work_dir, collect, workers, tasks, as_json) -> None:
    """Curate CORPUS: exact and near dedup, quality rules, decontamination; audit every removal.

    CORPUS is python-stdlib, package-docs, a file, a directory or a .jsonl. The curated corpus keeps
    document ids, so `celeris.corpora` splits it exactly as the input. On Slurm, `--executor slurm`
    submits the jobs; `celeris curate --collect --work-dir W --out D` writes D once they have finished.
    """
    from celeris.curation.pipeline import CurationConfig, curate
    from celeris.io import check_output_path
    from celeris.validate import emit_json

    check_output_path(out, "dir")
    if collect:
        kept = ("corpus", "out", "work_dir", "collect", "report", "as_json")
        given = ["CORPUS"] * (corpus is not None) + [p.opts[0] for p in ctx.command.params
                                                     if p.name not in kept and option_given(ctx, p.name)]
        if given:
            raise CelerisError(f"--collect takes the run's settings from --work-dir; drop {', '.join(given)}")
        if work_dir is None:
            raise CelerisError("--collect needs --work-dir (the work folder of the --executor run)")
        s = _executors().collect_curation(work_dir, out, report)
    else:
        if corpus is None:
            raise CelerisError("missing argument CORPUS (or give --collect --work-dir W)")
        if executor == "inprocess" and (workers != 1 or tasks is not None or executor_config or work_dir):
            raise CelerisError("--workers, --tasks, --executor-config and --work-dir need --executor local, slurm or ray")
        cfg = CurationConfig(rules=_rules(rules), near_dup_threshold=threshold, num_perm=num_perm, decontam_ngram=ngram,
                             decontam_min_matches=min_matches)
        tok = None if tokenizer == "words" else tokenizer
        if executor == "inprocess":
            s = curate(corpus, out, cfg, eval_corpus=eval_corpus, tokenizer=tok, report=report)
        else:
            ex = _executors()
            options = ex.read_executor_config(executor, executor_config) if executor_config else {}
            s = ex.curate_on_datatrove(corpus, out, executor, work_dir, cfg, eval_corpus, tok, report, tasks, workers,
                                       options)
            if s is None:
                collect_cmd = f"celeris curate --collect --work-dir {work_dir} --out {out}"
                if as_json:
                    emit_json({"submitted": "slurm", "work_dir": str(work_dir), "collect": collect_cmd})
                else:
                    click.echo(f"submitted to Slurm (work folder {work_dir}); once the jobs have finished "
                               f"(squeue -u $USER):\n  {collect_cmd}")
                return
    for f in s["skipped_files"]:
        click.echo(f"skipped {f['path']}: {f['reason']}", err=True)
    if as_json:
        emit_json(s)
        return
    click.echo(f"{s['documents_in']:,} documents in, {s['documents_out']:,} out; {s['tokens_in']:,} {s['token_unit']} in, "
               f"{s['tokens_out']:,} out ({s['seconds']:.1f} s, {s['documents_per_second']:.0f} documents/s)")
    for rule, n in s["removed"].items():
        click.echo(f"  {rule:>18}: {n:,}")
    click.echo(f"curated corpus: {out / 'corpus.jsonl'}; audit: {out / 'audit.jsonl'}")


def _executors():
    """`celeris.curation.executors`, which needs datatrove (`celeris[scale]`, in make setup)."""
    try:
        from celeris.curation import executors
    except ImportError as exc:
        raise CelerisError(f"--executor and --collect need datatrove ({exc}); pip install 'celeris[scale]'") from None
    return executors


@click.command("data")
@click.option("--corpus", "-c", "corpora", multiple=True,
              help="Corpus to benchmark (repeatable; default: python-stdlib and package-docs).")
@click.option("--json", "json_out", default=None, type=click.Path(path_type=Path), help="Write the full results here.")
@click.option("--report", "report_out", default=None, type=click.Path(path_type=Path), help="Write an HTML report here.")
@click.option("--size", default="tiny", show_default=True, help="Model size for raw/curated runs.")
@click.option("--budget-steps", default=300, show_default=True, type=click.IntRange(2, 10**7),
              help="FLOPs budget: this many steps of the model (same for every run).")
@click.option("--eval-every", default=20, show_default=True, type=click.IntRange(1, 10**6))
@click.option("--eval-batches", default=8, show_default=True, type=click.IntRange(1, 10**6),
              help="Validation batches (of 16 blocks) per evaluation.")
@click.option("--patience", default=2, show_default=True, type=click.IntRange(1, 10**6))
@click.option("--augment/--no-augment", default=True, show_default=True, help="Also run curated + augmented.")
@click.option("--transfer/--no-transfer", default=True, show_default=True,
              help="Also run LoRA on the default model vs scratch (slow on CPU).")
@click.option("--transfer-steps", default=24, show_default=True, type=click.IntRange(1, 10**6))
@click.option("--seed", default=0, show_default=True)
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="Timed curation runs of each corpus after the first; documents/s is their median with min-max.")
def bench_data_cmd(corpora, json_out, report_out, size, budget_steps, eval_every, eval_batches, patience, augment, transfer,
                   transfer_steps, seed, repeats) -> None:
    """Raw vs curated (vs curated+augmented) data at the same FLOPs budget; early stopping; transfer."""
    from celeris.curation.bench import DataBenchConfig, bench_data, summary_rows, write_bench_report
    from celeris.io import check_output_path, save_results
    from celeris.validate import emit_json

    if json_out is not None:
        check_output_path(json_out, "file", "--json")
    if report_out is not None:
        check_output_path(report_out, "file", "--report")
    cfg = DataBenchConfig(size=size, budget_steps=budget_steps, eval_every=eval_every, eval_batches=eval_batches,
                          patience=patience,
                          augment=augment, transfer=transfer, transfer_steps=transfer_steps,
                          transfer_eval_every=max(1, transfer_steps // 4), seed=seed, repeats=repeats,
                          progress=sys.stderr.isatty())
    res = bench_data(list(corpora) or None, cfg)
    if json_out:
        save_results(json_out, res)
    if report_out:
        write_bench_report(res, report_out)
    rows = summary_rows(res)
    emit_json({"rows": rows, **{f"transfer:{k}": {kk: v["transfer"].get(kk) for kk in
                                                    ("target_loss", "lora_flops_to_target", "scratch_flops_to_target", "factor")}
                                for k, v in res["corpora"].items() if "transfer" in v}})


def register(cli: click.Group) -> None:
    cli.add_command(curate_cmd, "curate")
    cli.commands["bench"].add_command(bench_data_cmd, "data")
