"""`celeris bench engine`: the fast engine against HF generate, the fp32 engine and llama.cpp, in one run.

Sections (each optional):
  decode   tokens/s of greedy answers to the benchmark prompts (prefill included, as a user waits for it),
           every engine in turn per prompt (order rotated), median over repeats after a warm-up pass
  prefill  prompt-processing tokens/s at 512 and 2,048 prompt tokens (time to the first token's logits)
  quality  the int4 engine against the fp32 reference: greedy agreement on the prompts, cross-entropy on
           held-out text
  process  whole-process wall time and peak resident memory of `celeris generate -n 64` (and llama.cpp's),
           each command run `repeats` times after a warm-up run

llama.cpp runs through llama-cpp-python on the same GGUF file, fed the same token ids (the chat template
applied by the same tokenizer), with the same thread count and token budget; its KV cache is reset before
each run so no prompt prefix is reused across runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from celeris.errors import CelerisError
from celeris.report import check_repeats, environment, format_spread, ratio, spread

SECTIONS = ("decode", "prefill", "quality", "process")
ENGINES = ("hf-generate", "celeris-fp32", "celeris-int4", "celeris-int4-compiled", "llama.cpp")
PEER_HINT = "llama-cpp-python is not installed: `make peers` builds it (about 5 minutes)"


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCpp:
    """llama.cpp on a GGUF file through llama-cpp-python: greedy completion from token ids."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int = 4096, prompt_lookup: int = 0):
        """`prompt_lookup` > 0: llama-cpp-python's own prompt-lookup drafting (`LlamaPromptLookupDecoding`)
        with that many drafted tokens (its docs: 10 suits a GPU, 2 a CPU-only machine)."""
        from llama_cpp import Llama

        draft = None
        if prompt_lookup:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=prompt_lookup)
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False, seed=0, draft_model=draft)

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        self.llm.reset()  # no prompt prefix reused from the previous run
        out = []
        for tok in self.llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if tok == self.llm.token_eos() or len(out) >= max_new_tokens:
                break
        return out

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)


def run_engine_benchmark(
    prompts: list[str],
    sections: tuple[str, ...] = SECTIONS,
    engines: tuple[str, ...] = ENGINES,
    max_new_tokens: int = 128,
    repeats: int = 5,
    prefill_lengths: tuple[int, ...] = (512, 2048),
    progress: bool = True,
    prompt_source: str = "given by the caller",
) -> dict[str, Any]:
    """Run the sections; returns a JSON-able dict (see the module docstring). `prompt_source` names the prompt
    split in the JSON (the benchmark split, never the one settings were chosen on)."""
    from celeris.engine import load_engine
    from celeris.generation import decode, encode_prompt, engine_decode, eos_token_ids
    from celeris.models import default_gguf_path, load_model

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    check_repeats(repeats)
    if "llama.cpp" in engines and not llama_cpp_available():
        raise CelerisError(f"the llama.cpp peer is asked for but {PEER_HINT}; or leave it out with --engines")
    threads = torch.get_num_threads()
    say("loading the fp32 reference, the int4 engine and the peers ...")
    ref_model, tok = load_model()
    res: dict[str, Any] = {"environment": environment({"gguf": default_gguf_path(), "reference_model": ref_model}),
                           "settings": {"max_new_tokens": max_new_tokens, "repeats": repeats, "prompts": len(prompts),
                                        "prompt_source": prompt_source, "threads": threads, "greedy": True,
                                        "sections": list(sections), "engines": list(engines)}}
    eos = eos_token_ids(ref_model, tok)
    fp32 = load_engine(quantize="none", progress=False) if "celeris-fp32" in engines else None
    int4 = load_engine(progress=False)
    int4c = load_engine(compile=True, progress=progress) if "celeris-int4-compiled" in engines else None
    llama = LlamaCpp(default_gguf_path(), threads) if "llama.cpp" in engines else None
    inputs = [encode_prompt(tok, p) for p in prompts]
    res["engine"] = int4.info.to_dict()

    runners = {
        "hf-generate": lambda ids: ref_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                                      do_sample=False, eos_token_id=eos, pad_token_id=eos[0])[0, ids.shape[1]:].tolist(),
        "celeris-fp32": lambda ids: engine_decode(fp32, ids, max_new_tokens, eos_ids=eos).tolist(),
        "celeris-int4": lambda ids: engine_decode(int4, ids, max_new_tokens, eos_ids=eos).tolist(),
        "celeris-int4-compiled": lambda ids: engine_decode(int4c, ids, max_new_tokens, eos_ids=eos).tolist(),
        "llama.cpp": lambda ids: llama.generate(ids[0].tolist(), max_new_tokens),
    }
    table = [(n, runners[n]) for n in engines]

    if "decode" in sections:
        with torch.inference_mode():
            reference = [decode(ref_model, ids, max_new_tokens, eos_ids=eos).tolist() for ids in inputs]
            outputs: dict[str, list[list[int]]] = {}
            t0 = time.perf_counter()
            for name, fn in table:  # warm-up (and compilation) pass; outputs kept for the identity check
                say(f"  warm-up {name} ...")
                outputs[name] = [fn(ids) for ids in inputs]
            res["warmup_seconds"] = time.perf_counter() - t0
            secs = {n: [0.0] * repeats for n, _ in table}
            toks = {n: [0] * repeats for n, _ in table}
            for r in range(repeats):
                say(f"  decode repeat {r + 1}/{repeats}")
                for i, ids in enumerate(inputs):
                    k = (i + r) % len(table)
                    for name, fn in table[k:] + table[:k]:
                        t1 = time.perf_counter()
                        out = fn(ids)
                        secs[name][r] += time.perf_counter() - t1
                        toks[name][r] += len(out)
        rows = []
        for name, _ in table:
            rates = [n / s for n, s in zip(toks[name], secs[name], strict=True)]
            same = sum(o == ref for o, ref in zip(outputs[name], reference, strict=True))
            rows.append({"name": name, "tokens_per_second": spread(rates), "new_tokens_per_repeat": toks[name][0],
                         "identical_to_fp32_greedy": f"{same}/{len(inputs)}"})
        base = next((r for r in rows if r["name"] == "llama.cpp"), None)
        for r in rows:  # ratios pass by pass (the engines were timed in the same passes)
            r["vs_hf_generate"] = ratio(r["tokens_per_second"], rows[0]["tokens_per_second"])
            if base:
                r["vs_llama_cpp"] = ratio(r["tokens_per_second"], base["tokens_per_second"])
        res["decode"] = rows

    if "prefill" in sections:
        res["prefill"] = _prefill_section(ref_model, tok, fp32, int4, int4c, llama, prefill_lengths, repeats, say)

    if "quality" in sections:
        say("  quality: greedy agreement and held-out cross-entropy ...")
        res["quality"] = _quality_section(ref_model, tok, int4, inputs, max_new_tokens, eos, int4c)

    if "process" in sections:
        say("  process: wall time and peak memory of one-shot commands ...")
        res["process"] = _process_section(prompts[0], threads, llama is not None, repeats)
    return res


def _long_ids(tok, n: int) -> torch.Tensor:
    """Exactly n tokens of held-out standard-library source (the validation split)."""
    from celeris.corpora import load_corpus

    ids: list[int] = []
    for text in load_corpus("python-stdlib", "validation").texts():
        ids += tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            break
    if len(ids) < n:
        raise CelerisError(f"the held-out corpus has fewer than {n} tokens")
    return torch.tensor([ids[:n]])


@torch.inference_mode()
def _prefill_section(ref_model, tok, fp32, int4, int4c, llama, lengths, repeats, say) -> list[dict[str, Any]]:
    runs = {"hf-fp32": lambda ids: ref_model(ids, logits_to_keep=1),
            "celeris-int4": lambda ids: int4.prefill(ids)}
    if fp32 is not None:
        runs["celeris-fp32"] = lambda ids: fp32.prefill(ids)
    if llama is not None:
        runs["llama.cpp"] = lambda ids: llama.prefill(ids[0].tolist())
    out = []
    for n in lengths:
        ids = _long_ids(tok, n)
        for fn in runs.values():  # warm-up
            fn(ids)
        secs: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(repeats):
            say(f"  prefill {n} tokens, repeat {r + 1}/{repeats}")
            names = list(runs)
            k = r % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                runs[name](ids)
                secs[name].append(time.perf_counter() - t0)
        for name, s in secs.items():
            out.append({"prompt_tokens": n, "name": name, "tokens_per_second": spread([n / x for x in s])})
    return out


@torch.inference_mode()
def _quality_section(ref_model, tok, int4, inputs, max_new_tokens, eos, int4c=None) -> dict[str, Any]:
    import torch.nn.functional as F

    from celeris.generation import decode, engine_decode

    agree = []
    for ids in inputs:
        ref = decode(ref_model, ids, max_new_tokens, eos_ids=eos).tolist()
        got = engine_decode(int4, ids, max_new_tokens, eos_ids=eos).tolist()
        first = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got)))
        row = {"identical": ref == got, "first_difference": first, "reference_tokens": len(ref)}
        if int4c is not None:  # compiled against eager, both int4
            comp = engine_decode(int4c, ids, max_new_tokens, eos_ids=eos).tolist()
            row["compiled_identical_to_eager"] = comp == got
            row["compiled_first_difference"] = next((i for i, (a, b) in enumerate(zip(got, comp, strict=False)) if a != b),
                                                    min(len(got), len(comp)))
        agree.append(row)
    from celeris.corpora import load_corpus

    ce = {"fp32": 0.0, "int4": 0.0}
    n = docs = 0
    for text in load_corpus("python-stdlib", "validation").texts():
        ids = tok(text, return_tensors="pt")["input_ids"][:, :512]
        if ids.shape[1] < 256:
            continue
        y = ids[0, 1:]
        ce["fp32"] += float(F.cross_entropy(ref_model(ids).logits[0, :-1].float(), y, reduction="sum"))
        ce["int4"] += float(F.cross_entropy(int4.prefill(ids, all_logits=True)[1][0, :-1], y, reduction="sum"))
        n += y.numel()
        docs += 1
        if docs == 16:
            break
    fp, q = ce["fp32"] / n, ce["int4"] / n
    return {"greedy": agree, "identical_prompts": sum(a["identical"] for a in agree),
            "compiled_identical_to_eager": sum(a.get("compiled_identical_to_eager", False) for a in agree),
            "cross_entropy": {"fp32": fp, "int4": q, "relative_change": (q - fp) / fp, "tokens": n, "documents": docs,
                              "text": "python-stdlib validation split, documents of 256-512 tokens"}}


def _peak_rss_of(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in GB, exit code) of a command run alone."""
    t0 = time.perf_counter()
    code = "import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:], capture_output=True); " \
           "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))"
    p = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, timeout=900,
                       env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    rc, kb = json.loads(p.stdout.strip().splitlines()[-1])
    return wall, kb / 1024**2, rc


def _process_section(prompt: str, threads: int, with_llama: bool, repeats: int) -> dict[str, Any]:
    import tempfile

    from celeris.models import default_gguf_path

    celeris = [sys.executable, "-m", "celeris", "generate", "-p", prompt, "-n", "64", "--threads", str(threads)]
    cold, warm = ("celeris generate -n 64 --compile, first process (cold compile)",
                  "celeris generate -n 64 --compile, second process (warm cache)")
    commands = {"import_floor": [sys.executable, "-c", "import torch, transformers; from transformers import LlamaForCausalLM"],
                "celeris generate -n 64": celeris,
                "celeris generate -n 64 --quantize none": celeris + ["--quantize", "none"],
                cold: celeris + ["--compile"], warm: celeris + ["--compile"]}
    if with_llama:
        code = ("import sys; from llama_cpp import Llama; m = Llama(model_path=sys.argv[1], n_ctx=2048, "
                f"n_threads={threads}, verbose=False); m.create_chat_completion([{{'role': 'user', 'content': sys.argv[2]}}], "
                "max_tokens=64, temperature=0.0, repeat_penalty=1.0)")  # plain greedy, as the other rows
        commands["llama-cpp-python, 64 tokens"] = [sys.executable, "-c", code, str(default_gguf_path()), prompt]
    runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in commands}
    with tempfile.TemporaryDirectory() as warm_cache:
        def run(name: str) -> tuple[float, float, int]:
            if name == cold:  # an empty inductor cache for every cold run
                with tempfile.TemporaryDirectory() as empty:
                    return _peak_rss_of(commands[name], env={"TORCHINDUCTOR_CACHE_DIR": empty})
            return _peak_rss_of(commands[name], env={"TORCHINDUCTOR_CACHE_DIR": warm_cache})

        for name in commands:  # warm-up: the files in the page cache, and the warm run's inductor cache filled
            if name != cold:
                run(name)
        names = list(commands)
        for r in range(repeats):  # every command once per pass, the order rotated
            k = r % len(names)
            for name in names[k:] + names[:k]:
                runs[name].append(run(name))
    out: dict[str, Any] = {"definition": "wall_seconds: the whole process, interpreter start to exit (imports, "
                                         "loading, prefill, 64 new tokens); peak_rss_gb: its peak resident memory; "
                                         f"median (min, max) of {repeats} runs after a warm-up run of each command "
                                         "(none for the cold compile, whose every run starts from an empty cache)"}
    for name, rs in runs.items():
        out[name] = {"wall_seconds": spread([w for w, _, _ in rs]), "peak_rss_gb": spread([m for _, m, _ in rs]),
                     "exit_codes": [c for _, _, c in rs]}
    return out


def format_tables(res: dict[str, Any]) -> str:
    lines = []
    if "decode" in res:
        lines += [f"decode: {res['settings']['prompts']} prompts x {res['settings']['max_new_tokens']} new tokens, greedy, "
                  f"{res['settings']['threads']} threads, median of {res['settings']['repeats']} (min-max)",
                  f"{'engine':<24}{'tokens/s (min-max)':>22}{'vs HF (min-max)':>22}{'vs llama.cpp (min-max)':>24}"
                  f"{'same as fp32':>14}"]
        for r in res["decode"]:
            vl = format_spread(r.get("vs_llama_cpp"), 2)
            lines.append(f"{r['name']:<24}{format_spread(r['tokens_per_second']):>22}{format_spread(r['vs_hf_generate'], 2):>22}"
                         f"{vl:>24}{r['identical_to_fp32_greedy']:>14}")
    if "prefill" in res:
        lines += ["", "prompt processing (tokens/s, median, min-max)"]
        for r in res["prefill"]:
            lines.append(f"  {r['prompt_tokens']:>5} tokens  {r['name']:<16}{format_spread(r['tokens_per_second'], 0):>22}")
    if "quality" in res:
        q = res["quality"]
        ce = q["cross_entropy"]
        lines += ["", f"quality: int4 engine identical to fp32 greedy on {q['identical_prompts']}/{len(q['greedy'])} prompts; "
                      f"cross-entropy fp32 {ce['fp32']:.4f}, int4 {ce['int4']:.4f} ({ce['relative_change'] * 100:+.2f} %) "
                      f"on {ce['tokens']} held-out tokens; compiled identical to eager on "
                      f"{q['compiled_identical_to_eager']}/{len(q['greedy'])} prompts"]
    if "process" in res:
        lines += ["", "one-shot processes: wall seconds and peak RSS in GB, median (min-max)"]
        for k, v in res["process"].items():
            if isinstance(v, dict):
                lines.append(f"  {k:<62}{format_spread(v['wall_seconds'], 2):>22} s  {format_spread(v['peak_rss_gb'], 2)} GB")
    return "\n".join(lines)
