"""Corpora: the built-in stdlib corpus, files, directories, JSONL, and deterministic splits."""

from __future__ import annotations

import json

import pytest

from celeris.corpora import corpus_stats, load_corpus, split_of
from celeris.errors import CelerisError


def test_stdlib_corpus_splits_are_disjoint_deterministic_and_by_file():
    c = load_corpus("python-stdlib")
    assert len(c) > 1000 and any(d.id == "os.py" for d in c)
    splits = {s: {d.id for d in c.split(s)} for s in ("train", "validation", "test")}
    assert not (splits["train"] & splits["validation"]) and not (splits["train"] & splits["test"])
    assert sum(len(v) for v in splits.values()) == len(c)
    assert 0.03 < len(splits["validation"]) / len(c) < 0.08
    again = {d.id for d in load_corpus("python-stdlib", "validation")}
    assert again == splits["validation"]
    assert {d.source for d in c if d.id.startswith("json/")} == {"json"}


def test_split_depends_only_on_the_document_id():
    assert split_of("a/b.py") == split_of("a/b.py")
    assert {split_of(f"doc{i}") for i in range(200)} == {"train", "validation", "test"}


def test_jsonl_corpus_and_its_errors(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"id": "x", "text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    c = load_corpus(str(f))
    assert [d.id for d in c] == ["x", "c.jsonl:3"] and c.texts() == ["hello", "world"]
    f.write_text(json.dumps({"text": "ok"}) + "\n{broken\n")
    with pytest.raises(CelerisError, match=r"c.jsonl:2: not valid JSON"):
        load_corpus(str(f))
    f.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(CelerisError, match=r"c.jsonl:1: .*'text'"):
        load_corpus(str(f))


def test_directory_corpus_skips_and_reports_non_utf8(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second document")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    c = load_corpus(str(tmp_path))
    assert sorted(d.id for d in c) == ["a.txt", "sub/b.md"]
    assert len(c.skipped) == 1 and "not UTF-8" in c.skipped[0][1]


def test_text_file_and_stats(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one two three")
    c = load_corpus(str(f))
    assert corpus_stats(c) == {"documents": 1, "characters": 13}


def test_missing_and_empty_corpora_are_clear_errors(tmp_path):
    with pytest.raises(CelerisError, match="corpus not found"):
        load_corpus(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CelerisError, match="has no documents"):
        load_corpus(str(tmp_path / "empty"))
    with pytest.raises(CelerisError, match="unknown split"):
        load_corpus("python-stdlib", "dev")


def test_datasets_path_loads_a_local_dataset(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text(json.dumps({"text": "alpha beta"}) + "\n" + json.dumps({"text": "gamma"}) + "\n")
    c = load_corpus(f"hf:{d}")
    assert c.texts() == ["alpha beta", "gamma"] and c.documents[0].id.endswith(":0")
    (d / "train.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (tmp_path / "ds2").mkdir()
    (tmp_path / "ds2" / "train.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CelerisError, match="no 'text' column"):
        load_corpus(f"hf:{tmp_path / 'ds2'}")
