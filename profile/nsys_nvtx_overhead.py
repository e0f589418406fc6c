"""What the NVTX annotations cost with no profiler attached: the annotated generation loop vs the bare one.

    python profile/nsys_nvtx_overhead.py --model tiny                  # ORT fp32 on CPU (make export first)
    python profile/nsys_nvtx_overhead.py --model tiny --engine torch

Reads:  the engine's inputs, as run_nsys_profile.py (--engine ort: the export manifest)
Writes: artifacts/<model>/profile/nvtx-overhead-<engine>-<precision>-<device>/{result.json, manifest.json}
        (or --out DIR)

Both variants run in one process, interleaved (ABAB, then BABA, ...), so machine noise hits both alike:
annotated = ranges on (what LMOPT_NVTX=1 gives), bare = ranges off (LMOPT_NVTX=0: a shared no-op context).
Two figures decide: the measured overhead (median of per-pair ratios of the timed thread's CPU time; the engine runs
on that thread with --threads 1, and CPU time does not count waiting for a core on a shared machine; the wall-time
ratio is recorded too) and a predicted one (ranges per round x the extra cost of one push/pop, timed in a tight loop,
/ round time), which does not depend on noise. The budget is 2%.
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger

log = get_logger("nvtx-overhead")


@dataclass
class OverheadSettings:
    model: str = "tiny"
    artifacts: str = "artifacts"
    engine: str = "ort"            # ort | torch | trt
    precision: str = "fp32"
    device: str = "cpu"
    batch_size: int = 1
    prompt_len: int = 32
    max_new_tokens: int = 32
    repeats: int = 40              # measured pairs of rounds (one annotated, one bare)
    warmup: int = 2
    threads: int = 1               # 1: the engine runs on the timed thread, so its CPU time is all of the work
    budget: float = 0.02           # the annotated loop may be at most this much slower
    out: str = ""                  # output folder


def measure(*, settings: OverheadSettings) -> dict:
    from tqdm import tqdm

    from lmopt import nvtx_ranges
    from lmopt.generate import generate_text
    from lmopt.manifest import write_manifest
    from lmopt.results import envelope, versions, write_json
    from lmopt.paths import check_writable, model_slug, stage_dir, staging_dir
    from lmopt.profiling.workload import prepare
    from lmopt.profiling.workload import ProfileSettings

    s = settings
    if not nvtx_ranges.AVAILABLE:
        raise UserError("the nvtx package is missing, so there is nothing to measure — pip install nvtx==0.2.11")
    if s.repeats < 2:
        raise UserError("--repeats must be >= 2")
    check_writable(s.artifacts)
    ps = ProfileSettings(**{f.name: getattr(s, f.name) for f in fields(ProfileSettings) if hasattr(s, f.name)})
    engine, tok, prompts, params = prepare(ps)

    def one_round() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        generate_text(engine, tok, prompts, params)
        engine.synchronize()
        return time.perf_counter() - t0, time.thread_time() - c0

    # how many ranges one round opens: count them through the hook once
    counted: dict[str, int] = {}

    class _Count:
        def __init__(self, name):
            counted[name] = counted.get(name, 0) + 1

        def __enter__(self):
            pass

        def __exit__(self, *a):
            return False

    nvtx_ranges.set_range_hook(_Count)
    one_round()
    nvtx_ranges.set_range_hook(None)
    ranges_per_round = sum(counted.values())

    for _ in range(s.warmup):
        one_round()
    on, off, on_cpu, off_cpu = [], [], [], []
    prev = nvtx_ranges.ENABLED
    try:
        for i in tqdm(range(s.repeats), desc="pairs", disable=None):
            order = (True, False) if i % 2 == 0 else (False, True)
            for mode in order:
                nvtx_ranges.set_enabled(mode)
                wall, cpu = one_round()
                (on if mode else off).append(wall)
                (on_cpu if mode else off_cpu).append(cpu)
        # the cost of one push/pop pair on this machine, no profiler attached: best of 7 interleaved blocks each,
        # since a block that lost its core to another process is slower, never faster
        cost = {True: [], False: []}
        n = 20000
        for _ in range(7):
            for mode in (True, False):
                nvtx_ranges.set_enabled(mode)
                t0 = time.perf_counter()
                for _ in range(n):
                    with nvtx_ranges.nvtx_range("decode_step"):
                        pass
                cost[mode].append((time.perf_counter() - t0) / n)
        per_range_on, per_range_off = min(cost[True]), min(cost[False])
    finally:
        nvtx_ranges.set_enabled(prev)
    engine.close()

    ratios = [a / b for a, b in zip(on, off)]
    cpu_ratios = [a / b for a, b in zip(on_cpu, off_cpu)]
    measured_wall = statistics.median(ratios) - 1.0
    # CPU time of the timed thread: on a shared machine the wall clock also counts time spent waiting for a core
    measured = statistics.median(cpu_ratios) - 1.0
    q = statistics.quantiles(cpu_ratios, n=4)
    half = 1.58 * (q[2] - q[0]) / len(cpu_ratios) ** 0.5
    predicted = ranges_per_round * (per_range_on - per_range_off) / statistics.median(off)
    result = envelope(
        "nvtx-overhead", settings=asdict(s), versions=versions("nvtx", "torch", "onnxruntime"),
        engine=vars(engine.info),
        raw={"annotated_round_s": on, "bare_round_s": off, "annotated_round_cpu_s": on_cpu,
                "bare_round_cpu_s": off_cpu, "ranges_per_round": counted},
        summary={
            "annotated_median_s": statistics.median(on), "bare_median_s": statistics.median(off),
            "annotated_median_cpu_s": statistics.median(on_cpu), "bare_median_cpu_s": statistics.median(off_cpu),
            "overhead_measured": round(measured, 5),
            "overhead_measured_basis": "median of per-pair ratios of the timed thread's CPU time",
            "overhead_measured_ratio_p10_p90": _p10_p90(cpu_ratios),
            "overhead_wall": round(measured_wall, 5), "overhead_wall_ratio_p10_p90": _p10_p90(ratios),
            # best round of each: the least disturbed by other processes on a shared machine
            "overhead_min_rounds": round(min(on) / min(off) - 1.0, 5),
            "ranges_per_round": ranges_per_round,
            "range_cost_us_annotated": round(per_range_on * 1e6, 4), "range_cost_us_bare": round(per_range_off * 1e6, 4),
            "overhead_predicted": round(predicted, 6), "budget": s.budget,
            # the notch of a box plot, median +- 1.58 IQR / sqrt(n): about a 95% interval for the median
            "overhead_measured_ci95": [round(measured - half, 5), round(measured + half, 5)],
            "within_budget_predicted": predicted <= s.budget,
            "within_budget_measured": measured <= s.budget,
            # a noisy machine can leave the measured median above the budget by chance: then say whether the
            # measurement is at least consistent with the budget (its interval reaches below it)
            "measured_consistent_with_budget": measured - half <= s.budget,
            "within_budget": predicted <= s.budget and measured - half <= s.budget,
        },
    )
    final = Path(s.out) if s.out else stage_dir(s.artifacts, s.model, "profile",
                                                f"nvtx-overhead-{s.engine}-{s.precision}-{s.device}")
    with staging_dir(final) as tmp:
        write_json(tmp / "result.json", result)
        write_manifest(tmp, {"stage": "profile", "variant": final.name, "model": model_slug(s.model),
                             "model_spec": s.model,
                             "settings": asdict(s), "outputs": {"result": "result.json"}})
    r = result["summary"]
    log.info("annotated %.2f ms vs bare %.2f ms per round (%d pairs, %d ranges per round)", 1e3 * r["annotated_median_s"],
             1e3 * r["bare_median_s"], s.repeats, ranges_per_round)
    log.info("overhead measured on CPU time %+.2f%% (95%% interval %+.2f%%..%+.2f%%), on wall time %+.2f%%, "
             "predicted %+.3f%% (%.2f us per range): %s the %.0f%% budget", 100 * measured, *(100 * x for x in
             r["overhead_measured_ci95"]), 100 * measured_wall, 100 * predicted,
             r["range_cost_us_annotated"], "within" if r["within_budget"] else "OVER", 100 * s.budget)
    log.info("Saving result to %s", final / "result.json")
    return result


def _p10_p90(ratios: list[float]) -> list[float]:
    r = sorted(ratios)
    return [round(r[int(0.1 * (len(r) - 1))] - 1, 5), round(r[int(0.9 * (len(r) - 1))] - 1, 5)]


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, OverheadSettings)
    return p


main = cli.main_for(build_parser, OverheadSettings, measure)


if __name__ == "__main__":
    cli.run(main)
