"""Fresh copies of Triton and of kernel modules built for Triton's CPU interpreter.

TRITON_INTERPRET is read when @triton.jit runs, triton.language's own helpers included, and
Triton is often imported already (transformers imports it). So Triton's Python modules (not its
C extension, which cannot be imported twice) and the kernel modules are set aside, imported
again with TRITON_INTERPRET=1, and the originals put back afterwards: nothing outside the
`with` block sees the interpreted copies, and the real modules keep their compiled kernels.
With numpy >= 2.4 the Triton 3.6 interpreter fails on loops with run-time bounds (int() of a
1-element array, triton-lang/triton#9171); the shim applies that issue's fix to the copy.
"""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

import pytest


def _isolated(names: tuple[str, ...]) -> list[str]:
    return [
        name for name in sys.modules
        if name in names or name == "triton"
        or (name.startswith("triton.") and not name.startswith("triton._C"))
    ]


@contextmanager
def interpreted(*names: str) -> Iterator[list[ModuleType]]:
    """The modules `names` (all under one package) imported anew for the interpreter."""
    package = sys.modules[names[0].rsplit(".", 1)[0]]
    saved = {name: sys.modules.pop(name) for name in _isolated(names)}
    saved_attrs = {name: package.__dict__.pop(name.rsplit(".", 1)[1], None) for name in names}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "1")
            interp = importlib.import_module("triton.runtime.interpreter")
            original_patch = interp._patch_lang_tensor

            def patch_lang_tensor(tensor, scope):
                original_patch(tensor, scope)
                scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

            interp._patch_lang_tensor = patch_lang_tensor
            yield [importlib.import_module(name) for name in names]
    finally:
        for name in _isolated(names):
            del sys.modules[name]
        sys.modules.update(saved)
        for name, value in saved_attrs.items():
            attr = name.rsplit(".", 1)[1]
            package.__dict__.pop(attr, None)
            if value is not None:
                setattr(package, attr, value)
