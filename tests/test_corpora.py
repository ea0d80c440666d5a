"""Corpora: registry, real text, and the token cache (round trip, corruption, atomic writes)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from cardhouse.data.corpora import CORPORA, Corpus, available_corpora, load_text
from cardhouse.data.text import unwrap_greedy
from cardhouse.data.token_cache import tokenize_corpus
from cardhouse.data.wikipedia import article_prose

TINY_TEXT = "The quick brown fox jumps over the lazy dog.\n\nSummer is warm and the nights are short."


@pytest.fixture
def tiny_corpus(monkeypatch, tmp_path):
    """A registered corpus with a build counter, and a private cache folder."""
    monkeypatch.setenv("CARDHOUSE_CACHE", str(tmp_path))
    builds = []

    def build() -> str:
        builds.append(1)
        return TINY_TEXT

    monkeypatch.setitem(CORPORA, "tiny", Corpus("tiny", "test text", "this test", build))
    return builds


def cache_files(tmp_path) -> list:
    return sorted((tmp_path / "tokens").iterdir())


def test_registry_lists_the_corpora():
    # the three perplexity corpora first, then the extra training text of cardhouse emergence
    assert available_corpora() == ["wikipedia", "c4", "austen", "kjv", "wiki-demo", "botchan"]
    assert all(CORPORA[name].name == name and CORPORA[name].source for name in available_corpora())


@pytest.mark.parametrize("call", [load_text, lambda name: tokenize_corpus(None, name)])
def test_unknown_corpus_names_the_known_ones(call):
    with pytest.raises(ValueError, match="unknown corpus 'pg19'.*wikipedia, c4, austen"):
        call("pg19")


# Measured on 2026-11-23 with gensim 4.4.0, mwparserfromhell 0.7.2, llamafactory 0.9.5 and Debian
# r-cran-janeaustenr 1.0.0-1: len(text), len(text.split()) and text.count("\n\n") + 1 of load_text(name).
# Wikipedia depends on mwparserfromhell's markup stripping, hence the 1% tolerance there.
# kjv (Debian bible-kjv 4.38), wiki-demo (llamafactory 0.9.5) and botchan (sentencepiece 0.2.3): measured
# on 2026-11-23 the same way.
COLUMNS = ("chars", "words", "blocks", "tolerance", "start")
REAL_TEXT = {name: dict(zip(COLUMNS, row)) for name, row in {
    "wikipedia": (2_581_881, 407_753, 5_201, 0.01,
                  "Anarchism is a political philosophy that advocates self-governed societies"),
    "c4": (737_759, 122_925, 300, 0.0, "Don’t think you need all the bells and whistles? No problem."),
    "austen": (4_022_320, 717_537, 10_298, 0.0,
               "SENSE AND SENSIBILITY\n\nby Jane Austen\n\n(1811)\n\nCHAPTER 1\n\nThe family of Dashwood"),
    "kjv": (4_139_036, 789_634, 1_189, 0.0,
            "In the beginning God created the heaven and the earth. And the earth was without form"),
    "wiki-demo": (1_026_482, 157_730, 30, 0.0,
                  "Anarchism is a political philosophy and movement that is sceptical of authority"),
    "botchan": (255_546, 47_665, 785, 0.0,
                "BOTCHAN (MASTER DARLING)\n\nBy The Late Mr. Kin-nosuke Natsume\n\nTRANSLATED By"),
}.items()}


@pytest.mark.parametrize("name", list(REAL_TEXT))
def test_each_corpus_is_the_measured_real_text(name):
    expected = REAL_TEXT[name]
    text = load_text(name)
    assert text.startswith(expected["start"])
    for measured, value in (("chars", len(text)), ("words", len(text.split())), ("blocks", text.count("\n\n") + 1)):
        assert abs(value - expected[measured]) <= expected["tolerance"] * expected[measured], (measured, value)
    if name == "wikipedia":
        assert "{{" not in text and "[[" not in text and "<ref" not in text and "|" not in text  # no markup left
    assert load_text(name) == text  # deterministic


def test_austen_books_come_in_publication_order():
    paragraphs = load_text("austen").split("\n\n")
    titles = ["SENSE AND SENSIBILITY", "PRIDE AND PREJUDICE", "MANSFIELD PARK", "EMMA", "NORTHANGER ABBEY",
              "Persuasion"]  # each book's first line, as janeaustenr has it
    positions = [paragraphs.index(title) for title in titles]
    assert positions[0] == 0 and positions == sorted(positions)


def test_kjv_chapters_run_from_genesis_to_revelation_without_verse_numbers():
    chapters = load_text("kjv").split("\n\n")
    assert chapters[0].endswith("And the evening and the morning were the sixth day.")  # Genesis 1:31
    assert chapters[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")  # Revelation 22:21
    assert not any(ch.isdigit() for ch in chapters[0])


def test_botchan_is_the_book_unwrapped_into_paragraphs():
    paragraphs = load_text("botchan").split("\n\n")
    assert paragraphs[-2:] == ["So Kiyo's grave is in the Yogen temple at Kobinata.", "--(THE END)--"]
    assert "CHAPTER XI." in paragraphs and "Gutenberg" not in load_text("botchan")  # no header, notes or license
    # hard-wrapped lines are joined: paragraphs are longer than the 72 columns of the file
    assert sum(len(p) > 72 for p in paragraphs) > 0.5 * len(paragraphs)


def test_greedy_unwrap_ends_a_paragraph_where_the_next_word_would_have_fit():
    lines = ["aaa bbb ccc", "ddd.", "eee fff ggg", "hhh"]  # wrapped at 11 columns
    assert unwrap_greedy(lines, 11) == ["aaa bbb ccc ddd.", "eee fff ggg hhh"]


def test_token_cache_round_trip(tiny_corpus, tokenizer, tmp_path):
    token_ids = tokenize_corpus(tokenizer, "tiny")
    assert token_ids.dtype == torch.long and token_ids.ndim == 1
    assert token_ids.tolist() == tokenizer(TINY_TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id not in token_ids.tolist()
    (cache_file,) = cache_files(tmp_path)
    assert cache_file.name.startswith("tiny-") and cache_file.suffix == ".safetensors"

    assert torch.equal(tokenize_corpus(tokenizer, "tiny"), token_ids)
    assert torch.equal(tokenize_corpus(tokenizer, "tiny", max_tokens=7), token_ids[:7])
    assert len(tiny_corpus) == 1  # built once: the text cache and then the token cache answered


def test_another_vocabulary_gets_another_cache_file(tiny_corpus, tokenizer, tmp_path):
    from copy import deepcopy

    tokenize_corpus(tokenizer, "tiny")
    other = deepcopy(tokenizer)
    other.add_tokens(["quick"])
    assert tokenize_corpus(other, "tiny").tolist() != tokenize_corpus(tokenizer, "tiny").tolist()
    assert len(cache_files(tmp_path)) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_token_cache_is_rebuilt(tiny_corpus, tokenizer, tmp_path, damage):
    from safetensors.torch import load_file

    expected = tokenize_corpus(tokenizer, "tiny")
    (cache_file,) = cache_files(tmp_path)
    data = cache_file.read_bytes()
    cache_file.write_bytes({"garbage": b"\x00not a safetensors file" * 10, "truncated": data[: len(data) - 5],
                            "empty": b""}[damage])

    assert torch.equal(tokenize_corpus(tokenizer, "tiny"), expected)
    assert torch.equal(load_file(cache_file)["token_ids"].long(), expected)  # rebuilt in place


def test_interrupted_cache_write_leaves_no_file(tiny_corpus, tokenizer, tmp_path, monkeypatch):
    import safetensors.torch

    def interrupted_save(tensors, filename, metadata=None):
        with open(filename, "wb") as half_written:
            half_written.write(b"{\"token_ids\"")
        raise KeyboardInterrupt

    real_save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(tokenizer, "tiny")
    assert cache_files(tmp_path) == []  # neither the cache file nor the temporary one

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert tokenize_corpus(tokenizer, "tiny").numel() == len(TINY_TEXT)  # one token per character
    assert len(cache_files(tmp_path)) == 1


def test_wiki_prose_filter_drops_markup_and_back_matter():
    markup = (
        "{{Infobox|name=x}}'''Alpha''' is a [[letter]] used in many [[Language|languages]] around the world "
        "today.<ref>{{cite book|title=A}}</ref>\n"
        "[[File:A.png|thumb|200px|A picture of the first letter of many alphabets in use today]]\n"
        "{| class=wikitable\n| a cell || with some words in it that are not prose at all here\n|}\n"
        "Short line.\n"
        "== References ==\n"
        "Smith, John (1999). A book about letters and the alphabets that use them in print.\n"
    )
    assert article_prose(markup) == [
        "Alpha is a letter used in many languages around the world today."]


@pytest.mark.real
def test_smollm2_token_counts():
    from cardhouse.models import load_model

    tokenizer = load_model("smollm2-135m").tokenizer
    # measured on 2026-11-23: len(tokenize_corpus(SmolLM2 tokenizer, name)), same text versions as REAL_TEXT
    counts = {"wikipedia": 566_443, "c4": 167_036, "austen": 927_382, "kjv": 993_042, "wiki-demo": 230_272,
              "botchan": 62_271}
    for name, count in counts.items():
        token_ids = tokenize_corpus(tokenizer, name)
        assert abs(len(token_ids) - count) <= REAL_TEXT[name]["tolerance"] * count, name
        assert tokenizer.bos_token_id not in token_ids[:1000].tolist()
