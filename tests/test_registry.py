"""One Registry class (cnexp/registry.py) behind the branches, data layouts, sample metrics and
base families:
a module dropped into a package registers, even with a computed name; two modules registering
one name are refused naming both; a lookup imports only the declaring module."""
import sys

import pytest

from cnexp.control.branch import BRANCHES
from cnexp.data.layout import LAYOUTS
from cnexp.families.family import FAMILIES
from cnexp.metrics.registry import METRICS
from cnexp.registry import DuplicateName, Registry, declared

COMPUTED = {  # one toy of each kind whose name no source scan can read: it is computed
    "branch": (BRANCHES, '''
from cnexp.control.branch import register
from cnexp.control.trainable_copy import CopyBranch


@register
class ToyBranch(CopyBranch):
    name = "toy_" + "branch"
'''),
    "layout": (LAYOUTS, '''
from cnexp.data.layout import DataLayout, register


@register
class ToyLayout(DataLayout):
    name = "_".join(["toy", "layout"])
'''),
    "metric": (METRICS, '''
from cnexp.metrics.registry import SampleMetric, register


@register
class ToyMetric(SampleMetric):
    name = "toy_{}".format("metric")
    needs = ("samples",)
'''),
    "family": (FAMILIES, '''
from cnexp.families.family import register
from cnexp.families.sd import StableDiffusionFamily


@register
class ToyFamily(StableDiffusionFamily):
    name = "toy_" + "family"
'''),
}


@pytest.mark.parametrize("kind", sorted(COMPUTED))
def test_a_computed_name_is_listed_not_silently_missed(kind, toy_package):
    registry, source = COMPUTED[kind]
    package = toy_package(f"toy_{kind}s", source)
    try:
        assert declared(package, f"toy_{kind}s") == {f"toy_{kind}": "toy"}  # the knob's choices
        assert registry.get(f"toy_{kind}").name == f"toy_{kind}"
        assert f"toy_{kind}" in registry.names()
    finally:
        registry.unregister(f"toy_{kind}")


def test_two_modules_registering_one_name_are_refused_naming_both(tmp_path, monkeypatch):
    package = tmp_path / "twins"
    package.mkdir()
    for stem in ("first", "second"):
        (package / f"{stem}.py").write_text(
            "from twins import REGISTRY\n\n\n@REGISTRY.register\nclass Twin:\n"
            "    name = 'twin'\n")
    (package / "__init__.py").write_text(
        "from pathlib import Path\nfrom cnexp.registry import Registry\n"
        "REGISTRY = Registry('toy', 'toy.knob', 'twins', Path(__file__).parent, KeyError)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(DuplicateName, match=r"'twin' is registered twice: in .*first\.py "
                                                r"and .*second\.py"):
            declared(package, "twins")  # from source, before anything is imported
        import twins.first  # noqa: F401
        with pytest.raises(DuplicateName, match="by twins.first and twins.second"):
            import twins.second  # noqa: F401
    finally:
        for name in ("twins", "twins.first", "twins.second"):
            sys.modules.pop(name, None)


def test_an_unknown_name_lists_the_choices_in_the_registrys_error(tmp_path):
    registry = Registry("toy", "toy.knob", "nowhere", tmp_path, LookupError)
    with pytest.raises(LookupError, match="toy.knob='nope' is unknown: use one of $"):
        registry.get("nope")


def test_a_scan_is_cached_until_a_file_changes(tmp_path):
    (tmp_path / "one.py").write_text("@register\nclass One:\n    name = 'one'\n")
    assert declared(tmp_path) == {"one": "one"}
    (tmp_path / "two.py").write_text("@register\nclass Two:\n    name = 'two'\n")
    assert declared(tmp_path) == {"one": "one", "two": "two"}
