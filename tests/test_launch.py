"""Real launchers: two torchrun agents on 127.0.0.1 act as two nodes."""

import os
import subprocess
import sys
from pathlib import Path

from dist_utils import free_port

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "3", "--width", "32", "--context", "16", "--batch-size", "4", "--layers", "1",
        "--optimizers", "microadam", "--quiet"]


def test_two_torchrun_agents_as_two_nodes():
    port = str(free_port())
    env = {**os.environ, "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(["bash", str(ROOT / "launch/torchrun.sh"), *TINY],
                               env={**env, "NODE_RANK": str(node)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
              for node in (0, 1)]
    outputs = []
    try:
        for agent in agents:
            out, _ = agent.communicate(timeout=240)
            outputs.append(out)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for node, (agent, out) in enumerate(zip(agents, outputs)):
        assert agent.returncode == 0, f"node {node}:\n{out}"
    assert "(world size 2)" in outputs[0], outputs[0]
    assert "microadam" in outputs[0]
