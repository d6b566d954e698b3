"""Reliability probes: what a careful user tries gets one clear error or the right result, never a
traceback, a silently changed model or lost data.

A table of bad flags with their one-line errors; seeded random bit flips and truncations of a small
packed file (each refused with one line, or loading to a model with bit-identical outputs);
non-finite, empty and fp16 weights; path errors; crafted pickles; the console scripts' exit codes.
The counts of the damaged-file probes are logged (``pytest -s`` or ``--log-cli-level INFO``).
"""
import logging
import os
import random
from pathlib import Path

import pytest
import torch

import fairseq_qplugin  # (architectures, allow-list)
from fairseq_qplugin.errors import _find_config_error
from fairseq_qplugin.models.transformer_bcq import parse_layer_bits
from fairseq_qplugin.quant import PruneSchedule, QuantSpec, quantize

from .conftest import PLUGIN, TINY_MODEL, run

fairseq_qplugin.install_command_hooks()  # load files as fairseq-generate loads them (the packed-file checks)
logger = logging.getLogger(__name__)
METHODS = [QuantSpec("int", 4), QuantSpec("int", 4, scheme="asym"), QuantSpec("bcq", 3), QuantSpec("kmeans", 2),
           QuantSpec("int", 1)]


def one_line_error(fn, *args, **kwargs) -> str:
    """The message of the QuantConfigError ``fn`` raises (directly or as the cause); fails on anything else."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        err = _find_config_error(e)
        assert err is not None, f"{type(e).__name__} instead of a clear error: {e}"
        assert "\n" not in str(err), str(err)
        return str(err)
    raise AssertionError(f"{fn.__name__}{args} raised no error")


# ---- quantizer inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", METHODS, ids=lambda s: f"{s.method}{s.bits}{s.scheme}")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_refuses_non_finite_rows(spec, bad):
    w = torch.randn(6, 8)
    w[4, 1] = bad
    w[5, 0] = bad
    assert one_line_error(quantize, w, spec, name="enc.fc1.weight") == (
        f"enc.fc1.weight: row 4 of (6, 8) holds {bad} (2 such row(s)); quantize only finite weights "
        "(the training diverged?)")


@pytest.mark.parametrize("spec", METHODS, ids=lambda s: f"{s.method}{s.bits}{s.scheme}")
@pytest.mark.parametrize("shape", [(0, 8), (8, 0)])
def test_quantize_refuses_an_empty_matrix(spec, shape):
    assert one_line_error(quantize, torch.empty(shape), spec) == f"weight: cannot quantize an empty weight of shape {shape}"


@pytest.mark.parametrize("spec", METHODS, ids=lambda s: f"{s.method}{s.bits}{s.scheme}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_has_the_input_dtype(spec, dtype):
    w = torch.randn(6, 16).to(dtype)
    got = quantize(w, spec).dequantize()
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.equal(got, quantize(w.float(), spec).dequantize().to(dtype))


@pytest.mark.parametrize("parse,text,message", [
    (parse_layer_bits, ",,", "--bcq-layer-bits ',,': empty entry; write PART:BITS pairs separated by single commas, "
                             "e.g. 'decoder_ffn:1,encoder_ffn:4'"),
    (parse_layer_bits, "decoder_ffn:1,", "--bcq-layer-bits 'decoder_ffn:1,': empty entry; write PART:BITS pairs "
                                         "separated by single commas, e.g. 'decoder_ffn:1,encoder_ffn:4'"),
    (PruneSchedule.parse, "0:0.3,,10:0.5", "--prune-schedule '0:0.3,,10:0.5': empty entry; write a sparsity such as "
                                           "'0.5' or update:sparsity pairs separated by single commas, such as "
                                           "'0:0.3,4000:0.5'"),
])
def test_empty_list_entries_are_errors(parse, text, message):
    assert one_line_error(parse, text) == message
    assert parse("") in (None, []) and parse("  ") in (None, [])  # unset still means "none"


# ---- bad flags: one line each, before any work -----------------------------------------------------

BAD_FLAGS = [
    ("transformer_int8", ["--attn-temperature", "nan"],
     "--attn-temperature must be a finite number > 0 (1 = plain attention), got nan"),
    ("transformer_int8", ["--attn-temperature", "inf"],
     "--attn-temperature must be a finite number > 0 (1 = plain attention), got inf"),
    ("transformer_int8", ["--attn-temperature", "0"],
     "--attn-temperature must be a finite number > 0 (1 = plain attention), got 0.0"),
    ("transformer_int8", ["--quant-bits", "9"],
     "--quant-bits 9: int quantization takes 1 to 8 bits, got 9; use 1 (binarize) or 2-8"),
    ("transformer_int8", ["--quant-act", "input", "--quant-act-bits", "1"],
     "--quant-act-bits must be 2-8 for --quant-act input, got 1"),
    ("transformer_bcq", ["--bcq-layer-bits", ",,"],
     "--bcq-layer-bits ',,': empty entry; write PART:BITS pairs separated by single commas, "
     "e.g. 'decoder_ffn:1,encoder_ffn:4'"),
    ("transformer_bcq", ["--bcq-layer-bits", "decoder_ffn:5"],
     "--bcq-layer-bits 'decoder_ffn:5': BCQ takes 1 to 4 bits per weight, got 5"),
    ("transformer_bcq", ["--bcq-embed-freq-ratio", "0"],
     "--bcq-embed-freq-ratio must be > 0 (the ratio of successive group sizes), got 0.0"),
    ("transformer_kmeans", ["--prune-schedule", "0:0.3,,10:0.5"],
     "--prune-schedule '0:0.3,,10:0.5': empty entry; write a sparsity such as '0.5' or update:sparsity pairs "
     "separated by single commas, such as '0:0.3,4000:0.5'"),
    ("transformer_int8", ["--quant-act-bits", "4"],
     "--quant-act-bits 4 applies with --quant-act input or output only; leave --quant-act-bits out"),
    ("transformer_bcq", ["--bcq-search", "greedy", "--bcq-rounds", "3"],
     "--bcq-rounds 3 applies to --bcq-search alternating only; leave --bcq-rounds out"),
    ("transformer_kmeans", ["--quant-method", "bsflex", "--kmeans-iters", "20"],
     "--kmeans-iters 20 applies to --quant-method kmeans only; leave --kmeans-iters out"),
    ("transformer_kmeans", ["--prune-schedule", "0:0.5,10:0.3"],
     "--prune-schedule '0:0.5,10:0.3': updates must increase and sparsities must not decrease (pruned weights "
     "stay pruned)"),
]


@pytest.mark.parametrize("arch,flags,message", BAD_FLAGS, ids=[" ".join(f) for _, f, _ in BAD_FLAGS])
def test_bad_flags_give_one_line_errors(tmp_path, arch, flags, message):
    """fairseq parses the flags and fills the architecture (where the plugin validates) before it
    loads data or builds anything: the same call fairseq-train makes first."""
    from fairseq import options

    argv = [str(tmp_path), "--user-dir", str(PLUGIN), "--arch", arch, *map(str, TINY_MODEL), *flags]
    assert one_line_error(options.parse_args_and_arch, options.get_training_parser(), argv) == message


# ---- a small packed file ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packed(tiny_data, fp32_checkpoint, tmp_path_factory):
    """A 4-bit PTQ packed file of the tiny model, its task, and the reference outputs on a fixed batch."""
    from fairseq import checkpoint_utils
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    from fairseq_qplugin.pack.cli import main

    path = tmp_path_factory.mktemp("probes") / "packed.pt"
    main([str(fp32_checkpoint), str(path), "--method", "int", "--bits", "4"])
    task = TranslationTask.setup_task(TranslationConfig(data=str(tiny_data / "bin"), source_lang="en", target_lang="de"))
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(4, len(task.source_dictionary), (3, 9), generator=g), torch.full((3,), 9),
             torch.randint(4, len(task.target_dictionary), (3, 7), generator=g))

    def outputs(p):
        [model], _ = checkpoint_utils.load_model_ensemble([str(p)], task=task)
        with torch.no_grad():
            return model.eval()(*batch)[0]

    return path, outputs, outputs(path)


def probe(path, outputs, reference, counts, failures, what):
    """Load ``path`` as fairseq-generate does: it must be refused with one line or give ``reference``."""
    counts["tried"] += 1
    try:
        out = outputs(path)
    except Exception as e:  # noqa: BLE001
        err = _find_config_error(e)
        if err is not None and "\n" not in str(err):
            counts["refused"] += 1
        else:
            failures.append(f"{what}: {type(e).__name__}: {str(e)[:300]}")
        return
    if torch.equal(out, reference):
        counts["identical"] += 1
    else:
        failures.append(f"{what}: loaded with other outputs (max diff {(out - reference).abs().max()})")


def test_bit_flips_and_truncations_are_refused_or_harmless(packed, tmp_path):
    path, outputs, reference = packed
    data = path.read_bytes()
    rng = random.Random(0)
    damaged = tmp_path / "damaged.pt"
    failures = []
    flips = {"tried": 0, "refused": 0, "identical": 0}
    for i in range(240):
        bit = rng.randrange(8 * len(data))
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        damaged.write_bytes(bytes(flipped))
        probe(damaged, outputs, reference, flips, failures, f"flip of bit {bit % 8} of byte {bit // 8}")
    cuts = {"tried": 0, "refused": 0, "identical": 0}
    for size in [0, 1, *sorted(rng.sample(range(2, len(data)), 17)), len(data) - 1]:
        damaged.write_bytes(data[:size])
        probe(damaged, outputs, reference, cuts, failures, f"truncation to {size} of {len(data)} bytes")
    logger.info("packed file of %d bytes: bit flips %s; truncations %s", len(data), flips, cuts)
    print(f"\nprobes on a {len(data)}-byte packed file: bit flips {flips}; truncations {cuts}")
    assert failures == []
    assert flips["tried"] == 240 and cuts["tried"] == 20 and cuts["refused"] == 20
    assert flips["refused"] >= 120  # most bytes are checksummed: tensors, config and header


def test_damaged_config_and_layout_are_refused(packed, tmp_path):
    """The layout JSON and the config are covered by the checksum (a changed one would build another model)."""
    path, outputs, _ = packed
    state = torch.load(path, weights_only=True)
    for key, value in [("qpack_layout", state["cfg"]["model"]["qpack_layout"].replace('"bits": 4', '"bits": 3', 1)),
                       ("encoder_layers", 2), ("int8_kernel", "dequant"), ("encoder_embed_dim", 16)]:
        bad = {**state, "cfg": {**state["cfg"], "model": {**state["cfg"]["model"], key: value}}}
        torch.save(bad, tmp_path / "bad.pt")
        assert one_line_error(outputs, tmp_path / "bad.pt") == (
            f"{tmp_path / 'bad.pt'}: the packed checkpoint's config or header does not match its checksum: "
            "the file is corrupted")
    no_header = {k: v for k, v in state.items() if k != "qpack"}
    torch.save(no_header, tmp_path / "no_header.pt")
    assert "has no packed header" in one_line_error(outputs, tmp_path / "no_header.pt")


def test_model_overrides_still_apply(packed, tiny_data):
    """--model-overrides replaces config values after loading: they are not a damaged config."""
    from fairseq import checkpoint_utils

    path, _, _ = packed
    [model], _ = checkpoint_utils.load_model_ensemble([str(path)], arg_overrides={"int8_kernel": "dequant",
                                                                                   "data": str(tiny_data / "bin")})
    assert model is not None


def test_format_v1_files_still_load(packed, tmp_path, caplog):
    path, outputs, reference = packed
    state = torch.load(path, weights_only=True)
    header = {k: v for k, v in state["qpack"].items() if k not in ("header_sha256", "config")}
    torch.save({**state, "qpack": {**header, "version": 1}}, tmp_path / "v1.pt")
    with caplog.at_level(logging.WARNING):
        assert torch.equal(outputs(tmp_path / "v1.pt"), reference)
    assert "packed by an older fairseq-qpack (format v1): its config is not checksummed" in caplog.text


# ---- qpack: paths, non-finite weights, atomic writes -------------------------------------------------

def qpack_error(*argv) -> str:
    from fairseq_qplugin.pack.cli import main

    return one_line_error(main, [str(a) for a in argv])


def test_qpack_path_errors_come_before_any_work(fp32_checkpoint, tmp_path, monkeypatch):
    from fairseq import checkpoint_utils

    monkeypatch.setattr(checkpoint_utils, "load_model_ensemble_and_task", None)  # loading would fail loudly
    ptq = ["--method", "int", "--bits", 4]
    assert qpack_error(tmp_path / "nope.pt", tmp_path / "o.pt", *ptq) == f"{tmp_path / 'nope.pt'}: no such checkpoint file"
    out = tmp_path / "no" / "dir" / "o.pt"
    assert qpack_error(fp32_checkpoint, out, *ptq) == (
        f"output {out}: the directory {out.parent} does not exist; create it first")
    assert qpack_error(fp32_checkpoint, tmp_path, *ptq) == f"output {tmp_path} is a directory; give a file name"
    report = tmp_path / "none" / "r.md"
    assert qpack_error(fp32_checkpoint, tmp_path / "o.pt", *ptq, "--report", report) == (
        f"--report {report}: the directory {report.parent} does not exist; create it first")


def test_qpack_never_replaces_its_input(fp32_checkpoint, tmp_path):
    src = tmp_path / "ckpt.pt"
    src.write_bytes(fp32_checkpoint.read_bytes())
    link = tmp_path / "link.pt"
    link.symlink_to(src)
    before = src.read_bytes()
    for out in (src, link, tmp_path / "." / "ckpt.pt"):
        assert qpack_error(src, out, "--method", "int") == (
            f"output {out} is the input checkpoint {src}: writing it would replace the checkpoint; "
            "give another output file")
    assert src.read_bytes() == before


def test_an_interrupted_write_keeps_the_old_file(fp32_checkpoint, tmp_path, monkeypatch):
    from fairseq_qplugin.pack import cli

    out = tmp_path / "packed.pt"
    out.write_bytes(b"the previous packed file")

    def killed(obj, f):
        Path(f).write_bytes(b"half a fi")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        cli.main([str(fp32_checkpoint), str(out), "--method", "int", "--bits", "4"])
    assert out.read_bytes() == b"the previous packed file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed.pt"]  # no temporary file left


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_qpack_names_the_non_finite_tensor_and_row(fp32_checkpoint, tmp_path, bad):
    from fairseq_qplugin.checkpoint import load_state

    state = load_state(fp32_checkpoint)
    state["model"]["decoder.layers.0.fc2.weight"][7, 3] = bad
    torch.save(state, tmp_path / "bad.pt")
    for method in ("int", "bcq", "kmeans"):
        assert qpack_error(tmp_path / "bad.pt", tmp_path / "o.pt", "--method", method, "--bits", 2) == (
            f"decoder.layers.0.fc2.weight: row 7 of (32, 64) holds {bad} (1 such row(s)); quantize only finite "
            "weights (the training diverged?)")
    assert not (tmp_path / "o.pt").exists()


# ---- crafted pickles: refused everywhere a checkpoint is read ---------------------------------------

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_checkpoints_never_run_code(fp32_checkpoint, tmp_path):
    import importlib.util

    from fairseq_qplugin.analysis import attention_weights
    from fairseq_qplugin.checkpoint import load_state

    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({"model": {}, "x": Payload(marker)}, crafted)
    spec = importlib.util.spec_from_file_location("bench_generate", PLUGIN.parent / "benchmarks" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for load in (load_state, attention_weights, lambda p: bench.strip_optimizer(p, tmp_path / "out.pt")):
        message = one_line_error(load, crafted)
        assert message.startswith(f"{crafted}: refused: the file pickles a class that is not allowed"), message
    assert qpack_error(crafted, tmp_path / "o.pt").startswith(f"{crafted}: refused: the file pickles a class")
    assert not marker.exists()
    assert one_line_error(load_state, tmp_path / "missing.pt") == f"{tmp_path / 'missing.pt'}: no such file"


def test_another_methods_checkpoint_is_named_as_such():
    from fairseq_qplugin.models.base import check_compatible

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))  # a k-means checkpoint's keys, given to another --arch
    state = {**model.state_dict(), "0.wq.centroids": torch.zeros(4), "0.wq.indices": torch.zeros(4, 4)}
    assert one_line_error(check_compatible, model, state) == (
        "the checkpoint holds another quantization method's model (its quantizer state, e.g. 0.wq.centroids, is not "
        "part of this --arch): fine-tune from the fp32 checkpoint it was trained from, or keep the --arch it was "
        "trained with")


# ---- the console scripts ------------------------------------------------------------------------------

def assert_one_error_line(proc, rc, message):
    lines = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert proc.returncode == rc and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert lines == [f"fairseq-qplugin: error: {message}"], proc.stdout[-3000:]


def test_console_scripts_exit_codes(tiny_data, fp32_checkpoint, tmp_path):
    ok = run(["fairseq-qpack", fp32_checkpoint, tmp_path / "p.pt", "--method", "int", "--bits", 4], check=False)
    assert ok.returncode == 0 and "compression vs fp32 weights" in ok.stdout, ok.stdout[-3000:]
    assert "{'components'" not in ok.stdout
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "p.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # like any new file, not private
    missing = tmp_path / "missing.pt"
    assert_one_error_line(run(["fairseq-qpack", missing, tmp_path / "q.pt"], check=False), 1,
                          f"{missing}: no such checkpoint file")
    gen = run(["fairseq-generate", tiny_data / "bin", "--user-dir", PLUGIN, "--path", missing], check=False)
    assert_one_error_line(gen, 1, f"--path {missing}: no such file")
    train = run(["fairseq-train", tiny_data / "bin", "--user-dir", PLUGIN, "--arch", "transformer_int8", *TINY_MODEL,
                 "--share-all-embeddings", "--optimizer", "adam", "--lr", "0.001", "--max-tokens", 2000,
                 "--max-update", 1, "--save-dir", tmp_path / "ft", "--finetune-from-model", missing], check=False)
    assert_one_error_line(train, 1, f"--finetune-from-model {missing}: no such file")
    assert not (tmp_path / "ft" / "checkpoint_last.pt").exists()


def test_missing_finetune_file_is_reported_before_data_is_read(tmp_path):
    """Right after the arguments are parsed: the data directory is not even looked at; but not when a
    checkpoint_last.pt in --save-dir resumes the training (fairseq then ignores --finetune-from-model)."""
    missing, no_data = tmp_path / "missing.pt", tmp_path / "no-data"
    args = ["fairseq-train", no_data, "--user-dir", PLUGIN, "--arch", "transformer_int8", *TINY_MODEL,
            "--optimizer", "adam", "--lr", "0.001", "--max-tokens", 2000, "--max-update", 1,
            "--save-dir", tmp_path / "ft", "--finetune-from-model", missing]
    assert_one_error_line(run(args, check=False), 1, f"--finetune-from-model {missing}: no such file")
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "checkpoint_last.pt").write_bytes(b"")
    resumed = run(args, check=False)
    assert resumed.returncode != 0 and "--finetune-from-model" not in resumed.stdout
    assert str(no_data) in resumed.stdout, resumed.stdout[-3000:]
