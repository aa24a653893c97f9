"""``cfedit`` as a torchrun worker, with two test hooks (used by tests/test_distributed.py):

    CFEDIT_TEST_RECORD=DIR      each rank appends the data-set indices of every batch it trains on to
                                DIR/rank<RANK>.jsonl (one JSON list per batch)
    CFEDIT_TEST_FAIL=RANK:N     rank RANK raises a DataError at its N-th batch (counted over all stages)
    CFEDIT_TEST_HANG=RANK:N     rank RANK stops answering (sleeps) at its N-th batch

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/editor/dist_worker.py fit --graph ...
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import cfedit.image.train as train
from cfedit.errors import DataError

RANK = int(os.environ.get("RANK", "0"))
_batches = train._batches
_count = 0


def _recorded(dataset, idx, batch_size, device):
    global _count
    record = os.environ.get("CFEDIT_TEST_RECORD")
    fail = os.environ.get("CFEDIT_TEST_FAIL")
    hang = os.environ.get("CFEDIT_TEST_HANG")
    for i, batch in zip(range(0, len(idx), batch_size), _batches(dataset, idx, batch_size, device)):
        _count += 1
        if fail and tuple(map(int, fail.split(":"))) == (RANK, _count):
            raise DataError(f"injected failure on rank {RANK} at batch {_count}")
        if hang and tuple(map(int, hang.split(":"))) == (RANK, _count):
            time.sleep(3600)
        if record:
            with open(Path(record) / f"rank{RANK}.jsonl", "a") as f:
                f.write(json.dumps([int(j) for j in idx[i:i + batch_size]]) + "\n")
        yield batch


train._batches = _recorded

if __name__ == "__main__":
    from cfedit.cli import main

    sys.argv = ["cfedit", *sys.argv[1:]]
    main()
