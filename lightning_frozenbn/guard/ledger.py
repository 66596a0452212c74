"""The ledger of guarded tensors: one record per tensor (live tensor, owner, reference, checksum), no Lightning.

Every comparison first looks each tensor up again by its module path and name in the model, so what is
compared is what the forward uses: a tensor replaced by a new object (Lightning's SWA assigns new BN
statistics) or re-parametrised (``torch.nn.utils.prune``, ``torch.nn.utils.parametrize``) is a change.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

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
    ``path`` and ``key`` say where the model holds it (``owner`` is the module at ``path`` when collected):
    ``live`` is re-bound to whatever the model holds there at each comparison.
    """

    live: Tensor
    owner: nn.Module
    is_param: bool
    reference: Tensor
    checksum: list[int]
    path: str = ""
    key: str = ""


def reparametrisation(owner: nn.Module, key: str) -> str | None:
    """How ``owner.<key>`` is computed on the way to the forward, if it was re-parametrised; else None."""
    if parametrize.is_parametrized(owner, key):
        kinds = ", ".join(type(p).__name__ for p in owner.parametrizations[key])
        return (
            f"was re-parametrised by torch.nn.utils.parametrize ({kinds}): the forward computes {key} from "
            f"{key}.original, not from the guarded values"
        )
    if f"{key}_orig" in owner._parameters or f"{key}_orig" in owner._buffers:
        mask = owner._buffers.get(f"{key}_mask")
        masked = f", {int((mask == 0).sum())} of {mask.numel()} elements masked to 0" if mask is not None else ""
        return (
            f"was re-parametrised by torch.nn.utils.prune ({key} = {key}_orig * {key}_mask{masked}): the forward "
            "no longer uses the guarded values"
        )
    return None


def _difference(live: Tensor, ref: Tensor) -> str | None:
    """How ``live`` differs from ``ref`` bit for bit (shape, dtype or elements), or None."""
    if ref.device != live.device:  # at on_fit_end a GPU strategy has moved the model to the CPU
        ref = ref.to(live.device)
    if live.shape != ref.shape or live.dtype != ref.dtype:
        return f"shape/dtype changed {tuple(ref.shape)} {ref.dtype} -> {tuple(live.shape)} {live.dtype}"
    if torch.equal(_bits(live), _bits(ref)):
        return None
    mask = _bits(live) != _bits(ref)  # elements that changed: an unchanged NaN is not a diff
    diff = (live.detach()[mask].double() - ref[mask].double()).abs().nan_to_num(nan=float("inf")).max()
    return f"{int(mask.sum())} of {ref.numel()} elements changed, max |diff| = {diff:.3g}"


class Ledger:
    """Every guarded tensor by name. It answers (what changed, what lies under a name) and acts only when told.

    Built by :meth:`collect` from the frozen roots of a model; :meth:`release` and :meth:`extend` change
    the guarded set deliberately; :meth:`changes` compares bit for bit; :meth:`restore` puts the
    references back.
    """

    def __init__(self, records: dict[str, Record] | None = None, model: nn.Module | None = None) -> None:
        self.records: dict[str, Record] = dict(records or {})
        self.model = model  # where each record is looked up again by name; None: the live tensors as they are

    @classmethod
    def collect(cls, model: nn.Module, roots: dict[str, nn.Module], released: Collection[str] = ()) -> Ledger:
        """The tensors of every module under ``roots`` and the statistics of norm="eval" layers.

        Minus ``released``; each with a reference copy taken now.
        """
        found: dict[str, tuple[Tensor, nn.Module, bool, str, str]] = {}
        for root_name, root in roots.items():
            for sub_name, module in root.named_modules(prefix=root_name):
                own = [(k, t, True) for k, t in module.named_parameters(recurse=False)]
                own += [(k, t, False) for k, t in module.named_buffers(recurse=False)]
                for key, tensor, is_param in own:
                    name = f"{sub_name}.{key}" if sub_name else key
                    if tensor is not None and name not in released:
                        found[name] = (tensor, module, is_param, sub_name, key)
        # norm="eval": trainable affine, but the statistics are frozen too.
        for name, module in model.named_modules():
            if isinstance(module, StatsFrozenBatchNorm2d):
                for key in ("running_mean", "running_var"):
                    if f"{name}.{key}" not in released:
                        found.setdefault(f"{name}.{key}", (getattr(module, key), module, False, name, key))
        sums = fingerprint([t for t, *_ in found.values()]).tolist()
        return cls(
            {
                name: Record(tensor, owner, is_param, tensor.detach().clone(), checksum, path, key)
                for (name, (tensor, owner, is_param, path, key)), checksum in zip(found.items(), sums)
            },
            model,
        )

    # ---- looking up by name ------------------------------------------------------------------
    def current(self, record: Record) -> tuple[Tensor | None, str | None]:
        """The tensor the model holds at the record's name now, or None and why it holds none there."""
        if self.model is None or not record.key:
            return record.live, None
        try:
            owner = self.model.get_submodule(record.path) if record.path else self.model
        except AttributeError:
            return None, f"its module {record.path!r} is no longer in the model"
        tensor = (owner._parameters if record.is_param else owner._buffers).get(record.key)
        if tensor is not None:
            return tensor, None
        kind = "parameter" if record.is_param else "buffer"
        return None, reparametrisation(owner, record.key) or f"is no longer a {kind} of {record.path or 'the model'}"

    def rebind(self) -> tuple[dict[str, str], set[str]]:
        """Point every record at what the model holds at its name now.

        Returns:
            The records the model holds no tensor for (name -> why: re-parametrised, removed), and the names
            whose tensor was replaced by another object. A replacement with the same bits (a device move
            replaces buffers) is no change; one with other values is reported by :meth:`changes`.
        """
        missing, replaced = {}, set()
        for name, record in self.records.items():
            tensor, why = self.current(record)
            if tensor is None:
                missing[name] = why or "is gone"
            elif tensor is not record.live:
                record.live = tensor
                replaced.add(name)
        return missing, replaced

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
        missing, replaced = self.rebind()
        lines = []
        for name, record in self.records.items():
            if name in missing:
                lines.append(f"{name}: {missing[name]}")
                continue
            diff = _difference(record.live, record.reference)
            if diff and name in replaced:
                lines.append(f"{name}: was replaced by a new tensor (values differ: {diff})")
            elif diff:
                lines.append(f"{name}: {diff}")
        lines += [
            f"{name}: requires_grad was switched back on"
            for name, p in self.params.items()
            if p.requires_grad and name not in releasing
        ]
        return lines

    # ---- acting ------------------------------------------------------------------------------
    def unrestorable(self) -> list[str]:
        """One line per tensor :meth:`restore` cannot put back: the model holds none at its name (re-parametrised)."""
        missing, _ = self.rebind()
        return [
            f"{name}: {why}; remove the re-parametrisation from frozen modules (or do not prune them) and rerun"
            for name, why in missing.items()
        ]

    def restore(self) -> None:
        """Copy every reference back into the tensor the model holds at its name; ``requires_grad`` off again.

        A replaced tensor of another shape or dtype is replaced in turn by a copy of the reference. Call
        :meth:`changes` afterwards: it must be empty.
        """
        self.rebind()
        with torch.no_grad():
            for record in self.records.values():
                live, ref = record.live, record.reference
                if live.shape == ref.shape and live.dtype == ref.dtype:
                    live.copy_(ref)
                elif self.model is not None and record.key:
                    owner = self.model.get_submodule(record.path) if record.path else self.model
                    copy = ref.to(live.device, copy=True)
                    if record.is_param:
                        owner._parameters[record.key] = nn.Parameter(copy, requires_grad=False)
                    else:
                        owner._buffers[record.key] = copy
                    record.live = getattr(owner, record.key)
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
