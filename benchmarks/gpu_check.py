"""Everything a session with a CUDA device should check, in one call.

1. Correctness on the device: ``indigrad.testing.check`` (grads, norms, clip_, all from
   one backward too) in float64 against the per-example loop, on small versions of the
   zoo's models, a ViT and a ConvNeXt, under each cost choice (the automatic one, all
   ghost, all materialised); for the ViT, whether its attention was read from the graph.
2. The zoo, all methods that run, as ``indigrad bench`` would time them.
3. Stacked convs: ResNet-18's steps with same-shaped convs taken together and one by one,
   alternated, eager and graphed (time and peak memory).
4. The cost choice: the clipped step of the models with a choice to make, under each
   choice, with its time and peak memory over plain's (to set ``_cost._PASS_COST`` and
   ``_cost._GROWTH`` for the device).
5. Profiles of one plain and one clipped step of the GPT and ResNet-18 problems.
6. CUDA graphs: replayed steps checked against eager ones, and the zoo timed as graphs.

7. The recurrent classifiers, and what the backward split at the recurrent layer and
   the top layer's states read from its output save (each switched off and on).
8. No false alarm of the check that rows are examples (``indigrad/_verify.py``) on the
   device's kernels: three clipped steps of each model, small and of the zoo's size,
   checked at every step, in float32 with TF32 on and off, and under bf16 autocast.
9. Convs' per-example gradients two ways (``conv_by_groups.py``), and how much of the
   quantities is the host's Python (``replay_bound.py``): parts ``convs`` and ``replay``.

``--parts`` picks some of them (run in the order check, verify, graphs, zoo, stacks,
recurrent, variants, profiles, outer, convs, replay), to fit a short device session.

Results go to ``OUT/gpu_check.json`` (a plot and the profiles beside it), a summary to
stdout last.

    python benchmarks/gpu_check.py --out results/ [--repeats 20] [--parts check,graphs,zoo]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import indigrad
import indigrad.bench as bench
from indigrad import _outer, testing
from indigrad.rules import _cost

# name: replacement of ``_cost.materialise_to_clip`` (None: the library's own choice)
CHOICES: dict[str, Callable[..., bool] | None] = {
    "auto": None,
    "ghost": lambda T, a, b, *_: not _cost.ghost_norm(T, a, b),
    "materialise": lambda *_: True,
}


@contextmanager
def choice(name: str, device: str = "cuda", **settings: float | None) -> Iterator[None]:
    """Run under the cost choice ``name``, with ``_cost`` settings for ``device`` replaced."""
    real = _cost.materialise_to_clip
    saved = {k: getattr(_cost, k).get(device) for k in settings}
    try:
        if CHOICES[name] is not None:
            _cost.materialise_to_clip = CHOICES[name]  # type: ignore[assignment]
        for key, value in settings.items():
            getattr(_cost, key)[device] = value
        yield
    finally:
        _cost.materialise_to_clip = real
        for key, value in saved.items():
            if value is None:
                getattr(_cost, key).pop(device, None)
            else:
                getattr(_cost, key)[device] = value


def small_problems(device: str) -> dict[str, Callable[[], bench.Problem]]:
    """The zoo's models, small enough for the float64 loop reference."""
    return {
        "mlp": lambda: bench.mlp_problem(12, [16, 8], 5, batch=6, device=device),
        "cnn": lambda: bench.cnn_problem(batch=4, width=8, device=device),
        "resnet18": lambda: bench.resnet18_problem(batch=3, device=device),
        # T = 40 lookups per example: the embedding's segment sum, not its Gram
        "gpt": lambda: bench.gpt_problem(3, 2, 32, 4, 40, 50, device=device),
        # the graph-read paths: self-attention, class token, position embedding, layer
        # scales (whether attention was read from the graph on this device is reported)
        "vit": lambda: bench.vit_problem(batch=3, layers=1, d=8, heads=2, device=device),
        "convnext": lambda: bench.convnext_problem(3, (4, 8), device, stochastic_depth=0.0),
        # cross-attention (key is value) read from the graph
        "seq2seq": lambda: bench.seq2seq_problem(3, 1, 8, 2, 4, 11, 0.0, device),
        # the recurrent layers' backward by hand, on the device's fused kernels, with the
        # backward split at them (the embedding below)
        "lstm": lambda: bench.lstm_problem(batch=3, T=4, hidden=6, device=device),
        "gru": lambda: bench.lstm_problem(batch=3, T=4, hidden=6, device=device, kind="GRU"),
        "rnn": lambda: bench.lstm_problem(batch=3, T=4, hidden=6, device=device, kind="RNN"),
    }


@contextmanager
def attention_recomputed() -> Iterator[list[int]]:
    """Count the calls whose attention the rule recomputed rather than read from the graph."""
    from indigrad.rules import attention

    calls: list[int] = []
    real = attention._forward
    attention._forward = lambda *a: calls.append(1) or real(*a)  # type: ignore[assignment]
    try:
        yield calls
    finally:
        attention._forward = real  # type: ignore[assignment]


def correctness(device: str) -> dict[str, str]:
    results = {}
    for key, make in small_problems(device).items():
        for name in CHOICES:
            label = f"{key}/{name}"
            try:
                p = make()
                model = p.model().double()
                x = p.x.double() if p.x.is_floating_point() else p.x

                def losses(x: torch.Tensor, y: torch.Tensor, p: Any = p, m: Any = model) -> Any:
                    return p.loss(m(x), y)

                with choice(name), attention_recomputed() as recomputed:
                    testing.check(model, losses, x, p.y)
                results[label] = "ok"
                if key in ("vit", "seq2seq"):
                    results[label] += f" (attention recomputed {len(recomputed)} times)"
            except ImportError as err:
                results[label] = f"skipped ({err})"
            except Exception as err:
                results[label] = f"FAIL {type(err).__name__}: {str(err)[:300]}"
            print(f"check {label}: {results[label]}", flush=True)
    return results


def verify(device: str) -> dict[str, str]:
    """Clipped steps checked at every step (``verify="always"``): where a check raises on
    these models, whose rows are their examples', it is a false alarm."""
    results = {}
    problems = {**small_problems(device), **{f"zoo-{k}": m for k, m in bench.zoo(device).items()}}
    settings = {"tf32": (True, None), "fp32": (False, None), "bf16": (False, "bf16")}
    for key, make in problems.items():
        for name, (tf32, autocast) in settings.items():
            label = f"{key}/{name}"
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            try:
                p = make()
                model = p.model()
                for _ in range(3):
                    with indigrad.capture(model, verify="always") as cap:
                        with torch.autocast(device, torch.bfloat16, enabled=autocast is not None):
                            losses = p.loss(model(p.x), p.y)
                        cap.clip_(losses.float(), 1.0)
                    model.zero_grad(set_to_none=True)
                results[label] = "ok"
            except ImportError as err:
                results[label] = f"skipped ({err})"
            except Exception as err:
                results[label] = f"FAIL {type(err).__name__}: {str(err)[:300]}"
            print(f"verify {label}: {results[label]}", flush=True)
            _empty_cache(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True  # torch's defaults
    return results


def zoo(
    device: str,
    repeats: int,
    methods: list[str],
    keys: list[str] | None = None,
    graphs: bool = False,
) -> dict[str, Any]:
    """The zoo's problems (or those of ``keys``) timed as ``indigrad bench`` times them;
    with ``graphs``, every step replayed from a CUDA graph (``indigrad bench --graphs``)."""
    report = {}
    for key, make in bench.zoo(device).items():
        if keys is not None and key not in keys:
            continue
        try:
            problem = make()
        except ImportError as err:
            print(f"{key}: skipped ({err})", flush=True)
            continue
        start = time.perf_counter()
        results = bench.run(problem, methods, repeats=repeats, ops=not graphs, graphs=graphs)
        print(bench.table(problem, results), flush=True)
        print(f"({time.perf_counter() - start:.0f} s)\n", flush=True)
        report[key] = {"name": problem.name, "results": results}
        del problem
        _empty_cache(device)
    return report


# variant: (choice, settings of _cost for CUDA)
VARIANTS: dict[str, tuple[str, dict[str, float | None]]] = {
    "auto": ("auto", {}),
    "budget0": ("auto", {"_BUDGET_SHARE": 0.0}),
    "budget0.2": ("auto", {"_BUDGET_SHARE": 0.2}),
    "budget0.4": ("auto", {"_BUDGET_SHARE": 0.4}),
    "no-budget": ("auto", {"_BUDGET_SHARE": None}),
    "ghost": ("ghost", {}),
    "materialise": ("materialise", {}),
}


# the variants each problem is timed under (a repeated one: the spread between runs)
VARIANTS_OF = {
    "gpt": ["auto", "budget0", "budget0.2", "budget0.4", "no-budget", "ghost", "auto"],
    "resnet18": ["auto", "auto", "auto"],
    "cnn": ["auto", "ghost", "materialise"],
}


def cost_variants(device: str, repeats: int) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for key, variants in VARIANTS_OF.items():
        try:
            problem = bench.zoo(device)[key]()
        except ImportError as err:
            print(f"{key}: skipped ({err})", flush=True)
            continue
        report[key] = {}
        for i, variant in enumerate(variants):
            name, settings = VARIANTS[variant]
            with choice(name, device, **settings):
                r = bench.run(problem, ["plain", "norms", "clipped"], repeats=repeats)
            report[key][f"{i}:{variant}"] = r
            c, nm = r["clipped"], r["norms"]
            print(
                f"{key:<9} {variant:<12} clipped {c.get('ratio', float('nan')):.3f}× "
                f"mem {c.get('memory_ratio', float('nan')):.2f}×  norms "
                f"{nm.get('ratio', float('nan')):.3f}×  {c.get('error', '')}",
                flush=True,
            )
        del problem
        _empty_cache(device)
    return report


def stacks(device: str, repeats: int, rounds: int = 3) -> dict[str, Any]:
    """ResNet-18's steps with same-shaped convs stacked (``indigrad/_stack.py``, the GPU's
    default) and one by one, alternated within each round; then graphed, on CUDA."""
    from indigrad.rules import conv

    def one_by_one(make: Callable[[bench.Problem], Callable[[], None]]) -> Any:
        def factory(p: bench.Problem) -> Callable[[], None]:
            step = make(p)

            def unstacked() -> None:
                saved, conv._STACKED = conv._STACKED, set()
                try:
                    step()
                finally:
                    conv._STACKED = saved

            return unstacked

        return factory

    try:
        problem = bench.zoo(device)["resnet18"]()
    except ImportError as err:
        print(f"resnet18: skipped ({err})", flush=True)
        return {}
    extra = {"norms-1by1": one_by_one(bench.METHODS["norms"])}
    extra["clipped-1by1"] = one_by_one(bench.METHODS["clipped"])
    bench.METHODS.update(extra)
    methods = ["plain", "norms", "norms-1by1", "clipped", "clipped-1by1"]
    report: dict[str, Any] = {}
    try:
        for i in range(rounds):
            report[f"eager {i}"] = bench.run(problem, methods, repeats=repeats)
            print(bench.table(problem, report[f"eager {i}"]), flush=True)
        if device == "cuda":
            report["graphed"] = bench.run(problem, methods, repeats=repeats, graphs=True)
            print(bench.table(problem, report["graphed"]), flush=True)
    finally:
        for key in extra:
            del bench.METHODS[key]
    return report


def without_gc(device: str, repeats: int) -> dict[str, Any]:
    """Diagnostic, not a reported figure: ResNet-18's steps with Python's garbage
    collector off while timing, to tell its pauses from the steps' own host time."""
    import gc

    try:
        problem = bench.zoo(device)["resnet18"]()
    except ImportError:
        return {}
    gc.collect()
    gc.disable()
    try:
        r = bench.run(problem, ["plain", "norms", "clipped"], repeats=repeats)
    finally:
        gc.enable()
    print(
        f"resnet18 without gc: clipped {r['clipped'].get('ratio', float('nan')):.3f}×, "
        f"norms {r['norms'].get('ratio', float('nan')):.3f}×",
        flush=True,
    )
    return r


def graphs(device: str, repeats: int) -> dict[str, Any]:
    """indigrad's steps as CUDA graphs: the replays checked against eager steps
    (``tests/test_cuda_graphs.py``), then the zoo timed with every method, plain included,
    replayed from a graph (``indigrad bench --graphs``): the device's work without the
    host's."""
    report: dict[str, Any] = {"check": _pytest("test_cuda_graphs.py")}
    if device != "cuda":
        print(f"graphed timings: skipped (CUDA graphs need a CUDA device, not {device})")
        return report
    methods = ["plain", "norms", "clipped", "dp", "grads"]
    report.update(zoo(device, repeats, methods, ["mlp", "cnn", "resnet18", "gpt"], graphs=True))
    return report


def recurrent(device: str, repeats: int) -> dict[str, Any]:
    """The recurrent classifiers (``indigrad bench --problems lstm,gru,rnn``), and what the
    backward split at the layer and the top layer's states read from the output save,
    each switched off and on alternately (``benchmarks/recurrent_paths.py``)."""
    import recurrent_paths

    report: dict[str, Any] = {}
    for key in ("lstm", "gru", "rnn"):
        problem = bench.extras(device)[key]()
        results = bench.run(problem, ["plain", "norms", "clipped", "grads"], repeats=repeats)
        print(bench.table(problem, results), flush=True)
        entry: dict[str, Any] = {"name": problem.name, "results": results}
        for switch in ("split", "output"):
            ratios = recurrent_paths.compare(problem, switch, max(5, repeats // 2))
            entry[switch] = ratios
            cells = ", ".join(
                f"{m} {a:.2f}× → {b:.2f}×" for m, (a, b) in ratios.items() if m != "plain"
            )
            print(f"{key}, {switch} off → on: {cells}", flush=True)
        report[key] = entry
        del problem
        _empty_cache(device)
    return report


def _pytest(name: str) -> dict[str, str]:
    """Each test of ``tests/<name>``: "ok", "skipped" or its failure (pytest, installed
    beside this script on the device from the wheels it is given)."""
    try:
        import pytest
    except ImportError as err:
        return {name: f"FAIL not run: {err}"}

    outcomes: dict[str, str] = {}

    class Report:
        def pytest_runtest_logreport(self, report: Any) -> None:
            if report.failed:
                outcomes[report.nodeid] = f"FAIL {str(report.longrepr)[-300:]}"
            elif report.when == "call" or report.skipped:
                outcomes.setdefault(report.nodeid, "skipped" if report.skipped else "ok")

    path = os.path.join(os.path.dirname(__file__), "..", "tests", name)
    pytest.main(["-q", "-p", "no:cacheprovider", path], plugins=[Report()])
    for nodeid, outcome in outcomes.items():
        print(f"test {nodeid}: {outcome}", flush=True)
    return outcomes or {name: "FAIL no test ran"}


def _empty_cache(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def profiles(device: str, out: str) -> None:
    """``torch.profiler`` tables (ops by self device time) of one plain and one clipped
    step of the GPT and ResNet-18 problems, to ``OUT/profile_<problem>.txt``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    for key in ("gpt", "resnet18"):
        try:
            problem = bench.zoo(device)[key]()
        except ImportError:
            continue
        with open(os.path.join(out, f"profile_{key}.txt"), "w") as f:
            for method in ("plain", "clipped"):
                step = bench.METHODS[method](problem)
                for _ in range(3):
                    step()
                _sync(device)
                with profile(activities=activities) as prof:
                    step()
                    _sync(device)
                f.write(f"== {problem.name}: {method}\n")
                f.write(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n\n")
        print(f"profile of {key} written", flush=True)
        del problem
        _empty_cache(device)


def host_profile(device: str, out: str) -> None:
    """``cProfile`` of plain and clipped ResNet-18 steps (host time per function: on a GPU
    a small-image ResNet step is bound by the host), to ``OUT/host_resnet18.txt``."""
    import cProfile
    import io
    import pstats

    try:
        problem = bench.zoo(device)["resnet18"]()
    except ImportError:
        return
    with open(os.path.join(out, "host_resnet18.txt"), "w") as f:
        for method in ("plain", "clipped"):
            step = bench.METHODS[method](problem)
            for _ in range(3):
                step()
            _sync(device)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(10):
                step()
            _sync(device)
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(45)
            f.write(f"== {method}, 10 steps\n{text.getvalue()}\n")
    print("host profile of resnet18 written", flush=True)


def convs(device: str) -> list[dict[str, Any]]:
    """A conv's per-example weight gradients by im2col and a batched product, and by one
    weight gradient of a conv with the examples as groups (``conv_by_groups.py``; on a CPU
    the rules take the groups where they measured faster), at n = 256, float32."""
    from conv_by_groups import grid

    rows = []
    print("conv per-example gradients, ms: im2col+bmm, groups", flush=True)
    for r in grid(device, [256], max_mb=1000):
        rows.append(r)
        shape = f"{r['c_in']}->{r['c_out']} {r['side']}² k{r['k']}"
        print(f"  {shape:<18} {r['im2col_ms']:8.3f} {r['groups_ms']:8.3f}", flush=True)
    return rows


def replay(device: str, repeats: int) -> dict[str, Any]:
    """How much of the zoo's ResNet-18's and CNN's norms and clipped sums is the host's
    Python: the same step's operators replayed from a recorded graph
    (``replay_bound.py``)."""
    from replay_bound import bound

    zoo = bench.zoo(device)
    out = {}
    for key in ("resnet18", "cnn"):
        r = out[key] = bound(zoo[key](), repeats)
        print(
            f"{key}: quantities eager {r['eager_ms']:.2f} ms, replayed {r['replayed_ms']:.2f} ms "
            f"({r['operators']} operators); plain forward and backward {r['plain_ms']:.2f} ms",
            flush=True,
        )
    return out


def outer_products(device: str) -> dict[str, float]:
    """Milliseconds to write the wide MLP's per-example weight gradients (n = 128, 4096 ×
    4096): as a broadcast product, as a batched GEMM with K = 1, and as one GEMM per
    example (n launches, each writing 64 MB), as indigrad's Triton kernel; and a fill of
    the same buffer, the floor for any writer."""
    n, a, b = 128 if device == "cuda" else 4, 4096, 4096
    L, R = torch.randn(n, a, 1, device=device), torch.randn(n, 1, b, device=device)
    W = torch.empty(n, a, b, device=device)

    def per_example() -> None:
        for i in range(n):
            torch.mm(L[i], R[i], out=W[i])

    ways = {
        "fill (writes alone: the floor)": lambda: W.fill_(1.0),
        "mul": lambda: torch.mul(L, R, out=W),
        "bmm": lambda: torch.bmm(L, R, out=W),
        "mm per example": per_example,
        "triton (indigrad._outer)": lambda: _outer.outer(L.view(n, a), R.view(n, b), W),
    }
    result = {}
    for name, f in ways.items():
        for _ in range(3):
            f()
        _sync(device)
        start = time.perf_counter()
        for _ in range(20):
            f()
        _sync(device)
        result[name] = (time.perf_counter() - start) / 20 * 1e3
    gb = n * a * b * 4 / 1e9
    print(
        f"outer products, {gb:.1f} GB written: "
        + ", ".join(f"{k} {v:.2f} ms ({gb / v:.2f} TB/s)" for k, v in result.items()),
        flush=True,
    )
    return result


def _sync(device: str) -> None:
    bench._sync(torch.device(device))  # the benchmark's own wait for the device


# the parts of a run, in the order they run: the figures the issues ask for first
PARTS = [
    "check",
    "verify",
    "graphs",
    "zoo",
    "stacks",
    "recurrent",
    "variants",
    "profiles",
    "outer",
    "convs",
    "replay",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-zoo", action="store_true")
    parser.add_argument(
        "--methods",
        default="plain,grads,norms,clipped,dp,torch.func,opacus,opacus-ew,opacus-ghost,backpack",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated, in this order: {','.join(PARTS)}",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        raise SystemExit(f"unknown parts {sorted(parts - set(PARTS))}; choose from {PARTS}")
    device = args.device
    name = device
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    header = f"torch {torch.__version__}, {name}"
    print(header, flush=True)
    report: dict[str, Any] = {"torch": torch.__version__, "device": name}
    os.makedirs(args.out, exist_ok=True)

    def save() -> None:  # after each part, so that a run cut short keeps what it did
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=2)

    report["check"] = {}
    if "check" in parts:
        start = time.perf_counter()
        report["check"] = correctness(device)
        print(f"correctness: {time.perf_counter() - start:.0f} s\n", flush=True)
        save()
    if "verify" in parts:
        report["verify"] = verify(device)
        save()
    if "graphs" in parts:
        report["graphs"] = graphs(device, args.repeats)
        save()
    if "zoo" in parts and not args.skip_zoo:
        report["zoo"] = zoo(device, args.repeats, args.methods.split(","))
        save()
    if "stacks" in parts:
        report["stacks"] = stacks(device, args.repeats)
        save()
    if "recurrent" in parts:
        report["recurrent"] = recurrent(device, args.repeats)
        save()
    if "variants" in parts:
        report["variants"] = cost_variants(device, max(5, args.repeats // 2))
        report["without_gc"] = without_gc(device, args.repeats)
        save()
    if "profiles" in parts:
        profiles(device, args.out)
        host_profile(device, args.out)
    if "outer" in parts:
        report["outer_products_ms"] = outer_products(device)
        save()
    if "convs" in parts:
        report["convs"] = convs(device)
        save()
    if "replay" in parts:
        report["replay"] = replay(device, args.repeats)
        save()
    if "zoo" in report:
        bench.plot(
            {v["name"]: v["results"] for v in report["zoo"].values()},
            os.path.join(args.out, "gpu_check.png"),
        )
    summary(report, header)


def summary(report: dict[str, Any], header: str) -> None:
    print("\n=== summary:", header)
    checks = {**report["check"], **report.get("graphs", {}).get("check", {})}
    failed = {k: v for k, v in checks.items() if v.split(" (")[0] != "ok"}
    print(f"checks: {len(checks) - len(failed)} ok; not ok: {failed or 'none'}")
    graphed = {f"{k} graphed": v for k, v in report.get("graphs", {}).items() if k != "check"}
    timed = {**graphed, **report.get("zoo", {}), **report.get("recurrent", {})}
    for key, entry in timed.items():
        cells = []
        for method, r in entry["results"].items():
            if "ratio" in r:
                mem = f"/{r['memory_ratio']:.2f}m" if "memory_ratio" in r else ""
                cells.append(f"{method} {r['ratio']:.2f}{mem}")
            else:
                cells.append(f"{method} FAILS")
        plain = entry["results"].get("plain", {}).get("seconds", float("nan")) * 1e3
        print(f"{key} (plain {plain:.2f} ms): " + ", ".join(cells))


if __name__ == "__main__":
    main()
