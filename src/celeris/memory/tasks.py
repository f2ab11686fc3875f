"""An offline long-context suite (RULER/LongBench style) and the one reader + scorer for it.

`make_tasks` writes LongBench-layout samples `{"id", "task", "context", "input", "answers",
"length", "metric"}` (plus `"answer_prefix"`): passkey retrieval, multi-needle retrieval, key-value
(UUID) retrieval, variable tracking, and next-line code completion on standard-library modules whose
identifiers are alpha-renamed (so a model cannot recite memorised code). Everything is generated from
one seeded RNG, so a seed gives the same file. `load_tasks` reads these files and real LongBench
JSONL (`"dataset"`/`"_id"` fields; the metric is inferred from the dataset name).

These five kinds are the `synthetic` family, the one NAMM was evolved and selected on. `family="prose"`
makes the independently written family of `prose_tasks` (facts in narrative prose, records in a table,
questions over real standard-library docstrings), which is held out from evolution and selection.
"""

from __future__ import annotations

import ast
import builtins
import difflib
import io
import json
import keyword
import random
import re
import string
import sysconfig
import tokenize
import uuid
from collections.abc import Callable
from pathlib import Path

from celeris.errors import CelerisError
from celeris.io import atomic_write_text, iter_jsonl
from celeris.memory import prose_tasks

KINDS = ("passkey", "multi_needle", "kv_uuid", "variable_tracking", "code")
METRICS = ("exact", "contains", "code_sim", "f1")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# Real LongBench files carry no metric: infer it from the dataset name (official metric families).
LONGBENCH_METRICS = {"lcc": "code_sim", "repobench-p": "code_sim", "passage_retrieval_en": "contains",
                     "passage_retrieval_zh": "contains", "passage_count": "exact", "trec": "contains",
                     "lsht": "contains"}
WORDS = ("apple river stone cloud tiger lamp ocean violin garden rocket silver forest candle piano "
         "mirror desert island falcon marble orchid thunder harbor lantern meadow comet walnut").split()


# ----------------------------------------------------------------------------- scoring
def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower().strip(string.punctuation + " "))


def _first_code_line(pred: str) -> str:
    for line in pred.lstrip("\n").split("\n"):
        s = line.strip()
        if s and not s.startswith("#") and not s.startswith("`"):
            return s
    return ""


def _f1(pred: str, ans: str) -> float:
    p, a = _norm(pred).split(), _norm(ans).split()
    common = sum(min(p.count(w), a.count(w)) for w in set(a))
    if not p or not a or common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(a)
    return 2 * prec * rec / (prec + rec)


def score_answer(prediction: str, answers: list[str], metric: str) -> float:
    """Score in [0, 1] of one prediction against the reference answers (best over answers)."""
    if metric not in METRICS:
        raise CelerisError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    best = 0.0
    for ans in answers:
        if metric == "exact":
            line = prediction.strip().split("\n")[0].split('"')[0]  # a JSON value ends at its quote
            words = line.split()
            first = _norm(words[0]) if words else ""
            s = float(_norm(line) == _norm(ans) or first == _norm(ans))
        elif metric == "contains":
            s = float(_norm(ans) in prediction.lower())
        elif metric == "code_sim":
            s = difflib.SequenceMatcher(None, _first_code_line(prediction), ans.strip()).ratio()
        else:
            s = _f1(prediction, ans)
        best = max(best, s)
    return best


# ----------------------------------------------------------------------------- reading
def load_tasks(path: str | Path) -> list[dict]:
    """Read a task JSONL file (ours or real LongBench); a malformed line is an error naming its number."""
    path = Path(path)
    out = []
    for no, obj in iter_jsonl(path, "task file"):
        task = obj.get("task") or obj.get("dataset")
        answers = obj.get("answers")
        if not isinstance(task, str) or not task:
            raise CelerisError(f'{path}:{no}: missing "task" (or LongBench "dataset")')
        for key in ("context", "input"):
            if not isinstance(obj.get(key), str):
                raise CelerisError(f'{path}:{no}: "{key}" must be a string')
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise CelerisError(f'{path}:{no}: "answers" must be a non-empty list of strings')
        metric = obj.get("metric") or LONGBENCH_METRICS.get(task, "f1")
        if metric not in METRICS:
            raise CelerisError(f"{path}:{no}: unknown metric {metric!r}; valid: {', '.join(METRICS)}")
        out.append({**obj, "id": str(obj.get("id") or obj.get("_id") or f"{path.stem}-{no}"), "task": task,
                    "metric": metric, "answer_prefix": obj.get("answer_prefix", "")})
    if not out:
        raise CelerisError(f"task file {path} holds no samples")
    return out


def build_prompt(sample: dict, tokenizer, chat: bool | None = None):
    """Token ids `[1, T]` of the prompt and the index where the question starts (for kvpress,
    which compresses only the context). Identical ids for every policy and press."""
    import torch

    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    user = sample["context"] + "\n\n" + sample["input"]
    if use_chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
    else:
        text = user + "\n"
    text += sample.get("answer_prefix", "")
    q_char = text.index(sample["context"]) + len(sample["context"])
    enc = tokenizer(text, add_special_tokens=not use_chat, return_offsets_mapping=True)
    ids = enc["input_ids"]
    split = next((i for i, (a, _) in enumerate(enc["offset_mapping"]) if a >= q_char), len(ids))
    return torch.tensor([ids]), split


# ----------------------------------------------------------------------------- generation
def _haystack(rng: random.Random, n_tokens: int, tok_count: Callable[[str], int], needles: list[str]) -> str:
    """Noise of about `n_tokens` tokens with the needles inserted at random depths (in order)."""
    per = max(1, tok_count(NOISE * 8) // 8)
    sentences = [s + "." for s in NOISE.strip().split(".") if s.strip()]
    n = max(len(needles) + 1, n_tokens * len(sentences) // (per * 1) // 1)
    body = [sentences[i % len(sentences)].strip() for i in range(n)]
    slots = sorted(rng.sample(range(1, n), len(needles)))
    for off, (slot, needle) in enumerate(zip(slots, needles, strict=False)):
        body.insert(slot + off, needle)
    return " ".join(body)


def _passkey(rng, length, count):
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    ctx = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. " + \
        _haystack(rng, length, count, [needle])
    return ctx, "What is the pass key?", [key], "contains", "The pass key is"


def _multi_needle(rng, length, count):
    keys = rng.sample(WORDS, 4)
    vals = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, vals, strict=False)]
    rng.shuffle(needles)
    i = rng.randrange(len(keys))
    ctx = _haystack(rng, length, count, needles)
    return ctx, f"What is the special magic number for {keys[i]} mentioned in the text?", [vals[i]], "contains", \
        f"The special magic number for {keys[i]} is"


def _uuid(rng) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _kv_uuid(rng, length, count):
    per_pair = count(json.dumps({_uuid(rng): _uuid(rng)})) - 2
    n = max(2, length // max(1, per_pair + 1))
    pairs = {_uuid(rng): _uuid(rng) for _ in range(n)}
    key = rng.choice(list(pairs))
    ctx = "JSON data:\n" + json.dumps(pairs, indent=0)
    # The answer prefix repeats the key in the JSON layout, so the model can continue it by copying.
    return ctx, f'Extract the value corresponding to the specified key in the JSON object above.\nKey: "{key}"', \
        [pairs[key]], "exact", f'"{key}": "'


def _var_name(rng) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _variable_tracking(rng, length, count, hops: int = 1):
    names = [_var_name(rng) for _ in range(hops + 1)]
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    ctx = "Memorize and track the chain of variable assignments hidden in the following text.\n" + \
        _haystack(rng, length, count, chain)
    return ctx, f"What is the value of VAR {names[-1]}? Follow the chain of assignments.", [value], "contains", \
        f"The value of VAR {names[-1]} is"


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.glob("*.py")) if 8_000 < p.stat().st_size < 120_000]
    return files


def alpha_rename(source: str, rng: random.Random) -> tuple[str, dict[str, str]]:
    """Rename the identifiers a module defines (functions, classes, arguments, assigned names) to
    random words, consistently; imports, builtins, keywords, dunders and attributes of other objects
    are left alone."""
    tree = ast.parse(source)
    defined: set[str] = set()
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names)
    skip = imported | set(dir(builtins)) | set(keyword.kwlist) | {"self", "cls"}
    names = sorted(n for n in defined if n not in skip and not n.startswith("__"))
    syll = ["ka", "lo", "mi", "ru", "te", "zo", "pa", "ne", "vi", "do", "sa", "gu", "fe", "bo"]
    mapping: dict[str, str] = {}
    used: set[str] = set()
    for n in names:
        while True:
            w = "".join(rng.choice(syll) for _ in range(rng.randint(2, 3))) + "_" + "".join(rng.choice(syll) for _ in range(2))
            if w not in used:
                break
        used.add(w)
        mapping[n] = w.title().replace("_", "") if n[:1].isupper() else ("_" + w if n.startswith("_") else w)
    # Replace NAME tokens in place (right to left per line) so the layout of the file is unchanged.
    lines = source.split("\n")
    edits: dict[int, list[tuple[int, int, str]]] = {}
    for t in tokenize.generate_tokens(io.StringIO(source).readline):
        if t.type == tokenize.NAME and t.string in mapping and t.start[0] == t.end[0]:
            edits.setdefault(t.start[0] - 1, []).append((t.start[1], t.end[1], mapping[t.string]))
    for row, spans in edits.items():
        line = lines[row]
        for a, b, w in sorted(spans, reverse=True):
            line = line[:a] + w + line[b:]
        lines[row] = line
    return "\n".join(lines), mapping


def _code(rng, length, count):
    files = _stdlib_files()
    for _ in range(20):
        path = rng.choice(files)
        try:
            src, mapping = alpha_rename(path.read_text(encoding="utf-8"), rng)
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError):
            continue
        lines = src.split("\n")
        renamed = set(mapping.values())
        cands = [i for i in range(len(lines) // 3, len(lines))
                 if len(lines[i].strip()) >= 12 and not lines[i].strip().startswith(("#", '"', "'"))
                 and any(w in renamed for w in re.findall(r"\w+", lines[i]))]
        if not cands:
            continue
        i = rng.choice(cands)
        ctx_lines = lines[:i]
        # keep the end of the file before the target line, trimmed to about `length` tokens
        per_line = max(1, count("\n".join(ctx_lines[-50:])) // max(1, len(ctx_lines[-50:])))
        ctx_lines = ctx_lines[-max(10, length // per_line):]
        ctx = "\n".join(ctx_lines) + "\n"
        return "Please complete the code given below.\n" + ctx, "Next line of code:", [lines[i].strip()], "code_sim", ""
    raise CelerisError("could not find a standard-library file to build a code task from")


# Answer lengths per kind, like LongBench's dataset2maxlen (a UUID is ~26 tokens with this tokenizer).
MAX_NEW_TOKENS = {"passkey": 16, "multi_needle": 16, "kv_uuid": 40, "variable_tracking": 16, "code": 32}
GENERATORS = {"passkey": _passkey, "multi_needle": _multi_needle, "kv_uuid": _kv_uuid,
              "variable_tracking": _variable_tracking, "code": _code}


# family -> (kinds, generators, answer lengths); "synthetic" is the one NAMM was evolved and selected on.
FAMILIES = {"synthetic": (KINDS, GENERATORS, MAX_NEW_TOKENS),
            "prose": (prose_tasks.KINDS, prose_tasks.GENERATORS, prose_tasks.MAX_NEW_TOKENS)}
HELD_OUT_FAMILIES = ("prose",)

# Longer contexts than any model Celeris runs can read; the cap also keeps `make_tasks` finite.
MAX_LENGTH = 131_072


def check_not_held_out(samples: list[dict], what: str) -> None:
    """Samples of a held-out family (never used for evolution or selection) are refused with `what` in the message."""
    held = {k: f for f in HELD_OUT_FAMILIES for k in FAMILIES[f][0]}
    bad = next((s for s in samples if s["task"] in held), None)
    if bad is not None:
        raise CelerisError(f"{what} sample {bad['id']} is of the {held[bad['task']]!r} task family, which is held out "
                           f"from evolution and selection; use the synthetic family ({', '.join(KINDS)})")


def make_tasks(kinds: list[str] | None = None, lengths: list[int] | None = None, n: int = 10, seed: int = 0,
               count_tokens: Callable[[str], int] | None = None, family: str = "synthetic") -> list[dict]:
    """`n` samples per (kind, length) of one task family, deterministic per `seed`. `count_tokens`
    measures lengths (default: the default model's tokenizer)."""
    if family not in FAMILIES:
        raise CelerisError(f"unknown task family {family!r}; valid: {', '.join(FAMILIES)}")
    family_kinds, generators, max_new = FAMILIES[family]
    kinds = list(kinds or family_kinds)
    lengths = list(lengths or [1024, 2048])
    bad = [k for k in kinds if k not in generators]
    if bad:
        raise CelerisError(f"unknown task kind {bad[0]!r} for the {family} family; valid: {', '.join(family_kinds)}")
    if any(x < 64 for x in lengths):
        raise CelerisError("task lengths must be at least 64 tokens")
    if any(x > MAX_LENGTH for x in lengths):
        raise CelerisError(f"task lengths must be at most {MAX_LENGTH:,} tokens (no model Celeris runs reads more), "
                           f"got {max(lengths):,}")
    if n < 1:
        raise CelerisError(f"--n must be at least 1, got {n}")
    if count_tokens is None:
        from celeris.models import load_tokenizer

        tok = load_tokenizer()
        def count_tokens(s: str) -> int:
            return len(tok(s, add_special_tokens=False)["input_ids"])
    out = []
    for kind in kinds:
        for length in lengths:
            for j in range(n):
                rng = random.Random(f"{seed}-{kind}-{length}-{j}")
                ctx, question, answers, metric, prefix = generators[kind](rng, length, count_tokens)
                out.append({"id": f"{kind}-{length}-s{seed}-{j}", "task": kind, "context": ctx, "input": question,
                            "answers": answers, "length": count_tokens(ctx + "\n\n" + question), "metric": metric,
                            "answer_prefix": prefix, "target_length": length,
                            "max_new_tokens": max_new[kind]})
    return out


def write_tasks(path: str | Path, samples: list[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
