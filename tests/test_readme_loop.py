"""The README's "Your own training loop" runs as written (with tiny settings), so the example cannot rot."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SETTINGS = re.compile(r"^EPOCHS, TRAIN_IMAGES, TEST_IMAGES, OUT = .*$", re.MULTILINE)


def readme_loop() -> str:
    """The first ``python`` block of the README section "Your own training loop"."""
    text = README.read_text()
    section = text.split("\n## Your own training loop\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_loop_runs(tmp_path, capsys):
    from vvtq.data import DatasetError, build_dataset

    try:
        build_dataset("fashion_mnist", "test")
    except (DatasetError, OSError) as exc:
        pytest.skip(f"Fashion-MNIST is not installed here ({exc})")
    code = readme_loop()
    assert len(SETTINGS.findall(code)) == 1, "the README loop's settings line changed: update this test"
    code = SETTINGS.sub(f"EPOCHS, TRAIN_IMAGES, TEST_IMAGES, OUT = 2, 64, 100, Path({str(tmp_path)!r})", code)
    torch.manual_seed(0)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_loop"})
    out = capsys.readouterr().out
    assert "epoch 2:" in out and "top-1, integer domain:" in out and "packed:" in out

    import vvtq
    from vvtq.export.runtime import build_runtime

    student, meta = vvtq.load_model(tmp_path / "w2a2.safetensors")
    assert meta["quant"]["wbits"] == 2 and meta["step"] == 2 and meta["img_size"] == 28
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(student(x), build_runtime(tmp_path / "w2a2.vvtq.safetensors")(x))
