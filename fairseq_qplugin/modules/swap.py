"""Choosing which modules to quantize (by name pattern) and swapping them for quantized ones.

Quantizable modules are every ``nn.Linear`` and every token embedding (positional embeddings stay
in full precision). A module shared under several names (``--share-all-embeddings``) matches if
any of its names does, and is replaced everywhere by one quantized module. A linear layer tied to
an embedding (``--share-decoder-input-output-embed``) is quantized together with it, sharing one
weight tensor and one quantizer.
"""
import fnmatch
import logging
from typing import Callable, Dict, List, Optional, Sequence

from torch import nn

from ..errors import QuantConfigError
from ..quant import QuantSpec
from .qmodules import ActQuantizer, QuantEmbedding, QuantLinear, WeightQuantizer

logger = logging.getLogger(__name__)

# Named parts of a fairseq transformer, usable wherever a pattern is.
PART_ALIASES = {
    "all": ["*"],
    "embeddings": ["*.embed_tokens"],
    "encoder": ["encoder.*"],
    "decoder": ["decoder.*"],
    "self_attn": ["*.self_attn.*"],
    "cross_attn": ["*.encoder_attn.*"],
    "ffn": ["*.fc1", "*.fc2"],
    "output_projection": ["decoder.output_projection"],
    "encoder_layers": ["encoder.layers.*"],
    "decoder_layers": ["decoder.layers.*"],
    "encoder_self_attn": ["encoder.layers.*.self_attn.*"],
    "encoder_ffn": ["encoder.layers.*.fc1", "encoder.layers.*.fc2"],
    "decoder_self_attn": ["decoder.layers.*.self_attn.*"],
    "decoder_cross_attn": ["decoder.layers.*.encoder_attn.*"],
    "decoder_ffn": ["decoder.layers.*.fc1", "decoder.layers.*.fc2"],
}


def quantizable_modules(model: nn.Module) -> Dict[nn.Module, List[str]]:
    """Each quantizable module with all the names it is reachable under."""
    found: Dict[nn.Module, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Embedding) and "embed_positions" not in name):
            found.setdefault(module, []).append(name)
    return found


def parse_patterns(text: Optional[str]) -> List[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def select(names: Sequence[str], patterns: Sequence[str], flag: str) -> set:
    """The names matching any pattern (or part alias); a pattern matching nothing is an error."""
    chosen = set()
    for pattern in patterns:
        globs = PART_ALIASES.get(pattern, [pattern])
        hits = {n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)}
        if not hits:
            raise QuantConfigError(
                f"{flag} {pattern!r} matches no quantizable module; use a part name "
                f"({', '.join(PART_ALIASES)}) or a glob over module names such as "
                f"'encoder.layers.*.self_attn.*' (quantizable modules: {', '.join(sorted(names)[:6])}, ...)"
            )
        chosen |= hits
    return chosen


def pattern_selector(all_names: Sequence[str], include: str, exclude: str,
                     flags=("--quant-include", "--quant-exclude")) -> Callable[[List[str]], bool]:
    """A predicate on a module's names: matched by ``include`` and not by ``exclude`` (comma lists)."""
    chosen = select(all_names, parse_patterns(include), flags[0])
    chosen -= select(all_names, parse_patterns(exclude), flags[1])
    if not chosen:
        raise QuantConfigError(f"{flags[0]} {include!r} minus {flags[1]} {exclude!r} leaves no module to quantize")
    return lambda names: any(n in chosen for n in names)


def act_quantizers(where: str, bits: int):
    """(act_in, act_out) of a linear layer: an ActQuantizer of ``bits`` on its "input" or "output", or none."""
    act = ActQuantizer(bits) if where != "none" else None
    return (act if where == "input" else None), (act if where == "output" else None)


def set_module(model: nn.Module, name: str, new: nn.Module):
    """Put ``new`` where ``model.get_submodule(name)`` is (the swap of the quantized and the packed models)."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def swap_modules(
    model: nn.Module,
    spec_for: Callable[[List[str]], Optional[QuantSpec]],
    act_bits: int = 0,
    act_where: str = "none",
    make_quantizer: Optional[Callable[[QuantSpec, List[str], nn.Parameter], WeightQuantizer]] = None,
) -> Dict[str, QuantSpec]:
    """Replace every quantizable module for which ``spec_for(names)`` gives a spec; return {name: spec}.

    Modules sharing one weight tensor (an embedding and the output projection tied to it) are
    quantized together, with the first spec given (embeddings come first), sharing one quantizer.
    ``act_where`` ("none", "input", "output") adds an activation quantizer of ``act_bits`` bits to
    each quantized linear layer. ``make_quantizer(spec, names, weight)`` builds the quantizer of a
    weight reachable under ``names`` (default: ``WeightQuantizer(spec)``).
    """
    modules = quantizable_modules(model)
    groups: Dict[nn.Parameter, List[nn.Module]] = {}
    for module in sorted(modules, key=lambda m: not isinstance(m, nn.Embedding)):
        groups.setdefault(module.weight, []).append(module)

    done: Dict[str, QuantSpec] = {}
    for members in groups.values():
        specs = [spec_for(modules[m]) for m in members]
        spec = next((s for s in specs if s is not None), None)
        if spec is None:
            continue
        names = [n for m in members for n in modules[m]]
        wq = make_quantizer(spec, names, members[0].weight) if make_quantizer else WeightQuantizer(spec)
        if not wq.trains_latent:
            members[0].weight.requires_grad_(False)
        if any(s != spec for s in specs):
            tied = ", ".join(modules[m][0] for m in members)
            logger.info("%s share one weight tensor: all quantized as %s", tied, spec)
        for module in members:
            if isinstance(module, nn.Embedding):
                new = QuantEmbedding(module, wq)
            else:
                act_in, act_out = act_quantizers(act_where, act_bits)
                new = QuantLinear(module, wq, act_in=act_in, act_out=act_out)
            for name in modules[module]:
                set_module(model, name, new)
                done[name] = spec
    return done
