"""The checkpoint schema in-process: fairseq-qpack's packing reads the saved codes (no search) and gives the
packed tensors of the search path bit for bit; checkpoints without codes (the 0.2 release's) still pack through
the search; a plain transformer or another method's architecture drops the quantizer entries with one line."""
import logging

import pytest
import torch

import fairseq_qplugin.modules.kmeans as kmeans_modules
import fairseq_qplugin.modules.qmodules as qmodules
from fairseq_qplugin.commands import install_state_filter
from fairseq_qplugin.modules.qmodules import is_schema_key
from fairseq_qplugin.pack.cli import pack_model

from .test_bcq_model import batch, build, dict_dir  # noqa: F401  (dict_dir is a fixture; 128-wide rows)

METHODS = {
    "int4": ("transformer_int8", "--quant-bits", 4, "--quant-scheme", "asym"),
    "binarize": ("transformer_int8", "--quant-bits", 1),
    "bcq": ("transformer_bcq", "--bcq-bits", 3),
    "bcq-frequency-rows": ("transformer_bcq", "--bcq-bits", 2, "--bcq-embed-bits", 3, "--bcq-embed-freq-ratio", 2,
                           "--share-decoder-input-output-embed"),
    "kmeans-pruned": ("transformer_kmeans", "--quant-bits", 3, "--prune-schedule", 0.3, "--kmeans-iters", 10),
    "bsflex": ("transformer_kmeans", "--quant-method", "bsflex"),
    "pruning": ("transformer_kmeans", "--quant-method", "none", "--prune-schedule", 0.5),
    "bcq-learned-scales": ("transformer_bcq", "--bcq-bits", 3, "--bcq-embed-freq-ratio", 2, "--bcq-learn-scales"),
    "int4-learned-step": ("transformer_int8", "--quant-bits", 4, "--quant-learn-scale"),
}


def trained(arch, *flags):
    """A model after two straight-through updates (its latent weights differ from the quantized ones)."""
    model, _, _ = build(dict_dir_path, *flags, arch=arch)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for update in range(2):
        model.set_num_updates(update)
        model(*batch(update))[0].logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(autouse=True)
def _dicts(dict_dir):
    global dict_dir_path
    dict_dir_path = dict_dir


def unpacked_state(model):
    """The k-means indices and masks as checkpoints saved them before they were saved only in the code: unpacked."""
    return {f"{name}.wq.{n}": getattr(m.wq, n).clone() for name, m in model.named_modules() if hasattr(m, "wq")
            for n in getattr(m.wq, "code_state", ()) if getattr(m.wq, n) is not None}


class Searches:
    """Counts the searches of the codes: quantization, per-row BCQ, k-means and BS-Flex clustering."""

    def __init__(self, monkeypatch):
        self.calls = []
        for module, name in [(qmodules, "quantize"), (qmodules, "quantize_bcq_rows"),
                             (kmeans_modules, "kmeans_weight"), (kmeans_modules, "bsflex_init")]:
            original = getattr(module, name)
            monkeypatch.setattr(module, name, self.counting(name, original))

    def counting(self, name, original):
        def call(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)
        return call


@pytest.mark.parametrize("method", METHODS)
def test_packing_reads_the_saved_codes_and_equals_the_search_path(method, monkeypatch):
    arch, *flags = METHODS[method]
    state = trained(arch, *flags).state_dict()
    assert any(k.endswith(".wq.latent") for k in state)
    assert any(".wq.code." in k for k in state) == (method != "pruning")  # pruned float weights have no code
    for key in [k for k in state if k.endswith((".wq.code.planes", ".wq.code.codes", ".wq.code.indices"))]:
        assert state[key].dtype == torch.uint8  # bit-packed as in the packed file, not bool planes
    model, _, _ = build(dict_dir_path, *flags, arch=arch)
    model.load_state_dict(state)
    searches = Searches(monkeypatch)
    layout, packed, _ = pack_model(model.eval())
    assert searches.calls == []
    release, _, _ = build(dict_dir_path, *flags, arch=arch)  # a checkpoint of the 0.2 release: no codes, no latent
    release.load_state_dict({**{k: v for k, v in state.items() if not is_schema_key(k)}, **unpacked_state(model)})
    layout_searched, searched, _ = pack_model(release.eval())
    assert (searches.calls != []) == (method in ("int4", "binarize", "bcq", "bcq-frequency-rows"))
    assert layout == layout_searched and sorted(packed) == sorted(searched)
    differ = [k for k in packed if packed[k].dtype != searched[k].dtype or not torch.equal(packed[k], searched[k])]
    assert differ == []
    model.eval()
    src, lengths, prev = batch(5)
    with torch.no_grad():
        assert torch.equal(model(src, lengths, prev)[0], release(src, lengths, prev)[0])


@pytest.mark.parametrize("arch,flags", [("transformer", ()), ("transformer_kmeans", ("--quant-bits", 2)),
                                        ("transformer_bcq", ("--bcq-bits", 2))])
def test_a_plain_or_another_methods_model_drops_the_quantizer_entries(arch, flags, caplog):
    install_state_filter()
    source = trained(*METHODS["bcq-frequency-rows"])
    state = source.state_dict()
    model, _, _ = build(dict_dir_path, "--share-decoder-input-output-embed", *flags, arch=arch)
    with caplog.at_level(logging.INFO):
        model.load_state_dict(state)
    lines = [r.getMessage() for r in caplog.records if "quantizer entries" in r.getMessage()]
    assert len(lines) == 1 and "dropped its" in lines[0], lines
    params = dict(model.named_parameters())
    for name in ("decoder.embed_tokens.weight", "decoder.layers.0.fc1.weight"):
        view, latent = state[name], state[name[:-len("weight")] + "wq.latent"]
        same_quantizer = arch == "transformer_bcq" and "fc1" in name  # 2-bit BCQ: its own code and latent weight
        assert torch.equal(params[name], latent if same_quantizer else view) and not torch.equal(view, latent)


@pytest.mark.parametrize("arch,flags", [(METHODS["kmeans-pruned"][0], METHODS["kmeans-pruned"][1:]),
                                        ("transformer_kmeans", ("--quant-method", "bsflex", "--prune-schedule", 0.2))],
                         ids=["kmeans", "bsflex"])
def test_kmeans_indices_and_masks_are_saved_once_and_old_checkpoints_load(arch, flags):
    """The indices and masks live only in the bit-packed ``wq.code.*``; a checkpoint that also holds them unpacked
    (``wq.indices`` / ``wq.mask``, as saved before) loads to the same model."""
    source = trained(arch, *flags)
    state = source.state_dict()
    quantizers = {name: m.wq for name, m in source.named_modules() if hasattr(m, "wq")}
    assert not any(k.endswith((".wq.indices", ".wq.mask")) for k in state)
    assert all(f"{name}.wq.code.mask" in state for name in quantizers)  # every weight is pruned
    old = {**state, **unpacked_state(source)}
    src, lengths, prev = batch(5)
    with torch.no_grad():
        expected = source(src, lengths, prev)[0]
    for saved in (state, old):
        model, _, _ = build(dict_dir_path, *flags, arch=arch)
        model.load_state_dict(saved)
        loaded = {name: m.wq for name, m in model.named_modules() if hasattr(m, "wq")}
        for name, wq in quantizers.items():
            for n in ("mask", "indices", "centroids", "centroid_delta"):
                if hasattr(wq, n):
                    assert torch.equal(getattr(loaded[name], n), getattr(wq, n)), (name, n)
        with torch.no_grad():
            assert torch.equal(model.eval()(src, lengths, prev)[0], expected)
