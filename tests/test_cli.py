"""The demo and the command line, run as a user would (short settings)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from indigrad import demo


def test_demo_trains_and_reports(tmp_path, capsys):
    plot = tmp_path / "demo.png"
    out = demo.main(epsilons=(3.0,), epochs=3, repeats=2, plot_path=str(plot), progress=False)
    runs = out["runs"]
    assert list(runs) == ["no noise", "ε = 3"]
    # 0.74-0.82 after 3 epochs over seeds 0-4 (chance: 0.1)
    assert runs["no noise"]["test_accuracy"][-1] > 0.7
    eps = runs["ε = 3"]["epsilon"]
    assert eps == sorted(eps) and 2.9 < eps[-1] <= 3.0  # σ calibrated to the target
    assert runs["ε = 3"]["test_accuracy"][-1] > 0.3  # better than chance after 3 epochs
    assert plot.stat().st_size > 10_000
    printed = capsys.readouterr().out
    for method in ["plain", "grads", "norms", "clipped", "loop", "torch.func"]:
        assert method in printed
        assert out["timing"][method]["ratio"] > 0  # timed (timings are never compared here)


def test_python_m_indigrad_demo(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "indigrad",
            "demo",
            "--epsilons",
            "8",
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
            "--methods",
            "plain,grads,norms,clipped,torch.func",
            "--no-progress",
            "--ops",
            "--json",
            str(path),
            "--plot",
            str(tmp_path / "bench.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "MLP 8-8-2, n=4" in result.stdout
    report = json.loads(path.read_text())
    # the machine, first line and in the report: CPU ratios depend on it
    assert report["machine"] == result.stdout.splitlines()[0]
    assert "threads" in report["machine"] and "torch" not in report["machine"]
    results = report["problems"]["MLP 8-8-2, n=4"]
    assert results["plain"]["ratio"] == 1.0 and results["grads"]["seconds"] > 0
    assert set(results) == {"plain", "grads", "norms", "clipped", "torch.func"}
    if sys.platform.startswith("linux"):  # CPU: fresh memory touched per step, per method
        assert "faults/step" in result.stdout
        assert all(r["page_faults"] >= 0 for r in results.values())
    assert (tmp_path / "bench.png").stat().st_size > 5_000
    # --ops: the operators of one step, views among them
    assert "ops (not views)/step" in result.stdout
    for r in results.values():
        assert r["ops"]["all"] > r["ops"]["views"] >= 0
    assert results["clipped"]["ops"]["all"] > results["plain"]["ops"]["all"]


def test_bench_graphs_need_a_cuda_device():
    from indigrad import bench, cli
    from indigrad.bench.methods import graphed

    with pytest.raises(SystemExit, match="--graphs needs a CUDA device"):
        cli.main(["bench", "--graphs", "--device", "cpu", "--problems", "mlp"])
    problem = bench.mlp_problem(8, [8], 2, batch=4)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        bench.run(problem, ["plain"], graphs=True)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        graphed(lambda: None, torch.device("cpu"))
    graphed_results = {"plain": {"seconds": 1e-3, "ratio": 1.0, "graphed": True}}
    assert ", CUDA graphs," in bench.table(problem, graphed_results).splitlines()[0]
    assert "graphs" not in bench.table(problem, {"plain": {"seconds": 1e-3, "ratio": 1.0}})


def _benchmark_script(name: str, *args: str) -> str:
    """Run ``benchmarks/<name>`` as a user would; its standard output."""
    script = Path(__file__).parents[1] / "benchmarks" / name
    result = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return result.stdout


def test_host_ops_counts_a_step_as_a_gpu_would_run_it():
    out = _benchmark_script("host_ops.py", "--problems", "mlp", "--batch", "4")
    assert "cost settings of cuda" in out
    counts = {}
    for line in out.splitlines():
        if line.startswith("MLP"):
            *_, method, ops, not_views = line.split()
            counts[method] = (int(ops), int(not_views))
    assert set(counts) == {"plain", "norms", "clipped", "grads"}
    assert all(ops > not_views > 0 for ops, not_views in counts.values())
    assert counts["clipped"][0] > counts["plain"][0]


def test_host_time_times_the_tiny_gpt():
    lines = _benchmark_script("host_time.py", "--rounds", "2", "--methods", "clipped").splitlines()
    assert lines[0].startswith("GPT 2×8, T=4, V=16, n=2")
    assert [line.split()[0] for line in lines[2:4]] == ["plain", "clipped"]
    assert lines[2].split()[2] == "1.00×"
    assert lines[4] == "(one thread)"


def test_bench_zoo_runs_every_method_or_reports_its_failure():
    from indigrad import bench

    problem = bench.mlp_problem(6, [5], 3, batch=4)
    results = bench.run(problem, list(bench.METHODS), repeats=1, warmup=1)
    assert set(results) == set(bench.METHODS)
    for method in ["plain", "grads", "norms", "clipped", "loop", "torch.func"]:
        assert "seconds" in results[method], results[method]
    for r in results.values():
        assert ("seconds" in r) != ("error" in r)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # torch's, on embeddings
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_opacus_gets_its_own_recurrent_layers_with_the_same_weights(kind):
    # Opacus's hooks need its DPLSTM, DPGRU and DPRNN in place of PyTorch's layers: the
    # bench gives it them, computing what the problem's model computes
    pytest.importorskip("opacus")
    from indigrad import bench
    from indigrad.bench import methods

    problem = bench.problems.lstm_problem(batch=3, T=4, hidden=5, kind=kind)
    model, theirs = problem.model(), methods._opacus_model(problem)  # each seeded alike
    assert not any(type(m) in (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN) for m in theirs.modules())
    torch.testing.assert_close(theirs(problem.x), model(problem.x))
    for method in ["opacus", "opacus-ew", "opacus-ghost"]:
        methods.METHODS[method](problem)()  # runs: a failure would raise here


def test_example_dp_finetune_transformer_runs():
    import importlib.util
    from pathlib import Path

    pytest = __import__("pytest")
    pytest.importorskip("transformers")
    path = Path(__file__).parents[1] / "examples" / "dp_finetune_transformer.py"
    spec = importlib.util.spec_from_file_location("dp_finetune_transformer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(
        ["--epochs", "1", "--batch", "16", "--micro-batch", "4", "--private-examples", "64",
         "--pretrain-steps", "2"]
    )  # fmt: skip
    assert 7.9 < out["epsilon"] <= 8.0 and out["loss"] > 0


def test_pass_cost_times_the_clipped_step_under_each_value():
    lines = _benchmark_script(
        "pass_cost.py", "--problem", "mlp", "--costs", "20,38", "--rounds", "1"
    ).splitlines()
    assert lines[0].startswith("MLP 784-512-256-10")
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["pass cost 20", "pass cost 38"]


def test_tied_gpt2_times_indigrads_methods():
    pytest.importorskip("transformers")
    out = _benchmark_script(
        "tied_gpt2.py", "--d", "8", "--vocab", "16", "--T", "4", "--n", "2", "--repeats", "1"
    ).splitlines()
    assert out[0].startswith("GPT-2 tied 2×8, T=4, V=16, n=2")
    assert [line.split()[0] for line in out[2:6]] == ["plain", "norms", "clipped", "grads"]
    rss = _benchmark_script(
        "tied_gpt2.py", "--d", "8", "--vocab", "16", "--T", "4", "--n", "2", "--rss"
    )
    assert "3 clipped steps raised the peak resident memory by" in rss


def test_scaled_embedding_times_indigrads_methods():
    args = ("--d", "8", "--vocab", "16", "--T", "4", "--n", "2")
    out = _benchmark_script("scaled_embedding.py", *args, "--repeats", "1").splitlines()
    assert out[0].startswith("scaled embedding LM d=8, T=4, V=16, n=2")
    assert [line.split()[0] for line in out[2:6]] == ["plain", "norms", "clipped", "grads"]
    rss = _benchmark_script("scaled_embedding.py", *args, "--rss")
    assert "3 clipped steps raised the peak resident memory by" in rss


def test_conv_by_groups_times_both_ways():
    out = _benchmark_script("conv_by_groups.py", "--batch", "2", "--max-mb", "0.05").splitlines()
    assert out[0].startswith("torch ") and out[1].split()[-3:] == ["im2col+bmm", "groups", "ratio"]
    rows = [line.split() for line in out[2:]]
    assert len(rows) > 10 and all(r[0] == "2" and float(r[5]) > 0 for r in rows)


def test_replay_bound_replays_a_steps_operators():
    out = _benchmark_script("replay_bound.py", "--problem", "mlp", "--rounds", "2").splitlines()
    assert out[0].startswith("MLP 784-512-256-10, n=256: ") and out[0].endswith(" operators")
    assert [line.split(",")[0].split()[0] for line in out[1:4]] == ["norms", "the", "plain"]


def test_alone_runs_each_method_in_a_process_of_its_own():
    out = _benchmark_script(
        "alone.py", "--problem", "mlp", "--methods", "plain,norms", "--steps", "2", "--rounds", "1"
    ).splitlines()
    assert [line.split()[0] for line in out if line] == ["plain", "norms"]
    assert "(this tree)" in out[1] and out[1].endswith("faults/step")


def test_gpu_check_runs_its_parts_on_cpu(tmp_path):
    # the device script must not fail on what a CPU can run of it: device time is scarce
    out = _benchmark_script(
        "gpu_check.py", "--device", "cpu", "--parts", "check,graphs,outer", "--out", str(tmp_path)
    )
    assert "=== summary" in out and "graphed timings: skipped" in out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["check"]["mlp/auto"] == report["check"]["gpt/materialise"] == "ok"
    if "skipped" not in report["check"]["vit/auto"]:  # torchvision: read from the graph
        assert report["check"]["vit/auto"] == "ok (attention recomputed 0 times)"
    assert report["check"]["seq2seq/auto"] == "ok (attention recomputed 0 times)"
    graphs = report["graphs"]["check"]
    assert len(graphs) == 8 and set(graphs.values()) == {"skipped"}  # CUDA only
    assert "zoo" not in report and "variants" not in report


def test_gpu_check_times_stacked_convs_against_one_by_one(tmp_path):
    pytest.importorskip("torchvision")
    args = ("--device", "cpu", "--parts", "stacks", "--repeats", "1", "--out", str(tmp_path))
    _benchmark_script("gpu_check.py", *args)
    report = json.loads((tmp_path / "gpu_check.json").read_text())["stacks"]
    assert list(report) == ["eager 0", "eager 1", "eager 2"]  # graphed: CUDA only
    methods = ["plain", "norms", "norms-1by1", "clipped", "clipped-1by1"]
    assert all(list(r) == methods and "ratio" in r["clipped-1by1"] for r in report.values())


def test_bench_extra_problems_are_named_not_run_by_default():
    from indigrad import bench, cli

    assert set(bench.extras()) == {"vit", "convnext", "lstm", "gru", "rnn", "seq2seq"}
    assert "vit" not in bench.zoo()
    with pytest.raises(SystemExit, match=r"unknown problems.*'vit'"):
        cli.main(["bench", "--problems", "no-such-problem"])
    for problem in (
        bench.lstm_problem(batch=3, T=4, hidden=6),
        bench.lstm_problem(batch=3, T=4, hidden=6, kind="GRU"),
        bench.seq2seq_problem(batch=3, layers=1, d=8, heads=2, T=4, vocab=11),
    ):
        results = bench.run(problem, ["plain", "norms", "clipped"], repeats=1, warmup=1)
        assert all("seconds" in r for r in results.values()), results
    pytest.importorskip("torchvision")
    for problem in (
        bench.vit_problem(batch=3, layers=1, d=8, heads=2),
        bench.convnext_problem(batch=3, widths=(4, 8)),
    ):
        results = bench.run(problem, ["plain", "norms", "clipped"], repeats=1, warmup=1)
        assert all("seconds" in r for r in results.values()), results


def test_against_times_another_revision_beside_this_tree(tmp_path):
    root = Path(__file__).parents[1]
    if not (root / ".git").exists():
        pytest.skip("needs the repository's history")
    out = _benchmark_script("against.py", "HEAD", "--problem", "mlp", "--rounds", "1")
    lines = out.splitlines()
    assert lines[0].startswith("MLP 784-512-256-10")
    assert [line.split("  ")[1].strip() for line in lines[1:]] == [
        "plain",
        "clipped (HEAD)",
        "clipped (this tree)",
    ]
    _benchmark_script("against.py", "HEAD", "--export", str(tmp_path))
    assert (tmp_path / "indigrad_base" / "capture.py").exists()
    out = _benchmark_script(
        "against.py", "--base", str(tmp_path), "--problem", "mlp", "--rounds", "1"
    )
    assert "clipped (this tree)" in out
    out = _benchmark_script(
        "against.py", "--base", str(tmp_path), "--tiny-mlp", "--methods", "grads,norms",
        "--rounds", "1",
    )  # fmt: skip
    labels = [line.split("  ")[1].strip() for line in out.splitlines()[1:]]
    base = f"({tmp_path})"
    expected = ["plain", f"grads {base}", "grads (this tree)", f"norms {base}", "norms (this tree)"]
    assert labels == expected


def test_step_phases_times_each_phase_and_counts_its_operators():
    out = _benchmark_script(
        "step_phases.py", "--problem", "mlp", "--device", "cpu", "--rounds", "1"
    )
    lines = out.splitlines()
    assert lines[0].startswith("MLP 784-512-256-10")
    phases = [line.split()[1] for line in lines[1:-1]]
    assert phases[:6] == ["enter", "forward", "backward", "norms", "sums", "step"]
    assert "operators" in lines[4] and lines[-1].startswith("  clipped / plain:")


def test_op_cost_times_each_operator():
    out = _benchmark_script("op_cost.py", "--device", "cpu", "--calls", "1").splitlines()
    assert out[0].startswith("torch ") and len(out) == 1 + 4 * 12
    assert all(len(line.split()) >= 5 for line in out[1:])


def test_host_threads_times_one_thread_against_two():
    pytest.importorskip("torchvision")
    out = _benchmark_script("host_threads.py", "--device", "cpu", "--rounds", "1").splitlines()
    assert "the norms of" in out[0]
    assert [line.split()[0] for line in out[1:]] == ["one", "two"]


def test_overlap_backward_times_the_norms_taken_during_the_backward():
    pytest.importorskip("torchvision")  # the tiny ResNet-18's blocks
    out = _benchmark_script("overlap_backward.py", "--as", "cuda", "--rounds", "1").splitlines()
    assert out[0].startswith("tiny ResNet-18") and "40 calls" in out[0]
    assert [line.split(",")[0].split()[0] for line in out[1:]] == ["backward", "overlapped"]


def test_tf32_cost_times_each_step_with_and_without_tf32():
    out = _benchmark_script("tf32_cost.py", "--device", "cpu", "--problems", "mlp", "--rounds", "1")
    lines = out.splitlines()
    assert lines[0].startswith("torch ") and len(lines) == 3
    assert "TF32 off: plain" in lines[1] and "TF32 on: plain" in lines[2] and "clipped" in lines[2]


def test_grads_floor_times_the_library_against_a_minimal_loop():
    out = _benchmark_script("grads_floor.py", "--device", "cpu", "--rounds", "1").splitlines()
    assert out[0].startswith("MLP ") and len(out) == 5
    assert [line.split()[0] for line in out[1:]] == ["plain", "hooks,", "hooks,", "indigrad"]
