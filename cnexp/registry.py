"""One registry design for every extension point: control branches, data layouts, sample metrics
and base families.

An extension is one module in its package's folder holding a class decorated with the
registry's `register`, whose `name` is the knob value that selects it. The knob's choices are
read from the modules' source (`declared`), so Hydra can refuse a misspelt name at composition
without importing torch, diffusers or `datasets`; a lookup imports just the module that declares
the name. A class whose `name` is computed (no string literal to read) makes the scan import its
module and list what it registered: a registered name is never silently missing from the
choices. Two modules registering one name are refused, naming both.

This module stays light (no torch): cnexp/knobs.py builds the choice Enums from it.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")

# module -> the names its classes registered (any registry): what a scan reads for a class whose
# name it cannot read from source
REGISTERED_BY_MODULE: dict[str, list[str]] = {}
_SCANS: dict[tuple, dict[str, str]] = {}  # (folder, package, files' mtimes) -> a scan's result


class DuplicateName(TypeError):
    """Two modules register the same name: one of them must be renamed."""


def _is_registered(node: ast.ClassDef) -> bool:
    return any(getattr(d, "id", getattr(d, "attr", None)) == "register"
               for d in node.decorator_list)


def _literal_name(node: ast.ClassDef) -> Optional[str]:
    for stmt in node.body:
        targets = (stmt.targets if isinstance(stmt, ast.Assign) else
                   [stmt.target] if isinstance(stmt, ast.AnnAssign) else [])
        if [getattr(t, "id", None) for t in targets] == ["name"] and stmt.value is not None:
            value = stmt.value
            return value.value if isinstance(value, ast.Constant) and isinstance(
                value.value, str) else None
    return None


def _scan(directory: Path, package: Optional[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    for path in sorted(directory.glob("*.py")):
        classes = [node for node in ast.parse(path.read_text(), str(path)).body
                   if isinstance(node, ast.ClassDef) and _is_registered(node)]
        found = [_literal_name(node) for node in classes]
        if None in found:  # a computed name: only importing the module tells it
            if package is None:
                raise TypeError(f"{path}: a registered class's name is not a string literal; "
                                "scanning it needs the package to import it from")
            module = f"{package}.{path.stem}"
            importlib.import_module(module)
            found = REGISTERED_BY_MODULE.get(module, [])
        for name in found:
            if name in names and names[name] != path.stem:
                raise DuplicateName(f"'{name}' is registered twice: in {directory / names[name]}"
                                    f".py and {path}; rename one")
            names[name] = path.stem
    return names


def declared(directory: Path, package: Optional[str] = None) -> dict[str, str]:
    """name -> module stem, for every registered class of the modules in `directory`, read from
    their source (importing a module only when a name is computed). Cached until a file of the
    folder changes."""
    key = (str(directory), package,
           tuple((p.name, p.stat().st_mtime_ns) for p in sorted(directory.glob("*.py"))))
    if key not in _SCANS:
        _SCANS[key] = _scan(directory, package)
    return dict(_SCANS[key])


class Registry(Generic[T]):
    """name -> a registered extension (an instance of its class, or the class itself).

    kind: what it holds, for messages ("control branch"); knob: what selects one
    ("control.branch"); package / directory: where the built-in ones are declared; error: the
    exception an unknown name raises (a CnexpError subclass: one message, exit 2)."""

    def __init__(self, kind: str, knob: str, package: str, directory: Path,
                 error: Callable[[str], Exception], instances: bool = True,
                 check: Optional[Callable[[type], None]] = None, order: tuple[str, ...] = ()):
        self.kind, self.knob, self.package, self.directory = kind, knob, package, directory
        self.error, self.instances, self.check = error, instances, check
        self.order = order  # names listed first, in this order (the docs' order of layouts)
        self.entries: dict[str, T] = {}
        self.modules: dict[str, str] = {}  # name -> the module that registered it

    # ---- declaring ----------------------------------------------------------------------------
    def register(self, cls: type) -> type:
        """Class decorator: make `cls` selectable as <knob>=<cls.name>."""
        name, module = cls.name, cls.__module__
        if self.modules.get(name, module) != module:
            raise DuplicateName(f"{self.kind} '{name}' is registered twice: by "
                                f"{self.modules[name]} and {module}; rename one")
        if self.check is not None:
            self.check(cls)
        self.entries[name] = cls() if self.instances else cls
        self.modules[name] = module
        REGISTERED_BY_MODULE.setdefault(module, [])
        if name not in REGISTERED_BY_MODULE[module]:
            REGISTERED_BY_MODULE[module].append(name)
        return cls

    def unregister(self, name: str) -> None:
        """Forget `name` (a test's toy, once the test is done)."""
        self.entries.pop(name, None)
        module = self.modules.pop(name, None)
        if module in REGISTERED_BY_MODULE and name in REGISTERED_BY_MODULE[module]:
            REGISTERED_BY_MODULE[module].remove(name)

    # ---- choosing -----------------------------------------------------------------------------
    def declared(self) -> dict[str, str]:
        """The built-in names -> their module's stem, from source (the knob's choices)."""
        return declared(self.directory, self.package)

    def names(self) -> list[str]:
        """The choices: the built-in names, then any registered from outside the package."""
        built_in = sorted(self.declared(), key=lambda n: (self.order + (n,)).index(n))
        return built_in + [name for name in self.entries if name not in built_in]

    def get(self, name) -> T:
        """The extension called `name`, importing just the module that declares it."""
        name = str(name)
        if name not in self.entries:
            stem = self.declared().get(name)
            if stem is not None:
                importlib.import_module(f"{self.package}.{stem}")
        if name not in self.entries:
            raise self.error(f"{self.knob}='{name}' is unknown: use one of "
                             f"{', '.join(self.names())}")
        return self.entries[name]

    def load_all(self) -> dict[str, T]:
        """Every extension, built-in ones imported (for a question asked of all of them)."""
        for stem in sorted(set(self.declared().values())):
            importlib.import_module(f"{self.package}.{stem}")
        return self.entries

    # a read-only mapping of what is registered so far, as the old dicts were
    def __contains__(self, name) -> bool:
        return str(name) in self.entries

    def __getitem__(self, name) -> T:
        return self.entries[str(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def items(self):
        return self.entries.items()

    def values(self):
        return self.entries.values()
