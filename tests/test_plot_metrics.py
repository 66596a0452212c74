import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plot_metrics_writes_a_png(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "epoch,step,train/loss,val/acc\n0,9,2.0,\n0,19,1.5,\n0,19,,0.5\n1,29,1.0,\n1,39,0.8,\n1,39,,0.8\n"
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plot_metrics.py"), str(csv_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    bad = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plot_metrics.py"), str(tmp_path / "nope.csv")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "nope.csv does not exist" in bad.stderr
