"""Test-wide settings: deterministic, few threads (the machine has 2 cores)."""
import os

import torch

torch.set_num_threads(int(os.environ.get("VVTQ_TEST_THREADS", "1")))
