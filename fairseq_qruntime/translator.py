"""``Translator``: batched translation of subword-tokenized lines with the engine.

Lines are grouped into batches by length (at most ``max_batch_tokens`` padded source tokens and
``max_batch_size`` sentences each), translated, and returned in input order. A line longer than the
model's source positions is not translated: a warning names it and its output is empty.
"""
import logging
from typing import Iterable, Iterator, List, Optional

from .model import Model

logger = logging.getLogger("fairseq_qruntime")


class Translator:
    """``Translator(model_dir, threads=1, lut="auto")`` (``lut``: the arithmetic of the packed BCQ products,
    int16 where the CPU has it, else fp32; ``lut="fp32"``: exact, as fairseq-generate; see Model);
    ``translate`` / ``translate_iter`` may be called from several Python threads at once (the engine keeps
    all state of a call in the call; it releases the GIL)."""

    def __init__(self, model_dir: str, threads: int = 1, lut: str = "auto"):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.model = Model(model_dir, lut=lut)
        self.threads = threads
        self.output_tokens = 0  # target tokens + EOS produced so far (the tokens/s count)

    @property
    def source_dictionary(self):
        return self.model.src_dict

    @property
    def target_dictionary(self):
        return self.model.tgt_dict

    def translate(self, lines: List[str], beam: int = 5, max_batch_tokens: int = 4096, **kw) -> List[str]:
        """Translations (token strings) of whitespace-tokenized ``lines``, in order."""
        return list(self.translate_iter(lines, beam=beam, max_batch_tokens=max_batch_tokens, **kw))

    def translate_iter(self, lines: Iterable[str], beam: int = 5, max_batch_tokens: int = 4096,
                       max_batch_size: int = 128, buffer_lines: Optional[int] = None, nbest: int = 1,
                       lenpen: float = 1.0, max_len_a: float = 0.0, max_len_b: int = 200, min_len: int = 1,
                       unk_penalty: float = 0.0) -> Iterator[str]:
        """Yields each line's translation in input order, reading ``buffer_lines`` lines at a time (default
        max(4 * max_batch_size, 256)) and sorting them by length into batches. With ``nbest`` > 1 each
        item is a list of nbest strings."""
        buffer_lines = buffer_lines or max(4 * max_batch_size, 256)
        opts = dict(beam=beam, nbest=nbest, lenpen=lenpen, max_len_a=max_len_a, max_len_b=max_len_b,
                    min_len=min_len, unk_penalty=unk_penalty)
        chunk, first = [], 1
        for line in lines:
            chunk.append(line)
            if len(chunk) == buffer_lines:
                yield from self._chunk(chunk, first, max_batch_tokens, max_batch_size, opts)
                first += len(chunk)
                chunk = []
        if chunk:
            yield from self._chunk(chunk, first, max_batch_tokens, max_batch_size, opts)

    def _chunk(self, lines, first, max_batch_tokens, max_batch_size, opts):
        m = self.model
        ids = [m.src_dict.encode(line) for line in lines]
        out: List = [None] * len(lines)
        order = []
        for i, s in enumerate(ids):
            if len(s) > m.max_source_positions:
                logger.warning("line %d: %d tokens (with EOS) exceed the model's %d source positions; not translated "
                               "(empty output line)", first + i, len(s), m.max_source_positions)
                out[i] = [""] * opts["nbest"]
            else:
                order.append(i)
        order.sort(key=lambda i: len(ids[i]))
        batches, cur = [], []
        for i in order:  # ascending lengths: the padded width of a batch is its last sentence's length
            if cur and ((len(cur) + 1) * len(ids[i]) > max_batch_tokens or len(cur) >= max_batch_size):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        for b in batches:
            hyps = m.generate([ids[i] for i in b], threads=self.threads, **opts)
            for i, h in zip(b, hyps):
                out[i] = [m.tgt_dict.string(t) for t, _ in h]
                self.output_tokens += len(h[0][0]) + 1 if h else 0
        for o in out:
            yield o[0] if opts["nbest"] == 1 else o
