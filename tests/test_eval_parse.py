"""The answer parser on real-looking model outputs: Chinese, English, multi-answer, garbage."""

from __future__ import annotations

import pytest

from sparsedoc.eval.parse import parse_choice

FIVE = "ABCDE"
CASES = [
    # Chinese
    ("答案：C", "C"),
    ("答案：C\n解析：根据《医疗废物管理条例》第三十五条规定（C对），A错。", "C"),
    ("正确答案是B。", "B"),
    ("答案为 A、B、D", "ABD"),
    ("答案：ABD", "ABD"),
    ("答案：A,B,E", "ABE"),
    ("故选C", "C"),
    ("答案解析：本题选D", "D"),
    ("C. 卫生行政主管部门", "C"),
    ("C 卫生行政主管部门", "C"),
    ("Ｃ", "C"),
    ("答案：C\nA. 错误 B. 错误", "C"),
    # English
    ("The answer is (B).", "B"),
    ("Answer: D. Hypertension", "D"),
    ("**Answer:** C", "C"),
    ("Answer:\n\nB", "B"),
    ("(E) Refuse to dictate the operative report", "E"),
    ("B", "B"),
    ("I think the correct option is A", "A"),
    ("Option A is wrong; the best answer is B.", "B"),
    ("The correct answer is: (C) Tell the attending", "C"),
    ("Based on the options, I'd choose D.", "D"),
    ("The answer is B-cell lymphoma (C)", "C"),
    ("Answer: A and C", "AC"),
    # garbage and ambiguity -> unparsed
    ("", None),
    ("我不知道", None),
    ("A 45-year-old man presents with chest pain.", None),
    ("A or C", None),
    ("B或C", None),
    ("答案：B或C", None),
    ("The answer is F", None),
    ("选项A错误，选项B正确", None),
    ("A. 聚乙二醇\nB. 卡波姆\nC. 微晶纤维素", None),  # an echo of the options
    ("A patient with C-reactive protein elevation", None),
]


@pytest.mark.parametrize("output,expected", CASES)
def test_parse_choice_table(output, expected):
    assert parse_choice(output, FIVE) == expected


YES_NO_MAYBE = {"A": "yes", "B": "no", "C": "maybe"}


@pytest.mark.parametrize("output,expected", [
    ("Yes, the study suggests a benefit.", "A"),
    ("Answer: maybe", "C"),
    ("no", "B"),
    ("Answer: no. The conclusion is that ...", "B"),
    ("The answer is yes.", "A"),
    ("It is not clear; maybe.", "C"),
    ("The data do not know", None),  # "no" only inside words
    ("A", None),  # letters were never shown for text choices
    ("yes or no", None),
])
def test_parse_text_choices(output, expected):
    assert parse_choice(output, "ABC", YES_NO_MAYBE, accept_letters=False) == expected


def test_option_text_answers_and_only_valid_letters():
    opts = {"A": "肝硬化", "B": "肝", "C": "胃炎", "D": "肾炎"}
    assert parse_choice("我认为是肝硬化", "ABCD", opts) == "A"  # not also B (a part of A)
    assert parse_choice("答案：E", "ABCD") is None
    assert parse_choice("D", "ABC") is None
