"""Bad input never passes silently: a file-level problem is a ``ConvertError`` naming the file,
a bad row is a counted skip naming file, row/line and field (or an error under ``strict``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparsedoc.prep import bentsao, chinese_medical_dialogue, cli, cmexam, cmmlu_med, medqa, mts_dialog, \
    sumpubmed
from sparsedoc.prep.common import ConvertError

CMEXAM_HEADER = "Question,Options,Answer,Explanation\r\n"
MTS_HEADER = "ID,section_header,section_text,dialogue\r\n"
LATIN1_ROW = '0,CC,Café pain.,"Doctor: hi\r\nPatient: ok"\r\n'


def write(path: Path, data: bytes | str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode(encoding))
    return path


def truncated_real_cmexam(tmp: Path, shared: Path) -> tuple[Path, int]:
    """val.csv cut inside the quoted Options of its last row; returns (file, that row's line)."""
    raw = (shared / "cmexam" / "data" / "val.csv").read_bytes()
    start = raw.rstrip(b"\r\n").rfind(b"\r\n") + 2  # rows end in CRLF; Options hold bare LF
    cut = raw.index(b"\n", raw.index(b'"', start)) + 3  # one option line into the field
    return write(tmp / "val.csv", raw[:cut]), raw[:start].count(b"\n") + 1


# (case, converter, make src, expected error regex) -- whole-file problems
ERRORS = [
    ("empty file", cmexam, lambda t: write(t / "val.csv", b""),
     r"val\.csv: file is empty \(0 bytes\)"),
    ("whitespace-only file", bentsao, lambda t: write(t / "llama_data.json", b"\n\n"),
     r"llama_data\.json: file is empty"),
    ("utf-16 file", cmexam, lambda t: write(t / "val.csv", CMEXAM_HEADER + 'Q,"A a\nB b",A,\r\n',
                                            "utf-16"),
     r"val\.csv: cannot decode the file \(utf-8-sig: byte 0xff at offset 0 \(line 1\); "
     r"gb18030: .*UTF-16 byte-order mark: pass --encoding utf-16"),
    ("latin-1 in an English source", mts_dialog,
     lambda t: write(t / "train.csv", MTS_HEADER + LATIN1_ROW, "latin-1"),
     r"train\.csv: cannot decode the file \(utf-8-sig: byte 0xe9 at offset \d+ \(line 2\)\)"),
    ("missing column", cmmlu_med,
     lambda t: write(t / "test" / "anatomy.csv", ",Question,A,B,C,D\n0,q,a,b,c,d\n"),
     r"test/anatomy\.csv: missing column\(s\) 'Answer'; the header has \['', 'Question'"),
    ("missing column, several", mts_dialog,
     lambda t: write(t / "train.csv", "ID,dialogue\r\n0,hi\r\n"),
     r"train\.csv: missing column\(s\) 'section_header', 'section_text'"),
    ("not JSON at all", bentsao, lambda t: write(t / "llama_data.json", "<html>oops</html>\n"),
     r"llama_data\.json: not valid JSON or JSON Lines \(Expecting value at line 1 column 1\)"),
    ("no such path", cmexam, lambda t: t, r"src: no such file or directory"),
    ("no data files", medqa, lambda t: write(t / "README.md", "hi"),
     r"no \.jsonl/\.json files found"),
    ("only bad rows", cmexam, lambda t: write(t / "val.csv", CMEXAM_HEADER + 'Q,"A a\nB b",Z,\r\n'),
     r"cmexam: no records converted"),
]


@pytest.mark.parametrize("case,conv,make,pattern", ERRORS, ids=[e[0] for e in ERRORS])
def test_file_level_errors(tmp_path, case, conv, make, pattern):
    make(tmp_path / "src")
    with pytest.raises(ConvertError, match=pattern):
        conv.convert(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out" / "report.json").exists()  # nothing half-written


# (case, converter, make src, skip kind, where regex, reason regex) -- one bad row among good ones
SKIPS = [
    ("bad answer letter", cmexam,
     lambda t: write(t / "val.csv", CMEXAM_HEADER + 'Q1,"A a\nB b\nC c",A,e\r\n'
                                                   'Q2,"A a\nB b\nC c",F,e\r\n'),
     "bad_answer", r"^val\.csv: row 2 \(line 5\)$",
     r"^field 'Answer': 'F' is not among the options A-C$"),
    ("bad letter in a multi-answer", cmexam,
     lambda t: write(t / "val.csv", CMEXAM_HEADER + 'Q1,"A a\nB b\nC c",A,e\r\n'
                                                   'Q2,"A a\nB b\nC c\nD d\nE e",ABF,e\r\n'),
     "bad_answer", r"^val\.csv: row 2 \(line 5\)$",
     r"^field 'Answer': 'F' is not among the options A-E \(answer 'ABF'\)$"),
    ("empty answer", cmexam,
     lambda t: write(t / "val.csv", CMEXAM_HEADER + 'Q1,"A a\nB b",A,e\r\nQ2,"A a\nB b",,e\r\n'),
     "bad_answer", r"^val\.csv: row 2 \(line 4\)$", r"^field 'Answer': empty answer$"),
    ("truncated CSV (hand-made)", cmexam,
     lambda t: write(t / "val.csv", CMEXAM_HEADER + 'Q1,"A a\nB b\nC c",A,e1\r\n'
                                                   'Q2,"A a\nB b",B,e2\r\nQ3,"A a\nB b\nC'),
     "malformed_row", r"^val\.csv: row 3 \(line 7\)$",
     r"^unterminated quoted field \(truncated file\?\)$"),
    ("row with a missing field", cmexam,
     lambda t: write(t / "val.csv", CMEXAM_HEADER + 'Q1,"A a\nB b",A,e1\r\nQ2,"A a\nB b",B\r\n'),
     "malformed_row", r"^val\.csv: row 2 \(line 4\)$",
     r"^expected 4 fields as in the header, got 3$"),
    ("broken quoting", cmexam,
     lambda t: write(t / "val.csv", CMEXAM_HEADER + 'Q1,"A a\nB b",A,e1\r\nQ2,"A a"x,B,e\r\n'),
     "malformed_row", r"^val\.csv: row 2 \(line 4\)$", r"^malformed CSV: ',' expected after '\"'$"),
    ("options without letters", cmexam,
     lambda t: write(t / "val.csv", CMEXAM_HEADER + 'Q1,"A a\nB b",A,e\r\nQ2,"one\ntwo",A,e\r\n'),
     "bad_options", r"^val\.csv: row 2 \(line 4\)$",
     r"^field 'Options': option line 'one' does not start with a letter A-J$"),
    ("duplicate ids", mts_dialog,
     lambda t: write(t / "train.csv", MTS_HEADER + '0,CC,Pain.,"Doctor: hi\r\nPatient: pain"\r\n'
                                                 '1,CC,Cough.,"Doctor: hi\r\nPatient: cough"\r\n'
                                                 '1,CC,Fever.,"Doctor: hi\r\nPatient: fever"\r\n'),
     "duplicate_id", r"^train\.csv: row 3 \(line 6\)$",
     r"^field 'id': duplicate id 'mts_dialog-train-1' \(first at train\.csv: row 2 \(line 4\)\)$"),
    ("empty target text", mts_dialog,
     lambda t: write(t / "train.csv", MTS_HEADER + '0,CC,Pain.,"Doctor: hi"\r\n'
                                                 '1,CC,,"Doctor: yo"\r\n'),
     "missing_field", r"^train\.csv: row 2 \(line 3\)$",
     r"^field 'section_text': empty or missing$"),
    ("malformed JSON line", bentsao,
     lambda t: write(t / "data.json", '{"instruction": "问", "input": "", "output": "答"}\n'
                                      '{"instruction": "问2", "output": \n'),
     "malformed_row", r"^data\.json: line 2$",
     r"^not valid JSON \(Expecting value at column 33\)$"),
    ("JSON line that is not an object", bentsao,
     lambda t: write(t / "data.json", '{"instruction": "问", "input": "", "output": "答"}\n[1, 2]\n'),
     "malformed_row", r"^data\.json: line 2$", r"^expected a JSON object, got list$"),
    ("answer text disagrees with answer_idx", medqa,
     lambda t: write(t / "test.jsonl",
                     '{"question": "q1", "answer": "x", "options": {"A": "x", "B": "y"}, '
                     '"answer_idx": "A"}\n{"question": "q2", "answer": "x", '
                     '"options": {"A": "x", "B": "y"}, "answer_idx": "B"}\n'),
     "bad_answer", r"^test\.jsonl: line 2$", r"^field 'answer': text 'x' is not option B \('y'\)$"),
    ("empty answer cell", chinese_medical_dialogue,
     lambda t: write(t / "d.csv", "department,title,ask,answer\n内科,t1,问一,答一\n内科,t2,问二,\n",
                     "gb18030"),
     "missing_field", r"^d\.csv: row 2 \(line 3\)$", r"^field 'answer': empty or missing$"),
]


@pytest.mark.parametrize("case,conv,make,kind,where,reason", SKIPS, ids=[s[0] for s in SKIPS])
def test_bad_row_is_a_reported_skip(tmp_path, case, conv, make, kind, where, reason):
    make(tmp_path / "src")
    report = conv.convert(tmp_path / "src", tmp_path / "out")
    assert report["totals"]["skipped"] == 1
    assert report["totals"]["out"] == report["totals"]["in"] - 1
    split = next(s for s in report["splits"].values() if s["skipped"])
    assert split["skip_kinds"] == {kind: 1}
    (skip,) = split["skips"]
    assert re.search(where, skip["where"]), skip
    assert re.search(reason, skip["reason"]), skip
    # under --strict the same row stops the run with the same message
    with pytest.raises(ConvertError, match=re.escape(f"{skip['where']}: {skip['reason']}")):
        conv.convert(tmp_path / "src", tmp_path / "strict", strict=True)


def test_truncated_real_file(tmp_path, shared_data):
    src, line = truncated_real_cmexam(tmp_path / "src", shared_data)
    report = cmexam.convert(src, tmp_path / "out")
    val = report["splits"]["validation"]
    assert (val["in"], val["out"], val["skipped"]) == (800, 799, 1)
    assert val["skips"] == [{"where": f"val.csv: row 800 (line {line})",
                             "reason": "unterminated quoted field (truncated file?)"}]


def test_gb18030_copy_of_a_utf8_source_converts(tmp_path, shared_data):
    """Encoding detection: the same CMExam file re-encoded as GB18030 gives the same records."""
    text = (shared_data / "cmexam" / "data" / "val.csv").read_bytes().decode("utf-8")
    write(tmp_path / "src" / "val.csv", text.encode("gb18030"))
    report = cmexam.convert(tmp_path / "src", tmp_path / "out")
    assert report["files"][0]["encoding"] == "gb18030"
    assert report["splits"]["validation"]["out"] == 800
    utf8 = cmexam.convert(shared_data / "cmexam" / "data" / "val.csv", tmp_path / "ref")
    assert (tmp_path / "out" / "validation.jsonl").read_bytes() == \
        (tmp_path / "ref" / "validation.jsonl").read_bytes()
    assert utf8["files"][0]["encoding"] == "utf-8"


def test_forced_encoding(tmp_path):
    write(tmp_path / "src" / "train.csv", MTS_HEADER + LATIN1_ROW, "latin-1")
    report = mts_dialog.convert(tmp_path / "src", tmp_path / "out", encoding="latin-1")
    assert report["files"][0]["encoding"] == "latin-1" and report["totals"]["out"] == 1


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path / "src" / "val.csv", CMEXAM_HEADER)
    real = Path.read_bytes

    def deny(self):
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(ConvertError, match=r"val\.csv: cannot read file: Permission denied"):
        cmexam.convert(tmp_path / "src", tmp_path / "out")


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    write(tmp_path / "src" / "val.csv",
          CMEXAM_HEADER + 'Q1,"A a\nB b",A,e\r\nQ2,"A a\nB b",F,e\r\n')
    argv = ["prepare", "cmexam", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "validation in      2  out      1  skipped 1" in out
    assert ("skipped val.csv: row 2 (line 4): field 'Answer': 'F' is not among the options A-B"
            in out)
    assert cli.main(argv + ["--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cmexam: val.csv: row 2 (line 4): field 'Answer'")
    assert "Traceback" not in err
    write(tmp_path / "empty" / "val.csv", b"")
    assert cli.main(["prepare", "cmexam", "--src", str(tmp_path / "empty"), "--out",
                     str(tmp_path / "o2")]) == 2
    assert "val.csv: file is empty (0 bytes)" in capsys.readouterr().err


def test_sumpubmed_missing_and_empty_article_files(tmp_path):
    src = tmp_path / "src"
    for n in (1, 2, 3):
        write(src / "text" / f"text_{n}.txt", f"BACKGROUND\narticle {n}\n")
    write(src / "abstract" / "abstract_1.txt", "abstract 1\n")
    write(src / "abstract" / "abstract_2.txt", b"")  # empty
    write(src / "abstract" / "abstract_4.txt", "abstract without an article\n")
    report = sumpubmed.convert(src, tmp_path / "out")
    assert report["totals"] == {"in": 4, "out": 1, "skipped": 3}
    skips = sorted((s["where"], s["reason"]) for split in report["splits"].values()
                   for s in split["skips"])
    assert skips == [
        ("abstract/abstract_4.txt", "field 'text': no text/text_4.txt for this abstract"),
        ("text/text_2.txt", "abstract/abstract_2.txt: file is empty (0 bytes)"),
        ("text/text_3.txt", "field 'abstract': no abstract/abstract_3.txt for this article")]
