"""Optional dependencies: which extra of ``pip install 'hil[...]'`` provides what.

A missing optional package is reported in one line that names the extra to install, never as a
raw ``ImportError`` traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from hil.errors import HilError

#: import name -> (extra, distribution the extra installs)
EXTRAS: dict[str, tuple[str, str]] = {
    "psycopg": ("postgres", "psycopg"),
    "optuna_dashboard": ("dashboard", "optuna-dashboard"),
    "pyvisa_py": ("lab", "pyvisa-py"),
    "serial": ("lab", "pyserial"),
    "torchdiffeq": ("benchmarks", "torchdiffeq"),
    "tensorboard": ("tensorboard", "tensorboard"),
}

#: other ways packages report that an optional module is missing
_MESSAGES: dict[str, tuple[str, ...]] = {"serial": ("install PySerial",)}


class MissingExtra(HilError, ImportError):
    """An optional package is not installed; the message names the extra that installs it."""

    def __init__(self, module: str, purpose: str) -> None:
        extra, dist = EXTRAS.get(module, (None, module))
        how = f"pip install 'hil[{extra}]'" if extra else f"pip install {dist}"
        super().__init__(f"{purpose} needs the package {dist}, which is not installed: {how}")
        self.module = module
        self.extra = extra


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = (exc.name or module).split(".")[0]
        if top != module.split(".")[0]:
            raise  # the package is there but one of its own imports failed: show it as it is
        raise MissingExtra(module, purpose) from None


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def hint(exc: BaseException) -> str | None:
    """The ``pip install 'hil[...]'`` line for an error caused by a missing optional package.

    Follows the exception's causes: a lab that cannot open an instrument with the ``@py`` VISA
    backend because ``pyvisa-py`` is missing says so in a wrapped message only.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = getattr(e, "name", None) if isinstance(e, ImportError) else None
        text = str(e)
        for module, (extra, dist) in EXTRAS.items():
            needles = (f"No package named {module}", f"No module named '{module}'",
                       *_MESSAGES.get(module, ()))
            if (name and name.split(".")[0] == module) or any(n in text for n in needles):
                return f"{dist} is not installed: pip install 'hil[{extra}]'"
        e = e.__cause__ or e.__context__
    return None
