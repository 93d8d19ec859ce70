"""The branch registry: every module of cnexp/control/ is imported (its branches register) and
read for control.branch's choices, so a new branch is one module dropped in, nothing else edited."""

import pytest

from cnexp.control import BRANCHES, get_branch
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
    assert set(BRANCHES.load_all()) == set(declared_branches())
    assert {"t2i_adapter", "lora_copy"} <= set(BRANCHES)  # issue 24's branches


def test_a_module_dropped_into_a_branch_package_registers_and_becomes_a_choice(toy_package):
    package = toy_package("toy_branches", TOY)
    assert declared_branches(package) == ["toy_registered"]  # what knobs.py makes the choices
    try:
        __import__("toy_branches.toy")
        assert get_branch("toy_registered").name == "toy_registered"
    finally:
        BRANCHES.unregister("toy_registered")  # the other tests see the built-in branches only
    with pytest.raises(Exception, match="'toy_registered' is unknown"):
        get_branch("toy_registered")
