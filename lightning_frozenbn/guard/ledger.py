"""The ledger of guarded tensors: one record per tensor (live tensor, owner, reference, checksum), no Lightning."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_frozenbn.guard.discovery import under
from lightning_frozenbn.norm import StatsFrozenBatchNorm2d

__all__ = ["Ledger", "Record", "fingerprint"]

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: Tensor) -> Tensor:
    """The tensor's raw bits as integers, so that -0.0 != 0.0 and NaN == NaN (same bits)."""
    t = t.detach()
    if t.is_floating_point():
        return t.view(_SAME_SIZE_INT[t.element_size()])
    return t


def fingerprint(tensors: list[Tensor]) -> Tensor:
    """Two int64 checksums per tensor (bit sum and position-weighted bit sum), shape ``(len, 2)``.

    Integer arithmetic wraps deterministically, so the value is the same on every device and rank.
    Any single flipped bit changes the bit sum (by ``2**k``, never a multiple of ``2**64``); the
    weighted sum also catches most swaps of elements. Used for the cross-rank check and the checkpoint.
    """
    if not tensors:
        return torch.zeros(0, 2, dtype=torch.int64)
    rows = []
    for t in tensors:
        bits = _bits(t).reshape(-1).to(torch.int64)
        weights = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
        rows.append(torch.stack([bits.sum(), (bits * weights).sum()]))
    return torch.stack(rows)


@dataclass
class Record:
    """One guarded tensor: the live tensor, its owner, its exact reference copy, the original checksum.

    The checksum is that of the *original* reference: the first fit's, carried through checkpoints.
    """

    live: Tensor
    owner: nn.Module
    is_param: bool
    reference: Tensor
    checksum: list[int]


class Ledger:
    """Every guarded tensor by name. It answers (what changed, what lies under a name) and acts only when told.

    Built by :meth:`collect` from the frozen roots of a model; :meth:`release` and :meth:`extend` change
    the guarded set deliberately; :meth:`changes` compares bit for bit; :meth:`restore` puts the
    references back.
    """

    def __init__(self, records: dict[str, Record] | None = None) -> None:
        self.records: dict[str, Record] = dict(records or {})

    @classmethod
    def collect(cls, model: nn.Module, roots: dict[str, nn.Module], released: Collection[str] = ()) -> Ledger:
        """The tensors of every module under ``roots`` and the statistics of norm="eval" layers.

        Minus ``released``; each with a reference copy taken now.
        """
        found: dict[str, tuple[Tensor, nn.Module, bool]] = {}
        for root_name, root in roots.items():
            for sub_name, module in root.named_modules(prefix=root_name):
                own = [(k, t, True) for k, t in module.named_parameters(recurse=False)]
                own += [(k, t, False) for k, t in module.named_buffers(recurse=False)]
                for key, tensor, is_param in own:
                    name = f"{sub_name}.{key}" if sub_name else key
                    if tensor is not None and name not in released:
                        found[name] = (tensor, module, is_param)
        # norm="eval": trainable affine, but the statistics are frozen too.
        for name, module in model.named_modules():
            if isinstance(module, StatsFrozenBatchNorm2d):
                for key in ("running_mean", "running_var"):
                    if f"{name}.{key}" not in released:
                        found.setdefault(f"{name}.{key}", (getattr(module, key), module, False))
        sums = fingerprint([t for t, _, _ in found.values()]).tolist()
        return cls(
            {
                name: Record(tensor, owner, is_param, tensor.detach().clone(), checksum)
                for (name, (tensor, owner, is_param)), checksum in zip(found.items(), sums)
            }
        )

    # ---- reading -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The guarded tensors' names, in collection order."""
        return list(self.records)

    @property
    def params(self) -> dict[str, Tensor]:
        """The guarded parameters (their ``requires_grad`` is part of the frozen state)."""
        return {n: r.live for n, r in self.records.items() if r.is_param}

    def live(self) -> list[Tensor]:
        """The live tensors, in :attr:`names` order."""
        return [r.live for r in self.records.values()]

    def checksums(self) -> dict[str, list[int]]:
        """The checksum of each tensor's original reference (what the checkpoint stores)."""
        return {n: list(r.checksum) for n, r in self.records.items()}

    def select(self, prefix: str) -> list[str]:
        """The guarded tensors named ``prefix`` or lying under it."""
        return [n for n in self.records if under(n, prefix)]

    def prefixes(self) -> list[str]:
        """Every module and tensor name that :meth:`select` would match something for."""
        return sorted({".".join(n.split(".")[:i]) for n in self.records for i in range(1, n.count(".") + 2)})

    def changes(self, releasing: Collection[str] = ()) -> list[str]:
        """One line per tensor that differs from its reference (bits, shape or dtype).

        And one per parameter whose ``requires_grad`` was switched back on (except those being released
        right now).
        """
        lines = []
        for name, record in self.records.items():
            live, ref = record.live, record.reference
            if ref.device != live.device:  # at on_fit_end a GPU strategy has moved the model to the CPU
                ref = ref.to(live.device)
            if live.shape != ref.shape or live.dtype != ref.dtype:
                lines.append(
                    f"{name}: shape/dtype changed {tuple(ref.shape)} {ref.dtype} -> {tuple(live.shape)} {live.dtype}"
                )
            elif not torch.equal(_bits(live), _bits(ref)):
                mask = _bits(live) != _bits(ref)  # elements that changed: an unchanged NaN is not a diff
                diff = (live.detach()[mask].double() - ref[mask].double()).abs().nan_to_num(nan=float("inf")).max()
                lines.append(f"{name}: {int(mask.sum())} of {ref.numel()} elements changed, max |diff| = {diff:.3g}")
        lines += [
            f"{name}: requires_grad was switched back on"
            for name, p in self.params.items()
            if p.requires_grad and name not in releasing
        ]
        return lines

    # ---- acting ------------------------------------------------------------------------------
    def restore(self) -> None:
        """Copy every reference back into its live tensor and switch ``requires_grad`` off again."""
        with torch.no_grad():
            for record in self.records.values():
                record.live.copy_(record.reference)
                if record.is_param:
                    record.live.requires_grad_(False)

    def adopt_live_as_reference(self) -> None:
        """After the ranks were made equal (rank 0's values broadcast), the live values are the reference."""
        with torch.no_grad():
            for record in self.records.values():
                record.reference.copy_(record.live)

    def release(self, names: Iterable[str]) -> None:
        """Stop guarding ``names``."""
        for name in names:
            self.records.pop(name, None)

    def extend(self, other: Ledger) -> list[str]:
        """Guard the tensors of ``other`` that are not guarded yet (their reference taken by ``other``)."""
        added = [n for n in other.records if n not in self.records]
        self.records.update({n: other.records[n] for n in added})
        return added

    def buffers_of_released_owners(self, released: Collection[str]) -> list[str]:
        """The buffers (BN statistics) of layers whose guarded parameters are all in ``released``.

        Such a layer trains as a whole, so its statistics go with it.
        """
        out = []
        for name, record in self.records.items():
            if record.is_param:
                continue
            owned = [n for n, r in self.records.items() if r.owner is record.owner and r.is_param]
            if owned and all(n in released for n in owned):
                out.append(name)
        return out

    def compare_with_checkpoint(
        self, stored: dict[str, list[int]], before_load: dict[str, Tensor]
    ) -> tuple[list[str], list[str]]:
        """Compare the resumed tensors with the checksums of the first fit's reference (``stored``).

        A tensor that differs gets its original values back as the reference when the model as built
        before the checkpoint was loaded (``before_load``) still holds them (same checksum): then the
        usual comparison reports it element by element and a restore really restores it. Otherwise the
        original values exist nowhere (the checkpoint keeps checksums, not values).

        Returns:
            The problem lines, and the names whose original values cannot be restored.
        """
        gone = [n for n in stored if n not in self.records]
        problems = [f"{n}: in the checkpoint's frozen reference but no longer frozen" for n in gone]
        unrecoverable = []
        for name, record in self.records.items():
            original = stored.get(name)
            if original is None or list(record.checksum) == list(original):
                continue
            built = before_load.get(name)
            record.checksum = list(original)  # later checkpoints keep comparing with the first fit's state
            if built is not None and fingerprint([built])[0].tolist() == list(original):
                record.reference = built.to(record.reference.device)
                continue
            unrecoverable.append(name)
            problems.append(
                f"{name}: differs from the original frozen reference stored in the checkpoint (checksum); the "
                "checkpoint keeps checksums, not values, and the model as built before loading it does not hold "
                "the original values either, so they cannot be restored"
            )
        return problems, unrecoverable
