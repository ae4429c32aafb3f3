"""python -m services.trainer.convert hf-to-mcore|mcore-to-hf SRC DST

Prints one JSON line: tensors, model bytes, seconds and the process's peak resident memory, also
as a multiple of the model's size."""
from __future__ import annotations

import argparse
import json
import resource
import time

from services.trainer.convert.engine import hf_to_mcore, mcore_to_hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf"])
    parser.add_argument("src", help="source directory")
    parser.add_argument("dst", help="destination directory (created)")
    args = parser.parse_args()
    start = time.perf_counter()
    stats = (hf_to_mcore if args.direction == "hf-to-mcore" else mcore_to_hf)(args.src, args.dst)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB
    stats.update(direction=args.direction, seconds=round(time.perf_counter() - start, 3), peak_rss_bytes=peak,
                 peak_rss_x_model=round(peak / max(1, stats["bytes"]), 3))
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
