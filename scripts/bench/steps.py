"""Section "steps": step time and peak memory per variant, eager and compiled, interleaved."""

from __future__ import annotations

import statistics

import torch

from bench.table import fmt_table
from bench.variants import EPILOGUE_OFF, VARIANTS, Runner


def bench_steps(args, device, x, y, precision, compiled, variants):
    runners, failed = [], []
    for v in variants:
        try:
            runner = Runner(v, args, device, precision, compiled)
            for _ in range(args.warmup):  # warm-up (and compilation)
                runner.step(x, y)
            runners.append(runner)
        except Exception as err:  # only the epilogue-off comparison may fail: report it, keep the baselines
            if v != EPILOGUE_OFF:
                raise
            failed.append({"variant": v, "precision": precision, "compiled": compiled, "error": repr(err)[:300]})
    for _ in range(args.rounds):
        for r in runners:
            r.timed_steps(x, y, args.steps)
    rows = []
    ours = statistics.median(runners[0].times)
    for r in runners:
        med = statistics.median(r.times)
        rows.append(
            {
                "variant": r.name,
                "precision": precision,
                "compiled": compiled,
                "ms_per_step": med * 1e3,
                "img_per_s": x.shape[0] / med,
                "peak_gib": r.peak_bytes / 2**30 if device.type == "cuda" else None,
                "ours_over_this": ours / med,
                "steps": len(r.times),
            }
        )
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows + failed


COLUMNS = ["variant", "precision", "compiled", "ms_per_step", "img_per_s", "peak_gib", "ours_over_this", "steps"]


def run(ctx):
    """Eager step times, every precision; ours with the fused epilogue off too where asked for."""
    a = ctx.args
    rows = []
    for precision in a.precisions.split(","):
        rows += bench_steps(a, ctx.device, ctx.x, ctx.y, precision, False, VARIANTS + [EPILOGUE_OFF] * a.epilogue_off)
    return rows


def report(ctx, rows):
    failed = [f"{r['variant']} ({r['precision']}) failed: {r['error']}" for r in rows if "error" in r]
    title = "## Step time (median of interleaved steps) and peak memory; ours_over_this < 1 means ours is faster"
    return "\n".join([title, fmt_table(rows, COLUMNS), *failed])


def run_compiled(ctx):
    """bf16 under torch.compile (last: compilation takes minutes); appended to the step rows."""
    return bench_steps(ctx.args, ctx.device, ctx.x, ctx.y, "bf16", True, ctx.args.compile_variants.split(","))


def report_compiled(ctx, rows):
    return "## torch.compile, bf16 (median of interleaved steps)\n" + fmt_table(rows, COLUMNS)
