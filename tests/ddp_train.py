"""fairseq-train that also dumps every rank's quantization state (for tests/test_distributed.py).

    python tests/ddp_train.py DUMP_DIR <fairseq-train arguments>

Writes ``DUMP_DIR/load_rank<R>.pt`` after the checkpoint load and ``DUMP_DIR/update<N>_rank<R>.pt``
at every checkpoint save, on every rank (fairseq itself saves on rank 0 only): the model's state
dict (quantized weights, quantizer state), its latent parameters, all its buffers (also the
non-persistent ones, e.g. frequency groups) and the pNR warm-start scales.
"""
import sys
from pathlib import Path

import torch
from fairseq import checkpoint_utils
from fairseq.trainer import Trainer
from fairseq_cli import train


def quantization_state(model) -> dict:
    state = {f"state.{k}": v.clone() for k, v in model.state_dict().items()}
    state.update({f"latent.{k}": p.detach().clone() for k, p in model.named_parameters()})
    state.update({f"buffer.{k}": b.clone() for k, b in model.named_buffers()})
    for name, module in model.named_modules():
        if getattr(module, "_warm", None) is not None:
            state[f"warm.{name}"] = module._warm.clone()
    return state


def main(dump_dir: Path, argv):
    dump_dir.mkdir(parents=True, exist_ok=True)

    def dump(trainer, tag):
        path = dump_dir / f"{tag}_rank{trainer.data_parallel_rank}.pt"
        torch.save(quantization_state(trainer.get_model()), path)

    save, load = checkpoint_utils.save_checkpoint, Trainer.load_checkpoint

    def save_and_dump(cfg, trainer, epoch_itr, val_loss):
        out = save(cfg, trainer, epoch_itr, val_loss)
        dump(trainer, f"update{trainer.get_num_updates()}")
        return out

    def load_and_dump(self, *args, **kwargs):
        out = load(self, *args, **kwargs)
        dump(self, "load")
        return out

    checkpoint_utils.save_checkpoint, Trainer.load_checkpoint = save_and_dump, load_and_dump
    sys.argv = ["fairseq-train", *argv]
    train.cli_main()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
