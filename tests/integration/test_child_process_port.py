"""A CLI run started from a process that already holds a group must not reuse its port."""

from __future__ import annotations

import subprocess
import sys

PARENT = """
import os, subprocess, sys
from posttrain.runtime import distributed
distributed.init_distributed()
port = os.environ["MASTER_PORT"]
distributed.setup_environment()
assert os.environ["MASTER_PORT"] == port, "same process keeps its port"
child = (
    "import os; from posttrain.runtime import distributed; distributed.init_distributed();"
    "print(os.environ['MASTER_PORT'])"
)
out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
assert out.returncode == 0, out.stderr[-2000:]
print(port, out.stdout.split()[-1])
"""


def test_child_process_picks_its_own_master_port():
    proc = subprocess.run(
        [sys.executable, "-c", PARENT], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    parent_port, child_port = proc.stdout.split()[-2:]
    assert parent_port != child_port
