import os

import pytest

from services.common.tiny_model import build_tiny_model
from services.coordinator.data import make_toy_dataset, toy_vocabulary
from tests.integration.cluster import ROOT, start_services


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """Toy data + a tiny Qwen3 (config only: random init from the seed) in a temp dir."""
    d = tmp_path_factory.mktemp("toy")
    data = make_toy_dataset(str(d / "toy.jsonl"), n=128, seed=0)
    model = build_tiny_model(str(d / "tiny-qwen3"), toy_vocabulary(), arch="qwen3", with_weights=False)
    return {"data": data, "model": model, "dir": str(d)}


def demo_overrides(toy, output_dir: str, **extra) -> list[str]:
    """The demo config pointed at the temp toy files, with extra overrides."""
    base = {"runtime_args.data_path": toy["data"], "models.policy.load": toy["model"],
            "runtime_args.output_dir": output_dir}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def demo_yaml():
    with open(os.path.join(ROOT, "configs", "demo_cpu.yaml")) as f:
        return f.read()


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """Coordinator + trainer + 2 rollout replicas as processes, shared by the integration tests."""
    d = tmp_path_factory.mktemp("cluster")
    # client paths may point into the repository's output/ (the README's demo) and the tests' temp dirs
    roots = [os.path.join(ROOT, "output"), str(tmp_path_factory.getbasetemp())]
    svc = start_services(str(d / "logs"), str(d / "state"), replicas=2, roots=roots)
    yield svc
    svc.cluster.stop_all()
