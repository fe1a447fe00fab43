"""Locating files inside installed packages without importing them."""

from __future__ import annotations

import sys

import pytest

from pregate.packages import PackageMissing, package_dir, package_file, site_packages


def test_package_dir_finds_an_installed_package_without_importing_it():
    imported = "gensim" in sys.modules
    path = package_dir("gensim")
    assert (path / "__init__.py").is_file() and ("gensim" in sys.modules) == imported
    assert site_packages().is_dir()


def test_missing_package_or_file_says_what_to_install():
    with pytest.raises(PackageMissing, match="pip install --no-deps absent-pkg==1.0"):
        package_dir("absent_pkg_xyz", "absent-pkg==1.0")
    with pytest.raises(PackageMissing, match="make setup"):
        package_dir("absent_pkg_xyz")
    with pytest.raises(PackageMissing, match="reinstall gensim-pin"):
        package_file("gensim", "no/such/file.txt", "gensim-pin")
