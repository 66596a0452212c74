"""Section "saved": bytes autograd saves for backward in one forward (deterministic)."""

from __future__ import annotations

import torch
from torch import nn

from bench.table import fmt_table
from bench.variants import VARIANTS, make_variant


def saved_bytes(args, device, variants):
    """Bytes of distinct storages autograd saves for backward in one forward pass."""
    rows = []
    x = torch.randn(args.saved_batch, 3, args.saved_size, args.saved_size, device=device)
    for precision in ("fp32", "bf16"):
        for name in variants:
            model, keep_eval = make_variant(name, args.arch, 2)
            model.to(device).train()
            if keep_eval:
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.eval()
            seen: dict[int, int] = {}

            def pack(t, seen=seen):
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = model(x)
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            total = sum(seen.values())
            no_params = sum(n for ptr, n in seen.items() if ptr not in params)
            rows.append(
                {
                    "variant": name,
                    "precision": precision,
                    "saved_mib": total / 2**20,
                    "saved_mib_excl_params": no_params / 2**20,
                    "output_dtype": str(out.dtype),
                }
            )
    return rows


def run(ctx):
    rows = saved_bytes(ctx.args, ctx.device, VARIANTS)
    for row in rows:
        ref = next(r for r in rows if r["variant"] == "torchvision FrozenBN" and r["precision"] == row["precision"])
        row["vs_torchvision"] = row["saved_mib"] / ref["saved_mib"]
    return rows


def report(ctx, rows):
    a = ctx.args
    return (
        f"## Bytes saved for backward in one forward (batch {a.saved_batch}, {a.saved_size} px; deterministic)\n"
        "(saved_mib counts every distinct storage, parameters included, as reference-figures.md does)\n"
        + fmt_table(
            rows, ["variant", "precision", "saved_mib", "vs_torchvision", "saved_mib_excl_params", "output_dtype"]
        )
    )
