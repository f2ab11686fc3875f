"""Curation: dedup with named twins, every quality rule on positive and negative examples,
decontamination, augmentation, round-trip through celeris.corpora, bad input, early stopping replay,
LoRA compute accounting."""

from __future__ import annotations

import ast
import json
import math
import random
import textwrap

import pytest
import torch

from celeris.corpora import Document, load_corpus
from celeris.curation import rules as R
from celeris.curation.augment import augment_code, augment_documents, augment_prose
from celeris.curation.bench import flops_to_reach, replay_early_stopping
from celeris.curation.dedup import NgramContamination, jaccard, normalise
from celeris.curation.pipeline import CurationConfig, curate, curate_documents
from celeris.errors import CelerisError

PROSE = (
    "The history of the river valley is told in the layers of its rocks. Each flood left a thin band of silt, "
    "and over thousands of years those bands grew into the cliffs that walkers see today. Geologists have "
    "counted the layers to estimate how often the river rose. They found that large floods came roughly once "
    "in a century, while smaller ones arrived every few years. The villages that grew along the banks learned "
    "to build on the higher terraces. Their fields were on the flood plain, where the silt made the soil rich. "
    "Farmers planted after the spring floods had passed and harvested before the autumn rains. This rhythm "
    "shaped the calendar of the valley for a very long time, and it is still visible in the festivals held there."
)
PROSE_2 = (
    "A small library opened in the old station building last spring. Volunteers painted the walls, repaired "
    "the shelves and catalogued every donated book by hand. Children come after school to read and to do their "
    "homework at the long tables. On Saturdays an retired teacher runs a reading club for adults who want to "
    "practise. The library has no budget of its own, so it depends on gifts and on the town council. Still, "
    "the number of visitors has doubled since it opened. People say that it has become the heart of the "
    "neighbourhood. The organisers now hope to add a small room for music and a garden with benches outside."
)
CODE = textwrap.dedent('''
    """Small helpers for parsing configuration files."""

    import os


    def read_settings(path, defaults=None):
        """Read KEY=VALUE lines from `path`, falling back to `defaults`."""
        result = dict(defaults or {})
        with open(path) as handle:
            for raw_line in handle:
                stripped = raw_line.strip()
                if not stripped or stripped.startswith("#"):
                    continue  # comments and blank lines carry no settings
                name, _, value = stripped.partition("=")
                result[name.strip()] = value.strip()
        return result


    def settings_path(base):
        candidate = os.path.join(base, "settings.cfg")
        return candidate if os.path.exists(candidate) else None
''')


# ---- dedup --------------------------------------------------------------------------------------

def _near_copy(text: str) -> str:
    """The same text with two sentences' words changed: Jaccard of 5-grams well above 0.8."""
    return text.replace("thousands of years", "many centuries", 1).replace("Farmers", "Growers", 1)


def test_exact_and_near_duplicates_are_removed_with_the_kept_twin_named():
    docs = [Document("a.txt", PROSE), Document("b.txt", PROSE_2),
            Document("c.txt", "  " + PROSE.upper().replace(". ", ".   ")),  # same after normalisation
            Document("d.txt", _near_copy(PROSE))]
    assert normalise(docs[2].text) == normalise(PROSE)
    assert 0.8 < jaccard(PROSE, docs[3].text) < 1.0
    res = curate_documents(docs, CurationConfig(near_dup_threshold=0.7))
    audit = {r.id: r for r in res.removals}
    assert [d.id for d in res.kept] == ["a.txt", "b.txt"]
    assert audit["c.txt"].rule == "exact_dedup" and audit["c.txt"].kept_twin == "a.txt"
    assert audit["d.txt"].rule == "near_dedup" and audit["d.txt"].kept_twin == "a.txt"


def test_near_dedup_respects_the_threshold():
    docs = [Document("a.txt", PROSE), Document("d.txt", _near_copy(PROSE))]
    j = jaccard(PROSE, docs[1].text)
    strict = curate_documents(docs, CurationConfig(rules=("near_dedup",), near_dup_threshold=min(0.99, j + 0.1)))
    assert len(strict.kept) == 2  # below the threshold: both kept
    loose = curate_documents(docs, CurationConfig(rules=("near_dedup",), near_dup_threshold=0.5))
    assert [d.id for d in loose.kept] == ["a.txt"]


# ---- quality rules: positive and negative examples ------------------------------------------------

def test_gopher_quality():
    assert R.gopher_quality(PROSE) is None
    assert "words <" in R.gopher_quality("Too short to be a document.")
    assert "stop words" in R.gopher_quality(" ".join(["apple banana cherry date elder fig grape"] * 10))
    assert "mean word length" in R.gopher_quality(" ".join(["a b c d e the of and"] * 10))
    assert "'#'" in R.gopher_quality(PROSE + " #tag" * 20)
    assert "bullet" in R.gopher_quality("\n".join(f"- the item {i} of the list with words" for i in range(60)))
    assert "letter" in R.gopher_quality(PROSE + " 12 34 56 78" * 30)


def test_gopher_repetition():
    assert R.gopher_repetition(PROSE + "\n\n" + PROSE_2) is None
    assert "duplicate" in R.gopher_repetition("\n\n".join([PROSE, PROSE, PROSE_2]))
    assert "duplicate lines" in R.gopher_repetition("\n".join(["the same line of words here"] * 5 + ["other"]))
    assert "gram" in R.gopher_repetition(PROSE + " buy now buy now buy now buy now" * 30)


def test_c4_quality():
    assert R.c4_quality(PROSE) is None
    assert "lorem ipsum" in R.c4_quality(PROSE + " Lorem ipsum dolor sit amet.")
    assert "'{'" in R.c4_quality(PROSE + " x = {1: 2}.")
    assert "sentences" in R.c4_quality("Menu\n\nHome\n\nAbout us\n\nOne short sentence here.")
    assert "sentences" in R.c4_quality("Enable javascript to see this page. " * 6)


def test_code_generated():
    assert R.code_generated(CODE) is None
    assert R.code_generated('"""Trees can be generated by passing a flag to compile()."""\n') is None
    gen = '""" Python Character Mapping Codec cp1252 generated from \'MAPPINGS/CP1252.TXT\' with gencodec.py.\n"""\n'
    assert "generated from" in R.code_generated(gen)
    assert R.code_generated("# This file is automatically generated. DO NOT EDIT.\nx = 1\n")


def test_code_vendored():
    assert R.code_vendored(CODE, doc_id="pkg/util.py") is None
    assert "_vendor" in R.code_vendored(CODE, doc_id="pip/_vendor/six.py")
    assert R.code_vendored(CODE, doc_id="third_party/lib/x.py")


def test_code_data_table():
    assert R.code_data_table(CODE) is None
    table = "TABLE = [\n" + "".join(f"    ({i}, 0x{i:04x}, 'ch{i}'),\n" for i in range(40)) + "]\n"
    assert "data literals" in R.code_data_table(table)
    short_table = "T = [\n" + "".join(f"    {i},\n" for i in range(5)) + "]\n" + CODE
    assert R.code_data_table(short_table) is None  # a few literal lines in real code are fine


def test_code_long_lines():
    assert R.code_long_lines(CODE) is None
    assert "a line of" in R.code_long_lines("x = '" + "a" * 1200 + "'\n")
    assert "mean line length" in R.code_long_lines("\n".join(["y = " + "1 + " * 40 + "1"] * 10))


def test_code_alpha_ratio():
    assert R.code_alpha_ratio(CODE) is None
    assert "alphabetic" in R.code_alpha_ratio("BLOB = '" + "0123456789+/=" * 80 + "'\n")


def test_code_tiny():
    assert R.code_tiny(CODE) is None
    assert "non-blank lines" in R.code_tiny("from .core import *\n")
    assert "characters" in R.code_tiny("a = 1\nb = 2\nc = 3\nd = 4\ne = 5\n")


def test_rules_apply_by_document_kind():
    table = "TABLE = [\n" + "".join(f"    ({i}, 0x{i:04x}),\n" for i in range(40)) + "]\n"
    docs = [Document("mod.py", CODE), Document("table.py", table), Document("notes.txt", PROSE),
            Document("menu.txt", "Home\nAbout\nContact")]
    res = curate_documents(docs, CurationConfig())
    assert [d.id for d in res.kept] == ["mod.py", "notes.txt"]  # prose rules never judge code, and vice versa
    assert {r.id: r.rule for r in res.removals} == {"table.py": "code_data_table", "menu.txt": "gopher_quality"}


# ---- decontamination ----------------------------------------------------------------------------

def test_decontamination_catches_a_planted_eval_passage():
    eval_passage = PROSE_2
    docs = [Document("clean.txt", PROSE), Document("leaky.txt", PROSE + "\n\n" + " ".join(PROSE_2.split()[:40]) + ".")]
    res = curate_documents(docs, CurationConfig(rules=("decontamination",)), eval_texts=[eval_passage])
    assert [d.id for d in res.kept] == ["clean.txt"]
    assert res.removals[0].id == "leaky.txt" and res.removals[0].rule == "decontamination"
    assert "13-grams" in res.removals[0].detail


def test_decontamination_ignores_boilerplate_common_in_training():
    header = "Licensed to the Python Software Foundation under a contributor agreement and distributed under its licence terms"
    eval_doc = header + " " + PROSE_2
    docs = [Document(f"m{i}.txt", header + f" document {i} " + PROSE) for i in range(8)]
    contam = NgramContamination([eval_doc], 13)
    assert contam.matches(docs[0].text) > 0
    dropped = contam.drop_common((d.text for d in docs), max_doc_freq=5)
    assert dropped > 0 and contam.matches(docs[0].text) == 0
    assert contam.matches(PROSE_2) > 0  # the real passage is still caught


# ---- augmentation -------------------------------------------------------------------------------

def test_code_augmentation_keeps_code_parseable_and_renames_locals(tmp_path):
    rng = random.Random(0)
    out = augment_code(CODE, rng, rename_prob=1.0, docstring_dropout=1.0)
    tree = ast.parse(out)
    assert out != CODE
    assert "comments and blank lines" not in out  # comments dropped
    assert ast.get_docstring(tree) is None  # docstrings dropped
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "read_settings")
    assert [a.arg for a in fn.args.args] == ["path", "defaults"]  # parameters are never renamed
    stored = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    assert not stored & {"result", "handle", "raw_line", "stripped", "name", "value"}
    # behaviour is unchanged: both versions read the same settings from a real file
    ns_a, ns_b = {}, {}
    exec(compile(CODE, "a", "exec"), ns_a)
    exec(compile(out, "b", "exec"), ns_b)
    cfg = tmp_path / "settings.cfg"
    cfg.write_text("# comment = ignored\n\nhost = example.org\nport=8080\n  user = ada=lovelace \n")
    want = {"port": "8080", "mode": "fast", "host": "example.org", "user": "ada=lovelace"}
    for ns in (ns_a, ns_b):
        assert ns["read_settings"](cfg, {"port": "80", "mode": "fast"}) == want
        assert ns["settings_path"](tmp_path) == str(cfg) and ns["settings_path"](tmp_path / "none") is None


def test_code_augmentation_on_real_stdlib_files_stays_parseable():
    docs = [d for d in load_corpus("python-stdlib").documents if d.id in
            ("textwrap.py", "json/decoder.py", "colorsys.py", "bisect.py", "fnmatch.py")]
    assert len(docs) == 5
    rng = random.Random(1)
    for d in docs:
        ast.parse(augment_code(d.text, rng, rename_prob=1.0))


def test_augmentation_keeps_invalid_code_and_prose_words():
    rng = random.Random(0)
    assert augment_code("def broken(:\n", rng) == "def broken(:\n"
    assert augment_prose(PROSE + "\n\n" + PROSE_2, rng).split() == (PROSE + " " + PROSE_2).split()
    docs = augment_documents([Document("a.py", CODE), Document("b.txt", PROSE)], seed=0)
    assert [d.id for d in docs] == ["a.py", "b.txt", "a.py#aug1", "b.txt#aug1"]


# ---- the curate command: files, round trip, bad input --------------------------------------------

@pytest.fixture
def small_corpus(tmp_path):
    src = tmp_path / "corpus"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text(CODE)
    (src / "pkg" / "b.py").write_text(CODE)  # exact duplicate
    (src / "pkg" / "gen.py").write_text("# Automatically generated file. Do not edit.\n" + CODE)
    (src / "notes.txt").write_text(PROSE)
    (src / "more.txt").write_text(PROSE_2)
    (src / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    return src


def test_curated_corpus_round_trips_through_celeris_corpora(small_corpus, tmp_path):
    out = tmp_path / "curated"
    summary = curate(str(small_corpus), out, tokenizer=None, report=True)
    assert summary["documents_in"] == 5 and summary["documents_out"] == 3
    assert summary["removed"]["exact_dedup"] == 1 and summary["removed"]["code_generated"] == 1
    assert summary["tokens_out"] < summary["tokens_in"]
    assert summary["skipped_files"][0]["path"].endswith("latin1.txt")
    assert "UTF-8" in summary["skipped_files"][0]["reason"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert {k: on_disk[k] for k in ("documents_in", "documents_out", "tokens_in", "tokens_out", "removed")} == \
           {k: summary[k] for k in ("documents_in", "documents_out", "tokens_in", "tokens_out", "removed")}
    audit = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    assert {"id": "pkg/b.py", "rule": "exact_dedup", "kept_twin": "pkg/a.py"} in [
        {k: a[k] for k in ("id", "rule", "kept_twin")} for a in audit]
    original = load_corpus(str(small_corpus))
    curated = load_corpus(str(out / "corpus.jsonl"))
    assert [d.id for d in curated] == ["more.txt", "notes.txt", "pkg/a.py"]
    for d in curated:
        twin = next(o for o in original if o.id == d.id)
        assert d.text == twin.text  # kept documents are byte-identical
        assert [x.id for x in curated.split("train")] == [x.id for x in original.split("train") if x.id in
                                                           {c.id for c in curated}]
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert (small_corpus / "pkg" / "b.py").read_text() == CODE  # the input is untouched


def test_bad_input_gives_clear_errors(small_corpus, tmp_path):
    with pytest.raises(CelerisError, match="overlaps the input"):
        curate(str(small_corpus), small_corpus / "out", tokenizer=None)
    with pytest.raises(CelerisError, match="overlaps the input"):
        curate(str(small_corpus), small_corpus, tokenizer=None)
    with pytest.raises(CelerisError, match=r"threshold must be in \(0, 1\)"):
        curate(str(small_corpus), tmp_path / "o", CurationConfig(near_dup_threshold=1.5), tokenizer=None)
    with pytest.raises(CelerisError, match="unknown rule"):
        curate(str(small_corpus), tmp_path / "o", CurationConfig(rules=("nope",)), tokenizer=None)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CelerisError, match="no documents"):
        curate(str(empty), tmp_path / "o", tokenizer=None)
    other = tmp_path / "occupied"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CelerisError, match="not a curation output"):
        curate(str(small_corpus), other, tokenizer=None)
    assert (other / "keep.txt").read_text() == "mine"


def test_cli_curate_reports_errors_with_exit_code_2(small_corpus, tmp_path, capsys):
    from celeris.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["curate", str(small_corpus), "--out", str(tmp_path / "o"), "--threshold", "0", "--tokenizer", "words"])
    assert exc.value.code == 2
    assert "threshold" in capsys.readouterr().err
    main(["curate", str(small_corpus), "--out", str(tmp_path / "o"), "--tokenizer", "words", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["documents_out"] == 3


# ---- early stopping and compute ---------------------------------------------------------------

def test_early_stopping_replay_matches_the_trainer(tmp_path):
    from celeris.models import new_model
    from celeris.trainer import TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 96, (32, 16), generator=g)
    val = torch.randint(0, 96, (8, 16), generator=g)

    def run(patience, name):
        net = new_model("nano", vocab_size=96, max_position_embeddings=64, seed=0)
        cfg = TrainConfig(max_steps=60, batch_size=4, lr=3e-2, warmup_steps=2, eval_every=3, eval_batches=2,
                          patience=patience, progress=False, save_every=10**9)
        return Trainer(net, train, val, tmp_path / name, cfg, export_fn=None).train(resume=False)

    full = run(None, "full")
    replay = replay_early_stopping(full.history, patience=2)
    assert replay["stopped"], "random targets overfit: the validation loss must stop improving"
    stopped = run(2, "es")
    assert stopped.stop_reason == "early_stopping"
    assert stopped.steps == replay["stop_step"]
    assert stopped.best_val_loss == pytest.approx(replay["best_val_loss_at_stop"])
    assert replay["stop_step"] - stopped.best_step == 2 * 3  # patience checks after the best one
    assert flops_to_reach(full.history, full.best_val_loss) == pytest.approx(
        next(h["flops"] for h in full.history if h["step"] == full.best_step))


def test_lora_training_flops_are_about_4nd(tiny_llama):
    from celeris.compute import count_parameters, training_flops_per_token
    from celeris.curation.transfer import LORA_TARGETS, lora_model

    n = count_parameters(tiny_llama)
    full = training_flops_per_token(tiny_llama, 16)
    assert full.dense == 6 * n
    # rank-2 A [2, in] and B [out, 2] on every targeted projection
    adapters = sum(2 * (m.in_features + m.out_features) for name, m in tiny_llama.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS)
    peft = lora_model(tiny_llama, r=2)
    fpt = training_flops_per_token(peft, 16)
    n_lora = count_parameters(peft, trainable_only=True)
    assert n_lora == adapters and 0 < n_lora < 0.2 * n
    assert fpt.dense == pytest.approx(4 * fpt.n_params + 2 * n_lora)
    assert fpt.n_params == pytest.approx(n + n_lora)
    assert 4.0 < fpt.dense / n < 4.5  # ≈ 4·N: no weight gradients for the frozen base


def test_lora_on_the_default_model_trains_adapters_only_through_the_trainer(default_model, tmp_path):
    """Integration: one LoRA step on SmolLM2-135M through the shared Trainer."""
    import copy

    from celeris.compute import count_parameters, training_flops_per_token
    from celeris.curation.transfer import lora_model
    from celeris.lm import token_blocks
    from celeris.trainer import TrainConfig, Trainer

    base, tok = default_model
    net = lora_model(copy.deepcopy(base), r=4)
    blocks = token_blocks([CODE, PROSE, PROSE_2], tok, 32)
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad and "q_proj" in n}
    lora_b = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad and "lora_B" in n}
    fpt = training_flops_per_token(net, 32)
    cfg = TrainConfig(max_steps=2, batch_size=2, lr=1e-2, warmup_steps=0, eval_every=2, eval_batches=1,
                      progress=False, save_every=10**9)
    trainer = Trainer(net, blocks[:4], blocks[4:6], tmp_path / "lora", cfg, flops_per_token=fpt, export_fn=None)
    before = trainer.evaluate()
    res = trainer.train(resume=False)
    with torch.no_grad():  # LoRA's B starts at zero: before training the adapted model is the base model
        base_loss = float(base(input_ids=blocks[4:6], labels=blocks[4:6]).loss)
    assert before == pytest.approx(base_loss, rel=1e-5)
    assert res.best_val_loss is not None and math.isfinite(res.best_val_loss)
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if n in frozen)
    assert any(not torch.equal(p, lora_b[n]) for n, p in net.named_parameters() if n in lora_b)
    assert res.flops_dense == pytest.approx(fpt.dense * res.tokens)
    assert fpt.dense / (4 * count_parameters(base)) == pytest.approx(1.0, abs=0.01)


def test_curating_an_in_memory_corpus_into_a_folder_below_the_cwd(tmp_path, monkeypatch):
    from celeris.corpora import Corpus, Document
    from celeris.curation.pipeline import curate

    monkeypatch.chdir(tmp_path)
    docs = [Document(f"d{i}.py", f"def f{i}(x):\n    return x + {i}\n" * 5, "m") for i in range(5)]
    s = curate(Corpus("mem", docs), "out/curated", tokenizer=None)
    assert s["documents_in"] == 5 and (tmp_path / "out" / "curated" / "summary.json").is_file()
