"""Stage 7: profile text generation (NVTX ranges + Nsight Systems or the PyTorch profiler) and write a summary a person
can act on: time per NVTX range, CUDA kernel time by name, memcpy H2D/D2H time and bytes, CPU launch -> GPU start
gaps, multi-stream overlap, and pinned vs pageable host->device copies.

    python profile/run_nsys_profile.py --model tiny                        # nsys when installed (make setup-nsys)
    python profile/run_nsys_profile.py --model tiny --profiler torch       # PyTorch profiler, CPU op summary
    python profile/run_nsys_profile.py --profiler torch --device cuda --engine torch --precision fp16 \\
        --model llama-1b --out results/gpu/profile-llama-1b                 # GPU: kernels, memcpy, pinned vs pageable

Reads:  the engine's inputs (--engine ort: artifacts/<model>/export/fp32 or quantize/* manifests; --engine torch:
        the model itself)
Writes: artifacts/<model>/profile/<profiler>-<engine>-<precision>-<device>/ (or --out DIR):
        summary.json (machine, versions, command, settings, raw round times, summary), run.nsys-rep and the
        `nsys stats` CSVs (nsys), trace.json.gz Chrome trace (torch; open in https://ui.perfetto.dev or chrome://tracing),
        manifest.json last

Only steady state is captured: warm-up rounds run first, outside the NVTX range `profile` that nsys's capture range
(-c nvtx) and the PyTorch profiler bracket. nsys traces `nvtx,osrt` (+`cuda` with --device cuda); Debian's nsys
2022.4 cannot trace CUDA 13 kernels (its CUPTI is 11.8), which the summary says; --profiler torch (CUPTI of the
installed torch) is the way to kernel timelines there. The summary's `nvtx.work_ranges_share_of_wall` checks that the
ranges explain the measured wall time (within 10%).
"""
from __future__ import annotations
if __import__("importlib.util").util.find_spec("lmopt") is None:  # not the project's Python: one line, no traceback
    raise SystemExit(f"error: this Python lacks the project — run: make setup; then .venv/bin/python {__file__}")

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path


from lmopt import cli
from lmopt.errors import UserError
from lmopt.log import get_logger, timed
from lmopt.profiling.workload import ProfileSettings

log = get_logger("profile")
PROFILERS = ("auto", "nsys", "torch")


def _variant(s: ProfileSettings, profiler: str) -> str:
    return f"{profiler}-{s.engine}-{s.precision}-{s.device.replace(':', '')}"


def _resolve_profiler(s: ProfileSettings) -> str:
    if s.profiler not in PROFILERS:
        raise UserError(f"unknown profiler '{s.profiler}' — use one of {', '.join(PROFILERS)}")
    has_nsys = shutil.which("nsys") is not None
    if s.profiler == "nsys" and not has_nsys:
        raise UserError("nsys is not on PATH — run: make setup-nsys (Debian 12), or pass --profiler torch")
    if s.profiler == "auto":
        return "nsys" if has_nsys else "torch"
    return s.profiler


def _not_traced(traced: list[str], profiler: str, device: str, engine: str) -> list[str]:
    gpu = device.startswith("cuda")
    notes = []
    if "cuda_kernels" not in traced:
        if not gpu:
            notes.append("CUDA kernels, memcpy, launch gaps, stream overlap: no GPU in this run (--device cpu)")
        elif profiler == "nsys":
            notes.append("CUDA kernels and memcpy: this nsys recorded none — Debian's nsys 2022.4 (CUPTI 11.8) cannot "
                         "trace CUDA 13; use --profiler torch or a newer Nsight Systems")
        else:
            notes.append("CUDA kernels: the PyTorch profiler recorded none (CUPTI unavailable?)")
    if profiler == "torch":
        notes.append("OS runtime calls (osrt): only nsys traces them")
        if engine != "torch":
            notes.append(f"per-op CPU time of the {engine} engine: the PyTorch profiler sees only PyTorch ops")
    if profiler == "nsys":
        notes.append("per-op CPU time: nsys records only our NVTX ranges and OS calls (--profiler torch lists ops)")
    return notes


def _nsys_profile(s: ProfileSettings, tmp: Path, timings: dict) -> tuple[dict, dict]:
    """Run the workload under nsys; return (raw workload results, events)."""
    from lmopt.profiling.nsys_summary import events_from_nsys_sqlite
    from lmopt.profiling.workload import ROOT_RANGE

    from lmopt.nvtx_ranges import AVAILABLE, DOMAIN

    if not AVAILABLE:
        raise UserError("the nvtx package is missing, so nsys would see no ranges — pip install nvtx==0.2.11")
    (tmp / "settings.json").write_text(json.dumps(asdict(s)))
    wall_json = tmp / "workload.json"
    trace = "nvtx,osrt,cuda" if s.device.startswith("cuda") else "nvtx,osrt"
    cmd = ["timeout", "-k", "5", str(s.nsys_timeout), "nsys", "profile", "-t", trace, "--sample=none",
           "--cpuctxsw=none", "-c", "nvtx", "-p", f"{ROOT_RANGE}@{DOMAIN}",
           # stop = keep the app running after the range (the default stop-shutdown kills it before it reports)
           "--capture-range-end=stop",
           # our range names are plain strings, not registered ones: let nsys match them
           "-e", "NSYS_NVTX_PROFILER_REGISTER_ONLY=0,LMOPT_NVTX=1",
           "-o", str(tmp / "run"), "--force-overwrite=true",
           sys.executable, "-m", "lmopt.profiling.workload",
           "--settings", str(tmp / "settings.json"), "--wall-out", str(wall_json)]
    log.info("running: %s", " ".join(cmd))
    with timed(log, "nsys profile", timings, "nsys_profile_s"):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode in (124, 137):
            # the 2022.4 agent sometimes spins after the app exited (ENVIRONMENT.md); a second run has gone through
            log.warning("nsys profile hit --nsys-timeout %d s; trying once more", s.nsys_timeout)
            proc = subprocess.run(cmd, capture_output=True, text=True)
    rep = tmp / "run.nsys-rep"
    if proc.returncode != 0 or not wall_json.is_file():
        tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["?"])[-1]
        err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        if err:  # the workload's own one-line user error (missing export etc.)
            raise UserError(err[-1][len("error:"):].strip())
        if proc.returncode in (124, 137):
            raise UserError(f"nsys profile ran past --nsys-timeout {s.nsys_timeout} s — raise it or lower --repeats")
        raise RuntimeError(f"nsys profile failed (exit {proc.returncode}): {tail}\n{proc.stderr[-3000:]}")
    if not rep.is_file():
        raise UserError("nsys wrote no .nsys-rep (QdstrmImporter not found?) — run: make setup-nsys, which links it")
    log.info("Saving Nsight Systems report to %s", rep)
    reports = ["nvtxsum", "osrtsum"] + (["cudaapisum", "gpukernsum", "gpumemtimesum", "gpumemsizesum"]
                                        if s.device.startswith("cuda") else [])
    with timed(log, "nsys stats", timings, "nsys_stats_s"):
        st = subprocess.run(["nsys", "stats", "-r", ",".join(reports), "-f", "csv", "--force-export=true",
                             "-o", str(tmp / "stats"), str(rep)], capture_output=True, text=True)
    sqlite = tmp / "run.sqlite"
    if st.returncode != 0 or not sqlite.is_file():
        raise RuntimeError(f"nsys stats failed (exit {st.returncode}): {st.stderr[-2000:]}")
    events = events_from_nsys_sqlite(sqlite, DOMAIN)
    sqlite.unlink()  # derived from the .nsys-rep, and large
    for f in ("settings.json",):
        (tmp / f).unlink()
    res = json.loads(wall_json.read_text())
    wall_json.unlink()
    return res, events


def _torch_profile(s: ProfileSettings, tmp: Path, timings: dict) -> tuple[dict, dict]:
    import torch
    from lmopt.profiling.nsys_summary import events_from_chrome_trace
    from lmopt.profiling.workload import warmup_and_measure

    from lmopt.nvtx_ranges import set_range_hook

    acts = [torch.profiler.ProfilerActivity.CPU]
    if s.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda but torch sees no GPU — use --device cpu or a CUDA build of torch")
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    # record_function is set during warm-up too, so the measured rounds run the same code path
    set_range_hook(torch.profiler.record_function)
    try:
        prof = torch.profiler.profile(activities=acts)
        with timed(log, "workload under the PyTorch profiler", timings, "torch_profile_s"):
            res = warmup_and_measure(s, on_measure=prof)
    finally:
        set_range_hook(None)
    trace = tmp / "trace.json.gz"   # gzip: a GPU decode loop is ~10^5 events; Perfetto opens .json.gz as is
    prof.export_chrome_trace(str(trace))
    log.info("Saving Chrome trace to %s", trace)
    return res, events_from_chrome_trace(trace)


def profile(*, settings: ProfileSettings) -> dict:
    from lmopt.profiling.pinned_copies import pinned_vs_pageable
    from lmopt.profiling.nsys_summary import summarize
    from lmopt.profiling.workload import ROOT_RANGE

    from lmopt.manifest import write_manifest
    from lmopt.results import envelope, versions, write_json
    from lmopt.models import resolve
    from lmopt.paths import check_writable, model_slug, stage_dir, staging_dir

    s = settings
    resolve(s.model)
    profiler = _resolve_profiler(s)
    if s.profiler == "auto" and profiler == "torch":
        log.warning("nsys not on PATH (make setup-nsys installs it): using the PyTorch profiler")
    check_writable(s.artifacts)
    final = Path(s.out) if s.out else stage_dir(s.artifacts, s.model, "profile", _variant(s, profiler))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with staging_dir(final) as tmp:
        if profiler == "nsys":
            res, events = _nsys_profile(s, tmp, timings)
        else:
            res, events = _torch_profile(s, tmp, timings)
        summary = summarize(events, ROOT_RANGE, res["wall_s"])
        with timed(log, "pinned vs pageable copies", timings, "pinned_s"):
            pinned = pinned_vs_pageable(s.model, s.batch_size, s.prompt_len + s.max_new_tokens, s.precision, s.device,
                                        s.pinned_repeats)
        dec = summary["nvtx"]["ranges"].get("decode_step", {})
        n_tok = sum(res["new_tokens"])
        result = envelope(
            "profile", settings=asdict(s),
            versions={**versions("torch", "onnxruntime", "transformers", "nvtx"),
                      "nsys": _nsys_version() if profiler == "nsys" else None},
            profiler=profiler, engine=res["engine"],
            raw={k: res[k] for k in ("round_wall_s", "decode_steps", "new_tokens", "warmup_s")},
            figures={"wall_s": round(res["wall_s"], 5), "new_tokens": n_tok,
                     "tokens_per_s": round(n_tok / res["wall_s"], 2),
                     "decode_step_mean_ms": dec.get("mean_ms"), "decode_step_p90_ms": dec.get("p90_ms")},
            summary=summary, not_traced=_not_traced(events["traced"], profiler, s.device, s.engine),
            pinned_vs_pageable=pinned,
            files=sorted(p.name for p in tmp.iterdir()),
        )
        write_json(tmp / "summary.json", result)
        log.info("Saving profile summary to %s", final / "summary.json")
        _log_findings(result)
        write_manifest(tmp, {"stage": "profile", "variant": final.name, "model": model_slug(s.model),
                             "model_spec": s.model,
                             "settings": asdict(s), "profiler": profiler,
                             "outputs": {"summary": "summary.json", "files": result["files"] + ["summary.json"]},
                             "versions": result["versions"], "timings_s": {**timings,
                                                                           "total_s": time.perf_counter() - t0}})
    log.info("profile finished: %s", final)
    return result


def _nsys_version() -> str | None:
    try:
        return subprocess.run(["nsys", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def _log_findings(r: dict) -> None:
    n = r["summary"]["nvtx"]
    log.info("%d rounds, %.3f s wall, %.1f tokens/s", len(r["raw"]["round_wall_s"]), r["figures"]["wall_s"],
             r["figures"]["tokens_per_s"])
    for name, st in list(n["ranges"].items())[:10]:
        log.info("  %-12s x%-5d total %9.2f ms  mean %8.3f ms  p90 %8.3f ms", name, st["count"], st["total_ms"],
                 st["mean_ms"], st["p90_ms"])
    if "work_ranges_share_of_wall" in n:
        log.info("ranges %s add up to %.1f%% of the measured wall time", "+".join(n["work_ranges"]),
                 100 * n["work_ranges_share_of_wall"])
    k = r["summary"].get("cuda_kernels")
    if k:
        log.info("CUDA: %d kernels, %.2f ms; top: %s", k["kernels"], k["total_ms"], k["by_name"][0]["name"][:80])
    for note in r["not_traced"]:
        log.info("not traced: %s", note)
    p = r["pinned_vs_pageable"]
    if p.get("status") == "measured":
        for case, row in p["cases"].items():
            log.info("pinned vs pageable %s (%d B): GPU %.3f vs %.3f ms (%.2fx)", case, row["bytes"],
                     row["pinned"]["gpu_ms_median"], row["pageable"]["gpu_ms_median"], row["pinned_speedup_gpu"])
    else:
        log.info("pinned vs pageable: %s", p.get("status"))


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_settings(p, ProfileSettings, choices={"profiler": PROFILERS})
    return p


main = cli.main_for(build_parser, ProfileSettings, profile)


if __name__ == "__main__":
    cli.run(main)
