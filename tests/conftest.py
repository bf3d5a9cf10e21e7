"""Test-wide settings: deterministic, few threads (the machine has 2 cores)."""
import os

# eager fake-quant kernels unless a test asks for the compiled ones (they are checked against eager in
# tests/quant/test_fake_quant.py): compiling costs ~10 s a process
os.environ.setdefault("VVTQ_FUSED", "0")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("VVTQ_TEST_THREADS", "1")))
