"""How many examples a data file holds and how long they are in tokens: what memory and time depend on.

The rows are read, validated and tokenized exactly as `tuneforge train` does (same chat template, label mask and
truncation policy), so the lengths are the ones training will see. A model whose tokenizer is not available offline
(a bundled architecture such as llama-2-7b) is measured with the embedded model's tokenizer, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.config import EMBEDDED_MODEL, DataSettings
from tuneforge.plan.architectures import bundled_name


@dataclass(frozen=True)
class DataShape:
    lengths: tuple[int, ...]  # tokens of each kept training example, after truncation
    targets: tuple[int, ...]  # answer (loss) tokens of each
    dropped: int
    tokenizer_note: str  # which tokenizer counted the tokens

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    @property
    def total_tokens(self) -> int:
        return sum(self.lengths)

    def largest_micro_batch(self, batch_size: int) -> tuple[tuple[int, ...], int]:
        """(lengths, answer tokens) of the `batch_size` longest examples: no micro-batch of the run holds more."""
        order = sorted(range(len(self.lengths)), key=lambda i: self.lengths[i], reverse=True)[:batch_size]
        return tuple(self.lengths[i] for i in order), sum(self.targets[i] for i in order)

    def summary(self) -> str:
        n = self.num_examples
        mean = self.total_tokens / n if n else 0
        longest = max(self.lengths, default=0)
        dropped = f", {self.dropped} dropped as over-long" if self.dropped else ""
        return (f"{n:,} examples, {self.total_tokens:,} tokens (mean {mean:.0f}, longest {longest}){dropped}; "
                f"{self.tokenizer_note}")


def measure_data(data: DataSettings, model: str, seed: int = 42, trust_remote_code: bool = False,
                 objective: str = "sft") -> DataShape:
    """Token lengths of the training split of `data` as `tuneforge train` would tokenize it for `model`. A preference
    pair counts as what it costs in a packed row: its prompt once and both answers."""
    from tuneforge.data.prepare import read_raw, tokenize_data
    from tuneforge.model.load import load_tokenizer

    train_rows, _ = read_raw(data, seed, objective)
    tokenizer_name, note = _tokenizer_for(model)
    prepared = tokenize_data(data, load_tokenizer(tokenizer_name, trust_remote_code), train_rows, [], objective)
    return DataShape(tuple(ex.packed_length for ex in prepared.train), tuple(ex.num_targets for ex in prepared.train),
                     prepared.train_report.dropped, note)


def _tokenizer_for(model: str) -> tuple[str, str]:
    short = bundled_name(model)
    if short is None:
        return model, f"tokenized with {model}'s tokenizer"
    if short == bundled_name(EMBEDDED_MODEL):
        return EMBEDDED_MODEL, f"tokenized with {EMBEDDED_MODEL}'s tokenizer"
    # A bundled architecture ships no tokenizer and the hub may be out of reach: count with the embedded one.
    return EMBEDDED_MODEL, (f"tokenized with {EMBEDDED_MODEL}'s tokenizer ({short}'s is not bundled; its counts "
                            "differ by tokenizer)")
