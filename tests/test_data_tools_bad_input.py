"""Bad lines: skipped and counted by reason with their line numbers; valid lines all kept."""

from __future__ import annotations

import json
from pathlib import Path

from test_data_tools_helpers import cli, file_bytes, megatron_reference, mixtral, preprocess_args

# (line content, reason or None for a valid line)
LINES = [
    (json.dumps({"text": "Valid one."}).encode(), None),
    (b"{not json", "not_json"),
    (b"", "blank_line"),
    (json.dumps({"other": "no text key"}).encode(), "missing_key"),
    (json.dumps({"text": 42}).encode(), "not_string"),
    (b'{"text": "caf\xe9 latin-1"}', "invalid_utf8"),
    (json.dumps({"text": "Valid two, with \u00e9 and \u65e5\u672c."}).encode(), None),
    (b"   \t ", "blank_line"),
    (b'["a", "list"]', "not_object"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_text"),
    (json.dumps({"text": {"nested": "object"}}).encode(), "not_string"),
    (json.dumps({"text": ["ok", 3]}).encode(), "not_string"),
    (json.dumps({"text": ""}).encode(), "empty"),
    (b'{"text": "crlf line"}\r', None),
    (b'{"text": "a"} {"text": "b"}', "not_json"),
    (json.dumps({"text": "Valid last, no newline at the end."}).encode(), None),
]


def _write(tmp_path: Path) -> tuple[Path, Path]:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(line for line, _ in LINES))  # no final newline
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"".join(line + b"\n" for line, why in LINES if why is None))
    return bad, good


def test_bad_lines_counted_and_valid_lines_kept(tmp_path: Path):
    bad, good = _write(tmp_path)
    stats = tmp_path / "stats.json"
    p = cli(
        *preprocess_args(str(bad), str(tmp_path / "o"), None, "--append-eod"),
        "--stats-json",
        str(stats),
    )
    s = json.loads(stats.read_text())
    expected: dict[str, list[int]] = {}
    for number, (_, why) in enumerate(LINES, start=1):
        if why not in (None, "empty"):
            expected.setdefault(why, []).append(number)
    assert {k: v[1] for k, v in s["skipped"].items()} == expected
    assert {k: v[0] for k, v in s["skipped"].items()} == {k: len(v) for k, v in expected.items()}
    assert s["empty"] == 1 and s["documents"] == 4 and s["lines"] == len(LINES)
    for reason in expected:
        assert reason in p.stderr
    # the valid lines give exactly what Megatron-LM writes for them alone
    megatron_reference(str(good), str(tmp_path / "ref"), mixtral())
    assert file_bytes(str(tmp_path / "o")) == file_bytes(str(tmp_path / "ref"))


def test_first_line_numbers_are_capped(tmp_path: Path):
    src = tmp_path / "many.jsonl"
    src.write_text("".join("oops\n" if i % 2 else '{"text": "fine"}\n' for i in range(40)))
    stats = tmp_path / "s.json"
    cli(*preprocess_args(str(src), str(tmp_path / "o")), "--stats-json", str(stats))
    count, first = json.loads(stats.read_text())["skipped"]["not_json"]
    assert count == 20 and first == [2, 4, 6, 8, 10]


def test_strict_names_file_and_line(tmp_path: Path):
    bad, _ = _write(tmp_path)
    p = cli(*preprocess_args(str(bad), str(tmp_path / "o"), None, "--strict"), check=False)
    assert p.returncode == 1
    assert f"{bad}:2: not_json" in p.stderr
    assert not list(tmp_path.glob("o*")), "no output and no partial folder after --strict"


def test_keep_empty_writes_zero_sequence_documents(tmp_path: Path):
    src = tmp_path / "e.jsonl"
    src.write_text('{"text": "a"}\n{"text": ""}\n{"text": "b"}\n')
    cli(*preprocess_args(str(src), str(tmp_path / "o"), None, "--append-eod", "--keep-empty"))
    megatron_reference(str(src), str(tmp_path / "ref"), mixtral())
    assert file_bytes(str(tmp_path / "o")) == file_bytes(str(tmp_path / "ref"))


def test_utf8_bom_is_ignored(tmp_path: Path):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(b'{"text": "first"}\n{"text": "second"}\n')
    cli(*preprocess_args(str(src), str(tmp_path / "a")))
    cli(*preprocess_args(str(plain), str(tmp_path / "b")))
    assert file_bytes(str(tmp_path / "a")) == file_bytes(str(tmp_path / "b"))
