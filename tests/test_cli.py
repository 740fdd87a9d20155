"""The demo and the command line, run as a user would (short settings)."""

import json
import subprocess
import sys

from indigrad import demo


def test_demo_trains_and_reports(tmp_path, capsys):
    plot = tmp_path / "demo.png"
    out = demo.main(epochs=2, repeats=2, plot_path=str(plot), progress=False)
    assert out["history"]["test_accuracy"][-1] > 0.8
    assert plot.stat().st_size > 10_000
    printed = capsys.readouterr().out
    for method in ["plain", "grads", "norms", "clipped", "loop", "torch.func"]:
        assert method in printed
        assert "ratio" in out["timing"][method]
    assert out["timing"]["loop"]["ratio"] > out["timing"]["norms"]["ratio"]


def test_python_m_indigrad_demo(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "indigrad",
            "demo",
            "--epochs",
            "1",
            "--repeats",
            "2",
            "--no-progress",
            "--plot",
            str(tmp_path / "p.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "test accuracy" in result.stdout and "× plain" in result.stdout


def test_bench_command_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "indigrad",
            "bench",
            "--sizes",
            "8-8-2",
            "--batch",
            "4",
            "--repeats",
            "2",
            "--no-progress",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "MLP 8-8-2, n=4" in result.stdout
    results = json.loads(path.read_text())["results"]
    assert results["plain"]["ratio"] == 1.0 and results["grads"]["seconds"] > 0
