"""The coordinator's client side: a packed micro-batch over the gRPC limit is refused before sending."""
import pytest

from services.common.batches import TrainSequence, make_micro_batch
from services.common.config import RpcTimeouts
from services.coordinator.clients import StepError, TrainerClient


def _batch(tokens: int):
    seq = TrainSequence([3] * (tokens // 2), [4] * (tokens - tokens // 2), [-1.0] * (tokens - tokens // 2), 1.0, 0)
    return make_micro_batch([seq], num_global_tokens=tokens, temperature=1.0)


def test_oversized_micro_batch_is_refused_naming_the_keys():
    client = TrainerClient("localhost:1", max_message_mb=1, timeouts=RpcTimeouts())   # a lazy channel: nothing sent
    assert client._encode(_batch(1000)).ByteSize() < 1 << 20
    with pytest.raises(StepError) as info:
        client._encode(_batch(200_000))   # ~3.4 MB of ids, masks, logprobs and advantages
    message = str(info.value)
    assert "gRPC message limit of 1 MiB" in message and "--max-message-mb" in message and "localhost:1" in message
    assert "models.policy_trainer.max_token_in_packing" in message and "200000 tokens" in message


def test_nothing_is_sent_when_one_micro_batch_is_too_big():
    client = TrainerClient("localhost:1", max_message_mb=1, timeouts=RpcTimeouts())
    sent = []
    client.stub = type("Stub", (), {"Train": lambda self, it, timeout: sent.extend(it)})()
    with pytest.raises(StepError):
        client.train([_batch(100), _batch(200_000)])
    assert sent == []
