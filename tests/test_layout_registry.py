"""The data-layout registry: data.layout's choices are the layouts the modules of cnexp/data/
declare, a layout is one module (registered, imported only when chosen), and a misspelt one fails
listing the choices."""
import subprocess
import sys

import pytest
import torch

from cnexp.config import DataConfig
from cnexp.data.datamodule import TriplesDataModule, open_sources
from cnexp.data.images import DataError
from cnexp.data.layout import LAYOUTS, get_layout
from cnexp.knobs import Layout
from cnexp.registry import declared

# a layout whose triples live in memory: image i is one colour, its condition the inverse colour
TOY = '''
from PIL import Image

from cnexp.data.images import DataError, Sample
from cnexp.data.layout import DataLayout, register

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
           (255, 255, 255), (0, 0, 0)]


class MemorySource:
    def __len__(self):
        return len(COLOURS)

    def load(self, index):
        inverse = tuple(255 - c for c in COLOURS[index])
        return Sample(Image.new("RGB", (16, 16), COLOURS[index]),
                      Image.new("RGB", (16, 16), inverse), self.captions(index), f"row {index}")

    def captions(self, index):
        return [f"toy {index}"]

    def fingerprint(self):
        return "toy-memory"


@register
class MemoryLayout(DataLayout):
    name = "toy_memory"

    def check(self, cfg):
        if cfg.annotator is not None:
            raise DataError("data.layout=toy_memory has its conditions: unset data.annotator")

    def open_sources(self, cfg, cache_dir):
        return {"train": MemorySource()}
'''


def test_the_choices_are_the_layouts_the_modules_declare_and_each_is_registered_there():
    declared = LAYOUTS.declared()
    assert [c.value for c in Layout] == ["fill50k", "hf", "captions"]  # the docs' order
    assert set(declared) == set(Layout)
    for name, module in declared.items():
        layout = get_layout(name)
        assert layout.name == name and type(layout).__module__ == f"cnexp.data.{module}"
    assert {c.value for c in Layout} <= set(LAYOUTS)


def test_a_layout_is_imported_only_when_chosen():
    """The registry and the choices read source, not modules: `datasets` (hf) stays unimported
    until data.layout=hf."""
    probe = ("import sys; from cnexp.config import DataConfig; "
             "from cnexp.data.layout import get_layout; get_layout('captions'); "
             "print(sorted(m for m in ('datasets', 'cnexp.data.hf', 'cnexp.data.fill50k', "
             "'cnexp.data.captions') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["['cnexp.data.captions']"]


def test_a_misspelt_layout_fails_listing_the_choices(tmp_path):
    with pytest.raises(DataError, match="data.layout='hff' is unknown: use one of fill50k, hf, "
                                        "captions$"):
        open_sources(DataConfig(root=str(tmp_path), layout="hff"), None)


def test_a_layout_module_dropped_into_a_package_registers_and_feeds_the_datamodule(
        tmp_path, toy_package):
    package = toy_package("toy_layouts", TOY)
    assert declared(package) == {"toy_memory": "toy"}  # what knobs.py makes the choices
    with pytest.raises(DataError, match="'toy_memory' is unknown"):
        get_layout("toy_memory")
    try:
        __import__("toy_layouts.toy")
        assert get_layout("toy_memory").name == "toy_memory"
        with pytest.raises(DataError, match="toy_memory has its conditions"):  # its own check
            open_sources(DataConfig(root=str(tmp_path), layout="toy_memory", annotator="canny"),
                         None)
        cfg = DataConfig(root=str(tmp_path / "unused"), layout="toy_memory", resolution=16,
                         batch_size=2, eval_size=2, val_fraction=0.25, test_fraction=0.25,
                         num_workers=0)
        data = TriplesDataModule(cfg, seed=0)
        data.setup()
        assert sorted(len(data.datasets[s]) for s in ("train", "val", "test")) == [2, 2, 4]
        held_out = data.datasets["val"].indices + data.datasets["test"].indices
        assert not set(held_out) & set(data.datasets["train"].indices)
        batch = data.eval_batch()
        assert batch["caption"] == [f"toy {i}" for i in batch["index"]]
        train = next(iter(data.train_dataloader()))
        for b in (batch, train):  # the condition is the image's inverse colour, pixel for pixel
            assert torch.allclose(b["condition"], 1 - (b["image"] + 1) / 2, atol=1e-6)
        assert set(train["index"].tolist()) <= set(data.datasets["train"].indices)
        with pytest.raises(DataError, match="use one of fill50k, hf, captions, toy_memory"):
            get_layout("toy_memry")
    finally:
        LAYOUTS.unregister("toy_memory")  # the other tests see the built-in layouts only
