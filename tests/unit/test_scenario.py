"""Unit tests of lab.scenario: the shipped scenarios validate, every kind of
mistake is one line naming file, step, action and field, and the bookkeeping
(page ranges, fork inheritance, partial munmap, pins, pipes) is right."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.model import UserError
from lab.guest import StepError
from lab.scenario import (
    ACTIONS,
    MADVISE,
    ScenarioError,
    WatchSpec,
    load_scenario,
    parse_pages,
    touched_pages,
    validate_text,
)

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
SHIPPED = sorted(SCENARIOS.glob("*.toml"))

HEAD4K = '[device]\nalign = "4K"\n'
HEAD2M = '[device]\nalign = "2M"\n'
MMAP = 'action = "mmap"\nproc = "a"\nname = "m"\nlength = "64K"\n'  # 16 pages


def scen(*steps: str, head: str = HEAD4K, top: str = "") -> str:
    return top + head + "".join("[[step]]\n" + s.strip() + "\n" for s in steps)


def error(text: str, name: str = "scenarios/x.toml") -> str:
    with pytest.raises(ScenarioError) as e:
        validate_text(text, name)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# -- shipped scenarios ---------------------------------------------------------


def test_the_promised_scenarios_ship():
    names = {p.stem for p in SHIPPED}
    assert names >= {"fault-4k", "fault-2m", "fault-1g", "fork-share", "pin-longterm",
                     "splice-transient", "partial-munmap-2m", "process-exit"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_scenario_validates_and_describes_itself(path):
    s = load_scenario(path)
    assert s.name == path.stem
    assert s.path == path
    assert s.title and s.title != s.name
    assert len(s.description) > 200
    assert "before" in s.description and "after" in s.description
    assert s.steps and all(step.label for step in s.steps)
    assert [step.index for step in s.steps] == list(range(1, len(s.steps) + 1))
    assert s.watch_list


def test_shipped_devices():
    device = {p.stem: load_scenario(p).device for p in SHIPPED}
    assert device["fault-4k"] == 4096
    assert device["fault-2m"] == device["partial-munmap-2m"] == 2 << 20
    assert device["fault-1g"] == 1 << 30


def test_fault_2m_touches_one_page_per_folio():
    s = load_scenario(SCENARIOS / "fault-2m.toml")
    pages = touched_pages(s)["m"]
    assert sorted({p // 512 for p in pages}) == [0, 1] and len(pages) == 2


# -- the result --------------------------------------------------------------------


def test_scenario_fields_and_args():
    text = scen(MMAP, 'action = "touch"\nmap = "m"\npages = [3, "0-1"]\nlabel = "hi"',
                top='title = "T"\ndescription = "D"\n')
    s = validate_text(text, "dir/x.toml")
    assert (s.name, s.title, s.description, s.device) == ("x", "T", "D", 4096)
    assert s.text == text and len(s.sha256) == 64 and s.path is None
    mmap, touch = s.steps
    assert (mmap.index, mmap.action, mmap.proc, mmap.label) == (1, "mmap", "a", None)
    assert dict(mmap.args) == {"name": "m", "length": 65536, "offset": 0, "write": True,
                               "shared": True}
    assert (touch.index, touch.proc, touch.label) == (2, "a", "hi")
    assert dict(touch.args) == {"map": "m", "pages": (0, 1, 3), "write": False}
    assert touch.pages_touched == (("m", 0), ("m", 1), ("m", 3))
    assert mmap.pages_touched == ()
    with pytest.raises(TypeError):
        touch.args["write"] = True  # read-only
    assert s.watch == () and s.watch_list == (WatchSpec("m", 0), WatchSpec("m", 1),
                                              WatchSpec("m", 3))
    assert hash(s) == hash(validate_text(text, "dir/x.toml"))


def test_name_key_overrides_the_file_stem():
    assert validate_text(scen(MMAP, top='name = "other"\n'), "a/b.toml").name == "other"


def test_mmap_offset_and_device_page():
    s = validate_text(scen('action = "mmap"\nproc = "a"\nname = "m"\nlength = "4M"\n'
                           'offset = "2M"', head=HEAD2M))
    assert s.maps["m"].offset == 2 << 20 and s.maps["m"].pages == 1024
    assert s.device_page("m", 3) == 512 + 3


def test_snapshot_step_has_no_process():
    s = validate_text(scen(MMAP, 'action = "snapshot"\nlabel = "look"'))
    assert (s.steps[1].proc, dict(s.steps[1].args), s.steps[1].label) == (None, {}, "look")


def test_every_action_has_an_example_in_the_docs():
    doc = (SCENARIOS.parent / "docs" / "scenarios.md").read_text()
    for action in ACTIONS:
        assert f'action = "{action}"' in doc, action


# -- pages -------------------------------------------------------------------------


def test_page_ranges_expand_sorted_and_distinct():
    assert parse_pages([5, "0-2", " 7 - 9 ", "4", 1], 16, "m") == (0, 1, 2, 4, 5, 7, 8, 9)
    assert parse_pages(["0-15"], 16, "m") == tuple(range(16))


@pytest.mark.parametrize("pages, problem", [
    ([16], 'page 16 is outside mapping "m" (16 pages)'),
    (["10-16"], 'range "10-16" is outside mapping "m" (16 pages)'),
    (["5-3"], 'range "5-3" runs backwards'),
    ([-1], "page -1 is negative"),
    (["x"], '"x" is neither a page number nor an "A-B" range'),
    ([1.5], "1.5 is neither"),
    ([], "is empty"),
    (3, "must be an array"),
])
def test_bad_pages(pages, problem):
    with pytest.raises(StepError, match="pages: ") as e:
        parse_pages(pages, 16, "m")
    assert problem in str(e.value)


def test_pages_count_4k_pages_on_a_2m_device():
    s = validate_text(scen('action = "mmap"\nproc = "a"\nname = "m"\nlength = "2M"',
                           'action = "touch"\nmap = "m"\npages = [511]', head=HEAD2M))
    assert s.steps[1].args["pages"] == (511,)
    msg = error(scen('action = "mmap"\nproc = "a"\nname = "m"\nlength = "2M"',
                     'action = "touch"\nmap = "m"\npages = [512]', head=HEAD2M))
    assert msg.endswith('step 2 (touch): pages: page 512 is outside mapping "m" (512 pages)')


def test_pin_and_splice_touch_every_page_of_their_range():
    s = validate_text(scen(MMAP, 'action = "pin"\nmap = "m"\nname = "p"\noffset = "8K"\n'
                                 'length = "12K"',
                           'action = "splice"\nmap = "m"\nname = "s"'))
    assert s.steps[1].pages_touched == (("m", 2), ("m", 3), ("m", 4))
    assert s.steps[2].pages_touched == tuple(("m", p) for p in range(16))
    assert dict(s.steps[1].args) == {"map": "m", "name": "p", "offset": 8192, "length": 12288}


# -- error classes: each names file, step, action and field -----------------------


def test_example_message_from_the_brief():
    msg = error(scen(MMAP, 'action = "touch"\nmap = "m"\npages = [1]',
                     'action = "touch"\nmap = "m"\npages = [20]'))
    assert msg == 'scenarios/x.toml: step 3 (touch): pages: page 20 is outside mapping "m" ' \
                  '(16 pages)'


def test_scenario_error_is_a_user_error():
    assert issubclass(ScenarioError, UserError)


def test_toml_syntax_error_gives_the_line():
    msg = error('[device]\nalign = "4K"\n[[step]]\naction = mmap\n')
    assert msg.startswith("scenarios/x.toml: TOML syntax error: ")
    assert "line 4" in msg


def test_unknown_action_lists_the_known_ones():
    msg = error(scen(MMAP, 'action = "frob"'))
    assert msg.startswith('scenarios/x.toml: step 2: action: unknown action "frob" (known: mmap,')
    assert all(a in msg for a in ACTIONS)


def test_missing_action():
    assert error(scen(MMAP, 'map = "m"')).startswith(
        "scenarios/x.toml: step 2: action: missing (one of: mmap, touch,")


def test_unknown_field_lists_the_allowed_ones():
    msg = error(scen(MMAP, 'action = "touch"\nmap = "m"\npages = [1]\npage = 2'))
    assert msg == ("scenarios/x.toml: step 2 (touch): page: unknown field "
                   "(allowed: action, map, pages, write, proc, label)")


def test_missing_field():
    assert error(scen('action = "mmap"\nproc = "a"\nname = "m"')) == \
        "scenarios/x.toml: step 1 (mmap): length: missing"


@pytest.mark.parametrize("field, value, expect", [
    ("write", '"yes"', 'write: must be true or false, not string "yes"'),
    ("length", "1.5", "length: must be a size"),
    ("length", '"lots"', 'length: "lots" is not a size'),
    ("name", "3", "name: must be a string, not integer 3"),
    ("name", '"a b"', 'name: "a b" is not a name'),
])
def test_wrong_type(field, value, expect):
    fields = {"proc": '"a"', "name": '"m"', "length": '"64K"', field: value}
    body = 'action = "mmap"\n' + "".join(f"{k} = {v}\n" for k, v in fields.items())
    msg = error(scen(body))
    assert msg.startswith("scenarios/x.toml: step 1 (mmap): " + expect), msg


@pytest.mark.parametrize("head, mmap, expect", [
    (HEAD4K, 'length = "1071M"',
     'length: offset 0 + length 1071M does not fit the 4K device (1070M)'),
    (HEAD4K, 'length = "1M"\noffset = "1070M"',
     'length: offset 1070M + length 1M does not fit the 4K device (1070M)'),
    (HEAD2M, 'length = "4K"', "length: 4K is not a multiple of the 2M device's alignment (2M)"),
    (HEAD2M, 'length = "2M"\noffset = "1M"',
     "offset: 1M is not a multiple of the 2M device's alignment (2M)"),
    (HEAD2M, 'length = "504M"', "length: offset 0 + length 504M does not fit the 2M device (502M)"),
    ('[device]\nalign = "1G"\n', 'length = "4G"',
     "length: offset 0 + length 4G does not fit the 1G device (3G)"),
    (HEAD4K, "length = 0", "length: must be more than 0"),
    (HEAD4K, 'length = "4K"\nshared = false', "shared: device-dax refuses private mappings"),
])
def test_sizes_the_device_cannot_serve(head, mmap, expect):
    msg = error(scen('action = "mmap"\nproc = "a"\nname = "m"\n' + mmap, head=head))
    assert msg.startswith("scenarios/x.toml: step 1 (mmap): " + expect), msg


def test_1g_device_serves_up_to_3g():
    s = validate_text(scen('action = "mmap"\nproc = "a"\nname = "m"\nlength = "3G"',
                           head='[device]\nalign = "1G"\n'))
    assert s.device_size == 3 << 30


@pytest.mark.parametrize("device, expect", [
    ('[device]\nalign = "64K"\n',
     'device: align: no device with alignment "64K" (known: "4K", "2M", "1G")'),
    ('[device]\nalign = true\n', "device: align: must be one of"),
    ('[device]\nalign = "4K"\nsize = 3\n', "device: size: unknown field (allowed: align)"),
    ('[device]\n', "device: align: missing"),
    ("", 'device: missing (add [device] with align = "4K", "2M" or "1G")'),
    ('device = "4K"\n', "device: must be a table"),
])
def test_bad_device(device, expect):
    msg = error(scen(MMAP, head=device))
    assert msg.startswith("scenarios/x.toml: " + expect), msg


def test_device_alignment_is_case_and_spelling_tolerant():
    for spelling in ('"2m"', '"2MiB"', "2097152"):
        text = scen('action = "snapshot"', head=f"[device]\nalign = {spelling}\n")
        assert validate_text(text).device == 2 << 20


def test_top_level_errors():
    assert error(scen(MMAP, top='colour = "red"\n')).startswith(
        "scenarios/x.toml: colour: unknown field (allowed: name, title, description,")
    assert error(HEAD4K) == "scenarios/x.toml: step: no steps (add [[step]] tables)"
    assert error(HEAD4K + '[step]\naction = "exit"\n').startswith(
        "scenarios/x.toml: step: must be an array of tables")
    assert error(scen(MMAP, top="title = 3\n")).startswith(
        "scenarios/x.toml: title: must be a string")


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ScenarioError) as e:
        load_scenario(path)
    assert str(e.value).startswith(f"{path}: cannot read the scenario")


def test_load_names_the_file_in_errors(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(scen(MMAP, 'action = "exit"\nproc = "zz"'))
    with pytest.raises(ScenarioError) as e:
        load_scenario(path)
    assert str(e.value) == (f'{path}: step 2 (exit): proc: no process "zz" '
                            "(a process is created by mmap or fork)")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ScenarioError, match="not UTF-8"):
        load_scenario(path)


# -- processes and handles ----------------------------------------------------------


def test_handles_are_inherited_across_fork():
    s = validate_text(scen(MMAP, 'action = "fork"\nproc = "a"\nchild = "b"',
                           'action = "touch"\nproc = "b"\nmap = "m"\npages = [2]',
                           'action = "exit"\nproc = "a"',
                           'action = "munmap"\nproc = "b"\nmap = "m"'))
    assert [(st.action, st.proc) for st in s.steps] == [
        ("mmap", "a"), ("fork", "a"), ("touch", "b"), ("exit", "a"), ("munmap", "b")]
    assert dict(s.steps[1].args) == {"child": "b"}


def test_default_proc_is_the_owner_and_must_be_alive():
    msg = error(scen(MMAP, 'action = "fork"\nproc = "a"\nchild = "b"',
                     'action = "exit"\nproc = "a"',
                     'action = "touch"\nmap = "m"\npages = [2]'))
    assert msg.startswith('scenarios/x.toml: step 4 (touch): proc: process "a" exited at '
                          "step 3 (proc defaults to the mapping's owner")


def test_mapping_made_after_fork_is_not_inherited():
    msg = error(scen(MMAP, 'action = "fork"\nproc = "a"\nchild = "b"',
                     'action = "mmap"\nproc = "a"\nname = "n"\nlength = "4K"',
                     'action = "touch"\nproc = "b"\nmap = "n"\npages = [0]'))
    assert msg.startswith('scenarios/x.toml: step 4 (touch): map: process "b" has no mapping "n"')


def test_munmap_in_the_parent_leaves_the_child_mapped():
    validate_text(scen(MMAP, 'action = "fork"\nproc = "a"\nchild = "b"',
                       'action = "munmap"\nmap = "m"',
                       'action = "touch"\nproc = "b"\nmap = "m"\npages = [5]'))
    msg = error(scen(MMAP, 'action = "fork"\nproc = "a"\nchild = "b"',
                     'action = "munmap"\nmap = "m"',
                     'action = "touch"\nmap = "m"\npages = [5]'))
    assert msg == 'scenarios/x.toml: step 4 (touch): map: mapping "m" was unmapped from "a" ' \
                  "at step 3"


@pytest.mark.parametrize("steps, expect", [
    (['action = "fork"\nproc = "a"\nchild = "a"'],
     'step 2 (fork): child: process "a" already exists (created at step 1)'),
    (['action = "exit"\nproc = "a"', 'action = "fork"\nproc = "a"\nchild = "b"'],
     'step 3 (fork): proc: process "a" exited at step 2'),
    (['action = "exit"\nproc = "a"', 'action = "exit"\nproc = "a"'],
     'step 3 (exit): proc: process "a" exited at step 2'),
    (['action = "exit"\nproc = "a"', 'action = "mmap"\nproc = "a"\nname = "n"\nlength = "4K"'],
     'step 3 (mmap): proc: process "a" exited at step 2; a new process needs a new name'),
    (['action = "fork"\nproc = "q"\nchild = "b"'], 'step 2 (fork): proc: no process "q"'),
    (['action = "fork"\nproc = "a"\nchild = "b"', 'action = "exit"\nproc = "b"',
      'action = "fork"\nproc = "a"\nchild = "b"'],
     'step 4 (fork): child: process "b" already exists (created at step 2, exited at step 3)'),
    (['action = "mmap"\nproc = "b"\nname = "m"\nlength = "4K"'],
     'step 2 (mmap): name: "m" already names mapping "m" (step 1)'),
    (['action = "touch"\nmap = "q"\npages = [0]'],
     'step 2 (touch): map: no mapping "q" (mappings so far: "m")'),
])
def test_process_and_handle_errors(steps, expect):
    msg = error(scen(MMAP, *steps))
    assert msg.startswith("scenarios/x.toml: " + expect), msg


# -- munmap bookkeeping ----------------------------------------------------------------


def test_partial_munmap_leaves_the_rest_usable():
    s = validate_text(scen(MMAP, 'action = "munmap"\nmap = "m"\noffset = "16K"\nlength = "8K"',
                           'action = "touch"\nmap = "m"\npages = ["0-3", "6-15"]',
                           'action = "munmap"\nmap = "m"\nlength = "16K"',
                           'action = "munmap"\nmap = "m"'))
    assert [dict(st.args) for st in s.steps[1:] if st.action == "munmap"] == [
        {"map": "m", "offset": 16384, "length": 8192, "whole": False},
        {"map": "m", "offset": 0, "length": 16384, "whole": False},
        {"map": "m", "offset": 0, "length": 65536, "whole": True},
    ]


def test_touching_an_unmapped_page_names_the_munmap():
    msg = error(scen(MMAP, 'action = "munmap"\nmap = "m"\noffset = "16K"\nlength = "8K"',
                     'action = "touch"\nmap = "m"\npages = ["3-5"]'))
    assert msg == 'scenarios/x.toml: step 3 (touch): pages: page 4 of "m" was unmapped at step 2'


def test_pieces_that_add_up_to_the_whole_end_the_handle():
    msg = error(scen(MMAP, 'action = "munmap"\nmap = "m"\nlength = "32K"',
                     'action = "munmap"\nmap = "m"\noffset = "32K"',
                     'action = "touch"\nmap = "m"\npages = [0]'))
    assert msg == 'scenarios/x.toml: step 4 (touch): map: mapping "m" was unmapped from "a" ' \
                  "at step 3"


def test_munmap_of_what_is_already_gone():
    msg = error(scen(MMAP, 'action = "munmap"\nmap = "m"\nlength = "8K"',
                     'action = "munmap"\nmap = "m"\nlength = "4K"'))
    assert msg == ('scenarios/x.toml: step 3 (munmap): offset: page 0 of "m" is already '
                   'unmapped from "a"')


@pytest.mark.parametrize("munmap, expect", [
    ('offset = "2K"', "offset: 2K is not a multiple of 4K"),
    ('length = "6K"', "length: 6K is not a multiple of 4K"),
    ('offset = "64K"', 'offset: 64K is past the end of mapping "m" (64K)'),
    ('offset = "60K"\nlength = "8K"',
     'length: offset 60K + length 8K runs past the end of mapping "m" (64K)'),
])
def test_munmap_ranges(munmap, expect):
    msg = error(scen(MMAP, 'action = "munmap"\nmap = "m"\n' + munmap))
    assert msg.startswith("scenarios/x.toml: step 2 (munmap): " + expect), msg


def test_a_2m_mapping_splits_only_at_2m():
    mmap = 'action = "mmap"\nproc = "a"\nname = "m"\nlength = "4M"'
    validate_text(scen(mmap, 'action = "munmap"\nmap = "m"\noffset = "2M"', head=HEAD2M))
    msg = error(scen(mmap, 'action = "munmap"\nmap = "m"\noffset = "1M"\nlength = "4K"',
                     head=HEAD2M))
    assert msg.startswith("scenarios/x.toml: step 2 (munmap): offset: 1M is not a multiple of 2M "
                          "(a device-dax mapping can only be split at its device's alignment)")
    # madvise does not split the VMA: 4K granularity is fine
    validate_text(scen(mmap, 'action = "madvise"\nmap = "m"\nadvice = "dontneed"\n'
                             'offset = "1M"\nlength = "4K"', head=HEAD2M))


# -- pins and pipes ----------------------------------------------------------------------


def test_pin_survives_munmap_and_unpins_in_its_process():
    s = validate_text(scen(MMAP, 'action = "pin"\nmap = "m"\nname = "p"\nlength = "16K"',
                           'action = "munmap"\nmap = "m"', 'action = "unpin"\npin = "p"'))
    assert (s.steps[3].proc, dict(s.steps[3].args)) == ("a", {"pin": "p", "map": "m"})


@pytest.mark.parametrize("steps, expect", [
    (['action = "unpin"\npin = "q"'], 'step 2 (unpin): pin: no pin "q" (pins so far: none)'),
    (['action = "pin"\nmap = "m"\nname = "p"', 'action = "unpin"\npin = "p"',
      'action = "unpin"\npin = "p"'],
     'step 4 (unpin): pin: pin "p" was already unpinned at step 3'),
    (['action = "pin"\nmap = "m"\nname = "p"', 'action = "exit"\nproc = "a"',
      'action = "unpin"\npin = "p"'], 'step 4 (unpin): proc: process "a" exited at step 3'),
    (['action = "pin"\nmap = "m"\nname = "p"', 'action = "fork"\nproc = "a"\nchild = "b"',
      'action = "unpin"\npin = "p"\nproc = "b"'],
     'step 4 (unpin): proc: pin "p" belongs to process "a", not "b"'),
    (['action = "splice"\nmap = "m"\nname = "s"', 'action = "unpin"\npin = "s"'],
     'step 3 (unpin): pin: no pin "s" (pins so far: none)'),
    (['action = "splice"\nmap = "m"\nname = "s"', 'action = "drain"\nsplice = "s"',
      'action = "drain"\nsplice = "s"'],
     'step 4 (drain): splice: pipe "s" was already drained at step 3'),
    (['action = "pin"\nmap = "m"\nname = "m"'],
     'step 2 (pin): name: "m" already names mapping "m" (step 1)'),
    (['action = "munmap"\nmap = "m"\nlength = "4K"', 'action = "pin"\nmap = "m"\nname = "p"'],
     'step 3 (pin): length: page 0 of "m" was unmapped at step 2 (length defaults'),
])
def test_pin_and_pipe_errors(steps, expect):
    msg = error(scen(MMAP, *steps))
    assert msg.startswith("scenarios/x.toml: " + expect), msg


def test_splice_is_at_most_1m():
    mmap = 'action = "mmap"\nproc = "a"\nname = "m"\nlength = "2M"'
    validate_text(scen(mmap, 'action = "splice"\nmap = "m"\nname = "s"\nlength = "1M"'))
    msg = error(scen(mmap, 'action = "splice"\nmap = "m"\nname = "s"'))
    assert msg == ("scenarios/x.toml: step 2 (splice): length: 2M is more than a pipe holds "
                   "(1M)")


def test_pin_is_at_most_1g():
    mmap = 'action = "mmap"\nproc = "a"\nname = "m"\nlength = "2G"'
    head = '[device]\nalign = "1G"\n'
    validate_text(scen(mmap, 'action = "pin"\nmap = "m"\nname = "p"\nlength = "1G"', head=head))
    msg = error(scen(mmap, 'action = "pin"\nmap = "m"\nname = "p"', head=head))
    assert msg.startswith("scenarios/x.toml: step 2 (pin): length: 2G is more than io_uring")


# -- madvise and mprotect --------------------------------------------------------------


@pytest.mark.parametrize("spelling", ['"DONTNEED"', '"MADV_DONTNEED"', '"dontneed"',
                                      '"madv_DontNeed"', "4"])
def test_madvise_names_with_and_without_prefix(spelling):
    s = validate_text(scen(MMAP, f'action = "madvise"\nmap = "m"\nadvice = {spelling}'))
    assert dict(s.steps[1].args) == {"map": "m", "advice": "DONTNEED", "advice_value": 4,
                                     "offset": 0, "length": 65536}


def test_every_uapi_advice_is_accepted():
    assert MADVISE["COLLAPSE"] == 25 and MADVISE["GUARD_REMOVE"] == 103
    for name, number in MADVISE.items():
        s = validate_text(scen(MMAP, f'action = "madvise"\nmap = "m"\nadvice = "{name}"'))
        assert (s.steps[1].args["advice"], s.steps[1].args["advice_value"]) == (name, number)


def test_advice_the_kernel_may_refuse_is_not_an_error():
    # device-dax may well refuse these; the runner records the errno
    for advice in ("HWPOISON", "COLLAPSE", "MERGEABLE", "GUARD_INSTALL", "PAGEOUT"):
        validate_text(scen(MMAP, f'action = "madvise"\nmap = "m"\nadvice = "{advice}"'))


@pytest.mark.parametrize("advice, expect", [
    ('"DONTWANT"', 'advice: unknown advice "DONTWANT" (known: NORMAL, RANDOM,'),
    ("7", "advice: 7 is not a known MADV_* value"),
    ("true", "advice: must be a string, not boolean true"),
])
def test_unknown_advice_is_an_error(advice, expect):
    msg = error(scen(MMAP, f'action = "madvise"\nmap = "m"\nadvice = {advice}'))
    assert msg.startswith("scenarios/x.toml: step 2 (madvise): " + expect), msg


@pytest.mark.parametrize("prot, normal", [('"rw"', "rw"), ('"WR"', "rw"), ('"x"', "x"),
                                          ('"rwx"', "rwx"), ('"none"', ""), ('"None"', "")])
def test_mprotect_prot(prot, normal):
    s = validate_text(scen(MMAP, f'action = "mprotect"\nmap = "m"\nprot = {prot}\n'
                                 'offset = "4K"\nlength = "4K"'))
    assert dict(s.steps[1].args) == {"map": "m", "prot": normal, "offset": 4096, "length": 4096}


@pytest.mark.parametrize("prot", ['"rr"', '"q"', '""', "7"])
def test_bad_prot(prot):
    msg = error(scen(MMAP, f'action = "mprotect"\nmap = "m"\nprot = {prot}'))
    assert msg.startswith("scenarios/x.toml: step 2 (mprotect): prot: "), msg


# -- watch ---------------------------------------------------------------------------


def test_explicit_watch():
    s = validate_text(scen(MMAP, 'action = "touch"\nmap = "m"\npages = [1]',
                           top='watch = [{map = "m", page = 9}, {map = "m", page = 0}]\n'))
    assert s.watch == (WatchSpec("m", 9), WatchSpec("m", 0)) == s.watch_list


@pytest.mark.parametrize("watch, expect", [
    ('[{map = "m", page = 16}]', 'watch 1: page: page 16 is outside mapping "m" (16 pages)'),
    ('[{map = "m", page = 1}, {map = "n", page = 0}]',
     'watch 2: map: no mapping "n" (mappings: "m")'),
    ('[{map = "m"}]', "watch 1: page: missing"),
    ('[{map = "m", page = 1, proc = "a"}]', "watch 1: proc: unknown field (allowed: map, page, events)"),
    ('[{map = "m", page = "1"}]', 'watch 1: page: must be an integer, not string "1"'),
    ('{map = "m", page = 1}', "watch: must be an array"),
    ('[{map = "m", page = 1, events = "everything"}]',
     'watch 1: events: must be true, false, "counts" or "stacks", not "everything"'),
    ('[{map = "m", page = 1, events = 1}]', 'watch 1: events: must be true, false, "counts"'),
])
def test_bad_watch(watch, expect):
    msg = error(scen(MMAP, top=f"watch = {watch}\n"))
    assert msg.startswith("scenarios/x.toml: " + expect), msg


def test_watch_events_modes():
    s = validate_text(scen(MMAP, top='watch = [{map = "m", page = 0, events = true}, '
                                     '{map = "m", page = 1, events = "stacks"}, '
                                     '{map = "m", page = 2, events = false}, {map = "m", page = 3}]\n'),
                      "x.toml")
    assert [w.events for w in s.watch_list] == ["counts", "stacks", None, None]


def test_watch_after_a_step_header_belongs_to_the_step():
    # the classic TOML slip: a top-level key written after [[step]]
    msg = error(scen(MMAP + 'watch = [{map = "m", page = 1}]\n'))
    assert msg.startswith("scenarios/x.toml: step 1 (mmap): watch: unknown field")


def test_the_docs_document_exactly_the_registrys_actions_and_fields():
    """docs/scenarios.md has a section per action of lab.actions whose field
    tables name exactly the action's fields (label aside: every step has it)."""
    import re

    from lab.actions import REGISTRY

    doc = (SCENARIOS.parent / "docs" / "scenarios.md").read_text()
    steps = doc[doc.index("## Steps"):]
    steps = steps[:steps.index("\n## ", 1)]  # the section, up to the next heading of its level
    sections = re.split(r"^### ", steps, flags=re.M)[1:]
    documented: dict[str, set[str]] = {}
    for section in sections:
        title, body = section.split("\n", 1)
        body = re.split(r"^## ", body, flags=re.M)[0]
        names = [n.strip() for n in title.split("/")]
        current = names[0]
        for line in body.splitlines():
            header = re.match(r"\|\s*(?:`(\w+)`\s+)?field\s*\|", line)
            if header:
                current = header.group(1) or names[0]
                documented.setdefault(current, set())
                continue
            row = re.match(r"\|\s*`(\w+)`\s*\|", line)
            if row and current in names:
                documented.setdefault(current, set()).add(row.group(1))
        for name in names:
            documented.setdefault(name, set())
    assert set(documented) == set(REGISTRY)
    for name, spec in REGISTRY.items():
        assert documented[name] - {"label"} == {f.name for f in spec.fields}, name
