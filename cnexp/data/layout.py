"""The data-layout interface, and the registry that picks a layout by `data.layout`.

A layout is one module in cnexp/data/ holding one `DataLayout` subclass, decorated `@register`:
it says how a `DataConfig` opens the raw samples of each split the data itself has (a `Source`,
cnexp/data/dataset.py, that TriplesDataset reads). cnexp/knobs.py reads the registered names from
the modules' source for data.layout's choices, so a misspelt layout fails at composition; only
the module that declares the chosen layout is imported (hf's brings in `datasets`). Splitting,
the data check, annotation and loading are written once, against the sources.

This module stays light (no torch, no Lightning, no reader): the readers import it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from cnexp.data.images import DataError
from cnexp.knobs import DATA_PACKAGE, LAYOUT_ORDER
from cnexp.registry import Registry

if TYPE_CHECKING:
    from cnexp.config import DataConfig
    from cnexp.data.dataset import Source

SPLITS = ("train", "val", "test")


class DataLayout:
    name: ClassVar[str]  # the value of data.layout that selects it
    # data.condition_style values its sources can draw (the tiny world's styles: fill50k)
    condition_styles: ClassVar[tuple[str, ...]] = ("outline",)

    def open_sources(self, cfg: DataConfig, cache_dir: str | None) -> dict[str, Source]:
        """Split name ("train", "val", "test") -> a source of its raw samples, for the splits
        the data itself has ("train" at least; the datamodule cuts the others from it). A source
        checks its index when built and raises DataError naming the file, line or field."""
        raise NotImplementedError

    def check(self, cfg: DataConfig) -> None:
        """Settings this layout cannot read with: raise DataError naming the knob and the fix
        (runs before open_sources)."""


LAYOUTS: Registry[DataLayout] = Registry("data layout", "data.layout", "cnexp.data", DATA_PACKAGE,
                                        DataError, order=LAYOUT_ORDER)
register = LAYOUTS.register


def get_layout(name: str) -> DataLayout:
    """The layout registered as `name`: a built-in one's module (the one that declares it) is
    imported here, on first use; an unknown name is one DataError listing the choices."""
    return LAYOUTS.get(name)


def open_sources(cfg: DataConfig, cache_dir: str | None) -> dict:
    """Split name -> the layout's source, for the splits the data itself has (the layout's module
    in cnexp/data/, registered: cnexp/data/layout.py)."""
    layout = get_layout(cfg.layout)
    style = str(getattr(cfg, "condition_style", "outline"))
    if style not in layout.condition_styles:
        raise DataError(f"data.condition_style={style} redraws the tiny world's conditions, "
                        f"which data.layout={layout.name} cannot: use data.layout=fill50k on the "
                        "generated tiny world, or data.condition_style=outline")
    layout.check(cfg)
    return layout.open_sources(cfg, cache_dir)
