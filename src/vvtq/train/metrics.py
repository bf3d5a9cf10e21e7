"""What a run reports: metrics as JSONL (rank 0 writes them); its progress display is ``vvtq.progress``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Metrics as JSONL (one record per logged step and per epoch), written by rank 0."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():  # drop what a killed run logged past its ckpt
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(k + "\n" for k in keep))
        elif enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
