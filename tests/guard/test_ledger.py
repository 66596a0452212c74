"""The guard's parts without a Trainer: the ledger, discovery and eval forcing, consensus at world size 1,
the BaseFinetuning split."""

import torch
from torch import nn

from lightning_frozenbn.guard import Ledger, eval_subtrees, find_frozen_modules, fingerprint
from lightning_frozenbn.guard.consensus import Consensus
from lightning_frozenbn.guard.eval_mode import EvalForcing
from lightning_frozenbn.guard.finetuning import split_unfrozen


def model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    m[0].requires_grad_(False), m[1].requires_grad_(False)
    with torch.no_grad():
        m[1].running_mean.normal_(), m[1].running_var.uniform_(0.5, 1.5)
    return m


def ledger_of(m):
    return Ledger.collect(m, find_frozen_modules(m))


def test_collect_takes_exact_copies_and_changes_are_compared_bit_for_bit():
    m = model()
    ledger = ledger_of(m)
    assert ledger.names == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"] + [
        "1.num_batches_tracked"
    ]
    assert list(ledger.params) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert ledger.records["0.weight"].reference is not m[0].weight  # cloned, not shared
    assert ledger.checksums()["0.weight"] == fingerprint([m[0].weight]).tolist()[0]
    assert ledger.changes() == []
    with torch.no_grad():
        m[1].running_var[2] = m[1].running_var[2].nextafter(torch.tensor(2.0))  # one ulp
        m[0].bias.view(torch.int32)[0] ^= 1  # one bit
    m[1].weight.requires_grad_(True)
    lines = ledger.changes()
    assert lines[0].startswith("0.bias: 1 of 4 elements changed") and lines[1].startswith("1.running_var: 1 of 4")
    assert lines[2] == "1.weight: requires_grad was switched back on"
    assert ledger.changes(releasing={"1.weight"}) == lines[:2]
    ledger.restore()
    assert ledger.changes() == [] and not m[1].weight.requires_grad


def test_signed_zero_and_nan_are_bits():
    holder = nn.Module()
    holder.register_buffer("x", torch.tensor([0.0, float("nan")]))
    ledger = Ledger.collect(holder, {"": holder})
    assert ledger.changes() == []  # NaN == NaN by bits
    holder.x[0] = -0.0
    assert ledger.changes() == ["x: 1 of 2 elements changed, max |diff| = 0"]


def test_select_release_extend_and_the_buffers_that_go_with_their_layer():
    m = model()
    ledger = ledger_of(m)
    assert ledger.select("1") == [n for n in ledger.names if n.startswith("1.")] and ledger.select("0.bias") == [
        "0.bias"
    ]
    assert "1" in ledger.prefixes() and "1.running_mean" in ledger.prefixes()
    assert ledger.buffers_of_released_owners({"1.weight"}) == []  # 1.bias still held
    assert ledger.buffers_of_released_owners({"1.weight", "1.bias"}) == [
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    ]
    ledger.release(ledger.select("1"))
    assert ledger.names == ["0.weight", "0.bias"]
    assert ledger.extend(ledger_of(m)) == [n for n in ledger_of(m).names if n.startswith("1.")]


def test_a_checkpoint_mismatch_restores_from_the_values_before_loading_or_says_they_are_gone():
    m = model()
    original = ledger_of(m)
    stored, built = original.checksums(), {n: r.reference for n, r in original.records.items()}
    with torch.no_grad():
        m[0].weight.add_(1e-3)  # the resumed weights differ from the first fit's
    resumed = ledger_of(m)
    problems, unrecoverable = resumed.compare_with_checkpoint(stored, built)
    assert problems == [] and unrecoverable == []  # the built values match the stored checksum: the reference
    assert resumed.changes()[0].startswith("0.weight: 108 of 108 elements changed")
    resumed = ledger_of(m)
    problems, unrecoverable = resumed.compare_with_checkpoint(stored, {})
    assert unrecoverable == ["0.weight"] and "cannot be restored" in problems[0]
    assert resumed.checksums()["0.weight"] == stored["0.weight"]  # later checkpoints keep the first fit's
    problems, _ = ledger_of(model()).compare_with_checkpoint({**stored, "gone.weight": [1, 2]}, built)
    assert problems == ["gone.weight: in the checkpoint's frozen reference but no longer frozen"]


def test_eval_forcing_sets_hooks_and_frees_what_leaves_the_set():
    m = model()
    forcing = EvalForcing()
    guarded = set(ledger_of(m).names)
    forcing.set(eval_subtrees(m, guarded), mode=True)
    assert list(forcing.roots) == ["0", "1"]
    assert forcing.apply() and not m[1].training and m[2].training  # the Dropout beside trainable layers trains
    forcing.install_hooks()
    assert forcing.hooked == [m[0], m[1]]  # every module of a frozen subtree, not only BN/Dropout
    m.train()
    m(torch.randn(1, 3, 9, 9))
    assert not m[1].training  # the pre-hook put it back
    forcing.set(eval_subtrees(m, {n for n in guarded if not n.startswith("1.")}), mode=True)
    assert m[1].training and not m[1]._forward_pre_hooks and forcing.hooked == [m[0]]
    forcing.remove_hooks()


def test_consensus_at_world_size_one_is_local():
    from lightning.pytorch.strategies import SingleDeviceStrategy

    ranks = Consensus(SingleDeviceStrategy(device=torch.device("cpu")), rank=0, world_size=1)
    assert ranks.all_agree(True) and not ranks.all_agree(False)
    assert ranks.gather_objects(("x", 1)) == [("x", 1)]
    assert ranks.diverged(["a"], torch.zeros(1, 2, dtype=torch.int64)) == []
    ranks.check_same_names(["a"], "guarded")  # nothing to disagree with


def test_basefinetuning_split_releases_what_an_optimizer_got_and_holds_the_rest():
    m = model()
    ledger = ledger_of(m)
    m[1].requires_grad_(True)  # unfrozen; only the weight given to an optimizer
    m[0].weight.requires_grad_(True)
    optimizer = torch.optim.SGD([m[1].weight, m[0].weight, *m[3].parameters()], lr=0.1)
    released, held = split_unfrozen(ledger, [optimizer])
    assert released == ["0.weight", "1.weight"] and held == ["1.bias"]
    optimizer.add_param_group({"params": [m[1].bias]})
    released, held = split_unfrozen(ledger, [optimizer])
    assert released[:3] == ["0.weight", "1.weight", "1.bias"] and "1.running_var" in released and held == []
