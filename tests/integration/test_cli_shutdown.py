"""A command that succeeds tears torch.distributed down before the process exits (gloo's worker
threads freed at interpreter shutdown abort a finished rank now and then); a failed one leaves
the groups alone (another rank may still be inside a collective)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import sys, torch
from posttrain.cli import main
from posttrain.runtime import distributed

def summed():
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    return float(t)

distributed.init_distributed()
assert summed() == 1.0
assert main(["eval", sys.argv[1] + "/missing"]) == 2  # fails: the group stays
print("after failure", torch.distributed.is_initialized())
assert main(["make-tiny", sys.argv[1] + "/tiny"]) == 0
print("after success", torch.distributed.is_initialized())
distributed.init_distributed()  # a later run in the same process starts a new group
print("again", summed())
"""


def test_successful_command_destroys_the_process_group(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "after failure True" in lines
    assert "after success False" in lines
    assert "again 1.0" in lines
