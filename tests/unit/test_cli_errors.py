"""Commands users type print a config or input error as its message alone and exit non-zero."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("args,needle", [
    (["services.coordinator.demo", "models.policy_trainer.max_token_in_packin=10"],
     "did you mean 'models.policy_trainer.max_token_in_packing'"),
    (["services.coordinator.demo", "--real", "runtime_args.eval_episode_interval=-1"],
     "runtime_args.eval_episode_interval=-1 is invalid"),
    (["services.common.import_gguf", "/tmp/never-written", "--gguf", "/nonexistent/model.gguf"], "is not a file"),
    (["services.coordinator.arithmetic", "/tmp/never-written", "--max-number", "2"], "--max-number must be >= 3"),
], ids=["demo", "demo-real", "import_gguf", "arithmetic"])
def test_input_error_is_its_message_alone(args, needle):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "protos")])}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and needle in proc.stderr
    assert proc.stderr.startswith("error: ")
    assert not os.path.exists("/tmp/never-written")   # nothing was written
