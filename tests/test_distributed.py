"""fairseq's data-parallel training on 2 CPU processes (gloo, loopback): checkpoints load on every rank,
and every rank holds bit-identical quantized weights and quantizer state after each update."""
import io
import os
import pickle
import socket
import subprocess
import sys
import time

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.distributed import utils as distributed_utils

import fairseq_qplugin  # noqa: F401  (allow-lists fairseq's checkpoint classes)

from .conftest import BIN, ROOT, TINY_MODEL, train_args

DRIVER = ROOT / "tests" / "ddp_train.py"
TIMEOUT = 150  # seconds for one launch of all ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_flags(world: int, rank: int, port: int):
    if world == 1:
        return []
    return ["--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-world-size", world,
            "--distributed-rank", rank, "--distributed-no-spawn", "--distributed-backend", "gloo",
            "--ddp-backend", "legacy_ddp"]


def launch(dump_dir, args, world=2):
    """Run ``args`` (a fairseq-train command line) as ``world`` CPU processes of one data-parallel job;
    return the logs of the ranks. A rank that fails stops the others (they would wait for it)."""
    dump_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port, procs = free_port(), []
    for rank in range(world):
        cmd = [sys.executable, DRIVER, dump_dir, *args[1:], "--cpu", *distributed_flags(world, rank, port)]
        log = open(dump_dir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(list(map(str, cmd)), env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p, _ in procs):
            failed = any(p.poll() not in (None, 0) for p, _ in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    logs = [(dump_dir / f"rank{r}.log").read_text() for r in range(world)]
    for rank, (p, _) in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{logs[rank][-3000:]}"
    return logs


def dumps(dump_dir, tag, world=2):
    return [torch.load(dump_dir / f"{tag}_rank{r}.pt") for r in range(world)]


def assert_identical(states):
    first = states[0]
    for rank, other in enumerate(states[1:], 1):
        assert sorted(other) == sorted(first)
        differ = [k for k in first if not torch.equal(first[k], other[k])]
        assert differ == [], f"rank {rank} differs from rank 0 in {len(differ)} tensors: {differ[:8]}"


def run_ddp(tiny_data, fp32_checkpoint, name, arch, *flags, updates=4):
    """2 ranks, ``updates`` updates from the fp32 checkpoint, saving every 2; rank states at each save."""
    dump = tiny_data / f"ddp_{name}"
    logs = launch(dump, train_args(tiny_data / "bin", dump / "save", arch, updates, "--finetune-from-model",
                                  fp32_checkpoint, "--save-interval-updates", 2, *flags))
    assert "training on 2 devices" in logs[0] and "distributed init (rank 1)" in logs[1], logs[1][-2000:]
    saved = [dumps(dump, f"update{n}") for n in range(2, updates + 1, 2)]
    for states in [dumps(dump, "load"), *saved]:
        assert_identical(states)
    return dump, saved[-1][0]


# -- loading: what fairseq's broadcast_object unpickles on ranks > 0 ---------------------------------------


def broadcast_payload(state):
    """The bytes rank 0 sends for a checkpoint (tensors travel separately) and what the others unpickle."""
    obj = distributed_utils._split_tensors_from_obj(state, [])
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return obj, buffer


def test_broadcast_checkpoint_unpickles_with_weights_only(fp32_checkpoint):
    state = checkpoint_utils.load_checkpoint_to_cpu(str(fp32_checkpoint))
    obj, buffer = broadcast_payload(state)
    loaded = torch.load(buffer, map_location="cpu")  # as fairseq's _broadcast_object_slow (weights_only)
    assert loaded == obj
    assert type(loaded["cfg"]).__name__ == "DictConfig" and loaded["cfg"].model.arch == "transformer"


class RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_crafted_pickle_is_still_refused(fp32_checkpoint, tmp_path):
    marker = tmp_path / "ran"
    state = checkpoint_utils.load_checkpoint_to_cpu(str(fp32_checkpoint))
    state["extra_state"]["payload"] = RunsCommand(f"touch {marker}")
    _, buffer = broadcast_payload(state)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        torch.load(buffer, map_location="cpu")
    assert not marker.exists()


# -- 2 ranks: identical quantization -------------------------------------------------------------------


def test_int8_with_activation_ranges(tiny_data, fp32_checkpoint):
    _, state = run_ddp(tiny_data, fp32_checkpoint, "int8", "transformer_int8", "--quant-bits", 4, "--quant-act", "input")
    ranges = [k for k in state if k.startswith("state.") and k.endswith("running_max")]
    assert ranges and all(state[k] > 0 for k in ranges)


def test_bcq_straight_through(tiny_data, fp32_checkpoint):
    run_ddp(tiny_data, fp32_checkpoint, "bcq", "transformer_bcq", "--bcq-bits", 2)


def test_bcq_pnr_with_frequency_groups_and_saves_without_validation(tiny_data, fp32_checkpoint):
    """pNR syncs before every save: fairseq saves on rank 0 only, so no rank may sync there alone."""
    _, state = run_ddp(tiny_data, fp32_checkpoint, "pnr", "transformer_bcq", "--bcq-bits", 2, "--bcq-embed-bits", 3,
                       "--bcq-embed-freq-ratio", 1, "--optimizer", "pnr_adam", "--pnr-period", 3,
                       "--disable-validation")
    assert any(k.startswith("warm.") for k in state)
    row_bits = state["buffer.encoder.embed_tokens.wq.row_bits"]
    assert sorted(row_bits.unique().tolist()) == [1, 2, 3]


def test_kmeans_with_pruning_then_resume_on_one_process(tiny_data, fp32_checkpoint):
    dump, state = run_ddp(tiny_data, fp32_checkpoint, "kmeans", "transformer_kmeans", "--quant-bits", 3,
                          "--prune-schedule", "0:0.2,3:0.4", "--kmeans-recluster-interval", 2)
    mask = state["buffer.encoder.layers.0.fc1.wq.mask"]
    assert (~mask).sum().item() == round(0.4 * mask.numel())
    resume = launch(dump / "resume", train_args(tiny_data / "bin", dump / "save", "transformer_kmeans", 6,
                                                "--quant-bits", 3, "--prune-schedule", "0:0.2,3:0.4",
                                                "--kmeans-recluster-interval", 2), world=1)
    assert "Loaded checkpoint" in resume[0] and "(epoch 1 @ 4 updates)" in resume[0], resume[0][-2000:]
    loaded = dumps(dump / "resume", "load", world=1)[0]
    quantization = [k for k in state if k.startswith(("state.", "buffer."))]
    assert_identical([{k: state[k] for k in quantization}, {k: loaded[k] for k in quantization}])


def test_bsflex_with_global_pruning(tiny_data, fp32_checkpoint):
    _, state = run_ddp(tiny_data, fp32_checkpoint, "bsflex", "transformer_kmeans", "--quant-method", "bsflex",
                       "--prune-schedule", 0.3, "--prune-ranking", "global")
    masks = [v for k, v in state.items() if k.startswith("buffer.") and k.endswith("wq.mask")]  # a tied one once
    pruned, total = sum(int((~m).sum()) for m in masks), sum(m.numel() for m in masks)
    assert pruned == round(0.3 * total)

def test_train_recipe_on_two_cpu_processes(tiny_data, fp32_checkpoint):
    save = tiny_data / "recipe_procs2"
    cmd = ["bash", ROOT / "recipes" / "train.sh", "--data", tiny_data / "bin", "--save-dir", save,
           "--arch", "transformer_int8", "--max-update", 2, "--max-tokens", 2000, "--warmup", 1, "--save-interval", 0,
           "--finetune-from", fp32_checkpoint, "--procs", 2, "--",
           *TINY_MODEL, "--quant-bits", 4, "--quant-act", "input"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(list(map(str, cmd)), env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "on 2 processes" in proc.stdout
    assert "training on 2 devices" in (save / "train.log").read_text()
    assert "distributed init (rank 1)" in (save / "train.rank1.log").read_text()
    assert (save / "checkpoint_best.pt").exists() and (save / ".done").exists()
