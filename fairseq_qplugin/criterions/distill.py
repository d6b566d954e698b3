"""Knowledge distillation from an fp32 teacher ("Distilling the Knowledge in a Neural Network", Hinton et
al. 2015) as a fairseq criterion, for quantization-aware training of any architecture, with or without pNR:

    fairseq-train ... --arch transformer_bcq --finetune-from-model fp32.pt \\
        --criterion label_smoothed_cross_entropy_distill --label-smoothing 0.1 \\
        --distill-alpha 0.5 --distill-temperature 1.0        # teacher: fp32.pt (or --distill-teacher PATH)

Per batch, summed over the non-pad target tokens t (as fairseq sums its losses)::

    loss = (1 - alpha) * CE_ls + alpha * T^2 * sum_t KL(softmax(z_t / T) || softmax(s_t / T))

where CE_ls is fairseq's label-smoothed cross entropy of the student, ``z`` the teacher's and ``s`` the
student's output logits. T^2 keeps the gradient of the soft term at the same scale whatever T (Hinton et
al. 2015, section 2). The teacher is loaded once, frozen (``requires_grad`` off), kept in eval mode on the
student's device and dtype, and runs under ``torch.no_grad``. It is held outside the criterion's module
tree, so fairseq neither optimizes it, nor switches it to training mode, nor saves it in checkpoints.
"""
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from fairseq.file_io import PathManager
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (LabelSmoothedCrossEntropyCriterion,
                                                             LabelSmoothedCrossEntropyCriterionConfig)
from fairseq.logging import metrics
from omegaconf import II

from ..errors import QuantConfigError

logger = logging.getLogger(__name__)


@dataclass
class DistillConfig(LabelSmoothedCrossEntropyCriterionConfig):
    distill_alpha: float = field(
        default=0.5,
        metadata={"help": "weight of the distillation term in [0, 1]: loss = (1 - alpha) * label-smoothed CE "
                          "+ alpha * T^2 * KL(teacher || student); 0 is plain label_smoothed_cross_entropy"},
    )
    distill_temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature T (> 0) of teacher and student in the KL term"},
    )
    distill_teacher: Optional[str] = field(
        default=None,
        metadata={"help": "checkpoint of the teacher (default: the --finetune-from-model checkpoint); it must "
                          "use the same dictionaries as the student"},
    )
    finetune_from_model: Optional[str] = II("checkpoint.finetune_from_model")


def check_distill_flags(alpha: float, temperature: float):
    if not (0.0 <= alpha <= 1.0):  # also rejects nan
        raise QuantConfigError(f"--distill-alpha must be in [0, 1], got {alpha}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise QuantConfigError(f"--distill-temperature must be a finite number > 0, got {temperature}")


def distill_kl(student_logits, teacher_logits, target, temperature: float, padding_idx: int, reduce=True):
    """Token-level KL(softmax(z / T) || softmax(s / T)) in nats, computed in fp32.

    ``student_logits``, ``teacher_logits``: (..., V); ``target``: (...) token ids, whose ``padding_idx``
    positions count 0. Returns the sum over tokens (``reduce``) or the per-token values, shape (...).
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
    kl = kl.masked_fill(target.eq(padding_idx), 0.0)
    return kl.sum() if reduce else kl


def output_sizes(state_dict):
    """(source vocabulary, output size) of a fairseq transformer state dict; None where a key is absent."""
    def rows(*keys):
        return next((state_dict[k].shape[0] for k in keys if k in state_dict), None)
    return (rows("encoder.embed_tokens.weight"),
            rows("decoder.output_projection.weight", "decoder.embed_tokens.weight"))


def check_same_dictionaries(path: str, teacher_task_cfg, task):
    """Compare the dictionaries the teacher was trained with, where its data directory is still readable,
    word by word with the student's (sizes alone cannot tell two dictionaries of the same size apart)."""
    data = (getattr(teacher_task_cfg, "data", None) or "").split(":")[0]
    for side, dictionary in (("target_lang", task.target_dictionary), ("source_lang", task.source_dictionary)):
        # fairseq infers the languages from the file names when no flag names them, as the student's task did
        lang = getattr(teacher_task_cfg, side, None) or getattr(getattr(task, "cfg", None), side, None)
        dict_path = os.path.join(data, f"dict.{lang}.txt")
        if not data or not lang or dictionary is None or not os.path.isfile(dict_path):
            logger.info("distillation teacher %s: its dictionary %s is not readable; only its size is checked",
                        path, dict_path)
            continue
        theirs = task.load_dictionary(dict_path)
        if theirs.symbols != dictionary.symbols:
            raise QuantConfigError(
                f"distillation teacher {path}: it was trained with the dictionary {dict_path} ({len(theirs)} tokens), "
                f"which differs from the student's ({len(dictionary)} tokens); use a teacher trained on the same "
                "fairseq-preprocess'ed dictionaries")


def load_teacher(path: str, task):
    """The frozen eval-mode model of checkpoint ``path``, built for ``task`` (whose dictionaries it must use).

    Loads with fairseq's ``load_checkpoint_to_cpu``: ``torch.load`` with ``weights_only`` (torch >= 2.6) and
    the plugin's allow-list (``checkpoint.py``), so no pickled code runs.
    """
    if not PathManager.exists(path):
        raise QuantConfigError(f"distillation teacher {path}: no such file; pass an existing checkpoint with "
                               "--distill-teacher (or --finetune-from-model)")
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    src_size, out_size = output_sizes(state["model"])
    for what, teacher_size, dictionary in (("output size", out_size, task.target_dictionary),
                                           ("source vocabulary", src_size, task.source_dictionary)):
        if teacher_size is not None and dictionary is not None and teacher_size != len(dictionary):
            raise QuantConfigError(
                f"distillation teacher {path}: its {what} is {teacher_size} tokens but the student's dictionary "
                f"has {len(dictionary)}; use a teacher trained on the same fairseq-preprocess'ed dictionaries")
    cfg = state["cfg"]
    check_same_dictionaries(path, cfg.task, task)
    teacher = task.build_model(cfg.model)
    teacher.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    teacher.requires_grad_(False)
    logger.info("distillation teacher %s: %s, %d parameters", path, cfg.model._name,
                sum(p.numel() for p in teacher.parameters()))
    return teacher.eval()


@register_criterion("label_smoothed_cross_entropy_distill", dataclass=DistillConfig)
class DistillCriterion(LabelSmoothedCrossEntropyCriterion):
    """label_smoothed_cross_entropy mixed with the KL to a frozen teacher (module doc). ``teacher``: a model
    to use instead of loading one (tests, benchmarks)."""

    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0, report_accuracy=False,
                 distill_alpha=0.5, distill_temperature=1.0, distill_teacher=None, finetune_from_model=None,
                 teacher=None):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        check_distill_flags(distill_alpha, distill_temperature)
        self.alpha, self.temperature = distill_alpha, distill_temperature
        if teacher is None:
            path = distill_teacher or finetune_from_model
            if not path:
                raise QuantConfigError("label_smoothed_cross_entropy_distill needs a teacher: pass --distill-teacher "
                                       "PATH or --finetune-from-model PATH")
            teacher = load_teacher(path, task)
        # object.__setattr__: not a submodule, so not in parameters(), state_dict(), train() or .to()
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())

    def teacher_logits(self, model, sample):
        """The teacher's output logits for ``sample``, moved first to the student's device and dtype if needed."""
        p = next(model.parameters())
        t = next(self.teacher.parameters())
        if (t.device, t.dtype) != (p.device, p.dtype):
            self.teacher.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            return self.teacher(**sample["net_input"])[0]

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        ce, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        if self.alpha > 0:
            student, teacher = net_output[0], self.teacher_logits(model, sample)
            target = model.get_targets(sample, net_output)
            n = self.ignore_prefix_size
            kl = distill_kl(student[:, n:], teacher[:, n:], target[:, n:], self.temperature, self.padding_idx,
                            reduce=reduce)
            if not reduce:
                kl = kl.reshape(ce.shape)
            loss = (1.0 - self.alpha) * ce + (self.alpha * self.temperature**2) * kl
        else:
            kl, loss = torch.zeros_like(ce), ce
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data, "nll_loss": nll_loss.data, "distill_ce": ce.data, "distill_kl": kl.data,
            "ntokens": sample["ntokens"], "nsentences": sample["target"].size(0), "sample_size": sample_size,
        }
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"], logging_output["total"] = n_correct.item(), total.item()
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """label_smoothed_cross_entropy's metrics plus ``distill_ce`` and ``distill_kl``, per token in bits."""
        super().reduce_metrics(logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        for key in ("distill_ce", "distill_kl"):
            total = sum(log.get(key, 0) for log in logging_outputs)
            metrics.log_scalar(key, total / max(ntokens, 1) / math.log(2), ntokens, round=3)
