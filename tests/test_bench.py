"""The data-path benchmark runs on the current code (it reads the typed configs the pipeline
uses) and reports a positive rate for every path; the rates themselves are the benchmark's, not
the test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_decode_runs_at_a_tiny_size() -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench_decode.py"), "--images", "3", "--size", "32",
                          "--source", "160", "--methods", "moco", "clicv2"],
                         capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout)
    assert set(result["methods"]) == {"moco", "clicv2"}
    for method, rates in result["methods"].items():
        assert set(rates["photometric_cpu"]) == {"pil", "batched"}, method
        assert all(v > 0 for v in rates["photometric_cpu"].values()), method
        assert all(v > 0 for v in rates["decode_on_device"].values()), method
        assert all(v > 0 for v in rates["augment_on_device"].values()), method


def test_bench_shard_writes_resumes_and_reads_at_a_tiny_size() -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench_shard.py"), "--n", "60", "--size", "24x16",
                          "--per-shard", "10", "--workers", "1", "--resume", "--read"],
                         capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout)
    assert result["parts"] == 6 and result["resume_written"] == 3  # the half a kill would have lost
    assert result["images_per_s"] > 0 and result["read_images_per_s"] > 0 and result["shard_bytes_mb"] > 0
