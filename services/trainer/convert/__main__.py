"""python -m services.trainer.convert hf-to-mcore|mcore-to-hf SRC DST

Prints one JSON line: tensors, model bytes, seconds, the process's resident memory before converting
and at its peak (also as multiples of the model's size), and whether CUDA was touched (it is not:
conversion runs on the host)."""
from __future__ import annotations

import argparse
import ctypes
import json
import resource
import threading
import time

import torch

from services.trainer.convert.engine import hf_to_mcore, mcore_to_hf


def _status(field: str = "VmRSS") -> int:
    """This process's resident memory now (bytes), from /proc: VmRSS in all, RssAnon (heap and tensors),
    RssFile (file pages mapped, e.g. safetensors read through mmap: page cache the kernel can drop)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib * 1024


class _PeakAnon(threading.Thread):
    """Samples RssAnon every 20 ms: the peak of memory the process itself holds (ru_maxrss also counts
    mapped file pages)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = _status("RssAnon"), threading.Event()

    def run(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, _status("RssAnon"))


def _keep_tensors_in_their_own_mappings() -> None:
    """glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB on 64-bit), so
    after the first tensors are freed, tensors of that size come from the heap, whose freed space the
    process keeps: a conversion that holds one tensor at a time would still grow by a good part of the
    model. A fixed threshold (M_MMAP_THRESHOLD) keeps each tensor in a mapping of its own, returned
    when freed. Elsewhere than glibc this does nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    except (OSError, AttributeError):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf"])
    parser.add_argument("src", help="source directory")
    parser.add_argument("dst", help="destination directory (created)")
    args = parser.parse_args()
    _keep_tensors_in_their_own_mappings()
    before, anon_before = _status(), _status("RssAnon")
    sampler = _PeakAnon()
    sampler.start()
    start = time.perf_counter()
    stats = (hf_to_mcore if args.direction == "hf-to-mcore" else mcore_to_hf)(args.src, args.dst)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB
    size = max(1, stats["bytes"])
    stats.update(direction=args.direction, seconds=round(seconds, 3), start_rss_bytes=before,
                 peak_rss_bytes=peak, peak_rss_x_model=round(peak / size, 3),
                 peak_extra_rss_x_model=round((peak - before) / size, 3),
                 peak_extra_anon_x_model=round((sampler.peak - anon_before) / size, 3),
                 cuda_initialized=torch.cuda.is_initialized())
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
