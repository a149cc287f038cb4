"""Loading never executes code from a file: the source tree is scanned (ast) for the ways it could.

Refused anywhere in the repository's Python files:
- importing pickle or a module built on it (pickle, _pickle, cPickle, cloudpickle, dill, shelve,
  joblib, marshal);
- torch.load (or torch.serialization.load) without weights_only=True, torch.jit.load;
- numpy.load with allow_pickle other than False; pandas.read_pickle; yaml.load (unsafe loader);
- mpi4py's lowercase object methods (comm.bcast, comm.allgather, ...), which pickle on the wire
  (the uppercase buffer methods and JSON are what tpquant uses);
- trust_remote_code=True (runs a checkpoint's Python), and the builtins eval / exec.

Names are resolved through each file's imports (`import numpy as np`, `from torch import load`).
The scanner itself is checked on small snippets, each of which must be caught (or let pass).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__"}

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "joblib",
                  "marshal"}
MPI_OBJECT_METHODS = {"bcast", "allgather", "gather", "scatter", "alltoall", "allreduce", "reduce",
                      "send", "recv", "sendrecv", "isend", "irecv", "ibcast", "scan", "exscan"}


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def find_unsafe_loading(source: str, filename: str = "<string>") -> list[str]:
    """Every way `source` could unpickle or run code from a file, as 'file:line: what'."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    found: list[str] = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]  # `import a.b` binds a; `import a.b as c` binds a.b
                aliases[a.asname or top] = a.name if a.asname else top
                if a.name.split(".")[0] in PICKLE_MODULES:
                    flag(node, f"imports {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                flag(node, f"imports from {node.module}")
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if _is_const(_kw(node, "trust_remote_code"), True):
            flag(node, "trust_remote_code=True")
        dotted = _dotted(node.func)
        if dotted is None:
            continue
        head, _, rest = dotted.partition(".")
        name = aliases.get(head, head) + (f".{rest}" if rest else "")
        if name in ("eval", "exec"):
            flag(node, f"calls {name}")
        elif name in ("torch.load", "torch.serialization.load"):
            if not _is_const(_kw(node, "weights_only"), True):
                flag(node, f"{name} without weights_only=True")
        elif name == "torch.jit.load":
            flag(node, "torch.jit.load")
        elif name == "numpy.load":
            allow = _kw(node, "allow_pickle")
            if allow is not None and not _is_const(allow, False):
                flag(node, "numpy.load with allow_pickle")
        elif name in ("pandas.read_pickle", "yaml.load", "yaml.unsafe_load"):
            flag(node, name)
        elif isinstance(node.func, ast.Attribute) and node.func.attr in MPI_OBJECT_METHODS:
            receiver = _dotted(node.func.value) or ""
            if "comm" in receiver.lower() or receiver.startswith("MPI"):
                flag(node, f"{dotted}: mpi4py's lowercase methods pickle")
    return found


def _python_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).parts
        if not any(part in SKIP_DIRS or part.startswith(".") for part in rel[:-1]):
            files.append(path)
    return sorted(files)


def test_the_tree_never_unpickles_or_runs_code_from_files():
    files = _python_files()
    assert len(files) > 20 and ROOT / "tpquant" / "engine" / "format.py" in files  # really scanned
    found = [hit for f in files for hit in
             find_unsafe_loading(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert not found, "unsafe loading:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "import pickle",
    "import pickle as p",
    "from pickle import loads",
    "import dill.settings",
    "import torch\nx = torch.load('f.pt')",
    "import torch\nx = torch.load('f.pt', weights_only=False)",
    "import torch as T\nx = T.load('f.pt', weights_only=flag)",
    "from torch import load\nx = load('f.pt')",
    "import torch\nm = torch.jit.load('m.pt')",
    "import numpy as np\na = np.load('a.npy', allow_pickle=True)",
    "from numpy import load as L\na = L('a.npy', allow_pickle=ok)",
    "import pandas as pd\nd = pd.read_pickle('x')",
    "from mpi4py import MPI\nx = MPI.COMM_WORLD.bcast(obj, root=0)",
    "y = self.mpi_comm.allgather(obj)",
    "t = AutoTokenizer.from_pretrained(p, trust_remote_code=True)",
    "eval(text)",
    "exec(code)",
])
def test_the_scanner_catches(snippet):
    assert find_unsafe_loading(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import torch\nx = torch.load('f.pt', weights_only=True)",
    "import numpy as np\na = np.load('a.npy')\nb = np.load('b.npy', allow_pickle=False)",
    "from mpi4py import MPI\nMPI.COMM_WORLD.Bcast(buf, root=0)",
    "from functools import reduce\nreduce(f, xs)",
    "self._nccl.bcast(ptr, n, dtype, root, stream)",
    "model.eval()",
    "json.loads(text)",
])
def test_the_scanner_lets_safe_code_pass(snippet):
    assert find_unsafe_loading(snippet) == [], snippet
