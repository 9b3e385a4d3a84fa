"""The onboarding tour's predict-then-check (notebooks/05-onboarding-tour).

After a step, :meth:`Tour.ask` reads one live value from the lab and shows a
question with a text box: the reader types a prediction and clicks Check,
which shows the value, whether the prediction held and two lines saying why
(with the kernel function behind it: docs/glossary.md). The answers live
here, not in the notebook. A notebook run without a reader (CI, papermill)
passes the predictions in as a parameter: each is then checked at once and
the verdict printed.

The pure part (:func:`parse_prediction`, :func:`judge`, :data:`QUESTIONS`)
is unit-tested; the widget only wires it to ipywidgets.
"""

from __future__ import annotations

import ast
import html
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pandas as pd

from .paths import device_pages

__all__ = ["QUESTIONS", "Question", "Tour", "Verdict", "judge", "parse_prediction"]

GLOSSARY = "../docs/glossary.md"


@dataclass(frozen=True)
class Question:
    """One prediction to make: what to predict, how to read the live value
    (a function of the lab and the tour), and why it is what it is."""

    key: str
    prompt: str
    read: Callable[[Any, Tour], Any]
    why: tuple[str, str]
    glossary: str  # anchor in docs/glossary.md


@dataclass(frozen=True)
class Verdict:
    key: str
    predicted: Any
    actual: Any
    held: bool
    why: tuple[str, str]

    def text(self) -> str:
        if self.held:
            head = f"prediction held: {self.key} = {self.actual!r}"
        else:
            head = f"prediction missed: {self.key} is {self.actual!r}, you predicted {self.predicted!r}"
        return "\n".join([head, *(f"  {line}" for line in self.why)])

    def html(self, glossary: str = "") -> str:
        color = "#1a7f37" if self.held else "#b42318"
        word = "held" if self.held else "missed"
        link = f' <a href="{GLOSSARY}#{glossary}" target="_blank">glossary</a>' if glossary else ""
        lines = "".join(f"<div>{html.escape(line)}</div>" for line in self.why)
        return (f'<div style="color:{color}"><b>Prediction {word}</b>: the live value is '
                f"<code>{html.escape(repr(self.actual))}</code>, you predicted "
                f"<code>{html.escape(repr(self.predicted))}</code>.</div>{lines}{link}")


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_WORDS = {"true": True, "yes": True, "false": False, "no": False, "none": None, "null": None}


def _arith(node: ast.AST) -> int:
    """An integer expression of literals, +, - and * (e.g. ``273_920 + 1``)."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_arith(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left), _arith(node.right))
    raise ValueError("not integer arithmetic")


def parse_prediction(value: Any) -> Any:
    """A typed prediction from what the reader typed (or a parameter's value):
    integers (``1027``, ``273,921``, ``273_920 + 1``), ``True``/``yes``,
    ``False``/``no``, ``None``/``null``; anything else stays text."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return _arith(ast.parse(text.replace(",", ""), mode="eval").body)
    except (SyntaxError, ValueError):
        return text


def _plain(value: Any) -> Any:
    """A live value as plain Python: numpy scalars unboxed, NA/NaN as None."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if hasattr(value, "item"):
        value = value.item()
    return value


def judge(question: Question, predicted: Any, actual: Any) -> Verdict:
    """Whether *predicted* (typed or text) matches the live *actual* value;
    text compares without regard to case."""
    p, a = parse_prediction(predicted), _plain(actual)
    if isinstance(p, str) and isinstance(a, str):
        held = p.casefold() == a.casefold()
    else:
        # True == 1 in Python; a yes/no question wants a yes/no answer
        strict = isinstance(p, bool) or isinstance(a, bool)
        held = (type(p) is type(a) and p == a) if strict else p == a
    return Verdict(question.key, p, a, bool(held), question.why)


# -- live readers -------------------------------------------------------------

def _page_row(lab, page: int, proc: str) -> pd.Series:
    """The latest row of *page* as *proc* sees it, else the page's row with
    no process (nobody maps it any more)."""
    now = lab.current()
    rows = now[(now["page"] == page) & (now["proc"].fillna("") == proc)]
    if not len(rows):
        rows = now[now["page"] == page]
    return rows.iloc[0]


def _field(name: str, page: int = 0, proc: str = "a") -> Callable[[Any, Tour], Any]:
    return lambda lab, _tour: _page_row(lab, page, proc)[name]


def _pgmap_ref(lab, _tour) -> Any:
    return lab.steps.iloc[-1]["pgmap_ref"]


def _mapping_kept(lab, _tour) -> bool:
    pfn = _page_row(lab, 0, "a")["pfn"]
    return lab.folio_mapping(int(pfn))["mapping"] is not None


def _rss_file_change(lab, tour: Tour) -> int:
    return lab.rss("a")["RssFile"] - tour.marked_rss_file(lab)


_PTE_TRUTH = ("On 6.12, pte_mkdevmap() sets _PAGE_SPECIAL with _PAGE_DEVMAP (x86); the special bit",
              "makes vm_normal_page() return NULL: zap, fork and GUP see no page to count.")

_QUESTIONS = [
    Question("pgmap_ref",
             "The dev_pagemap's percpu_ref count right after mmap (the 4K device has "
             f"{device_pages('4K'):,} order-0 folios)?", _pgmap_ref,
             (("pagemap_range() takes percpu_ref_get_many(pfn_len) in one go: one per device folio"
              " whose memmap is not on the device, plus the 1 percpu_ref_init() starts with."),
              "mmap takes none; only memunmap_pages() gives them back, in bulk."),
             "pgmap-references"),
    Question("refcount", "Page 0's folio refcount after the write fault?", _field("refcount"),
             ("A GENERIC device page rests at refcount 1 (__init_zone_device_page).",
              ("vmf_insert_page_mkwrite() -> insert_page_into_pte_locked() does folio_get() for the"
              " PTE: 2.")), "refcount-at-rest"),
    Question("mapcount", "Its raw _mapcount?", _field("mapcount"),
             ("_mapcount is stored minus one: -1 unmapped, 0 mapped once.",
              "insert_page_into_pte_locked() calls folio_add_file_rmap_pte(): -1 -> 0."),
             "mapcount"),
    Question("pt_level", "The level of the page-table entry mapping it (PTE, PMD or PUD)?",
             _field("pt_level"),
             ("dax0.0 is 4K-aligned: __dev_dax_pmd_fault() returns VM_FAULT_FALLBACK (a PMD is"
              " larger than the device's alignment),",
              "so the fault ends in __dev_dax_pte_fault(), which maps one PTE."), "vm-hugepage"),
    Question("pt_devmap", "Its devmap bit (True, False, or None when the kernel has none)?",
             _field("pt_devmap"),
             (("This kernel has no devmap bit at all: \"mm: remove devmap related functions and"
              " page table bits\" removed it after the refcount series."),
              ("The entry is a normal one, neither special nor devmap: vm_normal_page() returns the"
              " page.")), "devmap"),
    Question("rss_file_change", "How many KiB did the fault add to process a's RssFile?",
             _rss_file_change,
             (("insert_page_into_pte_locked() also does inc_mm_counter(mm, mm_counter_file()):"
              " the 4 KiB the PTE maps count as file RSS."),
              "On 6.12 insert_pfn() counts nothing: RssFile is a cheap observable for reports."),
             "rss-file"),
    Question("refcount_after_fork", "Page 0's refcount right after a forks b?", _field("refcount"),
             (("fork copies no page tables for this VMA: vma_needs_copy() finds no anon_vma and no"
              " VM_PFNMAP/VM_MIXEDMAP/uffd-wp (7.x: no VM_COPY_ON_FORK flag)."),
              ("So b has no entry and the refcount stays 2; b will fault its own, as for any"
              " MAP_SHARED file.")), "fork"),
    Question("refcount_two_mappings", "After b touches page 0 too: its refcount?",
             _field("refcount", proc="b"),
             ("Each mapping holds its own folio reference: 1 at rest + 1 for a + 1 for b.",
              "b's fault went through the same vmf_insert_page_mkwrite() path as a's."),
             "refcount-at-rest"),
    Question("mapcount_two_mappings", "And its raw _mapcount?", _field("mapcount", proc="b"),
             ("Two PTE mappings: _mapcount = mappings - 1 = 1.",
              "folio_mapcount() would say 2 (it adds the 1 back)."), "mapcount"),
    Question("refcount_pinned", "Page 0's refcount while io_uring holds a long-term pin?",
             _field("refcount"),
             (("try_grab_folio(FOLL_PIN) on an order-0 folio adds GUP_PIN_COUNTING_BIAS (1024)"
              " to the refcount: 3 + 1024."),
              "A large folio would get +1 on the refcount and +1 on _pincount instead."),
             "pins"),
    Question("pgmap_ref_pinned", "The dev_pagemap's count while pinned?", _field("pgmap_ref"),
             ("Unchanged: no kernel keeps a pgmap reference for a pin's lifetime.",
              ("6.12 GUP held one only while it followed a devmap entry; the refcount series"
              " dropped even that.")), "pgmap-references"),
    Question("refcount_unpinned", "Page 0's refcount after unpin?", _field("refcount"),
             ("unpin_user_page() -> gup_put_folio() subtracts the 1024 again.",
              "The two mappings' references remain: 3."), "pins"),
    Question("refcount_b_exited", "After b exits?", _field("refcount"),
             (("exit_mmap() zaps b's PTE: folio_remove_rmap_pte() and the reference put by the"
              " zap's batched folios_put_refs()."),
              "a's mapping keeps its reference: 2."), "zap"),
    Question("refcount_unmapped", "After a unmaps: the refcount?", _field("refcount"),
             ("The last mapping's reference goes: back to the resting 1.",
              "Had it reached 0, free_zone_device_folio() would set a GENERIC folio back to 1."),
             "refcount-at-rest"),
    Question("mapcount_unmapped", "And the raw _mapcount?", _field("mapcount"),
             ("No mapping left: -1.",
              "The zap's folio_remove_rmap_pte() took back what folio_add_file_rmap_pte() added."),
             "mapcount"),
    Question("mapping_kept",
             "Is the folio's ->mapping still set after the last unmap (True or False)?",
             _mapping_kept,
             (("dax_set_mapping() set ->mapping and ->index at the first fault, and nothing"
               " clears them for a GENERIC folio."),
              "7.2's free_zone_device_folio() leaves ->mapping alone for FS_DAX and GENERIC."),
             "mapping-index"),
    Question("before_refcount", "On before (6.12), page 0's refcount after the same write fault?",
             _field("refcount"),
             (("__dev_dax_pte_fault() on 6.12 calls vmf_insert_mixed() with a PFN_DEV|PFN_MAP pfn:"
              " insert_pfn() writes a devmap PTE."),
              "No folio_get(): the refcount stays at the resting 1."), "refcount-series"),
    Question("before_mapcount", "Its raw _mapcount?", _field("mapcount"),
             ("insert_pfn() does no rmap: -1, although a PTE maps the page.",
              "So folio_mapped() is false: code that trusts the mapcount cannot see this mapping."),
             "refcount-series"),
    Question("before_pt_devmap", "The PTE's devmap bit?", _field("pt_devmap"),
             ("pfn_t_devmap(pfn) -> pte_mkdevmap(): bit 57 (_PAGE_BIT_SOFTW4) on x86.",
              ("GUP used it to find the pgmap (get_dev_pagemap()) for a page with no mapping"
              " reference.")), "devmap"),
    Question("before_pt_special", "And its special bit?", _field("pt_special"),
             _PTE_TRUTH, "vm-normal-page"),
    Question("before_rss_file_change", "How many KiB did that fault add to RssFile?",
             _rss_file_change,
             ("insert_pfn() touches no mm counter: 0.",
              "The same touch on after adds 4: compare the two in a bug report."), "rss-file"),
]
QUESTIONS: Mapping[str, Question] = MappingProxyType({q.key: q for q in _QUESTIONS})


class Tour:
    """The questions of one reading of the tour. *predictions* ({key: value},
    e.g. a notebook parameter) are checked as soon as their question is
    asked; the others wait for the reader."""

    def __init__(self, predictions: Mapping[str, Any] | None = None):
        predictions = dict(predictions or {})
        unknown = sorted(set(predictions) - set(QUESTIONS))
        if unknown:
            from .errors import UserError

            raise UserError(f"no tour question {unknown[0]!r} (known: {', '.join(QUESTIONS)})")
        self.predictions = predictions
        self.verdicts: dict[str, Verdict] = {}
        self._rss: dict[int, int] = {}

    def mark(self, lab) -> None:
        """Remember process a's RssFile now: the rss questions ask for the
        change since the mark."""
        self._rss[id(lab)] = lab.rss("a")["RssFile"]

    def marked_rss_file(self, lab) -> int:
        if id(lab) not in self._rss:
            from .errors import UserError

            raise UserError("call tour.mark(lab) before the step whose RssFile change is asked")
        return self._rss[id(lab)]

    def check(self, key: str, predicted: Any, actual: Any) -> Verdict:
        verdict = judge(QUESTIONS[key], predicted, actual)
        self.verdicts[key] = verdict
        return verdict

    def ask(self, lab, *keys: str):
        """Read the live values of questions *keys* from *lab* now and show
        the questions; predictions given up front are checked at once and
        their verdicts printed."""
        unknown = [k for k in keys if k not in QUESTIONS]
        if unknown or not keys:
            from .errors import UserError

            raise UserError(f"no tour question {unknown[0] if unknown else '(none given)'!r} "
                            f"(known: {', '.join(QUESTIONS)})")
        import ipywidgets as w

        widgets = [_QuestionWidget(self, QUESTIONS[k], QUESTIONS[k].read(lab, self)).show()
                   for k in keys]
        return widgets[0] if len(widgets) == 1 else w.VBox(widgets)

    def results(self) -> pd.DataFrame:
        """The predictions checked so far: question, predicted, live value, held."""
        rows = [{"question": v.key, "predicted": v.predicted, "actual": v.actual, "held": v.held}
                for v in self.verdicts.values()]
        return pd.DataFrame(rows, columns=["question", "predicted", "actual", "held"])


class _QuestionWidget:
    """A prompt, a text box and a Check button; the verdict below them."""

    def __init__(self, tour: Tour, question: Question, actual: Any):
        import ipywidgets as w

        self.tour, self.question, self.actual = tour, question, actual
        self.box = w.Text(placeholder="your prediction", layout=w.Layout(width="16em"))
        self.button = w.Button(description="Check", button_style="primary")
        self.result = w.HTML()
        self.button.on_click(lambda _b: self.check())
        self.widget = w.VBox([w.HTML(f"<b>{html.escape(question.prompt)}</b>"),
                              w.HBox([self.box, self.button]), self.result])

    def check(self) -> Verdict | None:
        if not self.box.value.strip():
            self.result.value = '<span style="color:#b42318">type a prediction first</span>'
            return None
        verdict = self.tour.check(self.question.key, self.box.value, self.actual)
        self.result.value = verdict.html(self.question.glossary)
        return verdict

    def show(self):
        if self.question.key in self.tour.predictions:
            self.box.value = str(self.tour.predictions[self.question.key])
            verdict = self.check()
            print(verdict.text())
        return self.widget
