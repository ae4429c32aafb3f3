"""services.common.memory: storages freed and brought back in place (what Sleep and Offload rely on)."""
import pytest
import torch

from services.common.memory import StorageSwap, memory_report, owned

CPU = torch.device("cpu")


def test_storage_swap_frees_in_place_and_refills_every_view():
    a = torch.arange(10, dtype=torch.float32)
    view = a[2:5]                      # shares a's storage: counted once
    c = torch.full((3,), 1.5, dtype=torch.bfloat16)
    swap = StorageSwap([a, view, c, torch.zeros(0)], CPU)
    assert len(swap.storages) == 2 and swap.total_bytes == 40 + 6
    swap.release()
    swap.release()   # idempotent
    assert a.untyped_storage().nbytes() == 0 == c.untyped_storage().nbytes() and swap.released
    host = swap._host
    assert swap.restore() and not swap.released
    assert torch.equal(a, torch.arange(10, dtype=torch.float32)) and torch.equal(view, torch.tensor([2.0, 3.0, 4.0]))
    assert torch.equal(c, torch.full((3,), 1.5, dtype=torch.bfloat16))
    assert swap.covers([a, c]) and not swap.covers([a]) and not swap.covers([a, c, torch.ones(2)])
    a.add_(1)
    swap.release()
    assert swap._host is host   # the host buffers of the last release, reused
    swap.restore()
    assert torch.equal(a, torch.arange(1, 11, dtype=torch.float32))
    swap.release(keep=False)   # the content is dropped, and so are the host buffers
    assert swap._host is None and not swap.restore()
    assert a.shape == (10,) and a.untyped_storage().nbytes() == 40   # allocated again, content undefined


def test_a_deeper_release_drops_what_an_earlier_one_kept():
    a = torch.ones(4)
    swap = StorageSwap([a], CPU)
    swap.release(keep=True)
    swap.release(keep=False)
    assert swap._host is None and not swap.restore()


def test_memory_mapped_tensors_are_made_owned_before_a_release():
    p = torch.nn.Parameter(torch.frombuffer(bytearray(16), dtype=torch.float32))
    other = torch.ones(3)
    with pytest.raises(RuntimeError, match="not resizable"):
        StorageSwap([other, p], CPU).release()
    assert other.untyped_storage().nbytes() == 12   # refused before anything was freed
    owned([p])
    swap = StorageSwap([p], CPU)
    swap.release()
    assert p.untyped_storage().nbytes() == 0 and swap.restore() and torch.equal(p, torch.zeros(4))


def test_memory_report_is_zeros_off_a_gpu():
    assert set(memory_report(CPU).values()) == {0.0}
