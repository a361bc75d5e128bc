"""Test-only hooks: Python imports this file at start-up when `tests/hooks` is on PYTHONPATH (the preemption
and Slurm tests put it there; nothing else does). They slow training down so that a test can send a real
signal from outside at a chosen point:

- `DPO_CORE_TEST_BATCH_SLEEP=S`: sleep S seconds after every backward (between micro-batches);
- `DPO_CORE_TEST_SAVE_SLEEP=S`: sleep S seconds after `Accelerator.save_state`, i.e. inside
  `save_checkpoint` while the checkpoint is still an incomplete `checkpoint-N.tmp` directory.
"""

import os
import time

_BATCH_SLEEP = float(os.environ.get("DPO_CORE_TEST_BATCH_SLEEP", "0"))
_SAVE_SLEEP = float(os.environ.get("DPO_CORE_TEST_SAVE_SLEEP", "0"))

if _BATCH_SLEEP or _SAVE_SLEEP:
    from accelerate import Accelerator

    def _slowed(method, seconds):
        def wrapper(*args, **kwargs):
            out = method(*args, **kwargs)
            time.sleep(seconds)
            return out
        return wrapper

    if _BATCH_SLEEP:
        Accelerator.backward = _slowed(Accelerator.backward, _BATCH_SLEEP)
    if _SAVE_SLEEP:
        Accelerator.save_state = _slowed(Accelerator.save_state, _SAVE_SLEEP)
