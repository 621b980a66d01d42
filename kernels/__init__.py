"""Pure array kernels of lensjax (installed as ``lensjax.kernels``); they import nothing of lensjax.

When the repository root is on ``sys.path`` (``python -m pytest`` or ``python -c`` run from it),
this directory is also importable as a top-level ``kernels``, the name of Hugging Face's
``kernels`` package, which ``transformers`` (5.25 on) depends on and imports. Imported under that
name, this module hands the import over to the installed package, so ``transformers`` keeps
working from the repository root; without one installed it stays this (empty) module.
"""

if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None:
        _mod = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _mod
        _spec.loader.exec_module(_mod)
