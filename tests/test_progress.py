"""Progress display: a line every N steps, with the values of that step, when stderr is not a terminal."""
from __future__ import annotations

import io

from vvtq.progress import LineProgress, progress, progress_bar


def test_lines_every_n_steps_with_that_step_s_values_and_one_at_the_end():
    out = io.StringIO()
    bar = LineProgress(7, "epoch 1/1", every=3, stream=out)
    for step in range(7):
        bar.update(1)
        bar.set_postfix(loss=f"{step:.1f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert [ln.split("  (")[0] for ln in lines] == [
        "epoch 1/1 [3/7]  loss 2.0", "epoch 1/1 [6/7]  loss 5.0", "epoch 1/1 [7/7]  loss 6.0"]
    assert "\r" not in out.getvalue()


def test_not_a_terminal_gets_lines_not_a_bar(capsys):
    assert isinstance(progress_bar(True, 10, "x"), LineProgress)  # pytest's stderr is not a terminal
    assert progress_bar(False, 10, "x") is None
    assert list(progress(range(5), True, 5, "items", every=2)) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err.count("items [") == 3  # 2, 4 and the last
