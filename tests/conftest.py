"""Test-wide settings.

The suite runs under pytest-xdist with one worker per core (`-n 2` on CI's 2 cores). Torch's default of one thread
per core would then put 4 busy threads on 2 cores, and its spinning OpenMP threads slow tiny ops down up to 8x, so
every worker uses a single thread. Subprocesses started by tests inherit OMP_NUM_THREADS.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
