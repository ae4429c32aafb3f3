"""What the placement policy calls around each phase, through the real services on the CPU: a replica's
Sleep / WakeUp (the built-in engine releases its KV cache, and at level 2 its weights), the trainer's
Offload / Onload (GPU only: refused here, and how), and colocated placement's hooks calling them."""
import grpc
import pytest

from rlgrid.v1 import common_pb2 as pb
from rlgrid.v1 import rollout_pb2 as rpb
from services.common.config import config_to_yaml, load_config
from services.common.tensors import ids_to_wire
from services.common.weight_sync import Rendezvous
from services.coordinator.clients import RolloutPool, TrainerClient, decode_sample
from services.coordinator.placement import Colocated, ServiceActions
from services.coordinator.steps import logprob_agreement
from services.coordinator.sync import WeightSync
from tests.integration.cluster import TEST_WORKER_SECRET, expect_rpc_error
from tests.integration.conftest import demo_overrides

pytestmark = pytest.mark.slow
INVALID, FAILED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
REQUEST = rpb.GenerateRequest(prompts=[rpb.Prompt(group_id="m-0", prompt_ids=ids_to_wire([4, 5, 6]))], n=2,
                              sampling=pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=8, seed=5))


@pytest.fixture(scope="module")
def deployment(services, toy, demo_yaml, tmp_path_factory):
    """Trainer and replicas set up and synced by the coordinator's own WeightSync."""
    overrides = demo_overrides(toy, str(tmp_path_factory.mktemp("memory")), **{
        "runtime_args.rpc_timeout_s.weight_sync": 60})
    cfg = load_config(demo_yaml, overrides)
    limits = dict(max_message_mb=64, timeouts=cfg.runtime_args.rpc_timeout_s)
    trainer = TrainerClient(services.trainer.address, **limits, secret=TEST_WORKER_SECRET)
    pool = RolloutPool([r.address for r in services.rollouts], **limits, retries=0,
                       max_sequences=cfg.runtime_args.sample_per_episode,
                       secrets={r.address: TEST_WORKER_SECRET for r in services.rollouts})
    setup = pb.SetupRequest(run_id="memory", config_yaml=config_to_yaml(cfg))
    trainer.call("Setup", setup, "setup")
    pool.call_all("Setup", setup, "setup")
    sync = WeightSync(Rendezvous("127.0.0.1"), trainer, pool, bucket_mb=1)
    sync.sync(0)
    return demo_yaml, overrides, trainer, sync


def _generate(stub) -> list[tuple]:
    return [(s.response_ids.data, s.response_logprobs.data) for s in stub.Generate(REQUEST, timeout=60)]


def test_a_sleeping_replica_generates_again_only_after_it_wakes(deployment, services):
    rollout = services.rollout_stub(0)
    before = _generate(rollout)
    try:
        expect_rpc_error(lambda: rollout.Sleep(rpb.SleepRequest(level=3)), INVALID, "level must be 1", "or 2")
        for _ in range(2):   # idempotent
            report = rollout.Sleep(rpb.SleepRequest(level=1))
            assert report.device_total_gib == 0   # a CPU service: no accelerator memory to report
        info = rollout.GetInfo(pb.Empty())
        assert info.sleep_level == 1 and info.weights_valid
        expect_rpc_error(lambda: _generate(rollout), FAILED, "asleep (Sleep level 1): call WakeUp first")
    finally:
        rollout.WakeUp(rpb.WakeUpRequest())
    rollout.WakeUp(rpb.WakeUpRequest())
    assert rollout.GetInfo(pb.Empty()).sleep_level == 0
    assert _generate(rollout) == before   # the same weights, a fresh KV cache


def test_after_a_level_2_sleep_a_replica_generates_only_once_a_sync_committed(deployment, services):
    _, _, trainer, sync = deployment
    rollout = services.rollout_stub(1)
    version = rollout.GetInfo(pb.Empty()).policy_version
    try:
        rollout.Sleep(rpb.SleepRequest(level=2))
        expect_rpc_error(lambda: rollout.CommitWeights(pb.WeightSyncRequest(group_id=sync.group_id, version=version)),
                         FAILED, "WakeUp before CommitWeights")
        rollout.WakeUp(rpb.WakeUpRequest())
        assert not rollout.GetInfo(pb.Empty()).weights_valid
        expect_rpc_error(lambda: _generate(rollout), FAILED, "no weight sync has committed since")
    finally:
        rollout.WakeUp(rpb.WakeUpRequest())
        sync.sync(version)   # every replica serves the trainer's weights again
    info = rollout.GetInfo(pb.Empty())
    assert info.weights_valid and info.policy_version == version
    samples = [decode_sample(m) for m in rollout.Generate(REQUEST, timeout=60)]
    assert logprob_agreement(trainer, samples, k=2, threshold=1e-3, temperature=1.0,
                             trainer_version=version) < 1e-3


def test_the_trainer_offloads_only_when_the_run_lets_it_and_only_from_a_gpu(deployment, services):
    demo_yaml, overrides, _, _ = deployment
    trainer = services.trainer_stub()
    step = trainer.GetInfo(pb.Empty()).step
    expect_rpc_error(lambda: trainer.Offload(pb.Empty()), FAILED, "models.policy_trainer.offload=True")
    trainer.Onload(pb.Empty())   # nothing offloaded: nothing to do
    assert not trainer.GetInfo(pb.Empty()).offloaded
    cfg = load_config(demo_yaml, overrides + ["models.policy_trainer.offload=True"])
    expect_rpc_error(lambda: trainer.Setup(pb.SetupRequest(run_id="offload", config_yaml=config_to_yaml(cfg))),
                     INVALID, "models.policy_trainer.offload=True", "on cpu")
    info = trainer.GetInfo(pb.Empty())
    assert info.run_id == "memory" and info.step == step   # the refused Setup changed nothing


def test_colocated_placement_hands_the_replicas_memory_over_through_the_services(deployment, services):
    """The hooks loop.py wraps around a step, with ServiceActions on the real services: the replicas
    sleep (level 2) after generating, only their weights wake for the sync, the KV cache before the
    next batch, and that batch is what the same weights generated before the handover."""
    demo_yaml, overrides, trainer, sync = deployment
    cfg = load_config(demo_yaml, overrides)
    actions = ServiceActions(cfg, trainer, sync.rollouts)
    placement = Colocated(actions, "test")
    assert "models.policy_trainer.offload=False" in placement.describe()   # a CPU trainer keeps its state
    version = sync.rollouts.call_all("GetInfo", pb.Empty())[0].policy_version
    sampling = pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=8, seed=9)

    def batch() -> list:
        with placement.rollout():
            return [(s.response_ids, s.logprobs) for s in sync.rollouts.generate([[4, 5, 6]], sampling, 2, "colo")]

    first = batch()
    infos = sync.rollouts.call_all("GetInfo", pb.Empty())
    assert all(i.sleep_level == 2 and not i.weights_valid for i in infos), "asleep, weights dropped"
    with placement.train():
        assert not trainer.call("GetInfo", pb.Empty()).offloaded
    with placement.sync():
        sync.sync(version)
    infos = sync.rollouts.call_all("GetInfo", pb.Empty())
    assert all(i.weights_valid and i.policy_version == version and i.sleep_level == 2 for i in infos), \
        "weights synced into a replica whose KV cache still sleeps"
    assert batch() == first
    assert {"memory/rollout_peak_gib", "memory/rollout_device_used_gib"} <= set(placement.metrics())
    for stub in (services.rollout_stub(i) for i in range(len(services.rollouts))):
        stub.WakeUp(rpb.WakeUpRequest())
        assert stub.GetInfo(pb.Empty()).sleep_level == 0
