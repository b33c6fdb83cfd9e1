"""The full, JSON-able description of a run (saved beside the weights as the recipe)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FactorLMError, check



def resolve_mixed_precision(value: str) -> str:
    """``auto`` -> ``bf16`` where training runs on a device with native bf16 (a bf16 GPU; a CPU with
    AVX-512 BF16 or AMX), else ``no`` (emulated bf16 is slower than fp32); other values unchanged."""
    if value != "auto":
        return value
    import torch

    from .profiling import bf16_native

    return "bf16" if bf16_native("cuda" if torch.cuda.is_available() else "cpu") else "no"


@dataclass
class RunConfig:
    # -- model and data ------------------------------------------------------------------------
    model: str | None = None  # hub id, local folder, or None = embedded all-MiniLM-L6-v2
    task: str = "rotten_tomatoes"
    data_dir: str | None = None  # GLUE layout folder (else $FACTORLM_DATA_DIR, else the hub)
    train_file: str | None = None  # generic csv/jsonl task
    dev_file: str | None = None
    text_columns: list[str] | None = None
    label_column: str | None = None
    max_length: int | None = None  # tokens per example; None = 128, or 384 for QA tasks (see validate)
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    seed: int = 0
    # held-out slice of the training split that keep-best selects on (fraction < 1, count >= 1, 0 = none)
    selection_size: float = 0.1
    # -- extractive QA (squad, squad_v2) --------------------------------------------------------
    split_by_article: float | None = None  # one SQuAD file: this fraction of its articles is the dev split
    doc_stride: int = 128  # tokens shared by consecutive windows of a long context
    max_answer_length: int = 30  # longest answer span, in tokens
    n_best: int = 20  # start / end candidates paired per window
    # -- every training phase ------------------------------------------------------------------
    learning_rate: float = 5e-5
    epochs: float = 3.0
    max_steps: int | None = None  # bounds every training phase (smoke runs)
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    eval_every: int | None = None
    mixed_precision: str = "no"  # no | fp16 | bf16 | auto (bf16 where the device runs it natively, else no)
    group_by_length: bool = False  # training batches of similar lengths (less padding; changes the batch order)
    progress: bool = True
    checkpoint_dir: str | None = None  # periodic training checkpoints (accelerate save_state) go here
    save_every: int | None = None  # steps between checkpoints (needs checkpoint_dir)
    # -- dense teacher (compress starts from a model fine-tuned on the task) --------------------
    teacher: str | None = None  # a fine-tuned model folder; else the model itself if it has a trained head
    teacher_epochs: float | None = None  # default: epochs
    teacher_learning_rate: float | None = None  # default: learning_rate
    cache_dir: str | None = None  # default: $FACTORLM_CACHE or ~/.cache/factorlm
    # -- compression ---------------------------------------------------------------------------
    method: str = "lpaf"
    keep: float | None = 0.25
    rank: int | None = None
    ranks: str | None = None  # JSON file of per-matrix ranks (e.g. a RankDyna allocation); see ranks/explicit.py
    structure: str = "lowrank"
    nblocks: int | None = None  # Monarch / block-wise grid (structure default when None)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    rank_policy: str = "uniform"  # uniform | global
    schedule: str = "oneshot"  # oneshot | staged
    stages: int = 0  # staged: number of stages (groups of consecutive layers); 0 = one per layer
    stage_order: str = "bottom_up"  # staged: bottom_up | top_down
    stage_epochs: float = 0.0  # staged: training after each stage; 0 = epochs / number of stages
    method_options: dict[str, Any] = field(default_factory=dict)
    # -- --task lm: one-shot compression of causal LMs (see factorlm.lm) -------------------------
    calibration: str | None = None  # corpus name or text file (default: convention speeches)
    calibration_samples: int = 128  # random windows of seq_len tokens
    eval_text: str | None = None  # corpus name or text file for perplexity (default: hamlet)
    seq_len: int = 256  # tokens per calibration window and per perplexity window
    eval_seq_len: int | None = None  # perplexity window (default: min(2048, the model's context))
    eval_stride: int | None = None  # perplexity window stride (default eval_seq_len: non-overlapping)
    bos: str = "auto"  # a BOS token before every window: auto (where the tokenizer adds one) | yes | no
    generation_prompts: int = 4  # greedy continuations scored for loops (dense and compressed); 0 = none
    eval_max_tokens: int | None = None  # cap on the evaluation tokens (default: all)
    rank_multiple: int = 1  # round ranks down to multiples of this (8: fast kernels)
    global_score: str = "fisher"  # --rank-policy global: fisher (loss-weighted spectra) | energy (relative)
    rank_price: str | None = None  # global plan: score per triplet | per weight (score / (out + in)); None = the method's (lm: triplet)
    refine_steps: int | None = None  # per-block refinement (AA-SVD), optimizer steps per block; None = the method's default (lm: rtn-lowrank 32, others 0)
    refine_lr: float = 3e-3  # measured on SmolLM2 (AA-SVD: 1e-4 over ~25 passes; here a few dozen steps)
    refine_params: str = "factors"  # factors | all (every floating parameter of the block)
    refine_loss: str = "mse"  # mse (AA-SVD's) | fisher (factorlm's: the block-output error weighted by its output-gradient Gram)
    heal_steps: int = 0  # optimizer steps of language-model fine-tuning after the one-shot factorization
    heal_params: str = "factors"  # factors | all: what healing trains
    heal_loss: str = "distill"  # distill (KL to the dense model's next-token distribution) | lm (next-token loss)
    heal_samples: int = 1024  # calibration-text windows healing draws from (its own seeded draw)
    heal_optimizer: str = "auto"  # auto (adamw-sr for bf16 weights, else adamw) | adamw | adamw-sr | adamw8bit
    heal_update: str = "joint"  # joint (both factors) | sequential (SVD-LLM: A, then B; state for one at a time)
    heal_checkpointing: bool = False  # transformers' gradient checkpointing during healing
    heal_curve: list[int] | None = None  # held-out perplexity also at these optimizer steps of the healing run
    device: str = "auto"  # --task lm execution device: auto (a GPU when visible) | cpu | cuda | cuda:N
    offload: str = "none"  # --task lm: none (the model on the device) | cpu (blocks visit the device one at a time)
    # -- measured latency in the report (dense source vs compressed, same process) -------------
    latency: bool = True
    latency_batch: int | None = None  # default: 32 (encoders), 1 (--task lm)
    latency_seq: int | None = None  # default: max_length (encoders), 128 prompt tokens (--task lm)
    # -- deployment ----------------------------------------------------------------------------
    dtype: str = "auto"  # the final model's dtype; auto = fp32 for encoders, the checkpoint's dtype for --task lm
    skip_slow: bool = False  # keep dense the target matrices that would not run faster factorized
    # -- output --------------------------------------------------------------------------------
    output: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.max_length is None:  # the task's usual length: a sentence (pair), or a QA window
            self.max_length = 384 if is_qa_task(self.task) else 128
        if self.mixed_precision == "auto":  # resolved at once: the recorded recipe says what ran
            self.mixed_precision = resolve_mixed_precision("auto")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def validate(self) -> "RunConfig":
        self.__post_init__()
        check(self.max_length > 0, f"--max-length must be > 0, got {self.max_length}")
        check(self.mixed_precision in ("no", "fp16", "bf16"),
              f"--mixed-precision must be no, fp16, bf16 or auto, got {self.mixed_precision!r}")
        if is_qa_task(self.task):  # (the QA settings are unused by every other task)
            check(0 < self.doc_stride < self.max_length,
                  f"--doc-stride must be in (0, --max-length {self.max_length}), got {self.doc_stride}")
            check(self.max_answer_length > 0, f"--max-answer-length must be > 0, got {self.max_answer_length}")
            check(self.n_best > 0, f"--n-best must be > 0, got {self.n_best}")
        check(self.split_by_article is None or 0 < self.split_by_article < 1,
              f"--split-by-article must be a fraction in (0, 1), got {self.split_by_article}")
        check(self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}")
        check(self.max_train_samples is None or self.max_train_samples > 0, "--max-train-samples must be > 0")
        check(self.max_eval_samples is None or self.max_eval_samples > 0, "--max-eval-samples must be > 0")
        check(self.dtype in ("auto", "fp32", "bf16", "fp16"), f"--dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        check(self.latency_batch is None or self.latency_batch > 0, f"--latency-batch must be > 0, got {self.latency_batch}")
        check(self.latency_seq is None or self.latency_seq > 1, f"--latency-seq must be > 1, got {self.latency_seq}")
        check(self.selection_size >= 0 and (self.selection_size < 1 or float(self.selection_size).is_integer()),
              f"--selection-size must be a fraction in [0, 1) or a whole count, got {self.selection_size}")
        check(self.heal_optimizer in ("auto", "adamw", "adamw-sr", "adamw8bit"),
              f"--heal-optimizer must be auto, adamw, adamw-sr or adamw8bit, got {self.heal_optimizer!r}")
        check(self.heal_update in ("joint", "sequential"), f"--heal-update must be joint or sequential, got {self.heal_update!r}")
        check(self.rank_price in (None, "triplet", "weight"), f"--rank-price must be triplet or weight, got {self.rank_price!r}")
        check(self.generation_prompts >= 0, f"--generation-prompts must be >= 0, got {self.generation_prompts}")
        check(self.bos in ("auto", "yes", "no"), f"--bos must be auto, yes or no, got {self.bos!r}")
        check(self.eval_seq_len is None or self.eval_seq_len > 1, f"--eval-seq-len must be > 1, got {self.eval_seq_len}")
        check(self.offload in ("none", "cpu"), f"--offload must be none or cpu, got {self.offload!r}")
        check(self.calibration_samples > 0, f"--calibration-samples must be > 0, got {self.calibration_samples}")
        check(self.seq_len > 1, f"--seq-len must be > 1, got {self.seq_len}")
        check(self.eval_stride is None or 1 <= self.eval_stride <= self.seq_len,
              f"--eval-stride must be in [1, --seq-len {self.seq_len}], got {self.eval_stride}")
        check(self.eval_max_tokens is None or self.eval_max_tokens > 1, "--eval-max-tokens must be > 1")
        check(self.global_score in ("fisher", "energy"), f"--global-score must be fisher or energy, got {self.global_score!r}")
        check(self.rank_multiple >= 1, f"--rank-multiple must be >= 1, got {self.rank_multiple}")
        check(self.heal_steps >= 0, f"--heal-steps must be >= 0, got {self.heal_steps}")
        check(self.refine_steps is None or self.refine_steps >= 0, f"--refine-steps must be >= 0, got {self.refine_steps}")
        check(self.refine_lr > 0, f"--refine-lr must be > 0, got {self.refine_lr}")
        check(self.refine_params in ("factors", "all"), f"--refine-params must be factors or all, got {self.refine_params!r}")
        check(self.refine_loss in ("mse", "fisher"), f"--refine-loss must be mse or fisher, got {self.refine_loss!r}")
        if self.heal_curve:
            bad = [s for s in self.heal_curve if not 0 < s <= self.heal_steps]
            check(not bad, f"--heal-curve steps must be in [1, --heal-steps={self.heal_steps}], got {bad[:1]}")
        check(self.heal_loss in ("lm", "distill"), f"--heal-loss must be lm or distill, got {self.heal_loss!r}")
        check(self.heal_samples > 0, f"--heal-samples must be > 0, got {self.heal_samples}")
        check(self.heal_params in ("factors", "all"), f"--heal-params must be factors or all, got {self.heal_params!r}")
        check(self.rank_policy in ("uniform", "global"), f"--rank-policy must be uniform or global, got {self.rank_policy!r}")
        check(self.schedule in ("oneshot", "staged"), f"--schedule must be oneshot or staged, got {self.schedule!r}")
        check(self.stage_order in ("bottom_up", "top_down"), f"--stage-order must be bottom_up or top_down, got {self.stage_order!r}")
        check(self.stages >= 0 and self.stage_epochs >= 0, "--stages and --stage-epochs must be >= 0")
        if self.ranks is not None:  # the file itself is read by compress, before any work
            check(self.rank is None, "give --ranks or --rank, not both")
            check(self.structure == "lowrank", f"--ranks gives low-rank ranks: use --structure lowrank, not {self.structure!r}")
            check(self.rank_policy == "uniform", "--ranks is the allocation: drop --rank-policy global")
        if self.rank is not None:
            check(self.rank > 0, f"--rank must be a positive integer, got {self.rank}")
        elif self.keep is not None:
            from .ranks.budget import check_keep

            self.keep = check_keep(self.keep)
        return self


def is_qa_task(name: str) -> bool:
    """Whether the registered task ``name`` is extractive QA (False for unknown names)."""
    from .data.tasks import TASKS

    try:
        return bool(getattr(TASKS.get(name), "qa", False))
    except FactorLMError:
        return False


def load_recipe(path: str) -> dict[str, Any]:
    """Read a YAML/JSON recipe: keys are RunConfig fields; unknown keys go to method_options."""
    p = Path(path)
    if not p.is_file():
        raise FactorLMError(f"recipe file not found: {path}")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001
        raise FactorLMError(f"cannot parse recipe {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise FactorLMError(f"recipe {path} must be a mapping of option: value")
    data = dict(data.get("recipe", data))  # accept a saved factorlm.json's "recipe" block too
    known = RunConfig.field_names()
    opts = dict(data.pop("method_options", {}) or {})
    out = {k: v for k, v in data.items() if k in known}
    opts.update({k: v for k, v in data.items() if k not in known})
    out["method_options"] = opts
    return out
