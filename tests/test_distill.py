"""Distillation from a frozen teacher (criterions/distill.py): the KL term, the loss mix, where gradients go,
and end to end through fairseq-train (BCQ straight-through and under pNR) and fairseq-generate."""
import copy
import math
import re

import pytest
import torch
from fairseq import options, tasks
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_qplugin.criterions.distill import DistillCriterion, check_distill_flags, distill_kl, load_teacher
from fairseq_qplugin.errors import QuantConfigError

from .conftest import PLUGIN, TINY_MODEL, run, train_args
from .test_cli import generate
from .test_pack_cli import qpack, same_translations

CRITERION = "label_smoothed_cross_entropy_distill"


def build(data_bin, arch, *flags):
    """(task, model) of ``arch`` at the tiny size on the dictionaries of ``data_bin``."""
    argv = [str(data_bin), "--user-dir", str(PLUGIN), "--task", "translation", "--arch", arch, *map(str, TINY_MODEL),
            "--share-all-embeddings", *map(str, flags)]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    return task, task.build_model(cfg.model)


@pytest.fixture(scope="module")
def setup(tiny_data):
    """A task, a batch of 6 valid sentence pairs (with padding), a BCQ student and a different fp32 teacher."""
    task, student = build(tiny_data / "bin", "transformer_bcq", "--bcq-bits", 3)
    _, teacher = build(tiny_data / "bin", "transformer")
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[i] for i in range(6)])
    assert sample["target"].eq(task.target_dictionary.pad()).any()  # the pad mask is exercised
    return task, sample, student, teacher


def test_kl_matches_hand_computation():
    s = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [9.0, 9.0, 9.0]]])
    z = torch.tensor([[[0.5, 2.5, -1.0], [1.0, 1.0, 1.0], [0.0, 5.0, 9.0]]])
    target = torch.tensor([[2, 0, 1]])  # padding_idx 1: the last token does not count

    def kl(zt, st, T):
        p = [math.exp(v / T) / sum(math.exp(u / T) for u in zt) for v in zt]
        q = [math.exp(v / T) / sum(math.exp(u / T) for u in st) for v in st]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    for T in (1.0, 2.0, 0.5):
        expected = [kl(z[0, i].tolist(), s[0, i].tolist(), T) for i in range(2)]
        per_token = distill_kl(s, z, target, T, padding_idx=1, reduce=False)
        assert per_token.shape == (1, 3) and per_token[0, 2].item() == 0.0
        assert per_token[0, :2].tolist() == pytest.approx(expected, abs=1e-6)
        assert distill_kl(s, z, target, T, padding_idx=1).item() == pytest.approx(sum(expected), abs=1e-6)
    assert distill_kl(s, s.clone(), target, 2.0, padding_idx=1).item() == 0.0


def test_alpha_0_is_label_smoothed_cross_entropy(setup):
    task, sample, student, teacher = setup
    student.eval()
    reference, ref_size, ref_log = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)(student, sample)
    loss, size, log = DistillCriterion(task, False, 0.1, distill_alpha=0.0, teacher=teacher)(student, sample)
    assert torch.equal(loss, reference) and size == ref_size
    assert torch.equal(log["nll_loss"], ref_log["nll_loss"]) and log["distill_kl"].item() == 0.0


def test_loss_mixes_ce_and_kl_and_kl_is_0_against_itself(setup):
    task, sample, student, teacher = setup
    student.eval()
    ce = LabelSmoothedCrossEntropyCriterion(task, False, 0.1)(student, sample)[0]
    criterion = DistillCriterion(task, False, 0.1, distill_alpha=0.3, distill_temperature=2.0, teacher=teacher)
    loss, _, log = criterion(student, sample)
    kl = distill_kl(student(**sample["net_input"])[0], teacher.eval()(**sample["net_input"])[0], sample["target"],
                    2.0, task.target_dictionary.pad())
    assert kl.item() > 0.1 and torch.equal(log["distill_ce"], ce) and torch.equal(log["distill_kl"], kl)
    assert loss.item() == pytest.approx(0.7 * ce.item() + 0.3 * 4.0 * kl.item(), rel=1e-6)
    own = DistillCriterion(task, False, 0.1, distill_alpha=0.3, teacher=copy.deepcopy(student))
    loss, _, log = own(student, sample)
    assert log["distill_kl"].item() == 0.0 and loss.item() == pytest.approx(0.7 * ce.item(), rel=1e-6)


def test_gradients_reach_the_student_only(setup):
    task, sample, student, teacher = setup
    student = copy.deepcopy(student).train()
    criterion = DistillCriterion(task, False, 0.1, distill_alpha=0.5, teacher=copy.deepcopy(teacher))
    criterion.train()  # as fairseq's trainer does: the teacher stays in eval mode
    assert list(criterion.parameters()) == [] and criterion.state_dict() == {}
    before = {k: v.clone() for k, v in criterion.teacher.state_dict().items()}
    optimizer = torch.optim.Adam(student.parameters(), lr=0.01)
    loss = criterion(student, sample)[0]
    loss.backward()
    optimizer.step()
    assert not criterion.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in criterion.teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in criterion.teacher.state_dict().items())
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("arch,flags", [
    ("transformer_int8", ["--quant-bits", 4]),
    ("transformer_kmeans", ["--quant-method", "kmeans", "--quant-bits", 4]),
    ("transformer_bcq", ["--bcq-bits", 2]),
])
def test_every_quantized_arch_trains_on_the_mix(setup, tiny_data, arch, flags):
    task, sample, _, teacher = setup
    student = build(tiny_data / "bin", arch, *flags)[1].train()
    loss, _, log = DistillCriterion(task, False, 0.1, teacher=teacher)(student, sample)
    loss.backward()
    assert log["distill_kl"].item() > 0 and torch.equal(loss, 0.5 * log["distill_ce"] + 0.5 * log["distill_kl"])
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_teacher_follows_the_students_dtype(setup):
    task, sample, student, teacher = setup
    criterion = DistillCriterion(task, False, 0.1, teacher=copy.deepcopy(teacher))
    assert next(criterion.teacher.parameters()).dtype == torch.float32
    loss = criterion(copy.deepcopy(student).double().eval(), sample)[0]
    assert torch.isfinite(loss) and next(criterion.teacher.parameters()).dtype == torch.float64


@pytest.mark.parametrize("alpha,temperature,message", [
    (1.5, 1.0, "--distill-alpha must be in [0, 1], got 1.5"),
    (-0.1, 1.0, "--distill-alpha must be in [0, 1], got -0.1"),
    (float("nan"), 1.0, "--distill-alpha must be in [0, 1], got nan"),
    (0.5, 0.0, "--distill-temperature must be a finite number > 0, got 0.0"),
    (0.5, -2.0, "--distill-temperature must be a finite number > 0, got -2.0"),
    (0.5, float("nan"), "--distill-temperature must be a finite number > 0, got nan"),
    (0.5, float("inf"), "--distill-temperature must be a finite number > 0, got inf"),
])
def test_bad_alpha_or_temperature(alpha, temperature, message):
    with pytest.raises(QuantConfigError) as e:
        check_distill_flags(alpha, temperature)
    assert str(e.value) == message
    check_distill_flags(0.0, 1e-3)
    check_distill_flags(1.0, 10.0)


@pytest.fixture(scope="module")
def small_vocab_teacher(fp32_checkpoint, tmp_path_factory):
    """The fp32 checkpoint with its (shared) embedding cut by 3 rows: a teacher of another dictionary."""
    state = torch.load(fp32_checkpoint)
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        state["model"][k] = state["model"][k][:-3].clone()
    path = tmp_path_factory.mktemp("teacher") / "small_vocab.pt"
    torch.save(state, path)
    return path, state["model"]["decoder.output_projection.weight"].shape[0]


def test_teacher_of_another_dictionary_names_both_sizes(setup, fp32_checkpoint, small_vocab_teacher):
    task = setup[0]
    path, rows = small_vocab_teacher
    with pytest.raises(QuantConfigError) as e:
        load_teacher(str(path), task)
    assert str(e.value) == (f"distillation teacher {path}: its output size is {rows} tokens but the student's "
                            f"dictionary has {rows + 3}; use a teacher trained on the same fairseq-preprocess'ed "
                            "dictionaries")
    teacher = load_teacher(str(fp32_checkpoint), task)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_teacher_of_a_reordered_dictionary_of_the_same_size(setup, tiny_data, fp32_checkpoint, tmp_path):
    task = setup[0]
    words = (tiny_data / "bin" / "dict.de.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "dict.de.txt").write_text("\n".join([words[1], words[0], *words[2:]]) + "\n", encoding="utf-8")
    (tmp_path / "dict.en.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    state = torch.load(fp32_checkpoint)
    assert state["cfg"]["task"]["data"] == str(tiny_data / "bin")  # so the dictionaries are found and compared
    state["cfg"]["task"]["data"] = str(tmp_path)
    torch.save(state, tmp_path / "teacher.pt")
    n = len(task.target_dictionary)
    with pytest.raises(QuantConfigError) as e:
        load_teacher(str(tmp_path / "teacher.pt"), task)
    assert str(e.value) == (f"distillation teacher {tmp_path / 'teacher.pt'}: it was trained with the dictionary "
                            f"{tmp_path / 'dict.de.txt'} ({n} tokens), which differs from the student's ({n} tokens); "
                            "use a teacher trained on the same fairseq-preprocess'ed dictionaries")
    state["cfg"]["task"]["data"] = str(tmp_path / "moved")  # not readable: the sizes alone are checked
    torch.save(state, tmp_path / "teacher.pt")
    assert not load_teacher(str(tmp_path / "teacher.pt"), task).training


def test_no_teacher_or_a_missing_one(setup, tmp_path):
    task = setup[0]
    with pytest.raises(QuantConfigError) as e:
        DistillCriterion(task, False, 0.1)
    assert str(e.value) == (f"{CRITERION} needs a teacher: pass --distill-teacher PATH or --finetune-from-model PATH")
    with pytest.raises(QuantConfigError) as e:
        DistillCriterion(task, False, 0.1, finetune_from_model=str(tmp_path / "nope.pt"))
    assert str(e.value) == (f"distillation teacher {tmp_path / 'nope.pt'}: no such file; pass an existing checkpoint "
                            "with --distill-teacher (or --finetune-from-model)")


def distill_train(tiny_data, save, arch, updates, *extra):
    return run(train_args(tiny_data / "bin", save, arch, updates, "--criterion", CRITERION, "--label-smoothing", 0.1,
                          *extra), check=False)


@pytest.mark.parametrize("flags,message", [
    (["--distill-alpha", 2], "fairseq-qplugin: error: --distill-alpha must be in [0, 1], got 2.0"),
    (["--distill-teacher", "/nonexistent/teacher.pt"],
     "fairseq-qplugin: error: distillation teacher /nonexistent/teacher.pt: no such file"),
    (["--distill-teacher", "SMALL"], "fairseq-qplugin: error: distillation teacher "),
])
def test_fairseq_train_errors_are_one_line(tiny_data, small_vocab_teacher, tmp_path, flags, message):
    small = "SMALL" in flags
    flags = [small_vocab_teacher[0] if f == "SMALL" else f for f in flags]
    proc = distill_train(tiny_data, tmp_path, "transformer_bcq", 2, *flags)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stdout[-3000:]
    if small:
        rows = small_vocab_teacher[1]
        assert f"output size is {rows} tokens but the student's dictionary has {rows + 3};" in errors[0]


@pytest.mark.parametrize("optimizer", ["adam", "pnr_adam"])
def test_fairseq_train_distills_then_generate_loads(tiny_data, fp32_checkpoint, tmp_path, optimizer):
    extra = ["--optimizer", optimizer, "--pnr-period", 2] if optimizer == "pnr_adam" else []
    teacher = ["--distill-teacher", fp32_checkpoint] if optimizer == "pnr_adam" else []
    proc = distill_train(tiny_data, tmp_path, "transformer_bcq", 4, "--bcq-bits", 3, "--finetune-from-model",
                         fp32_checkpoint, "--distill-alpha", 0.5, "--distill-temperature", 2, *teacher, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:]
    valid = [line for line in proc.stdout.splitlines() if "| valid on 'valid' subset |" in line]
    assert valid and re.search(r"\| loss [\d.]+ \| nll_loss [\d.]+ .*\| distill_ce [\d.]+ \| distill_kl [\d.]+",
                               valid[-1]), proc.stdout[-3000:]
    assert "num_updates 4" in proc.stdout
    state = torch.load(tmp_path / "checkpoint_last.pt")
    assert state["criterion"] is None and not any("teacher" in k for k in state["model"])
    # the student's keys; a latent weight is saved only where it differs from the quantized one (not
    # after pNR's last period, which sets the weights to their quantized values)
    student = set(build(tiny_data / "bin", "transformer_bcq", "--bcq-bits", 3)[1].state_dict())
    latent = {k for k in student if k.endswith(".wq.latent")}
    assert set(state["model"]) - latent == student - latent
    assert set(state["model"]) & latent == (set() if optimizer == "pnr_adam" else latent)
    hyps, log = generate(tiny_data / "bin", tmp_path / "checkpoint_last.pt")
    assert len(hyps) == 40, log[-2000:]
    if optimizer == "adam":  # and it packs like any QAT checkpoint
        qpack(tmp_path / "checkpoint_last.pt", tmp_path / "packed.pt")
        assert same_translations(generate(tiny_data / "bin", tmp_path / "packed.pt")[0], hyps)
