"""The checkpoint schema (modules/qmodules.py): for every architecture, straight-through and pNR, 20 updates,
a save and a resumed run of 20 more equal 40 uninterrupted updates bit for bit."""
import pytest
import torch

from .conftest import run, train_args

RUNS = {
    "int4-straight-through": ["transformer_int8", "--quant-bits", 4, "--quant-scheme", "asym", "--quant-act", "input"],
    "binarize-pnr": ["transformer_int8", "--quant-bits", 1, "--optimizer", "pnr_adam", "--pnr-period", 3],
    "bcq-mixed-straight-through": ["transformer_bcq", "--bcq-bits", 2, "--bcq-embed-bits", 3, "--bcq-embed-freq-ratio",
                                   2, "--bcq-rounds", 2],
    "bcq-mixed-pnr": ["transformer_bcq", "--bcq-bits", 3, "--bcq-embed-bits", 3, "--bcq-embed-freq-ratio", 2,
                      "--bcq-rounds", 2, "--optimizer", "pnr_adam", "--pnr-period", 3],
    "bcq-learned-scales": ["transformer_bcq", "--bcq-bits", 3, "--bcq-rounds", 2, "--bcq-learn-scales",
                           "--bcq-research-every", 3],
    "bcq-mixed-learned-scales": ["transformer_bcq", "--bcq-bits", 2, "--bcq-embed-bits", 3, "--bcq-embed-freq-ratio", 2,
                                 "--bcq-layer-bits", "decoder_ffn:1", "--bcq-group-size", 16, "--bcq-rounds", 2,
                                 "--bcq-learn-scales", "--bcq-research-every", 7],
    "int4-learned-step": ["transformer_int8", "--quant-bits", 4, "--quant-learn-scale", "--quant-act", "input"],
    "kmeans-recluster-prune": ["transformer_kmeans", "--quant-bits", 2, "--kmeans-recluster-interval", 5,
                               "--kmeans-iters", 10, "--prune-schedule", "0:0.2,25:0.4"],
    "bsflex-pnr": ["transformer_kmeans", "--quant-method", "bsflex", "--optimizer", "pnr_adam", "--pnr-period", 3],
}


@pytest.mark.parametrize("name", RUNS)
def test_resumed_run_equals_uninterrupted(tiny_data, tmp_path, name):
    arch, *flags = RUNS[name]
    every_20 = ["--save-interval-updates", 20]
    run(train_args(tiny_data / "bin", tmp_path / "once", arch, 40, *every_20, *flags))
    [halfway] = (tmp_path / "once").glob("checkpoint_*_20.pt")
    run(train_args(tiny_data / "bin", tmp_path / "resumed", arch, 40, *every_20, *flags, "--restore-file", halfway))
    once, resumed = (torch.load(tmp_path / d / "checkpoint_last.pt", weights_only=False)
                     for d in ("once", "resumed"))
    assert once["optimizer_history"][-1]["num_updates"] == resumed["optimizer_history"][-1]["num_updates"] == 40
    a, b = once["model"], resumed["model"]
    assert sorted(a) == sorted(b)
    assert any(k.endswith(".wq.code.alpha") or k.endswith(".wq.code.codes") or k.endswith(".wq.code.indices")
               for k in a), "the codes are saved"
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert differ == [], f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
