"""`tuneforge estimate --table`: the guide's memory table (7B/13B/70B x full/LoRA/QLoRA), computed, beside its figures.

The guide's figures are the table most blogs copy: LLaMA-Factory's README, "Hardware Requirement" (hiyouga/LLaMA-Factory,
the 2024 versions with a 13B column; marked "estimated"). Its setup is the standard Hugging Face one, so the computed
column uses the `hf` engines (bf16 on CUDA, the guide's rows: full in mixed precision ("AMP") and in pure 16-bit,
LoRA on a 16-bit base, QLoRA on a 4-bit base). The guide states no sequence length or batch; LLaMA-Factory's defaults
are assumed: one sequence of 1,024 tokens, gradient checkpointing on. The last column is what `tuneforge train` itself
would need for the same run (weights held in fp32, so more than the guide for full and LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.plan.memory import MemorySpec, estimate_memory

GIB = 2**30
GUIDE_SOURCE = "LLaMA-Factory README, 'Hardware Requirement' (github.com/hiyouga/LLaMA-Factory, 2024)"
TABLE_MODELS = {"7B": "llama-2-7b", "13B": "llama-2-13b", "70B": "llama-2-70b"}


@dataclass(frozen=True)
class GuideRow:
    label: str
    method: str
    engine: str  # how the guide's row trains (see memory.py's engines)
    guide_gb: dict[str, float]  # the guide's figure by model size; its "GB" are GPU-sized, i.e. GiB (an "80GB" A100)


GUIDE_ROWS = (
    GuideRow("full (AMP)", "full", "hf", {"7B": 120, "13B": 240, "70B": 1200}),
    GuideRow("full (16-bit)", "full", "hf-bf16", {"7B": 60, "13B": 120, "70B": 600}),
    GuideRow("LoRA (16-bit)", "lora", "hf", {"7B": 16, "13B": 32, "70B": 160}),
    GuideRow("QLoRA (4-bit)", "qlora", "hf", {"7B": 6, "13B": 12, "70B": 48}),
)
TABLE_SEQ_LEN = 1024
TABLE_CHECKPOINTING = True


@dataclass(frozen=True)
class TableCell:
    size: str
    row: GuideRow
    computed: int  # bytes, the guide's setup
    tuneforge: int | None  # bytes, the same run as `tuneforge train` does it

    @property
    def ratio(self) -> float:
        return self.computed / (self.row.guide_gb[self.size] * GIB)


def table_spec(model: str, method: str, engine: str) -> MemorySpec:
    return MemorySpec(model=model, method=method, engine=engine, example_lengths=(TABLE_SEQ_LEN,),
                      gradient_checkpointing=TABLE_CHECKPOINTING, compute_dtype="bf16", device="cuda")


def compute_table(with_tuneforge: bool = True) -> list[TableCell]:
    cells = []
    for size, model in TABLE_MODELS.items():
        for row in GUIDE_ROWS:
            computed = estimate_memory(table_spec(model, row.method, row.engine)).peak
            ours = None
            if with_tuneforge and row.engine != "hf-bf16":  # tuneforge has one full mode; show it once
                ours = estimate_memory(table_spec(model, row.method, "tuneforge")).peak
            cells.append(TableCell(size, row, computed, ours))
    return cells


def format_table(cells: list[TableCell]) -> str:
    lines = [f"peak training memory, GiB: one sequence of {TABLE_SEQ_LEN} tokens, gradient checkpointing, bf16, "
             "AdamW, CUDA",
             f"guide: {GUIDE_SOURCE}",
             "",
             "| model | method | guide | tuneforge estimate (guide's setup) | ratio | `tuneforge train` (fp32 weights) |",
             "|---|---|---:|---:|---:|---:|"]
    for c in cells:
        ours = f"{c.tuneforge / GIB:,.1f}" if c.tuneforge is not None else "-"
        lines.append(f"| {c.size} | {c.row.label} | {c.row.guide_gb[c.size]:,.0f} | {c.computed / GIB:,.1f} | "
                     f"{c.ratio:.2f} | {ours} |")
    return "\n".join(lines)
