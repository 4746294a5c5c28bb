"""Triton kernels of the CGC ops, imported as ``cgc.kernels`` (see :mod:`cgc.ops.triton`).

From a source checkout, the repository's root is on ``sys.path`` (``python -m`` and pytest
run there), which makes this folder importable as the top-level ``kernels`` too, shadowing
Hugging Face's ``kernels`` package that ``transformers`` imports. Imported under that name, it
hands the name to the installed package (when there is one) instead of being itself.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _installed  # what `import kernels` returns once this file has run
        _spec.loader.exec_module(_installed)
