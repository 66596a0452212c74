"""Section "profile": per-op time of ours vs the strongest peer."""

from __future__ import annotations

import torch

from bench.table import fmt_table
from bench.variants import Runner


def profile_ops(args, device, x, y, variants=("ours (folded)", "detectron2 FrozenBN"), precision="bf16"):
    """Where a step's time goes, per aten op, for ours and the strongest peer (torch.profiler, eager).

    On CUDA the time is the GPU time of the kernels each op launched (self device time); on CPU it is
    the op's self CPU time. Calls per step are deterministic and show what each variant runs: e.g. the
    elementwise passes a BN costs, or the bias add a folded conv keeps.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps = max(2, args.steps)
    runners = {name: Runner(name, args, device, precision, False) for name in variants}
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step(x, y)
    per_variant: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    for _ in range(args.rounds):  # interleaved, like the step timings
        for name, runner in runners.items():
            sync()
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    runner.step(x, y)
                sync()
            for event in prof.key_averages():
                spent = event.self_device_time_total if cuda else event.self_cpu_time_total
                if event.key.startswith(("aten::", "lightning_frozenbn::")):  # ours: the tiny-map convolution
                    total = per_variant[name].setdefault(event.key, [0.0, 0.0])
                    total[0] += spent / 1e3 / steps / args.rounds
                    total[1] += event.count / steps / args.rounds
    del runners
    ours, peer = (per_variant[name] for name in variants)
    rows = []
    for op in set(ours) | set(peer):
        (ours_ms, ours_calls), (peer_ms, peer_calls) = ours.get(op, (0.0, 0.0)), peer.get(op, (0.0, 0.0))
        rows.append(
            {"op": op, "ours_ms": ours_ms, "ours_calls": ours_calls, "peer_ms": peer_ms, "peer_calls": peer_calls}
        )
    rows.sort(key=lambda r: -max(r["ours_ms"], r["peer_ms"]))
    return {
        "peer": variants[1],
        "precision": precision,
        "clock": "GPU kernel time" if cuda else "CPU self time",
        "steps": steps,
        "ops": rows,
        "ours_total_ms": sum(t for t, _ in ours.values()),
        "peer_total_ms": sum(t for t, _ in peer.values()),
    }


def run(ctx):
    return profile_ops(ctx.args, ctx.device, ctx.x, ctx.y)


def report(ctx, prof):
    return (
        f"## Per-op {prof['clock']} per step, eager {prof['precision']}: ours vs {prof['peer']} "
        f"(totals {prof['ours_total_ms']:.1f} vs {prof['peer_total_ms']:.1f} ms; top 15 ops)\n"
        + fmt_table(prof["ops"][:15], ["op", "ours_ms", "ours_calls", "peer_ms", "peer_calls"])
    )
