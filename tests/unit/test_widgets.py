"""The panel offers every action of the registry with a widget per field,
without a VM (the steps themselves are tested live in tests/notebooks)."""

from __future__ import annotations

from lab.actions import REGISTRY
from lab.widgets import LabPanel


def test_the_panel_offers_every_registry_action_and_field():
    panel = LabPanel(None)
    assert tuple(panel.action.options) == tuple(REGISTRY)
    for name, spec in REGISTRY.items():
        expected = [f.name for f in spec.fields if f.kind != "name"]  # names are made up
        assert list(panel.fields[name]) == expected, name
        panel.action.value = name
        shown = list(panel.args_box.children)
        assert shown[-1] is panel.label
        assert [w for w in shown if w is not panel.label and w is not panel.device] == [
            panel.fields[name][f] for f in expected]


def test_a_step_before_boot_is_one_line():
    panel = LabPanel(None)
    panel.run_button.click()
    assert panel.last_error.startswith("boot a kernel first")
