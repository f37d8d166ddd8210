"""The public API is curated: every module lists its public names in ``__all__``, every listed
name exists and has a docstring, and nothing public is left out."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import shoal

MODULES = sorted(m.name for m in pkgutil.walk_packages(shoal.__path__, "shoal."))


def test_top_level_all_names_exist():
    for name in shoal.__all__:
        assert hasattr(shoal, name), name


@pytest.mark.parametrize("module_name", MODULES)
def test_module_all_is_complete_and_documented(module_name):
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no module docstring"
    listed = getattr(module, "__all__", None)
    assert listed is not None, f"{module_name} has no __all__"
    for name in listed:
        obj = getattr(module, name)  # raises if listed but missing
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{module_name}.{name} has no docstring"
    # Public functions and classes defined here must be listed (or be private: _name).
    defined = [n for n, o in vars(module).items()
               if (inspect.isclass(o) or inspect.isfunction(o))
               and getattr(o, "__module__", None) == module_name and not n.startswith("_")]
    missing = sorted(set(defined) - set(listed))
    assert not missing, f"{module_name} defines public names not in __all__: {missing}"


@pytest.mark.parametrize("module_name", MODULES)
def test_public_methods_have_docstrings(module_name):
    module = importlib.import_module(module_name)
    for name in getattr(module, "__all__", []):
        cls = getattr(module, name)
        if not inspect.isclass(cls) or cls.__module__ != module_name:
            continue
        for attr, member in vars(cls).items():
            if attr.startswith("_") or not inspect.isfunction(member):
                continue
            assert inspect.getdoc(member), f"{module_name}.{name}.{attr} has no docstring"
