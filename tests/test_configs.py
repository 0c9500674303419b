"""Every example config parses, and opens with the command that runs it."""

from pathlib import Path

import pytest

from qlorakit.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid_and_says_how_to_run_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith((f"# qlorakit train configs/{path.name}", f"# qlorakit plan configs/{path.name}")), first
    load_config(path)


def test_there_are_example_configs():
    assert CONFIGS
