"""The branch registry: every module of cnexp/control/ is imported (its branches register) and
read for control.branch's choices, so a new branch is one module dropped in, nothing else edited."""
import sys
import textwrap

import pytest

from cnexp.control import BRANCHES, get_branch, import_modules
from cnexp.knobs import Branch, declared_branches

TOY = '''
from cnexp.control.branch import register
from cnexp.control.trainable_copy import CopyBranch


@register
class ToyBranch(CopyBranch):
    name = "toy_registered"
'''


def test_the_choices_are_the_registered_branches_and_include_the_new_arms():
    assert [b.value for b in Branch] == declared_branches()
    assert set(BRANCHES) == set(declared_branches())
    assert {"t2i_adapter", "lora_copy"} <= set(BRANCHES)  # issue 24's branches


def test_a_module_dropped_into_a_branch_package_registers_and_becomes_a_choice(
        tmp_path, monkeypatch):
    package = tmp_path / "toy_branches"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "toy.py").write_text(textwrap.dedent(TOY))
    assert declared_branches(package) == ["toy_registered"]  # what knobs.py makes the choices
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert import_modules("toy_branches", [str(package)]) == ["toy"]
        assert get_branch("toy_registered").name == "toy_registered"
    finally:
        BRANCHES.pop("toy_registered", None)  # the other tests see the built-in branches only
        for name in ("toy_branches", "toy_branches.toy"):
            sys.modules.pop(name, None)
    with pytest.raises(Exception, match="toy_registered is unknown"):
        get_branch("toy_registered")
