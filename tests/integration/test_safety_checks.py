"""The loop's safety checks, each made to fire against real services: the agreement check (a replica
serving other weights than the trainer's), the version check (a replica serving an old version), and
the weight sync's abort (every replica keeps serving its old version)."""
import os
import signal
import time

import grpc
import pytest

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import coordinator_pb2 as cpb
from rlgrid.v1 import rollout_pb2 as rpb
from services.common import batches
from services.common.batches import TrainSequence
from services.common.config import config_to_yaml, load_config
from services.common.tensors import ids_to_wire
from services.common.weight_sync import Rendezvous
from services.coordinator.clients import RolloutPool, StepError, TrainerClient
from services.coordinator.sync import WeightSync
from tests.integration.cluster import TEST_WORKER_SECRET
from tests.integration.conftest import demo_overrides

pytestmark = pytest.mark.slow


def start_and_pause(services, demo_yaml, overrides) -> tuple[str, int]:
    """Starts a long run and pauses it between steps (after a weight sync); returns (run id, step)."""
    coord = services.coord()
    run = coord.StartRun(cpb.StartRunRequest(config_yaml=demo_yaml, overrides=overrides))
    for e in coord.WatchRun(cpb.WatchRunRequest(run_id=run.run_id), timeout=300):
        assert e.state not in (cpb.FAILED, cpb.STOPPED), e.message
        if e.metrics:
            break
    coord.PauseRun(cpb.RunRef(run_id=run.run_id))
    deadline = time.time() + 120
    while (info := coord.GetRun(cpb.RunRef(run_id=run.run_id))).state != cpb.PAUSED:
        assert time.time() < deadline and info.state == cpb.RUNNING, info
        time.sleep(0.1)
    return run.run_id, info.step


def resume_to_end(services, run_id: str) -> tuple[cpb.RunInfo, list[cpb.RunEvent]]:
    services.coord().ResumeRun(cpb.RunRef(run_id=run_id))
    return services.run_to_end(run_id)


def test_a_replica_serving_other_weights_fails_the_step(services, toy, demo_yaml, tmp_path):
    """While the run is paused the trainer takes one more optimizer step that no sync brings to the
    replicas: the next step's agreement check finds them serving other weights."""
    overrides = demo_overrides(toy, str(tmp_path), **{"runtime_args.num_episode": 50})
    run_id, _ = start_and_pause(services, demo_yaml, overrides)
    trainer = services.trainer_stub()
    step = trainer.GetInfo(pb.Empty()).step
    seqs = [TrainSequence([4, 5], [6, 7, 8], [-2.0] * 3, 1.0 - 2 * (i % 2), step) for i in range(8)]
    trainer.Train(iter([batches.to_proto(batches.make_micro_batch(seqs, num_global_tokens=24, temperature=1.0))]),
                  timeout=60)
    info, events = resume_to_end(services, run_id)
    assert info.state == cpb.FAILED
    assert "logprob agreement check failed" in info.error and "runtime_args.logprob_diff_threshold" in info.error
    diff = info.last_metrics["agreement/max_abs_diff"]
    assert diff > 0.001, diff   # demo threshold
    assert events[-1].state == cpb.FAILED and events[-1].metrics["agreement/max_abs_diff"] == diff


def test_a_sample_of_an_old_version_is_refused(services, toy, demo_yaml, tmp_path):
    """A replica restarts between steps with its initial weights (version 0) on the same address: its
    samples carry an old version, and the step refuses them, naming it."""
    overrides = demo_overrides(toy, str(tmp_path), **{"runtime_args.num_episode": 50})
    cfg = load_config(demo_yaml, overrides)
    config = tmp_path / "rollout.yaml"
    config.write_text(config_to_yaml(cfg))
    run_id, step = start_and_pause(services, demo_yaml, overrides)
    old = services.rollouts[1]
    port = old.address.rsplit(":", 1)[1]
    services.cluster.stop(old)
    restarted = services.cluster.start(old.name, "services.rollout", "--coordinator", services.coordinator.address,
                                       "--device", "cpu", "--config", str(config), port=int(port))
    services.rollouts[1] = restarted
    services.cluster.wait_healthy(restarted)
    assert services.rollout_stub(1).GetInfo(pb.Empty()).policy_version == 0
    info, events = resume_to_end(services, run_id)
    assert info.state == cpb.FAILED
    assert "samples carry another policy version" in info.error and "refused" in info.error, info.error
    assert f"{restarted.address} (version 0)" in info.error
    assert info.last_metrics["rollout/stale_samples"] > 0
    assert info.step == step, "the step with stale samples is not recorded"
    services.wait_workers()


def _generate(stub) -> list[tuple[list[int], list[float]]]:
    """A fixed-seed generation: the same weights give the same tokens and logprobs."""
    request = rpb.GenerateRequest(prompts=[rpb.Prompt(group_id="g-0", prompt_ids=ids_to_wire([4, 5]))], n=4,
                                  sampling=pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=8,
                                                             seed=7))
    return [(list(s.response_ids.data), list(s.response_logprobs.data)) for s in stub.Generate(request, timeout=30)]


def test_an_aborted_sync_leaves_every_replica_serving_its_old_version(services, toy, demo_yaml, tmp_path):
    """The coordinator's own WeightSync against the real trainer and replicas: the trainer freezes
    (SIGSTOP) before sending version 2; the sync fails within its deadline and is aborted; every replica
    still serves version 1, generating exactly as before. Once the trainer is back, a sync succeeds."""
    cfg = load_config(demo_yaml, demo_overrides(toy, str(tmp_path), **{
        "runtime_args.rpc_timeout_s.weight_sync": 5, "runtime_args.rpc_timeout_s.control": 2}))
    limits = dict(max_message_mb=64, timeouts=cfg.runtime_args.rpc_timeout_s)
    trainer = TrainerClient(services.trainer.address, **limits, secret=TEST_WORKER_SECRET)
    pool = RolloutPool([r.address for r in services.rollouts], **limits, retries=0,
                       max_sequences=cfg.runtime_args.sample_per_episode,
                       secrets={r.address: TEST_WORKER_SECRET for r in services.rollouts})
    setup = pb.SetupRequest(run_id="abort", config_yaml=config_to_yaml(cfg))
    trainer.call("Setup", setup, "setup")
    pool.call_all("Setup", setup, "setup")
    sync = WeightSync(Rendezvous("127.0.0.1"), trainer, pool, bucket_mb=1)
    sync.sync(1)
    before = [_generate(r.stub) for r in pool.replicas]
    seqs = [TrainSequence([4, 5], [6, 7, 8], [-2.0] * 3, 1.0 - 2 * (i % 2), 0) for i in range(8)]
    trainer.train([batches.make_micro_batch(seqs, num_global_tokens=24, temperature=1.0)])   # new weights to send

    os.killpg(services.trainer.popen.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(StepError) as failure:
            sync.sync(2)
        elapsed = time.monotonic() - start
    finally:
        os.killpg(services.trainer.popen.pid, signal.SIGCONT)
    assert "weight sync to version 2 failed; replicas keep their old version" in str(failure.value)
    assert f"trainer {services.trainer.address} did not answer SendWeights" in str(failure.value)
    assert elapsed < 5 + 2 + 30, elapsed
    for r, generated in zip(pool.replicas, before):
        assert r.call("GetInfo", pb.Empty()).policy_version == 1
        assert _generate(r.stub) == generated, "an aborted sync must leave the old weights serving"

    deadline = time.monotonic() + 60
    while True:   # the trainer finishes the call it was frozen in, then the group is rebuilt
        try:
            sync.sync(2)
            break
        except (StepError, grpc.RpcError):
            assert time.monotonic() < deadline
            time.sleep(1)
    for r, generated in zip(pool.replicas, before):
        assert r.call("GetInfo", pb.Empty()).policy_version == 2
        assert _generate(r.stub) != generated
    services.wait_workers()
