"""The `celeris` command: one entry point, a subcommand per job. Each is a thin recipe over the
Python API of the same name (`celeris.generate`, `celeris.train_lm`, `celeris.demo`, ...)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from celeris.errors import CelerisError
from celeris.validate import FiniteFloatRange, emit_json

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _SystemsGroup(click.Group):
    """A group whose system commands are imported on first use (`bench=True`: the `bench` group's)."""

    bench = False

    def get_command(self, ctx, cmd_name):
        if cmd_name not in self.commands:
            for pkg, (top, benches) in SYSTEM_COMMANDS.items():
                if cmd_name in (benches if self.bench else top):
                    _load_system(pkg)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx):
        _register_system_commands()
        return super().list_commands(ctx)


class _BenchGroup(_SystemsGroup):
    bench = True


@click.group(context_settings=CONTEXT, cls=_SystemsGroup)
@click.version_option(package_name="celeris")
@click.option("--verbose", "-v", is_flag=True,
              help="Show third-party warnings and logs (hidden by default; also CELERIS_VERBOSE=1).")
def cli(verbose: bool) -> None:
    """Celeris: make language models cheaper to train and faster to run.

    Start with `celeris demo`. Models (`--model`) are a local directory, a .gguf file, a Hugging
    Face model id, or nothing for the default SmolLM2-135M-Instruct.
    """


@cli.command()
@click.option("--model", "-m", default=None, help="Also describe this model (size, layers, heads, context, vocab).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(model: str | None, as_json: bool) -> None:
    """Versions, threads, the default model's cache state, and a model's shape."""
    from celeris.info import info as run_info

    out = run_info(model)
    if as_json:
        emit_json(out)
        return
    for k, v in out.items():
        if isinstance(v, dict):
            click.echo(f"{k}:")
            for k2, v2 in v.items():
                click.echo(f"  {k2}: {v2:,}" if isinstance(v2, int) and not isinstance(v2, bool) else f"  {k2}: {v2}")
        else:
            click.echo(f"{k}: {v}")


@cli.command()
@click.option("--prompt", "-p", required=True, help="The prompt (a user message when the chat template is used).")
@click.option("--model", "-m", default=None, help="Model directory, .gguf file or hub id (default: SmolLM2-135M-Instruct).")
@click.option("--max-new-tokens", "-n", default=128, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--temperature", "-t", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="0 for greedy decoding.")
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("--chat/--no-chat", default=None, help="Apply the chat template (default: when the tokenizer has one).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, prompt_tokens, new_tokens, seconds, tokens_per_second.")
@click.option("--drafter", default=None, help="Decode with this ReDrafter drafter directory ('default': the shipped one).")
@click.option("--beam-width", default=None, type=int, help="ReDrafter beams per step (with --drafter).  [default: 1 on a CPU, 8 on a GPU]")
@click.option("--beam-length", default=None, type=int, help="ReDrafter tokens per beam, the guaranteed one included.  [default: with one beam, up to 4 on the engine (6 with --quantize none on a CPU), chosen per step from the drafter's confidence and measured verify costs; 4 with more beams on a CPU; 5 on a GPU]")
@click.option("--memory", default=None, help="KV-memory policy NAME[:PATH] (full, streaming_llm, l2, h2o, random, namm); greedy.")
@click.option("--budget", default="0.25", show_default=True, help="With --memory: fraction in (0, 1], token count, or 'threshold'.")
@click.option("--device", default="auto", show_default=True,
              help="auto (the GPU when there is one; the CPU with --memory), cpu, cuda or cuda:N.")
@click.option("--quantize", type=click.Choice(["auto", "int4", "int8", "none"]), default="auto", show_default=True,
              help="Weights of the fast engine: auto = a GGUF model's own 4-bit blocks (the default model is one), "
                   "the float model otherwise; int4/int8 = packed CPU kernels (torchao for non-GGUF models); "
                   "none = the float model, whose greedy output equals Hugging Face generate.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="Compile the decoding step with torch.compile (cached under $CELERIS_CACHE; the first run takes "
                   "about two minutes).  [default: only when --max-new-tokens is 1024 or more]")
@click.option("--threads", default=None, type=click.IntRange(1, 4096), help="CPU threads (default: PyTorch's choice).")
@click.option("--truncate", type=click.Choice(["left"]), default=None,
              help="When prompt + --max-new-tokens exceed the model's context, keep the end of the prompt "
                   "(default: refuse such a prompt).")
def generate(prompt, model, max_new_tokens, temperature, seed, chat, as_json, drafter, beam_width, beam_length,
             memory, budget, device, quantize, compile_, threads, truncate) -> None:
    """Generate an answer to one prompt: the fast engine, ReDrafter (--drafter) or a KV-memory policy (--memory)."""
    from celeris.api import generate as run
    from celeris.validate import check_engine_options, check_temperature, option_given

    check_temperature(temperature)
    ctx = click.get_current_context()
    check_engine_options(drafter, memory, beam_width if option_given(ctx, "beam_width") else None,
                         beam_length if option_given(ctx, "beam_length") else None,
                         budget if option_given(ctx, "budget") else None)
    if drafter is not None and memory is not None and quantize == "none":
        raise CelerisError("--drafter and --memory run together on the engine only; drop --quantize none")
    if drafter is not None:
        from celeris.speculative.bench import default_drafter_dir
        from celeris.speculative.decoding import check_beam_settings

        check_beam_settings(1 if beam_width is None else beam_width, 4 if beam_length is None else beam_length)
        drafter = default_drafter_dir() if drafter == "default" else drafter
    from celeris.engine import load_engine, set_threads
    from celeris.models import load_model, resolve_device

    set_threads(threads)
    dev = resolve_device("cpu" if memory and device == "auto" else device)
    if memory and dev.type != "cpu":
        raise CelerisError("--memory policies run on the CPU only for now; use --device cpu")
    if quantize != "none" or (drafter is None and memory is None):  # the engine (drafting and memory run eagerly)
        compile_ = (max_new_tokens >= COMPILE_FROM_TOKENS and memory is None) if compile_ is None else compile_
        m = load_engine(model, quantize=quantize, compile=compile_, device=dev, max_len=None)
        tok = m.tokenizer
    else:
        m, tok = load_model(model, attn_implementation="eager" if memory else None, device=dev)
    r = run(m, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, chat=chat,
            drafter=drafter, beam_width=beam_width, beam_length=beam_length, memory=memory, budget=budget,
            truncate=truncate)
    if as_json:
        out = r.to_dict()
        wall = process_seconds()
        if wall is not None:
            out["process_seconds"] = wall  # the whole command: interpreter start, imports, loading, generating
        emit_json(out)
    else:
        click.echo(r.text)
        click.echo(f"[{r.new_tokens} tokens, {r.seconds:.2f} s, {r.tokens_per_second:.1f} tokens/s]", err=True)


# A one-shot answer shorter than this does not repay even a warm compile (docs/engine.md: ~800 tokens here).
COMPILE_FROM_TOKENS = 1024


def process_seconds() -> float | None:
    """Seconds since this process started (Linux /proc), or None where that cannot be read."""
    import os

    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError):
        return None


@cli.group()
def data() -> None:
    """Inspect corpora (python-stdlib, text files, directories, JSONL, hf:NAME)."""


@data.command("stats")
@click.argument("corpus")
@click.option("--tokenizer", default="default", show_default=True,
              help="Count tokens with this model's tokenizer ('none' to skip).")
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default=None, help="Only this split.")
@click.option("--json", "as_json", is_flag=True)
def data_stats(corpus, tokenizer, split, as_json) -> None:
    """Documents, characters and tokens of CORPUS."""
    from celeris.corpora import corpus_stats, load_corpus
    from celeris.models import load_tokenizer

    c = load_corpus(corpus, split)
    tok = None if tokenizer == "none" else load_tokenizer(None if tokenizer == "default" else tokenizer)
    stats = {"corpus": c.name, **corpus_stats(c, tok), "skipped_files": len(c.skipped)}
    if as_json:
        emit_json(stats)
        return
    for k, v in stats.items():
        click.echo(f"{k:>14}: {v:,}" if isinstance(v, int) else f"{k:>14}: {v}")
    for path, why in c.skipped[:20]:
        click.echo(f"skipped {path}: {why}", err=True)


@cli.command("train-lm")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Run directory (resumed if it holds a checkpoint).")
@click.option("--corpus", "-c", default="python-stdlib", show_default=True)
@click.option("--size", default="tiny", show_default=True, help="Model size when training from scratch: nano|tiny|small|base.")
@click.option("--model", "-m", default=None, help="Fine-tune this pretrained model instead of training from scratch.")
@click.option("--tokenizer", default="train", show_default=True,
              help="'train' a BPE tokenizer on the corpus, or reuse a model's tokenizer (from scratch only).")
@click.option("--vocab-size", default=4096, show_default=True, type=click.IntRange(257, 1_000_000))
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(8, 1_000_000))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--max-steps", default=1000, show_default=True, type=click.IntRange(1, 10**9))
@click.option("--max-minutes", default=None, type=FiniteFloatRange(min=0, min_open=True), help="Also stop after this much training time.")
@click.option("--lr", default=1e-3, show_default=True, type=FiniteFloatRange(min=0, min_open=True))
@click.option("--warmup-steps", default=50, show_default=True, type=click.IntRange(0, 10**9))
@click.option("--eval-every", default=50, show_default=True, type=click.IntRange(1, 10**9))
@click.option("--log-every", default=10, show_default=True, type=click.IntRange(1, 10**9), help="Log the training loss every N steps.")
@click.option("--patience", default=None, type=click.IntRange(1, 10**6), help="Early stopping: validation checks without improvement.")
@click.option("--min-delta", default=0.0, show_default=True, type=FiniteFloatRange(min=0))
@click.option("--max-train-tokens", default=None, type=click.IntRange(1, 10**12), help="Use at most this many training tokens.")
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Start afresh even if --out holds a run.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
def train_lm(out, corpus, size, model, tokenizer, vocab_size, seq_len, batch_size, max_steps, max_minutes, lr,
             warmup_steps, eval_every, log_every, patience, min_delta, max_train_tokens, seed, overwrite, as_json) -> None:
    """Train a small Llama from scratch (or fine-tune a model) on a corpus.

    Cosine schedule with warm-up, gradient clipping, validation, early stopping, atomic checkpoints,
    and FLOPs accounting in OUT/log.jsonl. Ctrl-C saves a checkpoint; the same command resumes.
    """
    from celeris.io import check_output_path
    from celeris.lm import train_lm as run
    from celeris.trainer import TrainConfig, process_state

    check_output_path(out, "dir")
    cfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                      eval_every=eval_every, log_every=log_every, patience=patience, min_delta=min_delta,
                      max_seconds=max_minutes * 60 if max_minutes else None, seed=seed)
    res = run(out, corpus=corpus, size=size, model=model, tokenizer=tokenizer, vocab_size=vocab_size, seq_len=seq_len,
              config=cfg, max_train_tokens=max_train_tokens, overwrite=overwrite)
    if not process_state().is_main_process:
        pass  # under `accelerate launch` the main process reports for the job
    elif as_json:
        emit_json(res.to_dict())
    else:
        click.echo(f"stopped: {res.stop_reason} at step {res.steps}; best validation loss "
                   f"{res.best_val_loss if res.best_val_loss is not None else float('nan'):.4f} (step {res.best_step}); "
                   f"{res.tokens:,} tokens, {res.flops:.3g} FLOPs, {res.seconds:.0f} s")
        click.echo(f"model: {out}" if res.stop_reason != "interrupted" else f"checkpoint saved in {out}; run the same command to resume")
    if res.stop_reason == "interrupted":
        sys.exit(130)


@cli.command()
@click.option("--out", "-o", default="celeris-demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--train-seconds", default=120.0, show_default=True, type=FiniteFloatRange(min=1))
@click.option("--quick", is_flag=True, help="Short version of every section (for a smoke test).")
@click.option("--only", multiple=True, help="Run only these sections (repeatable): generation, training, "
              "speculative, memory, calm, curation, federated.")
def demo(out, train_seconds, quick, only) -> None:
    """The main job: every system on the real default model, with an HTML report."""
    from celeris.demo import demo as run
    from celeris.demo import sections
    from celeris.io import check_output_path

    check_output_path(out, "dir")
    names = [name for name, _ in sections()]
    unknown = [s for s in only if s not in names]
    if unknown:
        raise CelerisError(f"unknown demo section(s) {', '.join(map(repr, unknown))} in --only; valid: {', '.join(names)}")
    run(out, train_seconds=train_seconds, quick=quick, only=list(only) or None)


@cli.group(cls=_BenchGroup)
def bench() -> None:
    """Benchmarks: each system against its peers, side by side in one run (table + JSON)."""


@bench.command("engine")
@click.option("--sections", default=",".join(("decode", "prefill", "quality", "process")), show_default=True,
              help="Comma-separated: decode, prefill, quality, process.")
@click.option("--engines", default="hf-generate,celeris-fp32,celeris-int4,celeris-int4-compiled,llama.cpp", show_default=True,
              help="Comma-separated rows of the decode section: hf-generate, celeris-fp32, celeris-int4, "
                   "celeris-int4-compiled, llama.cpp (the peer; `make peers` installs it).")
@click.option("--limit", default=6, show_default=True, type=click.IntRange(1, 1000), help="Benchmark prompts to use.")
@click.option("--max-new-tokens", "-n", default=128, show_default=True, type=click.IntRange(1, 4096))
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1, 100), help="Timed passes after the warm-up pass.")
@click.option("--prefill-lengths", default="512,2048", show_default=True, help="Prompt lengths of the prefill section.")
@click.option("--threads", default=None, type=click.IntRange(1, 4096), help="CPU threads for every engine (default: PyTorch's).")
@click.option("--json", "json_out", default=None, type=click.Path(path_type=Path), help="Write the results here.")
def bench_engine(sections, engines, limit, max_new_tokens, repeats, prefill_lengths, threads, json_out) -> None:
    """The fast engine against HF generate, the fp32 engine and llama.cpp on the same GGUF, side by side."""
    from celeris.engine import set_threads
    from celeris.engine.bench import ENGINES, SECTIONS, format_tables, run_engine_benchmark
    from celeris.io import check_output_path, save_results
    from celeris.speculative.prompts import EVAL_PROMPTS

    secs = tuple(s.strip() for s in sections.split(",") if s.strip())
    engs = tuple(e.strip() for e in engines.split(",") if e.strip())
    for given, valid, what in ((secs, SECTIONS, "--sections"), (engs, ENGINES, "--engines")):
        bad = [x for x in given if x not in valid]
        if bad or not given:
            raise CelerisError(f"unknown {what} {', '.join(map(repr, bad)) or '(none given)'}; valid: {', '.join(valid)}")
    try:
        lengths = tuple(int(x) for x in prefill_lengths.split(","))
    except ValueError:
        raise CelerisError(f"--prefill-lengths must be comma-separated whole numbers, got {prefill_lengths!r}") from None
    if any(not 1 <= n <= 8000 for n in lengths):
        raise CelerisError("--prefill-lengths must each be between 1 and 8000")
    if json_out is not None:
        check_output_path(json_out, "file", "--json")
    set_threads(threads)
    res = run_engine_benchmark(list(EVAL_PROMPTS)[:limit], secs, engs, max_new_tokens, repeats, lengths,
                               prompt_source="benchmark split (celeris.speculative.prompts.EVAL_PROMPTS), disjoint from "
                                             "the drafter's validation prompts that settings are chosen on")
    click.echo(format_tables(res))
    if json_out:
        save_results(json_out, res)
        click.echo(f"wrote {json_out}", err=True)


_LOADED: set[str] = set()


def _load_system(pkg: str) -> None:
    """Import system `pkg`'s `cli` module and let it `register(cli)` its commands (once).

    Systems load only when one of their commands is asked for (or the command list is shown): `celeris
    generate` does not pay for importing Flower, kvpress or datasketch."""
    import importlib
    import importlib.util

    if pkg in _LOADED:
        return
    _LOADED.add(pkg)
    name = f"celeris.{pkg}.cli"
    try:
        if importlib.util.find_spec(f"celeris.{pkg}") is not None and importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(cli)
    except ModuleNotFoundError as exc:  # an optional dependency of this one system is not installed
        if (exc.name or "").startswith("celeris"):
            raise
        _register_unavailable(pkg, (exc.name or "?").split(".")[0])


def _register_system_commands() -> None:
    """Load every system's commands (what the full command list shows)."""
    for pkg in SYSTEM_COMMANDS:
        _load_system(pkg)


# The commands (top level, and under `bench`) each system registers, for the message when it cannot load.
SYSTEM_COMMANDS = {"speculative": (("drafter",), ("speculative",)), "memory": (("memory", "tasks"), ("memory",)),
                   "calm": (("calm", "brierlm"), ("calm",)), "curation": (("curate",), ("data",)),
                   "federated": (("federate",), ("federated",)), "serve": (("serve",), ("serve",))}
# The extra that installs a system's dependencies, where it is not `systems`.
SYSTEM_EXTRAS = {"serve": "serve"}


def _register_unavailable(pkg: str, missing: str) -> None:
    """Keep the other systems usable; each of this system's commands then says what to install."""
    top, bench = SYSTEM_COMMANDS.get(pkg, ((pkg,), ()))
    why = f"needs the Python package {missing!r}, which is not installed; pip install 'celeris[{SYSTEM_EXTRAS.get(pkg, 'systems')}]'"

    def placeholder(name: str, shown: str) -> click.Command:
        def run() -> None:
            raise CelerisError(f"'celeris {shown}' {why}")

        return click.Command(name, callback=run, help=f"(unavailable: {why})",
                             context_settings={"ignore_unknown_options": True, "allow_extra_args": True})

    for name in top:
        if name not in cli.commands:  # never shadows a working command
            cli.add_command(placeholder(name, name))
    for name in bench:
        if name not in cli.commands["bench"].commands:
            cli.commands["bench"].add_command(placeholder(name, f"bench {name}"))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    from celeris.noise import silence_third_party

    silence_third_party(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=argv, prog_name="celeris", standalone_mode=False)
    except CelerisError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # a bad option value is a user error like any other: one line, exit 2
        if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())) or exc.ctx is None:
            exc.show()
        else:
            click.echo(f"error: {exc.format_message()} (see '{exc.ctx.command_path} -h')", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
