"""Hostile input at the command line: exit status 2, exactly one line on stderr, no traceback.

Each case asserts the exact line the user sees. Most run in-process (``cli.main`` with capsys);
a few run ``python -m jaxattn.cli`` in a subprocess, as a user would. The full successful runs
(non-UTF-8 bytes, empty and binary files inside a directory) are in test_determinism.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxattn
from jaxattn import cli, options, pipeline
from jaxattn.corpus import corpus_from_ids
from jaxattn.errors import JaxattnError
from jaxattn.output import artefacts as io

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "small", "--layers", "2", "--heads", "2", "--d-model", "16", "--d-head", "4"]
TINY += ["--seq-len", "8", "--num-seqs", "2", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Small hostile and benign inputs."""
    d = tmp_path_factory.mktemp("hostile")
    (d / "bin.dat").write_bytes(b"ab\x00cd")
    (d / "empty.txt").write_bytes(b"")
    (d / "emptydir").mkdir()
    (d / "bindir").mkdir()
    (d / "bindir" / "x.txt").write_bytes(b"\x00" * 10)  # a text name, binary bytes
    (d / "mixdir").mkdir()
    (d / "mixdir" / "x.txt").write_bytes(b"\x00" * 10)
    (d / "mddir").mkdir()
    (d / "mddir" / "notes.md").write_text("markdown, not a .txt")
    (d / "mixdir" / "e.txt").write_bytes(b"")
    (d / "short.txt").write_text("abc")
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and then it ran off to see what the dog did".split()
    (d / "small.txt").write_text((" ".join(rng.choice(words, 120)))[:449] + "\n")  # 450 chars: 45 held out
    (d / "eval.txt").write_text(" ".join(rng.choice(words, 60)) + "\n")
    return d


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse errors exit from inside the parser
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(code: int, err: str, line: str) -> None:
    """Exit status 2 and exactly ``line`` on stderr: one line, no traceback."""
    assert code == 2, err
    assert err.splitlines() == [line], err
    assert "Traceback" not in err


def analyze(files: Path, *extra: str) -> list[str]:
    return ["analyze", *TINY, "--corpus", str(files / "small.txt"), "--out", str(files / "out"), *extra]


# (case id, extra arguments, exact stderr line); ``{d}`` is the fixture directory.
CASES = [
    ("binary file", ["--corpus", "{d}/bin.dat"], "not a text file (NUL bytes in its first 8 KiB): {d}/bin.dat"),
    ("empty file", ["--corpus", "{d}/empty.txt"], "corpus is empty: {d}/empty.txt (1 empty file(s))"),
    ("empty directory", ["--corpus", "{d}/emptydir"], "no text files in directory: {d}/emptydir"),
    (
        "directory without *.txt files",
        ["--corpus", "{d}/mddir"],
        "no text files in directory: {d}/mddir (1 file(s) not named *.txt or *.text skipped: notes.md; "
        "pass a glob such as DIR/**/*.md to read them)",
    ),
    ("--glob without a directory", ["--glob", "*.md"], "--glob '*.md' needs a directory --corpus or --eval-corpus"),
    (
        "directory of binary files",
        ["--corpus", "{d}/bindir"],
        "no text files in directory: {d}/bindir (1 binary file(s) skipped)",
    ),
    (
        "directory of empty and binary files",
        ["--corpus", "{d}/mixdir"],
        "corpus is empty: {d}/mixdir (1 empty file(s); 1 binary file(s) skipped)",
    ),
    (
        "single document shorter than n+s+1, held out from itself",
        ["--corpus", "{d}/short.txt"],
        "held-out fraction 0.1 of the single document 'short.txt' (3 characters) leaves one side empty",
    ),
    (
        "single document shorter than n+s+1",
        ["--corpus", "{d}/short.txt", "--eval-corpus", "{d}/eval.txt"],
        "corpus too short for n=1, s=2: a window needs n+s+1=4 tokens in one document, the longest document has 3",
    ),
    (
        "--seq-len longer than any document",
        ["--seq-len", "200"],
        "seq_len=200 is longer than every document (the longest has 45 tokens)",
    ),
    ("--num-seqs 0", ["--num-seqs", "0"], "argument --num-seqs: must be >= 1, got 0 (see `jaxattn analyze --help`)"),
    ("--seq-len -3", ["--seq-len", "-3"], "argument --seq-len: must be >= 1, got -3 (see `jaxattn analyze --help`)"),
    (
        "uncreatable output path",
        ["--out", "/dev/null/x"],
        "cannot create output directory '/dev/null/x': Not a directory",
    ),
    (
        "output path is a file",
        ["--out", "{d}/small.txt"],
        "cannot create output directory '{d}/small.txt': File exists",
    ),
    ("unknown preset", ["--preset", "huge"], "unknown preset 'huge'; choose one of ['seed', 'small']"),
    ("d_head > d_model", ["--d-model", "16", "--d-head", "32"], "d_head=32 > d_model=16"),
    (
        "dense size over --max-dense-bytes",
        ["--max-dense-bytes", "1000"],
        "dense attention of shape (2, 2, 2, 8, 8) needs 2.0 KiB, over the memory budget of 1000 B "
        "(raise it with --max-dense-bytes or JAXATTN_MAX_DENSE_BYTES, or use the sparse form)",
    ),
    (
        "dense size over the default budget",
        ["--preset", "seed", "--layers", "12", "--heads", "12", "--seq-len", "40", "--num-seqs", "10000000"],
        "dense attention of shape (10000000, 12, 12, 40, 40) needs 8.4 TiB, over the memory budget of 4.0 GiB "
        "(raise it with --max-dense-bytes or JAXATTN_MAX_DENSE_BYTES, or use the sparse form)",
    ),
    (
        "--max-dense-bytes nan",
        ["--max-dense-bytes", "nan"],
        "argument --max-dense-bytes: must be a number of bytes in [1, 2**63), got 'nan' (see `jaxattn analyze --help`)",
    ),
    ("missing corpus path", ["--corpus", "/nonexistent/corpus"], "no such file or directory: /nonexistent/corpus"),
    ("--load of a missing directory", ["--load", "{d}/noart"], "artefact directory does not exist: '{d}/noart'"),
    (
        "--load of a directory without tables",
        ["--load", "{d}/emptydir"],
        "no saved tables in '{d}/emptydir' (missing tables.json)",
    ),
]


@pytest.mark.parametrize(("extra", "line"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_gives_exit_2_and_one_line(files, capsys, extra, line):
    d = str(files)
    code, out, err = run_main(analyze(files, *(a.replace("{d}", d) for a in extra)), capsys)
    assert_error(code, err, "jaxattn: error: " + line.replace("{d}", d))
    assert not (files / "out" / "metrics.json").exists()


def test_loaded_tables_of_another_vocabulary_are_refused(files, capsys, tmp_path):
    tokens = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0], np.int32)
    io.save_tables(tmp_path, jaxattn.count_tables(tokens, 5, 2, 3))
    code, _, err = run_main(analyze(files, "--load", str(tmp_path)), capsys)
    V = jaxattn.load_corpus(files / "small.txt", progress=False).vocab_size
    assert_error(
        code,
        err,
        f"jaxattn: error: tables in '{tmp_path}' were counted with vocab_size=5, but the corpus has "
        f"vocab_size={V} (another corpus, tokenizer or --max-vocab?)",
    )


def test_ctrl_c_exits_130_and_writes_nothing(files, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(options, "run_option", interrupted)
    out = files / "out_interrupted"
    code, _, err = run_main(["analyze", *TINY, "--corpus", str(files / "small.txt"), "--out", str(out)], capsys)
    assert code == 130 and err.splitlines() == ["jaxattn: interrupted"]
    assert list(out.iterdir()) == []  # nothing that looks like a finished report


def test_huge_vocabulary_switches_to_int64_keys_then_refuses_overflow():
    # V = 70000: packed (context, target) keys reach 4.9e9 > int32, so they must be int64 and exact.
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 70_000, 400).astype(np.int32)
    tokens[::7] = 69_999
    cm = jaxattn.count_matrix(tokens, 1, 1, 70_000)
    pairs = {}
    for i in range(len(tokens) - 2):
        pairs[(int(tokens[i]), int(tokens[i + 2]))] = pairs.get((int(tokens[i]), int(tokens[i + 2])), 0) + 1
    got = {(int(cm.contexts[r, 0]), int(c)): int(v) for r, c, v in zip(cm.rows, cm.cols, cm.values, strict=True)}
    assert got == pairs and cm.num_windows == 398
    # V = 2**21 + 1 with n = 2: V**3 > 2**63 overflows even int64 -> refused before counting.
    V = 2**21 + 1
    corpus = corpus_from_ids(np.arange(40, dtype=np.int32) % 7, None, V)
    run = pipeline.RunConfig(preset="small", seq_len=4, num_seqs=1)
    with pytest.raises(JaxattnError) as e:
        pipeline.prepare(corpus, corpus, run, progress=False)
    assert str(e.value) == (
        f"vocab_size={V} with n=2: packed keys reach vocab_size**(n+1)={V**3}, which overflows int64; "
        "reduce the vocabulary (e.g. --max-vocab) or n"
    )


def test_loaded_tables_with_another_vocabulary_are_refused_by_prepare():
    # The library path too (e.g. `jaxattn compare --load`): prepare() checks V before using tables.
    corpus = corpus_from_ids(np.arange(60, dtype=np.int32) % 6, None, 6)
    tabs = jaxattn.count_tables(np.arange(60, dtype=np.int32) % 5, 5, 2, 3)
    with pytest.raises(JaxattnError, match=r"count tables have vocab_size 5, but the corpus has vocab_size=6"):
        pipeline.prepare(corpus, corpus, pipeline.RunConfig(preset="small", seq_len=8), tables=tabs, progress=False)


def _python_cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, JAXATTN_NO_PROGRESS="1")
    cmd = [*prefix, sys.executable, "-m", "jaxattn.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_subprocess_zero_sequences():
    r = _python_cli("analyze", "--num-seqs", "0")
    assert r.returncode == 2
    assert r.stderr == "jaxattn: error: argument --num-seqs: must be >= 1, got 0 (see `jaxattn analyze --help`)\n"


def test_subprocess_read_only_output_directory(files):
    ro = files / "readonly"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        # root writes anywhere: drop the capabilities that let it ignore permission bits.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: a read-only directory cannot be simulated")
        prefix = (setpriv, "--bounding-set", "-dac_override,-dac_read_search")
    try:
        r = _python_cli("analyze", "--corpus", str(files / "small.txt"), "--out", str(ro), prefix=prefix)
        assert (r.returncode, r.stderr) == (2, f"jaxattn: error: output directory '{ro}' is not writable\n")
    finally:
        ro.chmod(0o755)


def test_option3_that_does_not_fit_is_refused_with_the_requirement(files, capsys):
    """The standard-GPT-2 Option 3 refuses a residual too narrow for its blocks, naming both sizes."""
    code, _, err = run_main(analyze(files, "--option", "3"), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "Option 3 as a GPT-2 needs a residual of" in err and "but d_model=16" in err, err


# --------------------------------------------------------------------------- #
# Small CLI things: --version, help on every flag, the error line's program name
# --------------------------------------------------------------------------- #


def test_version(capsys):
    from jaxattn.version import VERSION

    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out == f"jaxattn {VERSION}\n"


def _all_actions(parser, name="jaxattn"):
    import argparse

    for action in parser._actions:
        yield name, action
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _all_actions(sub, f"{name} {sub_name}")


def test_every_flag_has_help():
    actions = list(_all_actions(cli.build_parser()))
    assert len({name for name, _ in actions}) >= 4  # the top level and at least three subcommands
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, a in actions if not (a.help or "").strip()]
    assert missing == []
    helps = {(name, a.option_strings[0]): a.help for name, a in actions if a.option_strings}
    for flag in ("--tokenizer", "--d-model", "--layers", "--heads", "--batch-size", "--max-n", "--max-s", "--glob"):
        assert len(helps[("jaxattn analyze", flag)]) > 25, flag
    option_help = helps[("jaxattn analyze", "--option")]
    assert all(f"{k}: " in option_help for k in ("baseline", "1", "2", "3", "4"))


@pytest.mark.parametrize(
    "argv, line",
    [
        (["analyze", "--bogus"], "jaxattn: error: unrecognized arguments: --bogus (see `jaxattn analyze --help`)"),
        (
            ["compare", "--bogus", "x"],
            "jaxattn: error: unrecognized arguments: --bogus x (see `jaxattn compare --help`)",
        ),
        (["--bogus"], "jaxattn: error: unrecognized arguments: --bogus (see `jaxattn --help`)"),
        (
            ["analyze", "--seq-len", "0"],
            "jaxattn: error: argument --seq-len: must be >= 1, got 0 (see `jaxattn analyze --help`)",
        ),
    ],
)
def test_error_line_names_the_command_once(argv, line, capsys):
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert err.splitlines() == [line]


def test_directory_skips_non_text_names_and_glob_overrides(tmp_path, capsys):
    d = tmp_path / "plays"
    d.mkdir()
    words = "the cat sat on a mat and then it ran off to see what the dog did".split()
    rng = np.random.default_rng(1)
    for name in ("a.txt", "b.txt"):
        (d / name).write_text(" ".join(rng.choice(words, 80)) + "\n")
    (d / "SOURCE.md").write_text("# where these came from\n")
    out = tmp_path / "out"
    code, _, err = run_main(["analyze", *TINY, "--corpus", str(d), "--out", str(out)], capsys)
    assert code == 0, err
    assert f"jaxattn: warning: {d}: 1 file(s) not named *.txt or *.text skipped: SOURCE.md" in err.splitlines()
    import json

    doc = json.loads((out / "metrics.json").read_text())
    assert doc["corpus"]["num_docs"] + doc["eval_corpus"]["num_docs"] == 2
    assert set(doc["corpus"]["files"]) | set(doc["eval_corpus"]["files"]) == {"a.txt", "b.txt"}


def test_compilation_cache_dir_and_opt_out(monkeypatch, tmp_path):
    from jaxattn.cli import common

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("JAXATTN_COMPILATION_CACHE", raising=False)
    assert common.compilation_cache_dir() == str(tmp_path / "jaxattn" / "jax")
    monkeypatch.setenv("JAXATTN_COMPILATION_CACHE", str(tmp_path / "mine"))
    assert common.compilation_cache_dir() == str(tmp_path / "mine")
    for off in ("0", "off", ""):
        monkeypatch.setenv("JAXATTN_COMPILATION_CACHE", off)
        assert common.compilation_cache_dir() is None
