"""The tour's pure part: parsing what a reader types, judging it against a
live value, the verdict's text and HTML, and the question registry."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lab.errors import UserError
from lab.paths import device_pages
from lab.tour import QUESTIONS, Tour, judge, parse_prediction


@pytest.mark.parametrize("typed, value", [
    ("2", 2), (" -1 ", -1), ("273,921", 273_921), ("273_920 + 1", 273_921), ("3 + 1024", 1027),
    ("2*512", 1024), ("True", True), ("yes", True), ("no", False), ("None", None),
    ("null", None), ("PTE", "PTE"), ("pmd", "pmd"), (5, 5), (None, None),
    ("__import__('os')", "__import__('os')"), ("2 ** 99", "2 ** 99"),
])
def test_parse_prediction(typed, value):
    assert parse_prediction(typed) == value and type(parse_prediction(typed)) is type(value)


@pytest.mark.parametrize("predicted, actual, held", [
    ("2", np.int64(2), True),
    ("3", np.int64(2), False),
    ("pte", "PTE", True),
    ("PMD", "PTE", False),
    ("None", pd.NA, True),
    ("None", None, True),
    ("False", None, False),
    ("True", np.bool_(True), True),
    ("1", True, False),  # True == 1, but a yes/no question wants yes or no
    ("0", False, False),
    ("-1", -1, True),
])
def test_judge(predicted, actual, held):
    verdict = judge(QUESTIONS["refcount"], predicted, actual)
    assert verdict.held is held


def test_verdict_text_says_value_prediction_and_two_lines_why():
    held = judge(QUESTIONS["refcount"], "2", np.int64(2))
    missed = judge(QUESTIONS["refcount"], "1", np.int64(2))
    assert held.text().splitlines()[0] == "prediction held: refcount = 2"
    assert missed.text().splitlines()[0] == "prediction missed: refcount is 2, you predicted 1"
    assert len(missed.text().splitlines()) == 3
    assert held.actual == 2 and type(held.actual) is int  # unboxed from numpy


def test_verdict_html_escapes_and_links_the_glossary():
    v = judge(QUESTIONS["pt_level"], "<b>PTE", "PTE")
    page = v.html("vm-hugepage")
    assert "&lt;b&gt;PTE" in page and "<b>PTE" not in page.replace("<b>Prediction", "")
    assert "glossary.md#vm-hugepage" in page and "missed" in page


def test_every_question_has_a_prompt_and_two_lines():
    for key, q in QUESTIONS.items():
        assert q.key == key and q.prompt.endswith("?"), key
        assert len(q.why) == 2 and all(line.strip() for line in q.why), key
        assert q.glossary, key


def test_glossary_anchors_exist():
    from lab.paths import repo_root

    text = (repo_root() / "docs" / "glossary.md").read_text()
    for q in QUESTIONS.values():
        assert f'<a id="{q.glossary}"></a>' in text, q.glossary


def test_pgmap_question_knows_the_device_size():
    assert f"{device_pages('4K'):,}" in QUESTIONS["pgmap_ref"].prompt


def test_unknown_prediction_keys_are_refused():
    with pytest.raises(UserError, match="no tour question 'refcnt'"):
        Tour({"refcnt": 2})


def test_tour_records_verdicts():
    tour = Tour({"refcount": 2})
    tour.check("refcount", "2", 2)
    tour.check("mapcount", "0", -1)
    assert tour.verdicts["refcount"].held and not tour.verdicts["mapcount"].held


def test_rss_question_needs_a_mark():
    with pytest.raises(UserError, match="tour.mark"):
        Tour().marked_rss_file(object())


def test_results_table():
    tour = Tour()
    tour.check("pt_level", "pte", "PTE")
    frame = tour.results()
    assert frame.to_dict("records") == [
        {"question": "pt_level", "predicted": "pte", "actual": "PTE", "held": True}]


def test_asking_with_a_prediction_prints_the_verdict(capsys):
    """The widget path without a VM: a stand-in lab is enough for the
    readers, which only look at lab.current() and lab.steps."""
    now = pd.DataFrame({"page": [0], "proc": ["a"], "refcount": [np.int64(2)],
                        "mapcount": [np.int64(0)], "pt_level": ["PTE"], "pt_devmap": [pd.NA],
                        "pgmap_ref": [273_921]})

    class Frames:
        steps = pd.DataFrame({"pgmap_ref": [273_921]})

        @staticmethod
        def current():
            return now

    tour = Tour({"refcount": "2", "pt_devmap": "None"})
    box = tour.ask(Frames, "refcount", "mapcount", "pt_devmap", "pgmap_ref")
    out = capsys.readouterr().out
    assert out.count("prediction held") == 2 and "mapcount" not in out
    assert len(box.children) == 4
    mapcount_widget = box.children[1]
    assert "Prediction" not in mapcount_widget.children[2].value  # waits for the reader
    text, button = mapcount_widget.children[1].children
    button.click()
    assert "type a prediction first" in mapcount_widget.children[2].value
    text.value = "-1"
    button.click()
    assert "Prediction missed" in mapcount_widget.children[2].value
    assert not tour.verdicts["mapcount"].held and tour.verdicts["mapcount"].actual == 0
    with pytest.raises(UserError, match="no tour question 'nope'"):
        tour.ask(Frames, "nope")
