"""Tests for jaxattn.corpus.sources: reading files, directories, globs and the built-in corpus."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxattn.corpus import (
    Corpus,
    Document,
    default_documents,
    directory_glob,
    load_corpus,
    read_documents,
)
from jaxattn.corpus import builtin as B
from jaxattn.errors import JaxattnError
from tests.corpus.helpers import write

# --------------------------------------------------------------------------- #
# Files, directories, globs
# --------------------------------------------------------------------------- #


def test_single_file(tmp_path: Path) -> None:
    f = write(tmp_path / "a.txt", "hello world\n")
    docs = read_documents(str(f), progress=False)
    assert docs == [Document(name="a.txt", text="hello world\n")]
    c = load_corpus(f, progress=False)  # PathLike accepted too
    assert c.source == str(f)
    assert c.num_docs == 1 and c.doc_names == ("a.txt",)
    assert c.num_tokens == len("hello world\n")
    assert c.tokens.dtype == np.int32 and c.doc_ids.dtype == np.int32
    assert c.tokenizer.decode(c.tokens) == "hello world\n"
    assert c.vocab_size == len(set("hello world\n"))


def test_directory_recursive_sorted_and_skips(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a.txt", "ay")
    write(tmp_path / "sub" / "c.md", "sea")
    write(tmp_path / "sub" / "deeper" / "d", "dee")
    write(tmp_path / ".hidden.txt", "secret")
    write(tmp_path / ".git" / "config", "gitstuff")
    write(tmp_path / "empty.txt", "")
    write(tmp_path / "img.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(tmp_path / "sub" / "e.TXT", "eee")
    write(tmp_path / "sub" / "f.text", "eff")
    with pytest.warns(
        UserWarning, match=r"3 file\(s\) not named \*\.txt or \*\.text skipped: img.png, sub/c.md, sub/deeper/d$"
    ):
        docs = read_documents(str(tmp_path), progress=False)
    assert [d.name for d in docs] == ["a.txt", "b.txt", "sub/e.TXT", "sub/f.text"]
    assert [d.text for d in docs] == ["ay", "bee", "eee", "eff"]


def test_directory_counts_txt_only_and_glob_overrides(tmp_path: Path) -> None:
    """A metadata file in a corpus folder (Shakespeare's SOURCE.md) is not a document."""
    write(tmp_path / "play.txt", "to be")
    write(tmp_path / "SOURCE.md", "# provenance")
    with pytest.warns(UserWarning, match=r"1 file\(s\) not named .* skipped: SOURCE.md"):
        c = load_corpus(str(tmp_path), progress=False)
    assert c.doc_names == ("play.txt",) and c.num_docs == 1
    # An explicit file, a glob, or directory_glob (the CLI's --glob) reads any name.
    assert [d.name for d in read_documents(str(tmp_path / "SOURCE.md"), progress=False)] == ["SOURCE.md"]
    assert [d.name for d in read_documents(str(tmp_path / "*"), progress=False)] == ["SOURCE.md", "play.txt"]
    write(tmp_path / "sub" / "more.md", "more")
    pattern = directory_glob(str(tmp_path), "*.md")
    assert [d.name for d in read_documents(pattern, progress=False)] == ["SOURCE.md", "sub/more.md"]
    with pytest.raises(JaxattnError, match="needs a directory"):
        directory_glob(str(tmp_path / "play.txt"), "*.md")
    with pytest.raises(JaxattnError, match="base-name pattern"):
        directory_glob(str(tmp_path), "sub/*.md")
    # No warning when nothing is skipped.
    write(tmp_path / "clean" / "x.txt", "x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [d.name for d in read_documents(str(tmp_path / "clean"), progress=False)] == ["x.txt"]


def test_shakespeare_directory_has_36_plays() -> None:
    from tests.corpus.helpers import SHAKESPEARE

    if not SHAKESPEARE.is_dir():
        pytest.skip(f"no shared data at {SHAKESPEARE}")
    with pytest.warns(UserWarning, match=r"1 file\(s\) not named \*\.txt or \*\.text skipped: SOURCE.md$"):
        docs = read_documents(str(SHAKESPEARE), progress=False)
    assert len(docs) == 36 and all(d.name.endswith("_gut.txt") for d in docs)


def test_glob_patterns(tmp_path: Path) -> None:
    write(tmp_path / "x_gut.txt", "xx")
    write(tmp_path / "y_gut.txt", "yy")
    write(tmp_path / "SOURCE.md", "not me")
    write(tmp_path / "nested" / "z_gut.txt", "zz")
    docs = read_documents(str(tmp_path / "*_gut.txt"), progress=False)
    assert [d.name for d in docs] == ["x_gut.txt", "y_gut.txt"]
    docs = read_documents(str(tmp_path / "**" / "*_gut.txt"), progress=False)
    assert [d.name for d in docs] == ["nested/z_gut.txt", "x_gut.txt", "y_gut.txt"]
    c = load_corpus(str(tmp_path / "*_gut.txt"), progress=False)
    assert c.source == str(tmp_path / "*_gut.txt")
    assert c.num_docs == 2


def test_glob_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "data" / "one.txt", "1")
    write(tmp_path / "data" / "two.txt", "2")
    monkeypatch.chdir(tmp_path)
    assert [d.name for d in read_documents("data/*.txt", progress=False)] == ["one.txt", "two.txt"]
    assert [d.name for d in read_documents("data", progress=False)] == ["one.txt", "two.txt"]


def test_progress_off_is_silent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(20):
        write(tmp_path / f"f{i:02d}.txt", f"text {i}")
    docs = read_documents(str(tmp_path), progress=False)
    assert len(docs) == 20
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- #
# Built-in default corpus
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def default_corpus() -> Corpus:
    return load_corpus(None, progress=False)


def test_default_corpus_size_and_content(default_corpus: Corpus) -> None:
    c = default_corpus
    assert c.source == "builtin:stdlib-docstrings"
    assert c.num_tokens >= 1_000_000
    assert c.num_docs >= 100
    assert 60 <= c.vocab_size <= 1000
    names = list(c.doc_names)
    assert names == sorted(names)
    assert not any(n.startswith(("test/", "idlelib/")) or "/tests/" in n or "site-packages" in n for n in names)
    assert "json/__init__.py" in names
    info = c.info()
    json.dumps(info)
    assert "python_version" in info
    text = c.tokenizer.decode(c.documents_tokens()[names.index("json/__init__.py")])
    assert "JSON" in text


def test_default_corpus_deterministic(default_corpus: Corpus) -> None:
    again = load_corpus(None, progress=False)
    np.testing.assert_array_equal(again.tokens, default_corpus.tokens)
    assert again.sha256 == default_corpus.sha256
    # Uncached re-parse (a prefix of the stdlib) gives identical documents.
    root = B.sysconfig.get_paths()["stdlib"]
    a = B._default_documents_uncached(root, 200_000, False)
    b = B._default_documents_uncached(root, 200_000, False)
    assert a == b
    assert sum(len(d.text) for d in a) == 200_000
    assert a == default_documents(max_chars=200_000, progress=False)
    assert tuple(d.name for d in a) == default_corpus.doc_names[: len(a)]


def test_builtin_corpus_disk_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXATTN_CORPUS_CACHE", str(tmp_path))
    monkeypatch.setattr(B, "_DEFAULT_CACHE", {})
    root = B.sysconfig.get_paths()["stdlib"]
    want = tuple(B._default_documents_uncached(root, 100_000, False))
    assert B.default_documents(max_chars=100_000, progress=False) == list(want)  # parsed, then written
    files = list(tmp_path.glob("stdlib-docstrings-*.json"))
    assert len(files) == 1
    # A later run reads the file and parses nothing.
    monkeypatch.setattr(B, "_DEFAULT_CACHE", {})
    monkeypatch.setattr(B, "_module_docstrings", lambda source: pytest.fail("parsed despite the cache"))
    assert B.default_documents(max_chars=100_000, progress=False) == list(want)
    # Another size is another key; a corrupt file is parsed anew, not trusted.
    assert B._disk_cache_path(root, 100_001) != B._disk_cache_path(root, 100_000)
    monkeypatch.undo()
    monkeypatch.setenv("JAXATTN_CORPUS_CACHE", str(tmp_path))
    monkeypatch.setattr(B, "_DEFAULT_CACHE", {})
    files[0].write_text("{not json")
    assert B.default_documents(max_chars=100_000, progress=False) == list(want)
    assert json.loads(files[0].read_text())["documents"][0] == [want[0].name, want[0].text]  # rewritten
    monkeypatch.setenv("JAXATTN_CORPUS_CACHE", "0")
    assert B.corpus_cache_dir() is None and B._disk_cache_path(root, 100_000) is None


def test_default_documents_bad_max_chars() -> None:
    with pytest.raises(JaxattnError, match="max_chars"):
        default_documents(max_chars=0)


# --------------------------------------------------------------------------- #
# Hostile input
# --------------------------------------------------------------------------- #


def test_missing_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(JaxattnError, match=f"no such file or directory: {missing}$"):
        load_corpus(missing, progress=False)
    with pytest.raises(JaxattnError, match="no such file or directory"):
        read_documents("", progress=False)


def test_glob_matching_nothing(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*.nothing")
    with pytest.raises(JaxattnError, match=r"no files match: .*\*\.nothing"):
        read_documents(pattern, progress=False)


def test_directory_without_text_files(tmp_path: Path) -> None:
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(JaxattnError, match="no text files in directory: .*empty_dir"):
        read_documents(str(tmp_path / "empty_dir"), progress=False)
    write(tmp_path / "bin_dir" / "a.txt", b"\x00\x01\x02")
    write(tmp_path / "bin_dir" / ".hidden.txt", "hidden text is not read")
    with pytest.raises(JaxattnError, match=r"no text files in directory: .*bin_dir \(1 binary file"):
        read_documents(str(tmp_path / "bin_dir"), progress=False)
    with pytest.raises(JaxattnError, match=r"no text files match: .*\(1 binary file"):
        read_documents(str(tmp_path / "bin_dir" / "*.txt"), progress=False)


def test_empty_files(tmp_path: Path) -> None:
    f = write(tmp_path / "empty.txt", "")
    with pytest.raises(JaxattnError, match=f"corpus is empty: {f}"):
        load_corpus(str(f), progress=False)
    write(tmp_path / "d" / "e1.txt", "")
    write(tmp_path / "d" / "e2.txt", b"\xef\xbb\xbf")  # only a BOM
    write(tmp_path / "d" / "b.txt", b"\x00")
    with pytest.raises(JaxattnError, match=r"corpus is empty: .*d \(2 empty file\(s\); 1 binary"):
        load_corpus(str(tmp_path / "d"), progress=False)
    write(tmp_path / "d" / "real.txt", "x")
    assert [d.name for d in read_documents(str(tmp_path / "d"), progress=False)] == ["real.txt"]


def test_single_binary_file_is_an_error(tmp_path: Path) -> None:
    f = write(tmp_path / "data.bin", b"abc\x00def" + bytes(range(256)))
    with pytest.raises(JaxattnError, match=f"not a text file .*: {f}"):
        load_corpus(str(f), progress=False)


def test_nul_after_8k_is_text(tmp_path: Path) -> None:
    f = write(tmp_path / "late.txt", b"a" * 9000 + b"\x00")
    (doc,) = read_documents(str(f), progress=False)
    assert len(doc.text) == 9001


def test_not_a_regular_file() -> None:
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(JaxattnError, match="not a regular file or directory: /dev/null"):
        read_documents("/dev/null", progress=False)


def test_non_utf8_bytes_are_replaced(tmp_path: Path) -> None:
    write(tmp_path / "latin1.txt", "café naïve".encode("latin-1"))
    write(tmp_path / "ok.txt", "fine")
    with pytest.warns(UserWarning, match=r"1 file\(s\) .* not valid UTF-8 \(first: latin1.txt\)"):
        docs = read_documents(str(tmp_path), progress=False)
    assert docs[0].text == "caf\ufffd na\ufffdve"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = load_corpus(str(tmp_path / "latin1.txt"), progress=False)
    assert "\ufffd" in c.tokenizer.vocab
    # Truncated multi-byte sequence and random bytes never raise.
    rng = np.random.default_rng(0)
    noise = rng.integers(1, 256, size=5000, dtype=np.uint8).tobytes()  # no NUL: "text"
    write(tmp_path / "noise" / "n.txt", noise + "é".encode()[:1])
    with pytest.warns(UserWarning):
        (doc,) = read_documents(str(tmp_path / "noise"), progress=False)
    assert doc.text.endswith("\ufffd")


def test_line_endings_and_boms(tmp_path: Path) -> None:
    write(tmp_path / "crlf.txt", b"a\r\nb\rc\n")
    write(tmp_path / "bom8.txt", b"\xef\xbb\xbfhi")
    write(tmp_path / "utf16.txt", "hé\r\n".encode("utf-16"))
    texts = {d.name: d.text for d in read_documents(str(tmp_path), progress=False)}
    assert texts == {"crlf.txt": "a\nb\nc\n", "bom8.txt": "hi", "utf16.txt": "hé\n"}


def test_unreadable_file(tmp_path: Path) -> None:
    f = write(tmp_path / "locked.txt", "secret")
    f.chmod(0)
    try:
        if os.access(f, os.R_OK):
            pytest.skip("running as a user who can read anything")
        with pytest.raises(JaxattnError, match="cannot read .*locked.txt"):
            read_documents(str(f), progress=False)
    finally:
        f.chmod(0o644)


def test_errors_are_value_errors() -> None:
    assert issubclass(JaxattnError, ValueError)
