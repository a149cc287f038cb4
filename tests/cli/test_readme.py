"""The README's usage commands, run exactly as written (from the repository root)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _usage_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    usage = text.split("## Usage", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", usage, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_usage_commands(tmp_path):
    commands = _usage_commands()
    assert len(commands) == 3 and "tpquant.build" in commands[0]
    env = {**os.environ, "TPQUANT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    outputs = []
    for command in commands:
        result = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)
    assert "Paris" in outputs[1]  # the chat question about France's capital
    assert len(outputs[2].split()) >= 3  # the default run printed a generation
    assert (tmp_path / "cache").is_dir()
