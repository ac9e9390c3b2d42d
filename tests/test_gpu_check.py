"""benchmarks/gpu_check.sh --dry-run: every phase of the GPU check runs (tiny sizes, CPU) and reports, the
column (phase e) included."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_phase(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1", PHASES="a b c d e")
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    statuses = [line for line in summary.splitlines() if line.startswith("- ")]
    assert {s.split(":")[0] for s in statuses} >= {"- a", "- b", "- c", "- d", "- e"}, summary
    assert all(": status 0," in s for s in statuses if "status" in s), summary
    assert "| released pipeline (PIL, 2 workers), fp16 |" in summary  # the side-by-side table
    assert "Epoch 0 done" in summary
    # the column: mode, pretraining stats every kNN epoch, the probe next to the published number
    assert "- e: mode: eager (no CUDA device: no self-check)" in summary
    assert "Pretraining: 2 of 2 epochs" in summary and "| 1 |" in summary
    assert "Linear probe (released protocol, 2 epochs, batched crops)" in summary and "published Un-Mix" in summary
    assert sorted(p.name for p in out.iterdir()) == ["device.txt", "gpu_check.log", "runs.tar.gz", "summary.md"]
