"""Import sd_zoo right after timm, so ``timm.create_model('sd_resnet152')`` works without ``import sd_zoo``.

timm has no plugin discovery: models exist only once their module is imported. The wheel ships
``sd_zoo-autoload.pth`` into site-packages; at interpreter start it loads this file by path (without importing
the sd_zoo package, which would pull in torch) and calls :func:`install`. That puts a one-shot finder at the
front of ``sys.meta_path`` which does nothing until ``timm`` is imported, then lets timm finish importing and
imports sd_zoo. A process that never imports timm pays one string comparison per import.

Set ``SD_ZOO_NO_AUTOIMPORT=1`` to turn it off. Nothing here may break interpreter start or ``import timm``:
every failure is caught and reported as a warning.
"""
import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

ENV_DISABLE = 'SD_ZOO_NO_AUTOIMPORT'
TRIGGER = 'timm'
TARGET = 'sd_zoo'


def disabled() -> bool:
    return os.environ.get(ENV_DISABLE, '').strip().lower() not in ('', '0', 'false', 'no')


class _ImportAfterLoader(importlib.abc.Loader):
    """Runs the real loader of timm, then imports sd_zoo; timm's module keeps its real loader."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            importlib.import_module(TARGET)
        except Exception as e:  # a broken sd_zoo must never break timm
            warnings.warn(f'sd_zoo auto-import after timm failed ({type(e).__name__}: {e}); '
                          f'import sd_zoo explicitly, or set {ENV_DISABLE}=1 to silence this', RuntimeWarning)


class AutoImportFinder(importlib.abc.MetaPathFinder):
    """One-shot: when timm is about to be imported, wrap its loader and leave ``sys.meta_path``."""
    sd_zoo_autoload = True  # recognised by attribute: the .pth may run once per path alias of site-packages

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TRIGGER:
            return None
        uninstall()
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders, as the import system would ask them
            if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'):
                return None
            spec.loader = _ImportAfterLoader(spec.loader)
            return spec
        except Exception:
            return None  # let the normal machinery import timm as if we were not here


def install() -> None:
    """Put the finder on ``sys.meta_path`` (no-op if disabled, installed already, or timm is imported)."""
    if disabled() or any(_is_ours(f) for f in sys.meta_path):
        return
    if TRIGGER in sys.modules:
        try:
            importlib.import_module(TARGET)
        except Exception:
            pass
        return
    sys.meta_path.insert(0, AutoImportFinder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not _is_ours(f)]


def _is_ours(finder) -> bool:
    return getattr(finder, 'sd_zoo_autoload', False) is True
