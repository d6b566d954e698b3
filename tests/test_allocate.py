"""fairseq-qallocate: the exact solver, sensitivity-driven bits, flags that rebuild the mix, errors."""
import itertools
import json
import random
import re
import sys

import pytest
import torch

from fairseq_qplugin.allocate import main, solve
from fairseq_qplugin.errors import QuantConfigError

from .conftest import run, train_args


def brute_force(params, costs, target):
    best = None
    for bits in itertools.product(*[sorted(c) for c in costs]):
        if sum(p * b for p, b in zip(params, bits)) <= target * sum(params):
            total = 0.0
            for c, b in zip(costs, bits):
                total += c[b]
            best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_solver_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 8)
    params = [rng.choice([64, 128, 192, 256, 320]) * rng.randint(1, 6) for _ in range(n)]
    options = sorted(rng.sample([1, 2, 3, 4], rng.randint(2, 4)))
    # sensitivities falling with the bits, plus random integers (exact sums) or floats
    costs = [{b: (rng.randint(0, 50) if seed % 2 else rng.random()) * (5 - b) for b in options} for _ in range(n)]
    for target in (options[0], options[0] + 0.37, (options[0] + options[-1]) / 2, options[-1] - 0.01, options[-1]):
        bits = solve(params, costs, target)
        assert sum(p * b for p, b in zip(params, bits)) <= target * sum(params)
        assert sum(c[b] for c, b in zip(costs, bits)) == brute_force(params, costs, target)


def test_solver_refuses_a_budget_below_the_smallest_mix():
    with pytest.raises(QuantConfigError, match=r"--target-bits 1.5 is below the smallest mix \(2 average bits\)"):
        solve([10, 20], [{2: 1.0, 3: 0.0}, {2: 1.0, 4: 0.0}], 1.5)


def allocate(tiny_data, ckpt, out, *flags):
    return run([sys.executable, "-m", "fairseq_qplugin.allocate", ckpt, tiny_data / "bin", "--output", out,
                "--max-sentences", 20, *flags])


DAMAGED, TWIN = "decoder.layers.0.fc2", "decoder.layers.0.fc1"  # as many weights


def damage(tiny_data, fp32_checkpoint, factor):
    """The fp32 model with 4 hidden units of the decoder FFN rescaled: fc1's rows (and biases) / factor,
    fc2's columns x factor. The function is the same (ReLU is positively homogeneous), but each row of fc2
    now holds 4 outliers, which a low-bit code of the row (its scales fit to the outliers) cannot
    represent together with the other weights."""
    state = torch.load(fp32_checkpoint, map_location="cpu", weights_only=False)
    units = [3, 17, 31, 50]
    state["model"][TWIN + ".weight"][units] /= factor
    state["model"][TWIN + ".bias"][units] /= factor
    state["model"][DAMAGED + ".weight"][:, units] *= factor
    path = tiny_data / f"damaged{factor}.pt"
    torch.save(state, path)
    return path


# the outliers' size that a low-bit code fails on and more bits help: BCQ's planes absorb small ones
@pytest.mark.parametrize("method,factor,target,extra", [("bcq", 1000, 2.5, ()), ("int", 8, 3.0, ("--bits", "2,3,4,6"))])
def test_damaged_layer_gets_more_bits_than_its_twin(tiny_data, fp32_checkpoint, tmp_path, method, factor, target,
                                                    extra):
    bits = {}
    for name, ckpt in (("fp32", fp32_checkpoint), ("damaged", damage(tiny_data, fp32_checkpoint, factor))):
        out = tmp_path / f"{name}.json"
        proc = allocate(tiny_data, ckpt, out, "--method", method, "--target-bits", target, *extra)
        result = json.loads(out.read_text())
        parts = {p["name"]: p for p in result["parts"]}
        bits[name] = parts[DAMAGED]["bits"], parts[TWIN]["bits"]
        assert result["average_bits"] <= target
        assert f"part 1/{len(parts)} " in proc.stdout and result["flags_line"] in proc.stdout
    low = str(min(result["candidate_bits"]))
    assert parts[DAMAGED]["loss_increase"][low] > 3 * parts[TWIN]["loss_increase"][low]
    assert bits["fp32"][0] <= bits["fp32"][1] and bits["damaged"][0] > bits["damaged"][1], bits


@pytest.mark.parametrize("method,arch", [("bcq", "transformer_bcq"), ("int", "transformer_int8"),
                                         ("kmeans", "transformer_kmeans")])
def test_saved_flags_build_a_model_at_the_allocated_bits(tiny_data, fp32_checkpoint, tmp_path, method, arch):
    out = tmp_path / "alloc.json"
    bits = {"bcq": "1,2,3,4", "int": "2,4,8", "kmeans": "2,3"}[method]
    allocate(tiny_data, fp32_checkpoint, out, "--method", method, "--target-bits", 2.6, "--bits", bits,
             "--embed-groups", 3)
    result = json.loads(out.read_text())
    assert result["average_bits"] <= 2.6 and len({p["bits"] for p in result["parts"]}) > 1
    extra = ["--bcq-rounds", 2] if method == "bcq" else ["--kmeans-iters", 5] if method == "kmeans" else []
    proc = run(train_args(tiny_data / "bin", tmp_path / "qat", arch, 1, "--finetune-from-model", fp32_checkpoint,
                          *result["flags"], *extra, "--no-save"))
    logged = float(re.search(r"weights at ([\d.]+) average bits", proc.stdout).group(1))
    assert logged == round(result["average_bits"], 2)
    if method == "bcq":
        assert "words by training frequency in groups of" in proc.stdout


RANGE = "outside {}'s range of {} to {} average bits; give a target in it"


@pytest.mark.parametrize("flags,message", [
    (("--method", "bcq", "--target-bits", 5), "--target-bits 5.0: " + RANGE.format("bcq", 1, 4)),
    (("--method", "bcq", "--target-bits", 0.5), "--target-bits 0.5: " + RANGE.format("bcq", 1, 4)),
    (("--method", "int", "--target-bits", 1.5, "--bits", "2,4"), "--target-bits 1.5: " + RANGE.format("int", 2, 4)),
    (("--method", "kmeans", "--target-bits", 9), "--target-bits 9.0: " + RANGE.format("kmeans", 1, 8)),
    (("--method", "pq", "--target-bits", 2), "--method 'pq': choose one of bcq, int, kmeans"),
    (("--method", "bcq", "--target-bits", 2, "--bits", "2,5"), "--bits 2,5: bcq takes 1 to 4 bits"),
    (("--method", "bcq", "--target-bits", 2, "--bits", "2,x"),
     "--bits '2,x': write a comma list of bit widths, e.g. 1,2,3,4"),
    (("--method", "bcq", "--target-bits", 2, "--embed-groups", 0), "--embed-groups must be >= 1, got 0"),
])
def test_bad_flags_give_one_error_line(tiny_data, fp32_checkpoint, flags, message):
    with pytest.raises(QuantConfigError) as e:
        main([str(fp32_checkpoint), str(tiny_data / "bin"), *map(str, flags)])
    assert str(e.value) == message


def test_missing_files_give_one_error_line(tiny_data, fp32_checkpoint, tmp_path):
    with pytest.raises(QuantConfigError) as e:
        main([str(fp32_checkpoint), str(tmp_path / "nodata"), "--method", "bcq", "--target-bits", "2"])
    assert str(e.value) == f"{tmp_path / 'nodata'}: no such data directory (the binarized data of the checkpoint)"
    proc = run([sys.executable, "-m", "fairseq_qplugin.allocate", tmp_path / "none.pt", tiny_data / "bin",
                "--method", "bcq", "--target-bits", 2], check=False)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1] == f"fairseq-qplugin: error: {tmp_path / 'none.pt'}: no such checkpoint file"
