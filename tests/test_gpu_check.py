"""benchmarks/gpu_check.sh --dry-run: every phase of the GPU check runs (tiny sizes, CPU) and reports."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_phase(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    statuses = [line for line in summary.splitlines() if line.startswith("- ")]
    assert {s.split(":")[0] for s in statuses} >= {"- a", "- b", "- c", "- d"}, summary
    assert all(": status 0," in s for s in statuses), summary
    assert "| released pipeline (PIL, 2 workers), fp16 |" in summary  # the side-by-side table
    assert "Epoch 0 done" in summary
    assert sorted(p.name for p in out.iterdir()) == ["device.txt", "gpu_check.log", "runs.tar.gz", "summary.md"]
