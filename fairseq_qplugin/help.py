"""``python -m fairseq_qplugin.help [ARCH ...]``: the flags of the plugin's architectures, with defaults.

``fairseq-train --arch transformer_int8 --help`` cannot show them: fairseq prints its help before it
adds an architecture's own flags. This prints, per architecture, every flag of the plugin with its
help text and the default that architecture (size preset included) gives it, plus the model size.
Without arguments it lists the architectures.
"""
import argparse
import sys
from dataclasses import fields

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY, MODEL_REGISTRY

import fairseq_qplugin  # noqa: F401  (registers the architectures)

SIZE = ("encoder_layers", "decoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads")


def plugin_archs():
    """{architecture: its model class} for every architecture whose model defines plugin flags."""
    return {arch: MODEL_REGISTRY[model] for arch, model in sorted(ARCH_MODEL_NAME_REGISTRY.items())
            if getattr(MODEL_REGISTRY[model], "config_cls", None) is not None}


def arch_defaults(arch: str, config_cls) -> argparse.Namespace:
    """What the architecture function fills in when the command line gives none of the plugin flags."""
    args = argparse.Namespace(**{f.name: None for f in fields(config_cls)})
    ARCH_CONFIG_REGISTRY[arch](args)
    return args


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        return action.help + (" (default: none)" if action.default in ("", None) else " (default: %(default)s)")


def arch_help(arch: str) -> str:
    model = plugin_archs()[arch]
    defaults = arch_defaults(arch, model.config_cls)
    parser = argparse.ArgumentParser(prog=f"fairseq-train DATA --user-dir fairseq_qplugin --arch {arch}",
                                     add_help=False, formatter_class=_Formatter,
                                     usage=argparse.SUPPRESS)
    group = parser.add_argument_group(f"{arch}: flags of the plugin; each default is the one this architecture sets")
    gen_parser_from_dataclass(group, model.config_cls(), delete_default=True)
    parser.set_defaults(**{f.name: getattr(defaults, f.name) for f in fields(model.config_cls)})
    size = ", ".join(f"{k.replace('_', '-')} {getattr(defaults, k)}" for k in SIZE)
    return (f"{parser.format_help().rstrip()}\n\nmodel size of {arch} (override with the same flags as "
            f"fairseq's transformer): {size}\n")


def main(argv=None):
    archs = list(argv if argv is not None else sys.argv[1:])
    known = plugin_archs()
    if not archs:
        print("architectures of fairseq-qplugin (python -m fairseq_qplugin.help ARCH shows one's flags):")
        print("\n".join(f"  {a}" for a in known))
        return
    unknown = [a for a in archs if a not in known]
    if unknown:
        raise SystemExit(f"error: {unknown[0]!r} is not an architecture of fairseq-qplugin; choose one of "
                         f"{', '.join(known)}")
    print("\n".join(arch_help(a) for a in archs))


if __name__ == "__main__":
    main()
