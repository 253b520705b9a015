"""
retrv_r1.py -- Retrv-R1 in one file.

A minimal, educational reimplementation of

    Retrv-R1: A Reasoning-Driven MLLM Framework for Universal and Efficient Multimodal Retrieval
    Zhu et al., NeurIPS 2025, https://arxiv.org/abs/2510.02745

A query (text, image or image+text) is answered in two stages. A coarse retriever phi embeds
query and candidates and keeps the top-K. A reasoning MLLM theta reads the query and the K
candidates -- each squeezed by the Information Compression Module (ICM) into two tokens
[t_con, t_rel] -- writes <think> ... </think><answer>k</answer>, and may ask to see a candidate in
full with <insp_s>k<insp_e> ("details inspection"). theta is trained in three stages: ICM
self-alignment, SFT "activation" on a retrieval-tailored synthetic chain of thought, and GRPO with
a curriculum reward that makes every inspection cost more as training goes on.

Commands (CPU, offline; the default `tiny` preset generates its own data and backbone):

    pip install torch==2.13.0 -r requirements.txt
    python retrv_r1.py train                     # every stage on the tiny preset
    python retrv_r1.py eval                      # R@1/5/10 per task -> runs/tiny/eval_test.json
    python retrv_r1.py demo                      # one query: phi's top-K, theta's trace, a picture
    python retrv_r1.py ablate                    # the paper's ablation rows
    python retrv_r1.py bench                     # sampler speed, ICM vs full tokens, step times
    python retrv_r1.py train --preset smoke      # a 1-2 minute pass (tests and notebooks)
    python retrv_r1.py --help                    # every command and flag

One GPU, pretrained SmolVLM (weights from the hub or a local directory):

    python retrv_r1.py train --preset smolvlm --backbone HuggingFaceTB/SmolVLM-256M-Instruct

Sections (read top to bottom; nothing is used before it is defined):

    1. Config                 Config dataclass, presets (smoke / tiny / smolvlm), the CLI's flags
    2. Utilities              seeding, device/dtype choice, masked means, atomic checkpoints, metric logs
    3. Data                   the synthetic world -> M-BEIR layout; the M-BEIR reader (ours or the real one)
    4. Backbone               word-level tokenizer, Idefics3/SmolVLM (tiny random-init or pretrained)
    5. Coarse retriever phi   embeddings, InfoNCE, top-K search
    6. ICM                    t_con = ATT1(e_con, T_c); R = ATT2(T_c, T_q); t_rel = ATT1'(e_rel, R)
    7. Prompt + inspection    prompt layout, <insp_s>k<insp_e> splices, batched KV-cache sampler, scorer
    8. Rewards                format / result reward, curriculum lambda, group advantages, GRPO loss
    9. Stage 0                backbone warm-up (tiny backbone only)
   10. Stage 1                ICM self-alignment (LM frozen)
   11. Stage 2                synthetic four-phase CoT and SFT activation (LoRA for pretrained LMs)
   12. Stage 3                GRPO with the curriculum result-efficiency reward
   13. Evaluation             M-BEIR Recall@k (hit rate), reranking, efficiency, demo, ablate, bench
   14. CLI                    data | train | eval | demo | ablate | bench

Deviations from the paper
-------------------------
* Backbone: the paper uses Qwen2.5-VL-3B/7B; here it is the Idefics3/SmolVLM family, either a
  ~3M-parameter random-initialised Idefics3 with a word-level tokenizer (CPU, offline) or a
  pretrained SmolVLM checkpoint (GPU). Pretrained images are resized to one square tile (no
  SmolVLM image splitting).
* Stage 0 (warm-up) does not exist in the paper: a random-initialised backbone knows nothing, so
  it first learns to caption scenes and to describe query-candidate differences from full tokens.
  This stands in for the knowledge of a pretrained VLM and is skipped for pretrained ones. A
  throw-away linear probe reads every cell's shape / colour / size off the visual tokens during the
  warm-up: a dense signal for the vision side (--warmup-probe).
* Data: a synthetic world of coloured shapes on a 3x3 grid written in the M-BEIR layout (task
  ids 0, 3, 4, 7) instead of the 16 M-BEIR evaluations, with one-change hard negatives
  (--neg-structure star: the target is the hub of its negatives, so a query-blind rule can find it;
  `eval` prints that control) or the corners of a 4-cube of independent changes (cube: no hub).
  The reader also accepts the real M-BEIR root. Scene graphs travel in `src_content` as JSON.
* Coarse retriever phi: the paper uses an existing MLLM embedding model (LamRA-style). Here phi is
  a copy of the warmed-up backbone, mean-pooled and projected, trained with InfoNCE on the train
  split; its vision encoder and connector stay frozen. A composed query (image + edit) is read text
  first, so that under causal attention the image's tokens can attend to the edit.
* ICM: each ATT is one pre-norm cross-attention block (+MLP); a learnable position table is added
  to T_c (word embeddings carry no order); e_con and e_rel are separate vectors. Self-alignment
  targets are the frozen LM's own greedy descriptions from full tokens ("caption :" / "relation :"
  prompts learned in the warm-up).
* Synthetic CoT: a rule-based teacher over scene graphs instead of Qwen2.5-VL-72B. Its
  "eliminate" phase treats colour / size changes as visible in the compressed view and shape /
  position / swap changes as needing inspection. Real M-BEIR data get a format-only trace, or
  teacher CoTs read from a JSONL file (--cot-file).
* GRPO: rollouts at temperature 1; log-probs are the untempered model's; with mu = 1 the ratio is
  1 (the clip never binds) and the update is REINFORCE with a group baseline plus the KL term.
  RL queries are the train queries the SFT model gets wrong first.
* Training data for theta: phi's top-K of the train queries, in phi's order -- the queries phi was
  trained on, so their rank statistics are rosier than at test time.
* Scale: K = 8 (paper: 50), a few hundred optimiser steps per stage on CPU.

Determinism: on CPU the same seed and thread count give the same checkpoints and the same eval
JSON, interrupted and resumed or not (tests check it). CUDA kernels are not bit-deterministic.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

# =============================================================================================
# 1. Config
# =============================================================================================


def arg(default, help: str):
    """A Config field with the one line `--help` shows for its flag."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- run -------------------------------------------------------------------------------------
    preset: str = arg("tiny", "smoke | tiny | smolvlm: a named bundle of the settings below")
    seed: int = arg(0, "one seed for data, initialisation, batching and sampling")
    run_dir: str = arg("", 'checkpoints, metrics and results ("" = runs/<preset>)')
    data_root: str = arg("", 'an M-BEIR root, ours or the real one ("" = data/synthetic-<world>)')
    stages: str = arg("all", "train: all, or a comma list of warmup,retriever,icm,sft,grpo")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N")
    threads: int = arg(0, "torch CPU threads (0 = all cores)")
    # --- the synthetic world (section 3) ---------------------------------------------------------
    world: str = arg("tiny", "name of the generated world: data/synthetic-<world>")
    tasks: str = arg("0,3,4,7", "M-BEIR task ids to generate: 0 t->i, 3 i->t, 4 i->i, 7 (i,t)->i")
    n_train: int = arg(600, "train queries per task")
    n_val: int = arg(50, "val queries per task")
    n_test: int = arg(100, "test queries per task")
    n_hard_neg: int = arg(15, "hard negatives per query, all in the task's local pool")
    neg_structure: str = arg("star", "star: every negative one change from the target | cube: corners of 4 changes")
    # --- backbone (section 4) --------------------------------------------------------------------
    backbone: str = arg("tiny", 'tiny (random init, offline) or an Idefics3/SmolVLM directory or hub id')
    # --- stage 0: warm-up (section 9) ------------------------------------------------------------
    warmup_steps: int = arg(500, "warm-up optimiser steps (tiny backbone only)")
    warmup_lr: float = arg(1e-3, "warm-up AdamW learning rate")
    warmup_batch: int = arg(48, "warm-up sequences per step")
    warmup_probe: float = arg(1.0, "weight of the attribute-probe loss on the visual tokens (0 = off)")
    warmup_check_frac: float = arg(0.0, "share of words-only check sequences: ideal, candidate -> relation")
    warmup_copy_steps: int = arg(0, "the first N warm-up steps are words-only copies: text query -> its caption")
    # --- coarse retriever phi (section 5) --------------------------------------------------------
    ret_steps: int = arg(250, "phi: InfoNCE steps")
    ret_lr: float = arg(5e-4, "phi: AdamW learning rate")
    ret_batch: int = arg(48, "phi: queries per step (the others' candidates are in-batch negatives)")
    ret_hard_negs: int = arg(2, "phi: hard negatives per query and step")
    # --- ICM (section 6) -------------------------------------------------------------------------
    icm_mode: str = arg("both", "a candidate in the prompt: both [t_con, t_rel] | con | rel | off (full tokens)")
    # --- stage 1: ICM self-alignment (section 10) ------------------------------------------------
    align_steps: int = arg(200, "self-alignment optimiser steps (only the ICM learns)")
    align_lr: float = arg(1e-3, "self-alignment AdamW learning rate")
    align_batch: int = arg(48, "self-alignment (query, candidate) pairs per step")
    # --- stage 2: synthetic CoT + SFT (section 11) -----------------------------------------------
    sft_steps: int = arg(400, "SFT optimiser steps on the teacher's traces")
    sft_lr: float = arg(5e-4, "SFT AdamW learning rate (LM + ICM; LoRA for pretrained LMs)")
    sft_batch: int = arg(16, "SFT traces per step")
    sft_from: str = arg("icm", "icm: start from the aligned ICM | none: a fresh ICM (w/o self-alignment)")
    cot_mode: str = arg("full", "full: four phases | noinsp: no inspection phase | direct: answer only")
    cot_file: str = arg("", 'optional JSONL of teacher CoTs {"qid", "trace"} from a large MLLM')
    inspect: bool = arg(True, "allow details inspection when sampling (--no-inspect: the ablation)")
    # --- stage 3: GRPO (section 12) --------------------------------------------------------------
    grpo_steps: int = arg(60, "N_iter: RL steps (lambda_i = i / N_iter)")
    grpo_lr: float = arg(1e-4, "GRPO AdamW learning rate")
    grpo_batch: int = arg(8, "B: queries per RL step")
    G: int = arg(8, "rollouts per query (the group)")
    grpo_mu: int = arg(1, "mu: updates per batch of rollouts")
    beta: float = arg(0.04, "weight of the k3 KL to the frozen SFT model (0 = no reference model)")
    grpo_pool: int = arg(256, "RL queries, the SFT model's failures first")
    grpo_from: str = arg("sft", "sft | icm (the w/o-SFT ablation: RL straight from the aligned model)")
    fixed_lambda: float = arg(-1.0, ">= 0: a fixed lambda instead of the curriculum (the ablation uses 0.5)")
    # --- reranking and evaluation (section 13) ---------------------------------------------------
    K: int = arg(8, "rerank depth: phi's top-K go to theta (paper: 50)")
    max_new: int = arg(128, "generated tokens per trace (spliced candidate tokens not counted)")
    split: str = arg("test", "eval / demo: val | test")
    stage: str = arg("", 'eval / demo: coarse | icm | sft | grpo ("" = the furthest trained)')
    qid: str = arg("", "demo: which query (default: the first)")
    rows: str = arg("", 'ablate: a comma list of rows ("" = all)')
    eval_batch: int = arg(256, "items per embedding batch")
    rerank_batch: int = arg(32, "queries theta reranks at once")
    ckpt_every: int = arg(50, "mid-stage checkpoint every N optimiser steps (0 = only at the end)")
    stop_after: int = arg(0, "stop a stage after N steps of this run, checkpointed (0 = never)")


PRESETS: dict[str, dict[str, Any]] = {
    # ~2 minutes on 2 CPU cores: what the tests and notebooks use. The numbers mean little.
    "smoke": dict(world="smoke", n_train=48, n_val=16, n_test=16, n_hard_neg=15,
                  warmup_steps=60, warmup_batch=32, ret_steps=30, ret_batch=16, align_steps=20, align_batch=16,
                  sft_steps=20, sft_batch=8, grpo_steps=4, grpo_batch=2, G=4, grpo_pool=16, ckpt_every=5),
    # the default CPU run (results in README.md)
    "tiny": dict(),
    # pretrained SmolVLM on one GPU; images are resized to the checkpoint's tile size
    "smolvlm": dict(world="tiny", backbone="HuggingFaceTB/SmolVLM-256M-Instruct", warmup_steps=0,
                    ret_batch=32, ret_lr=1e-4, eval_batch=64),
}
CHOICES = {"neg_structure": ("star", "cube"), "icm_mode": ("both", "con", "rel", "off"), "sft_from": ("icm", "none"),
           "cot_mode": ("full", "noinsp", "direct"), "grpo_from": ("sft", "icm"), "split": ("train", "val", "test"),
           "stage": ("", "coarse", "icm", "sft", "grpo")}
# fields a run's config.json does not decide: where to read and write, how to run, what to evaluate
PER_CALL = {"run_dir", "stages", "device", "threads", "split", "stage", "qid", "rows", "eval_batch", "rerank_batch",
            "ckpt_every", "stop_after"}


class RetrvError(Exception):
    """Any error caused by the user's input or files; the CLI prints it as one line."""


def _field_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]


COMMANDS = {
    "data": "write the synthetic world in the M-BEIR layout (to --data-root)",
    "train": "run the stages in order: warmup, retriever, icm, sft, grpo (finished ones are skipped)",
    "eval": "Recall@k per task, inspections, context tokens -> <run_dir>/eval_<split>.json",
    "demo": "one query end to end: phi's top-K, theta's trace, a PNG of the candidates",
    "ablate": "train and evaluate the paper's ablation rows -> <run_dir>/ablation.md",
    "bench": "sampler speed, ICM vs full tokens as K grows, step times and memory -> <run_dir>/bench.md",
}


def build_argparser() -> argparse.ArgumentParser:
    """One sub-command per COMMANDS entry, each taking one flag per Config field (--warmup-steps 50;
    bools get --x / --no-x), grouped by the section that uses them. Nothing hand-written per flag."""
    common = argparse.ArgumentParser(add_help=False)
    titles = {"preset": "run", "world": "the synthetic world (section 3)", "backbone": "backbone (section 4)",
              "warmup_steps": "stage 0: warm-up (section 9)", "ret_steps": "coarse retriever phi (section 5)",
              "icm_mode": "ICM (section 6)", "align_steps": "stage 1: ICM self-alignment (section 10)",
              "sft_steps": "stage 2: CoT + SFT (section 11)", "grpo_steps": "stage 3: GRPO (section 12)",
              "K": "reranking and evaluation (section 13)"}
    for f in fields(Config):
        if f.name in titles:  # the first field of each block of Config opens a group of flags
            group = common.add_argument_group(titles[f.name])
        flag, t, h = "--" + f.name.replace("_", "-"), _field_type(f), f.metadata["help"]
        if t is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"{h} (default {f.default})")
        else:
            group.add_argument(flag, type=t, default=None, metavar=t.__name__.upper(), help=f"{h} (default {f.default!r})")
    p = argparse.ArgumentParser(prog="retrv_r1.py", description="Retrv-R1 in one file. The defaults shown are the tiny "
                                "preset's (--preset smoke and smolvlm change some); every command but `data` starts "
                                "from the run's own config.json, and the flags given override it.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, h in COMMANDS.items():
        sub.add_parser(name, parents=[common], help=h, description=h)
    return p


def make_config(preset: str = "tiny", **overrides) -> Config:
    """Config of a preset plus overrides; fills run_dir / data_root defaults. Used by CLI and notebooks."""
    if preset not in PRESETS:
        raise RetrvError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    kw = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    bad = sorted(set(kw) - {f.name for f in fields(Config)})
    if bad:
        raise RetrvError(f"unknown Config field(s): {bad}")
    cfg = Config(preset=preset, **kw)
    cfg.run_dir = cfg.run_dir or f"runs/{preset}"
    cfg.data_root = cfg.data_root or default_data_root(cfg)
    if cfg.K < 1:
        raise RetrvError(f"--K must be >= 1 (got {cfg.K})")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise RetrvError(f"--{name.replace('_', '-')} must be one of {choices} (got {getattr(cfg, name)!r})")
    if not 0 <= cfg.warmup_copy_steps <= cfg.warmup_steps:
        raise RetrvError(f"--warmup-copy-steps must be between 0 and --warmup-steps {cfg.warmup_steps} "
                         f"(got {cfg.warmup_copy_steps}); the copy steps are part of the warm-up's steps")
    for f in fields(Config):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise RetrvError(f"--{f.name.replace('_', '-')} must be a finite number (got {v})")
        if f.name.endswith("_lr") and v <= 0:
            raise RetrvError(f"--{f.name.replace('_', '-')} must be > 0 (got {v})")
    return cfg


def default_data_root(cfg: Config) -> str:
    return f"data/synthetic-{cfg.world}"


def with_run_config(cfg: Config, given: dict, verbose: bool = True) -> Config:
    """The run's saved settings, then the flags given now. Why: `eval --run-dir runs/x` must score the
    model with the settings it was trained with (--max-new, --K ...), not the preset's defaults -- a
    forgotten flag would otherwise give a silently different number. Prints what it took."""
    path = Path(cfg.run_dir) / "config.json"
    if not path.exists():
        return cfg
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise RetrvError(f"{path} is unreadable ({e}); fix or delete it (the run's weights do not need it)") from None
    if "preset" in given and saved.get("preset", given["preset"]) != given["preset"]:
        raise RetrvError(f"{cfg.run_dir} was made with --preset {saved['preset']}, not {given['preset']}: drop "
                         f"--preset to use the run's settings, or pass another --run-dir for a {given['preset']} run")
    types = {f.name: _field_type(f) for f in fields(Config)}
    kw = {}
    for k, v in saved.items():
        if k not in types or k in PER_CALL or k in given:
            continue  # a field this version does not have, a per-call field, or one the command line sets
        ok = isinstance(v, types[k]) and not (types[k] is int and isinstance(v, bool))
        if types[k] is float and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            raise RetrvError(f"{path}: field {k!r} should be {types[k].__name__}, got {v!r}")
        kw[k] = v
    out = dataclasses.replace(cfg, **kw)
    if "data_root" not in given and "data_root" not in kw:
        out.data_root = default_data_root(out)  # a config.json without data_root: follow its world
    try:
        out = make_config(out.preset, **{f.name: getattr(out, f.name) for f in fields(Config) if f.name != "preset"})
    except RetrvError as e:
        raise RetrvError(f"{path}: {e}") from None
    diff = [f"{f.name}={getattr(out, f.name)!r}" for f in fields(Config)
            if f.name not in given and getattr(out, f.name) != getattr(cfg, f.name)]
    if verbose and diff:
        print(f"[config] {path}: the run's settings ({', '.join(diff)}); flags given now override them")
    return out


def config_from_args(argv: list[str] | None = None, verbose: bool = True) -> tuple[str, Config]:
    """CLI -> (command, Config). Every command but `data` starts from the run's own config.json when
    --run-dir (default runs/<preset>) already holds one; the flags given on the command line override it."""
    args = vars(build_argparser().parse_args(argv))
    cmd = args.pop("command")
    given = {k: v for k, v in args.items() if v is not None}
    cfg = make_config(given.get("preset", "tiny"), **{k: v for k, v in given.items() if k != "preset"})
    return cmd, (cfg if cmd == "data" else with_run_config(cfg, given, verbose))


# =============================================================================================
# 2. Utilities
# =============================================================================================


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(cfg: Config, verbose: bool = True) -> tuple[torch.device, torch.dtype]:
    """Device and autocast dtype, with the reason printed. Never hard-codes "cuda"."""
    if cfg.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        why = "CUDA is available" if dev.type == "cuda" else "no CUDA device found"
    else:
        dev = torch.device(cfg.device)
        why = "asked for by --device"
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RetrvError(f"--device {cfg.device} but torch sees no CUDA device")
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype, dwhy = torch.bfloat16, "bf16 autocast (supported by this GPU)"
    else:
        dtype, dwhy = torch.float32, "fp32 (bf16 gives no speed-up for a model this small on CPU)"
    if dev.type == "cpu":
        n = cfg.threads or os.cpu_count() or 1
        torch.set_num_threads(n)
        dwhy += f", {n} CPU threads"
    if verbose:
        print(f"[device] {dev} ({why}); {dwhy}")
    return dev, dtype


def autocast(dev: torch.device, dtype: torch.dtype):
    """bf16 autocast on CUDA, a no-op on CPU."""
    if dev.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (mask broadcastable to x)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


LOG_EVERY = 25  # optimiser steps between metric lines (GRPO logs every step)


class MetricLog:
    """Appends one JSON object per logged step to <run_dir>/metrics/<stage>.jsonl."""

    def __init__(self, run_dir: str | Path, stage: str, start_step: int = 0):
        self.path = Path(run_dir) / "metrics" / f"{stage}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep what a resumed run already logged, drop the rest
            keep = [line for line in self.path.read_text().splitlines()
                    if start_step and json.loads(line).get("step", 0) < start_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, **row) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}) + "\n")


def read_metrics(run_dir: str | Path, stage: str) -> list[dict]:
    path = Path(run_dir) / "metrics" / f"{stage}.jsonl"
    return [json.loads(line) for line in open(path)] if path.exists() else []


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_dir(final: str | Path):
    """Context manager: write a checkpoint into a temp dir, then swap it in with renames.

    A run killed mid-save leaves the previous checkpoint intact (the temp dir is ignored)."""

    class _Atomic:
        def __enter__(self):
            self.final = Path(final)
            self.tmp = self.final.with_name(f".{self.final.name}.tmp{os.getpid()}")
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            old = self.final.with_name(f".{self.final.name}.old{os.getpid()}")
            if self.final.exists():
                os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
            return False

    return _Atomic()


def stage_state(cfg: Config, stage: str, step: int, **extra) -> dict:
    """What every checkpoint records next to its weights."""
    return dict(stage=stage, step=step, seed=cfg.seed, git_commit=git_commit(),
                time=time.strftime("%Y-%m-%d %H:%M:%S"), config=dataclasses.asdict(cfg), **extra)


def save_config(cfg: Config) -> None:
    atomic_write_text(Path(cfg.run_dir) / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))


def stage_done(cfg: Config, stage: str) -> bool:
    return (Path(cfg.run_dir) / stage / "state.json").exists()


def check_compatible(saved: dict, cfg: Config, where: str, keys=("backbone",)) -> None:
    """Refuse a checkpoint whose config differs from ours in a field that matters, naming them."""
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in keys if k in saved and saved.get(k) != getattr(cfg, k)}
    if diff:
        raise RetrvError(f"{where} was made with a different config: " +
                         ", ".join(f"{k}={a!r} (checkpoint) vs {b!r} (now)" for k, (a, b) in diff.items()))


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RetrvError(f"{path / 'state.json'} is unreadable ({e}); delete {path} to redo that stage") from None


def cosine_schedule(opt, total: int, warmup: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def check_finite(loss: torch.Tensor, stage: str, step: int) -> None:
    """Stop a stage on a NaN/inf loss before the optimiser step, so nothing corrupt is saved."""
    if not torch.isfinite(loss):
        raise RetrvError(f"{stage}: loss is {loss.item()} at step {step}; stopping before the bad update "
                         f"(no checkpoint written). Try a lower learning rate.")


class StopRun(Exception):
    """Raised after --stop-after steps (a planned interruption: tests, preemptible jobs)."""


class Partial:
    """Mid-stage checkpoints in <run_dir>/<stage>_partial/: the module's weights (safetensors), the
    optimiser and scheduler state (torch.save; loaded with weights_only=True), the data-order RNG
    and the step, written atomically every --ckpt-every steps. `train` rerun on the run directory
    resumes from there and ends exactly where an uninterrupted run ends (same seed, CPU)."""

    def __init__(self, cfg: Config, stage: str, module: nn.Module, opt, sched, rng: random.Random):
        self.cfg, self.stage, self.module, self.opt, self.sched, self.rng = cfg, stage, module, opt, sched, rng
        self.dir = Path(cfg.run_dir) / f"{stage}_partial"
        self.ran = 0

    def resume(self) -> int:
        """Load the partial checkpoint if there is one; returns the first step to run."""
        from safetensors.torch import load_model

        if not (self.dir / "state.json").exists():
            return 0
        st = read_state(self.dir)
        check_compatible(st["config"], self.cfg, str(self.dir),
                         keys=[f.name for f in fields(Config) if f.name not in PER_CALL | {"data_root", "preset"}])
        try:
            load_model(self.module, str(self.dir / "model.safetensors"))
            tr = torch.load(self.dir / "trainer.pt", weights_only=True)
        except Exception as e:
            raise RetrvError(f"{self.dir} is corrupt ({type(e).__name__}: {e}); delete it to restart {self.stage}") from None
        self.opt.load_state_dict(tr["opt"])
        self.sched.load_state_dict(tr["sched"])
        torch.set_rng_state(tr["torch_rng"])
        v, internal, g = st["rng"]
        self.rng.setstate((v, tuple(internal), g))
        print(f"[{self.stage}] resuming from {self.dir} at step {st['step']}")
        return st["step"]

    def step_done(self, step: int) -> None:
        """Call after optimiser step `step` (0-based): checkpoint / planned stop."""
        from safetensors.torch import save_model

        self.ran += 1
        n = step + 1
        stop = self.cfg.stop_after and self.ran >= self.cfg.stop_after
        if (self.cfg.ckpt_every and n % self.cfg.ckpt_every == 0) or stop:
            with atomic_dir(self.dir) as tmp:
                save_model(self.module, str(tmp / "model.safetensors"))
                torch.save({"opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                            "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
                (tmp / "state.json").write_text(json.dumps(stage_state(self.cfg, self.stage, n, rng=self.rng.getstate())))
        if stop:
            raise StopRun(f"{self.stage}: stopped after {self.ran} steps (--stop-after); rerun `train` to resume")

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# =============================================================================================
# 3. Data: the synthetic world, the M-BEIR layout, the reader
# =============================================================================================
#
# A scene is 2-4 objects on a 3x3 grid; an object is (shape, color, size, cell). Shapes are unique
# within a scene, so "the circle" always names one object. Hard negatives differ from the target
# in exactly one attribute of one object (color, shape, size, position) or swap two objects: a
# single embedding vector confuses them, the full tokens do not.

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "white"]
SIZES = ["small", "large"]
CELLS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
         "bottom right"]
RGB = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 230, 50),
       "purple": (160, 60, 210), "orange": (250, 140, 20), "cyan": (40, 220, 230),
       "white": (245, 245, 245)}
ATTRS = ["color", "shape", "size", "position"]
IMAGE_SIZE = 64  # rendered scene side in pixels (a 3x3 grid of ~21-px cells)
DATASET_ID = 10  # M-BEIR uses 0-9; our synthetic dataset is "10"
DATASET_NAME = "synth"
TASK_MODALITIES = {0: ("text", "image"), 3: ("image", "text"), 4: ("image", "image"),
                   7: ("image,text", "image")}
TASK_NAMES = {0: "text->image", 1: "text->text", 2: "text->image,text", 3: "image->text",
              4: "image->image", 5: "image->text,image", 6: "image,text->text",
              7: "image,text->image", 8: "image,text->image,text"}
MODALITIES = {"text", "image", "image,text"}

Obj = tuple  # (shape, color, size, cell)


def random_scene(rng: random.Random) -> list[Obj]:
    n = rng.randint(2, 4)
    cells = rng.sample(range(9), n)
    shapes = rng.sample(SHAPES, n)
    return sorted((s, rng.choice(COLORS), rng.choice(SIZES), c) for s, c in zip(shapes, cells))


def canon(scene) -> tuple:
    """Scenes compare as sorted tuples of objects."""
    return tuple(sorted(tuple(o) for o in scene))


def caption(scene) -> str:
    """Objects in reading order: 'a large red circle top left , a small blue star center .'"""
    objs = sorted(scene, key=lambda o: o[3])
    return " , ".join(f"a {o[2]} {o[1]} {o[0]} {CELLS[o[3]]}" for o in objs) + " ."


def one_change_variants(scene, rng: random.Random, n: int, exclude=()) -> list[list[Obj]]:
    """n distinct scenes differing from `scene` by one attribute of one object, or a swap.

    The change type is drawn uniformly first (color/shape/size/position/swap), so that each kind of
    hard negative is about equally common."""
    scene = [tuple(o) for o in scene]
    seen = {canon(scene)} | {canon(e) for e in exclude}
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 10000:
            raise RuntimeError("could not draw enough distinct one-change variants")
        kind = rng.choice(["color", "shape", "size", "position", "swap"])
        new = list(scene)
        i = rng.randrange(len(new))
        s, c, z, cell = new[i]
        used_cells = {o[3] for o in new}
        if kind == "color":
            new[i] = (s, rng.choice([x for x in COLORS if x != c]), z, cell)
        elif kind == "shape":
            free = [x for x in SHAPES if x not in {o[0] for o in new}]
            new[i] = (rng.choice(free), c, z, cell)
        elif kind == "size":
            new[i] = (s, c, "small" if z == "large" else "large", cell)
        elif kind == "position":
            new[i] = (s, c, z, rng.choice([x for x in range(9) if x not in used_cells]))
        else:
            j = rng.choice([x for x in range(len(new)) if x != i])
            new[i], new[j] = (s, c, z, new[j][3]), (new[j][0], new[j][1], new[j][2], cell)
        key = canon(new)
        if key not in seen:
            seen.add(key)
            out.append(sorted(new))
    return out


def describe_relation(target, cand) -> str:
    """The 'relation description' between the scene a query asks for and a candidate's scene:
        'match .' | 'differs : the circle has color blue not red .' | 'differs : the circle and the star
        are swapped .' | 'differs : many changes .'
    Objects are matched exactly first; what is left over is the difference. The verdict comes first."""
    t, c = [tuple(o) for o in target], [tuple(o) for o in cand]
    rest_t = [o for o in t if o not in c]
    rest_c = [o for o in c if o not in t]
    if not rest_t and not rest_c:
        return "match ."
    if len(rest_t) == 1 and len(rest_c) == 1:
        a, b = rest_t[0], rest_c[0]
        diff = [k for k, (x, y) in enumerate(zip(a, b)) if x != y]
        if len(diff) == 1:
            k = diff[0]
            name = ["shape", "color", "size", "position"][k]
            tv, cv = (CELLS[a[3]], CELLS[b[3]]) if k == 3 else (a[k], b[k])
            return f"differs : the {a[0]} has {name} {cv} not {tv} ."
    if len(rest_t) == 2 and len(rest_c) == 2:
        a1, a2 = rest_t
        swapped = sorted([(a1[0], a1[1], a1[2], a2[3]), (a2[0], a2[1], a2[2], a1[3])])
        if swapped == sorted(rest_c):
            return f"differs : the {a1[0]} and the {a2[0]} are swapped ."
    return "differs : many changes ."


def apply_edit(scene, rng: random.Random) -> tuple[list[Obj], str]:
    """Task 7 (composed retrieval): one edit of one object, and its instruction text."""
    new = [tuple(o) for o in scene]
    i = rng.randrange(len(new))
    s, c, z, cell = new[i]
    kind = rng.choice(["color", "shape", "size", "position"])
    if kind == "color":
        c2 = rng.choice([x for x in COLORS if x != c])
        new[i], text = (s, c2, z, cell), f"make the {s} {c2}"
    elif kind == "shape":
        s2 = rng.choice([x for x in SHAPES if x not in {o[0] for o in new}])
        new[i], text = (s2, c, z, cell), f"turn the {s} into a {s2}"
    elif kind == "size":
        z2 = "small" if z == "large" else "large"
        new[i], text = (s, c, z2, cell), f"make the {s} {z2}"
    else:
        cell2 = rng.choice([x for x in range(9) if x not in {o[3] for o in new}])
        new[i], text = (s, c, z, cell2), f"move the {s} to the {CELLS[cell2]}"
    return sorted(new), text


def render(scene, size: int = 64, jitter: random.Random | None = None):
    """Draw a scene as an RGB PIL image. With `jitter`, objects move by up to 2 px, colours shift and
    pixel noise is added (task 4's 'same scene, re-photographed' query)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (25, 25, 30))
    d = ImageDraw.Draw(img)
    cs = size / 3
    for shape, color, sz, cell in scene:
        cx, cy = (cell % 3 + 0.5) * cs, (cell // 3 + 0.5) * cs
        col = RGB[color]
        if jitter is not None:
            cx, cy = cx + jitter.uniform(-2, 2), cy + jitter.uniform(-2, 2)
            col = tuple(int(min(255, max(0, v + jitter.uniform(-20, 20)))) for v in col)
        r = cs * (0.42 if sz == "large" else 0.22)
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif shape == "square":
            d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=col)
        elif shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=col)
        elif shape == "diamond":
            d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=col)
        elif shape == "cross":
            w = r * 0.35
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
            d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
        elif shape == "star":
            pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                    cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
            d.polygon(pts, fill=col)
    if jitter is not None:
        arr = np.asarray(img).astype(np.int16)
        nrng = np.random.default_rng(jitter.randrange(2**31))
        arr = np.clip(arr + nrng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
    return img


def make_group(task: int, rng: random.Random, n_neg: int, structure: str = "star") -> dict:
    """One query with its positive and n_neg hard negatives, as scene graphs + texts (no files yet).

    Returns {query: {txt, scene (to render or None), jitter, target}, pos: cand, negs: [cand]} where a
    cand is {scene, modality}. `target` is the scene the query asks for (for relation texts).
    structure "star" (the default world): every negative is one change away from the target, so the
    target is the one candidate that is one change away from all the others -- a query-blind rule can
    find it (consensus_pick measures how often). "cube": see cube_group."""
    if structure == "cube":
        return cube_group(task, rng, n_neg)
    if task == 7:
        source = random_scene(rng)
        target, edit = apply_edit(source, rng)
        negs = [source] + one_change_variants(target, rng, n_neg - 1, exclude=[source])
        query = dict(txt=edit, scene=source, jitter=False, target=target)
    else:
        target = random_scene(rng)
        negs = one_change_variants(target, rng, n_neg)
        query = dict(txt=caption(target) if task == 0 else None,
                     scene=None if task == 0 else target, jitter=task == 4, target=target)
    cmod = TASK_MODALITIES[task][1]
    return dict(query=query, pos=dict(scene=target, modality=cmod),
                negs=[dict(scene=s, modality=cmod) for s in negs])


def cube_changes(scene, rng: random.Random, d: int) -> list[tuple[int, int, Any]]:
    """d independent single-attribute changes of `scene`: (object index, attribute index 0-3 = shape /
    colour / size / cell, new value), on distinct (object, attribute) pairs; a new shape or cell is one
    the scene and the other changes do not use, so any subset of them can be applied together."""
    pairs = [(i, a) for i in range(len(scene)) for a in range(4)]
    rng.shuffle(pairs)
    shapes, cells, out = {o[0] for o in scene}, {o[3] for o in scene}, []
    for i, a in pairs:
        if len(out) == d:
            break
        s, c, z, cell = scene[i]
        if a == 0:
            free = [x for x in SHAPES if x not in shapes]
            if not free:
                continue
            v = rng.choice(free)
            shapes.add(v)
        elif a == 1:
            v = rng.choice([x for x in COLORS if x != c])
        elif a == 2:
            v = "small" if z == "large" else "large"
        else:
            v = rng.choice([x for x in range(9) if x not in cells])
            cells.add(v)
        out.append((i, a, v))
    if len(out) < d:
        raise RetrvError(f"a scene of {len(scene)} objects has fewer than {d} independent changes (--n-hard-neg too large for --neg-structure cube)")
    return out


def cube_group(task: int, rng: random.Random, n_neg: int) -> dict:
    """make_group with structure "cube": draw a base scene and d = ceil(log2(n_neg + 1)) independent
    one-attribute changes (cube_changes); the candidates are corners of the d-cube (a subset of the
    changes applied), the target a random corner, the negatives n_neg of the others (all of them when
    n_neg = 2^d - 1, the default 15 = 2^4 - 1). Every corner is one change away from exactly d others,
    so no candidate is a hub: which one is the target can only be read off the query. Hard negatives
    are now 1 to d changes away (4 of 15 one change away, 6 two, 4 three, 1 four) and never swaps.
    Task 7's source image is the target with one change undone, and the edit text redoes it."""
    base = random_scene(rng)
    d = max(1, math.ceil(math.log2(n_neg + 1)))
    changes = cube_changes(base, rng, d)

    def corner(bits) -> tuple[list, list]:  # -> (objects in base order, sorted scene)
        objs = [list(o) for o in base]
        for (i, a, v), b in zip(changes, bits):
            if b:
                objs[i][a] = v
        return objs, sorted(tuple(o) for o in objs)

    t_bits = tuple(rng.randrange(2) for _ in range(d))
    others = [b for b in itertools.product((0, 1), repeat=d) if b != t_bits]
    t_objs, target = corner(t_bits)
    if task == 7:
        k = rng.randrange(d)
        s_bits = tuple(b ^ (n == k) for n, b in enumerate(t_bits))
        negs = [s_bits] + rng.sample([b for b in others if b != s_bits], n_neg - 1)
        s_objs, source = corner(s_bits)
        i, a, _ = changes[k]
        name, new = s_objs[i][0], t_objs[i][a]
        edit = {0: f"turn the {name} into a {new}", 1: f"make the {name} {new}", 2: f"make the {name} {new}",
                3: f"move the {name} to the {CELLS[new] if a == 3 else new}"}[a]
        query = dict(txt=edit, scene=source, jitter=False, target=target)
    else:
        negs = rng.sample(others, n_neg)
        query = dict(txt=caption(target) if task == 0 else None,
                     scene=None if task == 0 else target, jitter=task == 4, target=target)
    cmod = TASK_MODALITIES[task][1]
    return dict(query=query, pos=dict(scene=target, modality=cmod),
                negs=[dict(scene=corner(b)[1], modality=cmod) for b in negs])


def scene_json(scene) -> str:
    return json.dumps({"objects": [list(o) for o in scene]})


def world_signature(cfg: Config) -> dict:
    keys = ["seed", "tasks", "n_train", "n_val", "n_test", "n_hard_neg", "neg_structure"]
    return {k: getattr(cfg, k) for k in keys}


PNG_LEVEL = 1  # zlib level of the world's PNGs: the fastest to write (any level stores the same pixels)


def generate_world(cfg: Config, root: str | Path | None = None, verbose: bool = True) -> Path:
    """Write the synthetic benchmark in the M-BEIR layout under `root` (see data/README.md).

    query/{split}/mbeir_synth_task{N}_{split}.jsonl, cand_pool/local/mbeir_synth_task{N}_{split}_cand_pool.jsonl
    (one local pool per task and split, named like MSCOCO's test pools), qrels/{split}/..., mbeir_images/...,
    instructions/query_instructions.tsv, and world.json (the parameters it was generated from)."""
    root = Path(root or cfg.data_root)
    tmp = root.with_name(f".{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tasks = parse_tasks(cfg.tasks)
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    with tqdm(total=sum(sizes.values()) * len(tasks), desc=f"world -> {root}", disable=not verbose) as bar:
        for si, (split, n) in enumerate(sizes.items()):
            for task in tasks:
                write_world_part(cfg, tmp, si, split, n, task)
                bar.update(n)
    (tmp / "instructions").mkdir(exist_ok=True)
    rows = ["query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4"]
    for t in tasks:
        qm, cm = TASK_MODALITIES[t]
        rows.append(f"{qm}\t{cm}\t{DATASET_NAME}\t{DATASET_ID}\t" + "\t".join([f"find the {cm} ."] * 4))
    (tmp / "instructions" / "query_instructions.tsv").write_text("\n".join(rows) + "\n")
    (tmp / "world.json").write_text(json.dumps(world_signature(cfg), indent=2))
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


def write_world_part(cfg: Config, tmp: Path, si: int, split: str, n: int, task: int) -> None:
    """One (split, task) of generate_world: its images, query file, local pool and qrels under tmp.
    si is the split's index (0 train, 1 val, 2 test: part of every id), n its queries per task."""
    # every (split, task) has its own stream, so changing n_test never changes train
    rng = random.Random(f"{cfg.seed}-{split}-{task}")
    img_dir = Path("mbeir_images") / DATASET_NAME / split / f"task{task}"
    (tmp / img_dir).mkdir(parents=True, exist_ok=True)
    qlines, plines, qrels = [], [], []
    for qn in range(n):
        g = make_group(task, rng, cfg.n_hard_neg, cfg.neg_structure)
        qid = f"{DATASET_ID}:{task * 1_000_000 + si * 100_000 + qn}"
        cands = [g["pos"]] + g["negs"]
        dids = []
        for cn, c in enumerate(cands):
            did = f"{DATASET_ID}:{task * 10_000_000 + si * 1_000_000 + qn * 100 + cn}"
            dids.append(did)
            line = dict(did=did, txt=None, img_path=None, modality=c["modality"],
                        src_content=scene_json(c["scene"]))
            if c["modality"] == "text":
                line["txt"] = caption(c["scene"])
            else:
                rel = img_dir / f"c{qn}_{cn}.png"
                render(c["scene"], IMAGE_SIZE).save(tmp / rel, compress_level=PNG_LEVEL)
                line["img_path"] = str(rel)
            plines.append(line)
        q = g["query"]
        qimg = None
        if q["scene"] is not None:
            qimg = img_dir / f"q{qn}.png"
            jit = random.Random(f"{cfg.seed}-{split}-{task}-{qn}-jitter") if q["jitter"] else None
            render(q["scene"], IMAGE_SIZE, jitter=jit).save(tmp / qimg, compress_level=PNG_LEVEL)
        # src_content carries the scene graph the query asks for (and the source of an edit)
        src = {"target": [list(o) for o in q["target"]]}
        if task == 7:
            src["source"] = [list(o) for o in q["scene"]]
        qlines.append(dict(qid=qid, query_txt=q["txt"], query_img_path=str(qimg) if qimg else None,
                           query_modality=TASK_MODALITIES[task][0], query_src_content=json.dumps(src),
                           pos_cand_list=[dids[0]], neg_cand_list=dids[1:], task_id=task))
        qrels.append(f"{qid} 0 {dids[0]} 1 {task}")
    name = f"mbeir_{DATASET_NAME}_task{task}_{split}"
    _write_jsonl(tmp / "query" / split / f"{name}.jsonl", qlines)
    _write_jsonl(tmp / "cand_pool" / "local" / f"{name.replace(f'_{split}', '')}_{split}_cand_pool.jsonl",
                 plines)
    (tmp / "qrels" / split).mkdir(parents=True, exist_ok=True)
    (tmp / "qrels" / split / f"{name}_qrels.txt").write_text("\n".join(qrels) + "\n")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def parse_tasks(s: str) -> list[int]:
    try:
        tasks = [int(t) for t in str(s).split(",") if t.strip()]
    except ValueError:
        raise RetrvError(f"--tasks must be a comma list of task ids, got {s!r}") from None
    bad = [t for t in tasks if t not in TASK_MODALITIES]
    if bad:
        raise RetrvError(f"the synthetic world has task ids {sorted(TASK_MODALITIES)}; got {bad}")
    return tasks


def ensure_world(cfg: Config, verbose: bool = True) -> Path:
    """Generate the data if data_root is missing; refuse a synthetic root made with other parameters."""
    root = Path(cfg.data_root)
    sig = root / "world.json"
    if not root.exists():
        if verbose:
            print(f"[data] {root} is missing: generating the '{cfg.world}' world")
        return generate_world(cfg, root, verbose)
    if sig.exists():
        have = json.loads(sig.read_text())
        want = world_signature(cfg)
        default = {f.name: f.default for f in fields(Config)}  # a key an older world.json lacks had its default
        diff = {k: (have.get(k, default[k]), v) for k, v in want.items() if have.get(k, default[k]) != v}
        if diff:
            raise RetrvError(f"{sig} was generated with other parameters {diff} (have, want); "
                             f"delete {root} or pass --data-root")
    return root


# ---- the M-BEIR reader ------------------------------------------------------------------------


class DataError(RetrvError):
    pass


_QUERY_FIELDS = {"qid": str, "query_txt": (str, type(None)), "query_img_path": (str, type(None)),
                 "query_modality": str, "pos_cand_list": list, "task_id": int}
_CAND_FIELDS = {"did": str, "txt": (str, type(None)), "img_path": (str, type(None)), "modality": str}


def read_jsonl(path: Path, required: dict[str, Any]) -> list[dict]:
    """Parse a JSONL file line by line; any problem names the file, the line and the field."""
    rows = []
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as fh:
        for ln, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{ln}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{ln}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{ln}: expected a JSON object, got {type(row).__name__}")
            for k, t in required.items():
                if k not in row:
                    raise DataError(f"{path}:{ln}: missing field '{k}'")
                if not isinstance(row[k], t) or (t is int and isinstance(row[k], bool)):
                    want = "string or null" if isinstance(t, tuple) else t.__name__
                    raise DataError(f"{path}:{ln}: field '{k}' has type {type(row[k]).__name__}, expected {want}")
            for k in ("pos_cand_list", "neg_cand_list"):  # lists of id strings (not objects)
                if k in row and row[k] is not None and (
                        not isinstance(row[k], list) or not all(isinstance(d, str) for d in row[k])):
                    raise DataError(f"{path}:{ln}: field '{k}' must be a list of candidate id strings")
            if "pos_cand_list" in required and not row["pos_cand_list"]:
                raise DataError(f"{path}:{ln}: field 'pos_cand_list' is empty (a query needs a positive)")
            mod = row.get("query_modality", row.get("modality"))
            if mod not in MODALITIES:
                fld = "query_modality" if "query_modality" in row else "modality"
                raise DataError(f"{path}:{ln}: field '{fld}' is {mod!r}; expected one of {sorted(MODALITIES)}")
            row["_line"] = ln
            rows.append(row)
    return rows


@dataclass
class TaskSplit:
    """One dataset-task evaluation: its queries and its local candidate pool.

    queries / pool are `datasets.Dataset`s (columns as in the JSONL plus `_line`); did2idx maps a
    candidate id to its row in pool; pos[i] is the list of pool rows that are positives of query i."""
    name: str
    task_id: int
    root: Path
    query_file: Path
    pool_file: Path
    queries: Any
    pool: Any
    did2idx: dict[str, int]
    pos: list[list[int]]
    neg: list[list[int]]

    def __len__(self) -> int:
        return len(self.queries)


def _find_pool(root: Path, name: str, split: str) -> Path:
    """mbeir_{ds}_task{N}_{split}.jsonl -> its local pool. Tries the split-specific name first
    (ours, and MSCOCO's test pools), then M-BEIR's usual shared one."""
    base = name[: -len(f"_{split}")] if name.endswith(f"_{split}") else name
    local = root / "cand_pool" / "local"
    union = root / "cand_pool" / "global" / f"mbeir_union_{split}_cand_pool.jsonl"  # real M-BEIR train
    for cand in (local / f"{base}_{split}_cand_pool.jsonl", local / f"{base}_cand_pool.jsonl", union):
        if cand.exists():
            return cand
    raise DataError(f"{root}/query/{split}/{name}.jsonl: no local candidate pool "
                    f"(looked for {base}_{split}_cand_pool.jsonl and {base}_cand_pool.jsonl in {local})")


def load_split(root: str | Path, split: str, tasks: list[int] | None = None,
               max_queries: int | None = None) -> list[TaskSplit]:
    """Read every query file of `split` under an M-BEIR root (ours or the real one).

    Checks: valid JSON objects; required fields with the right types; modality strings; unique dids;
    every positive id present in the pool (UniIR's rule: positives whose dataset prefix differs
    from the query's are dropped, as for OVEN/InfoSeek); image paths relative to the root."""
    import datasets as hfds

    root = Path(root)
    qdir = root / "query" / split
    if not qdir.is_dir():
        raise DataError(f"{qdir}: no such directory (is {root} an M-BEIR root with a '{split}' split?)")
    out = []
    for qf in sorted(qdir.glob("*.jsonl")):
        name = qf.stem
        qrows = read_jsonl(qf, _QUERY_FIELDS)
        if not qrows:
            continue
        task_id = qrows[0]["task_id"]
        if tasks is not None and task_id not in tasks:
            continue
        if max_queries:
            qrows = qrows[:max_queries]
        pf = _find_pool(root, name, split)
        prows = read_jsonl(pf, _CAND_FIELDS)
        if not prows:
            raise DataError(f"{pf}: the candidate pool is empty")
        did2idx: dict[str, int] = {}
        for i, r in enumerate(prows):
            if r["did"] in did2idx:
                raise DataError(f"{pf}:{r['_line']}: field 'did' {r['did']!r} is a duplicate "
                                f"(first on line {prows[did2idx[r['did']]]['_line']})")
            if r["txt"] is None and r["img_path"] is None:
                raise DataError(f"{pf}:{r['_line']}: fields 'txt' and 'img_path' are both null")
            did2idx[r["did"]] = i
        pos, neg, seen_q = [], [], {}
        for r in qrows:
            if r["qid"] in seen_q:
                raise DataError(f"{qf}:{r['_line']}: field 'qid' {r['qid']!r} is a duplicate (first on line {seen_q[r['qid']]})")
            seen_q[r["qid"]] = r["_line"]
            prefix = r["qid"].split(":")[0]
            plist = [d for d in r["pos_cand_list"] if str(d).split(":")[0] == prefix] or r["pos_cand_list"]
            for d in plist:
                if d not in did2idx:
                    raise DataError(f"{qf}:{r['_line']}: field 'pos_cand_list' names {d!r}, "
                                    f"which is not in the pool {pf.name}")
            if r["query_txt"] is None and r["query_img_path"] is None:
                raise DataError(f"{qf}:{r['_line']}: fields 'query_txt' and 'query_img_path' are both null")
            pos.append([did2idx[d] for d in plist])
            neg.append([did2idx[d] for d in r.get("neg_cand_list") or [] if d in did2idx])
        for r in qrows + prows:  # keep columns uniform for datasets
            r.setdefault("query_src_content" if "qid" in r else "src_content", None)
        qcols = ["qid", "query_txt", "query_img_path", "query_modality", "query_src_content", "task_id", "_line"]
        pcols = ["did", "txt", "img_path", "modality", "src_content", "_line"]
        queries = hfds.Dataset.from_dict({c: [_as_str(r.get(c), c) for r in qrows] for c in qcols})
        pool = hfds.Dataset.from_dict({c: [_as_str(r.get(c), c) for r in prows] for c in pcols})
        out.append(TaskSplit(name, task_id, root, qf, pf, queries, pool, did2idx, pos, neg))
    if not out:
        raise DataError(f"{qdir}: no query files" + (f" for tasks {tasks}" if tasks else ""))
    return out


def _as_str(v, col):
    if col in ("task_id", "_line"):
        return v
    if v is None or isinstance(v, str):
        return v
    return json.dumps(v)  # e.g. a real M-BEIR src_content that is not a string


def load_image(root: Path, rel: str, where: str, size: int) -> torch.Tensor:
    """Image file -> uint8 tensor (3, size, size). Grayscale/RGBA/palette are converted to RGB and any
    size is resized (bilinear); a missing or unreadable file names the record that points to it."""
    from PIL import Image, UnidentifiedImageError

    path = root / rel
    if not path.exists():
        raise DataError(f"{where}: field 'img_path' points to {path}, which does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: field 'img_path' {path} is not a readable image ({e})") from None
    return torch.from_numpy(arr).permute(2, 0, 1)  # (3, H, W)


class ImageCache:
    """uint8 image tensors keyed by path (a 64x64 image is 12 KB, so a pool fits easily)."""

    def __init__(self, size: int):
        self.size, self.store = size, {}

    def get(self, root: Path, rel: str, where: str) -> torch.Tensor:
        key = (str(root), rel)
        if key not in self.store:
            self.store[key] = load_image(root, rel, where, self.size)
        return self.store[key]


def query_item(ts: TaskSplit, i: int) -> dict:
    """A query as an item for the backbone: {txt, img (path or None), where}."""
    r = ts.queries[i]
    return dict(txt=r["query_txt"], img=r["query_img_path"], root=ts.root,
                where=f"{ts.query_file}:{r['_line']}")


def cand_item(ts: TaskSplit, j: int) -> dict:
    r = ts.pool[j]
    return dict(txt=r["txt"], img=r["img_path"], root=ts.root, where=f"{ts.pool_file}:{r['_line']}")


def scene_of(src: str | None, key: str | None = None):
    """The scene graph stored in src_content, or None (real M-BEIR data)."""
    if not src:
        return None
    try:
        d = json.loads(src)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(d, dict):
        return None
    objs = d.get(key) if key else d.get("objects")
    return [tuple(o) for o in objs] if isinstance(objs, list) else None


def _is_synthetic(cfg: Config) -> bool:
    return (Path(cfg.data_root) / "world.json").exists()


def load_tasks(cfg: Config, split: str) -> list[TaskSplit]:
    """The run's split: in our world only the tasks of --tasks; a real M-BEIR root, every query file."""
    return load_split(cfg.data_root, split, parse_tasks(cfg.tasks) if _is_synthetic(cfg) else None)


# =============================================================================================
# 4. Backbone: tokenizer and the Idefics3 / SmolVLM family
# =============================================================================================
#
# One interface for both backbones:
#   embed_text(ids)             (B, T)        -> (B, T, D)   token embeddings
#   embed_image(pixels)         (N, 3, H, W)  -> (N, n_img, D)  vision encoder + pixel shuffle + proj
#   lm(inputs_embeds, ...)      (B, T, D)     -> hidden (B, T, D), logits (B, T, V), cache
# Everything above the backbone works on embeddings, which is what lets the ICM insert two
# compressed tokens where a candidate's full token sequence would be.

SPECIAL_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<insp_s>", "<insp_e>", "<full>", "</full>"]
BASE_TOKENS = ["<pad>", "<unk>", "<eos>", "<image>"]
# Words of the tiny world: scene captions, relation descriptions, edit instructions, prompts and
# the reasoning traces of later sections. Real text maps unknown words to <unk>.
WORLD_WORDS = (
    SHAPES + COLORS + SIZES + sorted({w for c in CELLS for w in c.split()})
    + ATTRS + [str(i) for i in range(1, 65)]
    + """a an the , . : ; ( ) ? ! - and not is are has have of to into make turn move instead
    match differs many changes swapped caption relation describe query candidate candidates
    find image text pick best matches which ideal target should be looks like show shows full view
    eliminate eliminated inspect inspected verify verified plausible clearly wrong wanted answer so
    same different scene object objects with without no none only all others other remaining
    keep kept check checked because but or it its in at on one two three four edited edit source
    first then result correct unclear maybe compressed close closest""".split()
)


def build_tiny_tokenizer():
    """Word-level tokenizer (tokenizers.WordLevel) over the world's vocabulary plus special tokens.
    Lower-cases, splits on whitespace and punctuation; unknown words -> <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in BASE_TOKENS + SPECIAL_TOKENS + WORLD_WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(BASE_TOKENS + SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<eos>")
    return tok


# The tiny backbone: a SigLIP-style vision tower (64-px images, 8-px patches -> 8x8 patches, pixel
# shuffle x2 -> 16 visual tokens of width D) and a Llama LM, ~3M parameters in all.
TINY = dict(vision_hidden=128, vision_layers=2, patch_size=8, scale_factor=2,
            text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, text_mlp=512)


def tiny_idefics3_config(tok, **shape):
    """The Idefics3 config of the tiny backbone; shape overrides TINY's entries (tests use fewer layers)."""
    from transformers import Idefics3Config

    t = {**TINY, **shape}
    return Idefics3Config(
        vision_config=dict(hidden_size=t["vision_hidden"], intermediate_size=t["vision_hidden"] * 2,
                           num_hidden_layers=t["vision_layers"], num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=t["patch_size"]),
        text_config=dict(model_type="llama", hidden_size=t["text_hidden"], intermediate_size=t["text_mlp"],
                         num_hidden_layers=t["text_layers"], num_attention_heads=t["text_heads"],
                         num_key_value_heads=t["text_kv_heads"], vocab_size=len(tok),
                         max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False),
        scale_factor=t["scale_factor"], image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)


class Backbone(nn.Module):
    """An Idefics3 / SmolVLM model with the three calls the rest of the file needs."""

    def __init__(self, model, tok, image_mean, image_std, pretrained: bool):
        super().__init__()
        self.model, self.tok, self.pretrained = model, tok, pretrained
        vc = model.config.vision_config
        self.image_size = vc.image_size
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        inner = model.model
        self.vision, self.connector, self.text = inner.vision_model, inner.connector, inner.text_model
        self.lm_head = model.lm_head
        self.D = model.config.text_config.hidden_size
        # transformers 5.x renames past_key_values -> cache; use whichever this version takes
        params = inspect.signature(self.text.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self):
        return self.lm_head.weight.device

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def tid(self, token: str) -> int:
        return self.tok.convert_tokens_to_ids(token)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text.get_input_embeddings()(ids)  # (B, T) -> (B, T, D)

    def freeze_vision(self) -> None:
        """Stop the vision encoder and connector learning; their tokens can then be computed once per
        image (Embedder(..., frozen_vision=True)). phi and theta use it."""
        for p in list(self.vision.parameters()) + list(self.connector.parameters()):
            p.requires_grad_(False)

    def embed_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> visual tokens (N, n_img, D): SigLIP-style encoder, pixel shuffle, linear."""
        x = pixels.to(self.device, torch.float32) / 255.0
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = ((x - self.image_mean) / self.image_std).to(self.lm_head.weight.dtype)
        patch_mask = torch.ones(x.shape[0], self.image_size // self.vision.config.patch_size,
                                self.image_size // self.vision.config.patch_size, dtype=torch.bool, device=x.device)
        h = self.vision(pixel_values=x, patch_attention_mask=patch_mask).last_hidden_state  # (N, P, Dv)
        return self.connector(h)  # (N, P / s^2, D)

    def lm(self, inputs_embeds, attention_mask=None, position_ids=None, cache=None, use_cache=False,
           logits: bool = True):
        """Run the language model on embeddings. Returns (hidden (B,T,D), logits (B,T,V) or None, cache)."""
        out = self.text(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=use_cache, **{self._cache_kw: cache})
        h = out.last_hidden_state
        new_cache = (getattr(out, "cache", None) if self._cache_kw == "cache" else out.past_key_values) if use_cache else None
        return h, (self.lm_head(h) if logits else None), new_cache

    def save(self, path: Path) -> None:
        self.model.save_pretrained(path)  # safetensors
        self.tok.save_pretrained(path)
        (path / "image_norm.json").write_text(json.dumps(dict(mean=self.image_mean.flatten().tolist(),
                                                              std=self.image_std.flatten().tolist(),
                                                              pretrained=self.pretrained)))


def new_tiny_backbone(**shape) -> Backbone:
    from transformers import Idefics3ForConditionalGeneration

    tok = build_tiny_tokenizer()
    model = Idefics3ForConditionalGeneration(tiny_idefics3_config(tok, **shape))
    return Backbone(model, tok, [0.5] * 3, [0.5] * 3, pretrained=False)


def load_backbone(path_or_id: str, dtype: torch.dtype = torch.float32) -> Backbone:
    """Any Idefics3/SmolVLM checkpoint (directory or hub id), or one saved by this file.

    Pretrained checkpoints get the reasoning special tokens added and their embeddings resized."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    p = Path(path_or_id)
    norm = p / "image_norm.json"
    try:
        model = AutoModelForImageTextToText.from_pretrained(path_or_id, dtype=dtype)
    except OSError as e:
        raise RetrvError(f"cannot load backbone {path_or_id!r}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # e.g. a corrupt safetensors file
        raise RetrvError(f"backbone {path_or_id!r} is unreadable: {type(e).__name__}: {e}") from None
    if getattr(model.config, "model_type", "") not in ("idefics3", "smolvlm"):
        raise RetrvError(f"{path_or_id!r} is a {model.config.model_type} model; expected Idefics3/SmolVLM")
    tok = AutoTokenizer.from_pretrained(path_or_id)
    if norm.exists():  # saved by this file
        meta = json.loads(norm.read_text())
        return Backbone(model, tok, meta["mean"], meta["std"], pretrained=meta["pretrained"])
    try:
        from transformers import AutoImageProcessor

        ip = AutoImageProcessor.from_pretrained(path_or_id)
        mean, std = list(ip.image_mean), list(ip.image_std)
    except Exception:
        mean, std = [0.5] * 3, [0.5] * 3
    new = [t for t in SPECIAL_TOKENS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if new:
        tok.add_special_tokens({"additional_special_tokens": new})
        model.resize_token_embeddings(len(tok))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return Backbone(model, tok, mean, std, pretrained=True)


def base_backbone(cfg: Config) -> Backbone:
    """The backbone every stage starts from: the warmed-up tiny one, or the pretrained checkpoint."""
    if cfg.backbone == "tiny":
        ck = Path(cfg.run_dir) / "warmup"
        if not (ck / "state.json").exists():
            raise RetrvError(f"{ck} has no finished warm-up; run `train --stages warmup` first")
        check_compatible(read_state(ck).get("config", {}), cfg, str(ck))
        return load_backbone(str(ck))
    return load_backbone(cfg.backbone)


# ---- turning items into token sequences ---------------------------------------------------------


class Embedder:
    """Items (a query or a candidate: text and/or image) -> the token embeddings the LM reads.

    T_x = [visual tokens of the image] + [word embeddings of the text]   (L_x, D)
    (text first with text_first=True: how phi reads an item that has both)"""

    def __init__(self, bb: Backbone, cache: ImageCache, max_txt: int = 64, frozen_vision: bool = False):
        self.bb, self.cache, self.max_txt = bb, cache, max_txt
        # with the vision side frozen (phi and stages 1-3) an image's tokens never change: compute them once
        self.vis_cache: dict | None = {} if frozen_vision else None

    def visual(self, items: list[dict]) -> torch.Tensor:
        """Visual tokens (N, n_img, D) of image items."""
        bb = self.bb
        if self.vis_cache is None:
            return bb.embed_image(self.pixels(items).to(bb.device))
        keys = [(str(it["root"]), it["img"]) for it in items]
        miss = list(dict.fromkeys(k for k in keys if k not in self.vis_cache))
        if miss:
            first = {k: items[keys.index(k)] for k in miss}
            with torch.no_grad():
                v = bb.embed_image(self.pixels([first[k] for k in miss]).to(bb.device))
            for k, t in zip(miss, v):
                self.vis_cache[k] = t
        return torch.stack([self.vis_cache[k] for k in keys])

    def pixels(self, items: list[dict]) -> torch.Tensor:
        return torch.stack([self.cache.get(it["root"], it["img"], it["where"]) for it in items])

    def tokens(self, items: list[dict], text_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """-> T (N, L, D) right-padded, mask (N, L). text_first puts an item's words before its image."""
        return pad_stack(self.sequences(items, text_first))

    def sequences(self, items: list[dict], text_first: bool = False) -> list[torch.Tensor]:
        """-> one (L_i, D) token sequence per item, unpadded (tokens() pads them into one batch)."""
        bb = self.bb
        img_idx = [i for i, it in enumerate(items) if it.get("img")]
        vis = self.visual([items[i] for i in img_idx]) if img_idx else None
        seqs = []
        txt_ids = [bb.ids(it["txt"])[: self.max_txt] if it.get("txt") else [] for it in items]
        flat = torch.tensor([t for ids in txt_ids for t in ids] or [0], device=bb.device)
        flat_emb = bb.embed_text(flat[None])[0]
        # unbind / split rather than vis[i] / flat_emb[a:b]: their backward is one stack / cat, while
        # every index or slice would scatter into a zeros tensor of the whole batch (O(N^2) copies)
        vis_rows = iter(vis.unbind(0)) if vis is not None else iter(())
        txt_rows = iter(flat_emb.split([len(t) for t in txt_ids if t]) if any(txt_ids) else ())
        for i, it in enumerate(items):
            parts = []
            if it.get("img"):
                parts.append(next(vis_rows))
            if txt_ids[i]:
                parts.append(next(txt_rows))
            if text_first:
                parts.reverse()
            if not parts:
                parts.append(bb.embed_text(torch.tensor([[bb.tid("<unk>")]], device=bb.device))[0])
            seqs.append(torch.cat(parts))
        return seqs


def pad_stack(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (L_i, D) -> (N, L_max, D) right-padded with zeros, and the mask (N, L_max)."""
    # stack of padded rows, not `out[i, :L_i] = s` into a zeros tensor (nor pad_sequence, which does
    # that inside): the backward of N slice assignments copies the whole (N, L_max, D) gradient N
    # times, a large share of a retriever step. F.pad's backward is one narrow per row.
    L = max(s.shape[0] for s in seqs)
    out = torch.stack([F.pad(s, (0, 0, 0, L - s.shape[0])) for s in seqs])  # (N, L_max, D)
    mask = torch.zeros(len(seqs), L, dtype=torch.long, device=seqs[0].device)
    for i, s in enumerate(seqs):
        mask[i, : s.shape[0]] = 1
    return out, mask


BUCKETS = 4  # warm-up and phi batches run in 4 length buckets (length_buckets)


def length_buckets(lengths: list[int], n: int) -> list[list[int]]:
    """Indices cut into n groups of consecutive lengths (sorted; sizes as equal as they come): padded per
    group, a batch of 16-token images and 8-token captions wastes little on padding. n = 1: one group in
    the original order (the plain padded batch). Right padding is masked, so the result is the same up
    to float rounding; on 2 CPU cores the matrix products are the whole cost, so what padding saves is time."""
    if n <= 1 or len(lengths) <= 1:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = min(n, len(order))
    return [order[g * len(order) // n: (g + 1) * len(order) // n] for g in range(n)]


def assemble(bb: Backbone, rows: list[list[tuple]]) -> list[torch.Tensor]:
    """Rows of segments ("ids", list[int], ...) / ("emb", (L, D)) -> one (L_i, D) tensor per row.
    All token ids of the batch go through the embedding table in one call."""
    all_ids = [t for row in rows for seg in row if seg[0] == "ids" for t in seg[1]]
    flat = bb.embed_text(torch.tensor([all_ids or [0]], device=bb.device))[0]
    # one split, not a slice per segment: a slice's backward scatters into a zeros tensor of the whole batch
    pieces = iter(flat[: len(all_ids)].split([len(seg[1]) for row in rows for seg in row if seg[0] == "ids"]))
    out = []
    for row in rows:
        out.append(torch.cat([seg[1] if seg[0] == "emb" else next(pieces) for seg in row]))
    return out


def lm_batch(bb: Backbone, rows: list[list[tuple]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build a right-padded LM batch from segments.

    A row is a list of segments: ("emb", Tensor (L, D)) an observation (never scored), or
    ("ids", list[int], train: bool) tokens whose labels count when train is True.
    Returns inputs_embeds (B, T, D), attention_mask (B, T), labels (B, T) with -100 where not scored.
    labels[t] is the token AT position t; the loss compares logits[t-1] with labels[t]."""
    x, mask = pad_stack(assemble(bb, rows))
    labels = torch.full(mask.shape, -100, dtype=torch.long)
    for i, row in enumerate(rows):
        lab = []
        for seg in row:
            if seg[0] == "emb":
                lab += [-100] * seg[1].shape[0]
            else:
                lab += list(seg[1]) if seg[2] else [-100] * len(seg[1])
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return x, mask, labels.to(x.device)


def lm_loss(bb: Backbone, x, mask, labels, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on labelled positions (their mean, or their sum with reduction="sum").
    Returns (loss, predictions (B,T-1), valid (B,T-1))."""
    _, logits, _ = bb.lm(x, attention_mask=mask)  # (B, T, V)
    logits, tgt = logits[:, :-1], labels[:, 1:]
    valid = tgt != -100
    loss = F.cross_entropy(logits[valid].float(), tgt[valid], reduction=reduction)
    return loss, logits.argmax(-1), valid


def bucketed_lm_loss(bb: Backbone, rows: list[list[tuple]], buckets: int) -> tuple[torch.Tensor, int, int]:
    """lm_loss of lm_batch(rows), computed in length_buckets: the same mean over every labelled token of
    the batch, with less padding. -> (loss, tokens predicted right, labelled tokens)."""
    seg_len = lambda seg: len(seg[1]) if seg[0] == "ids" else seg[1].shape[0]  # tokens of one segment
    total, right, count = 0.0, 0, 0
    for group in length_buckets([sum(seg_len(seg) for seg in row) for row in rows], buckets):
        x, mask, labels = lm_batch(bb, [rows[i] for i in group])  # (b, T_group, D), (b, T_group), (b, T_group)
        loss_sum, pred, valid = lm_loss(bb, x, mask, labels, reduction="sum")
        total = total + loss_sum
        right += ((pred == labels[:, 1:]) & valid).sum().item()
        count += int(valid.sum())
    return total / max(1, count), right, count


# =============================================================================================
# 5. Coarse retriever phi
# =============================================================================================
#
#   e(x) = normalize(W . mean_t h_t(x))      h = the backbone LM's last hidden states over T_x
#   L_InfoNCE = -log exp(e_q.e_+ / tau) / sum_c exp(e_q.e_c / tau)
# where c runs over the query's positive, its hard negatives and every other query's candidates
# in the batch. Why mean pooling and not a final [EMB] token: the LM is causal, and with 20-70
# tokens an average is a stronger start than one position it was never trained to summarise in.
# An item with both an image and words (a composed query: image + edit) is read text first: under
# causal attention its 16 visual tokens -- most of the mean -- then attend to the edit; image first,
# they would never see it and the query would embed as its source image, one of its hard negatives.
# The vision encoder and connector are frozen here: InfoNCE shapes the LM's reading of the visual
# tokens, each image is encoded once (Embedder's cache), and a step costs the LM alone.
# A step holds B = --ret-batch queries, each with its positive and H = --ret-hard-negs of its hard
# negatives: in a test pool most of what outranks a positive belongs to other queries' groups, which
# only the in-batch negatives teach.

RET_DIM = 128  # embedding width after the projection W
TAU = 0.05  # InfoNCE temperature


class Retriever(nn.Module):
    def __init__(self, bb: Backbone, dim: int = RET_DIM):
        super().__init__()
        self.bb = bb
        self.proj = nn.Linear(bb.D, dim, bias=False)

    def encode_tokens(self, T: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """e = normalize(W mean_t h_t),  h = LM(T). T (N, L, D), mask (N, L) right-padded -> e (N, dim)."""
        h, _, _ = self.bb.lm(T, attention_mask=mask, logits=False)  # (N, L, D)
        pooled = masked_mean(h, mask[..., None], dim=1)  # (N, D)
        return F.normalize(self.proj(pooled.float()), dim=-1)  # (N, dim)

    def encode(self, emb: Embedder, items: list[dict]) -> torch.Tensor:
        """Items -> e (N, dim), encoded in BUCKETS length buckets (length_buckets), returned in item order."""
        seqs = emb.sequences(items, text_first=True)
        groups = length_buckets([len(t) for t in seqs], BUCKETS)
        e = torch.cat([self.encode_tokens(*pad_stack([seqs[i] for i in g])) for g in groups])  # bucket order
        back = torch.empty(len(seqs), dtype=torch.long)
        back[[i for g in groups for i in g]] = torch.arange(len(seqs))  # item i sits at row back[i] of e
        return e[back.to(e.device)]  # (N, dim)

    @torch.no_grad()
    def encode_all(self, emb: Embedder, items: list[dict], batch: int, desc: str = "") -> torch.Tensor:
        self.eval()
        outs = [self.encode(emb, items[i: i + batch])
                for i in tqdm(range(0, len(items), batch), desc=desc, leave=False, disable=not desc)]
        return torch.cat(outs)

    def save(self, path: Path) -> None:
        self.bb.save(path)
        from safetensors.torch import save_file

        save_file({"proj.weight": self.proj.weight.detach().cpu().contiguous()}, str(path / "proj.safetensors"))


def load_retriever(cfg: Config) -> Retriever:
    ck = Path(cfg.run_dir) / "retriever"
    if not (ck / "state.json").exists():
        raise RetrvError(f"{ck} has no finished retriever; run `train --stages retriever` first")
    from safetensors.torch import load_file

    check_compatible(read_state(ck).get("config", {}), cfg, str(ck))
    r = Retriever(load_backbone(str(ck)))
    try:
        r.proj.weight.data.copy_(load_file(str(ck / "proj.safetensors"))["proj.weight"])
    except Exception as e:
        raise RetrvError(f"{ck / 'proj.safetensors'} is unreadable or has the wrong shape: {e}") from None
    return r


def topk_search(q: torch.Tensor, pool: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-K: q (Q, d), pool (N, d) -> (scores, indices), both (Q, K)."""
    if K > pool.shape[0]:
        raise RetrvError(f"K={K} is larger than the candidate pool ({pool.shape[0]} candidates)")
    return (q @ pool.T).topk(K, dim=-1)


def train_retriever(cfg: Config, verbose: bool = True) -> dict:
    """Stage: phi by InfoNCE on the train split, from the warmed-up (or pretrained) backbone."""
    dev, dt = pick_device(cfg, verbose)
    rng = random.Random(cfg.seed + 11)
    seed_everything(cfg.seed + 1)
    bb = base_backbone(cfg).to(dev)
    ret = Retriever(bb).to(dev)
    bb.freeze_vision()  # only the LM and the projection W learn; an image's tokens are computed once
    emb = Embedder(bb, ImageCache(bb.image_size), frozen_vision=True)
    train = load_tasks(cfg, "train")
    pairs = [(ts, i) for ts in train for i in range(len(ts)) if ts.pos[i]]
    opt = torch.optim.AdamW([p for p in ret.parameters() if p.requires_grad], lr=cfg.ret_lr, weight_decay=0.01)
    sched = cosine_schedule(opt, cfg.ret_steps, warmup=max(1, cfg.ret_steps // 20))
    ck = Partial(cfg, "retriever", ret, opt, sched, rng)
    start = ck.resume()
    log = MetricLog(cfg.run_dir, "retriever", start)
    bar = tqdm(range(start, cfg.ret_steps), initial=start, total=cfg.ret_steps, desc="phi (InfoNCE)", disable=not verbose)
    ret.train()
    for step in bar:
        batch = rng.sample(pairs, min(cfg.ret_batch, len(pairs)))
        q_items, c_items = [], []
        for ts, i in batch:  # candidates: [pos_0..pos_B-1, then hard negatives]
            q_items.append(query_item(ts, i))
            c_items.append(cand_item(ts, rng.choice(ts.pos[i])))
        for ts, i in batch:
            negs = ts.neg[i]
            for j in rng.sample(negs, min(cfg.ret_hard_negs, len(negs))):
                c_items.append(cand_item(ts, j))
        with autocast(dev, dt):
            e = ret.encode(emb, q_items + c_items)  # one call: its length buckets mix queries and candidates
        eq, ec = e[: len(batch)], e[len(batch):]  # (B, d), (B + B*H, d)
        logits = eq @ ec.T / TAU  # (B, B + B*H)
        target = torch.arange(len(batch), device=dev)
        loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(ret.parameters(), 1.0)
        check_finite(loss, "retriever", step)
        opt.step()
        sched.step()
        acc = (logits.argmax(-1) == target).float().mean().item()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
        if step % LOG_EVERY == 0 or step == cfg.ret_steps - 1:
            log.log(step=step, loss=loss.item(), batch_acc=acc, grad_norm=float(gn), lr=sched.get_last_lr()[0])
        ck.step_done(step)
    ret.eval()
    val = coarse_recall(cfg, ret, "val", verbose=False)
    with atomic_dir(Path(cfg.run_dir) / "retriever") as tmp:
        ret.save(tmp)
        (tmp / "state.json").write_text(json.dumps(stage_state(cfg, "retriever", cfg.ret_steps, val=val), indent=2))
    ck.finish()
    if verbose:
        print(f"[retriever] val R@1 {val['avg']['R@1']:.3f}  R@{cfg.K} {val['avg'][f'R@{cfg.K}']:.3f}")
    return val


# =============================================================================================
# 6. Information Compression Module (ICM)
# =============================================================================================
#
# Every candidate c arrives as its full token sequence T_c (L_c, D): 16 visual tokens for a tiny
# image, up to ~40 word embeddings for a caption, hundreds for a real image. With K candidates the
# reasoning context grows as K * L_c. The ICM squeezes each candidate into two tokens:
#
#     t_con = ATT1 (Q = e_con, K = V = T_c)           what the candidate shows      (content)
#     R     = ATT2 (Q = T_c,   K = V = T_q)           candidate tokens read the query
#     t_rel = ATT1'(Q = e_rel, K = V = R)             how it relates to the query   (relation)
#
# so the context grows as 2K. e_con and e_rel are two separate learnable query vectors (the
# paper's text leaves open whether they are shared; separate ones let the ablations drop either).
# Each ATT is a pre-norm attention block (cross-attention + MLP, residual) like one Q-Former /
# Perceiver layer. Why a learnable position table on T_c: word embeddings carry no order, and
# "a red circle , a blue star" must not compress like "a blue circle , a red star".


ICM_HEADS = 4  # attention heads of ATT1, ATT2 and ATT1'
ICM_MAX_LEN = 96  # longest candidate token sequence the position table covers (longer ones are cut)


class AttnBlock(nn.Module):
    """x <- x + MHA(LN(x), LN(ctx)); x <- x + MLP(LN(x)). Returns (x, attention (B, H, Lq, Lk))."""

    def __init__(self, D: int, H: int):
        super().__init__()
        self.H = H
        self.ln_q, self.ln_kv, self.ln_m = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.kv, self.o = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x, ctx, ctx_mask):
        q = rearrange(self.q(self.ln_q(x)), "b l (h d) -> b h l d", h=self.H)  # (B, H, Lq, d)
        k, v = rearrange(self.kv(self.ln_kv(ctx)), "b l (two h d) -> two b h l d", two=2, h=self.H)
        att = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
        att = att.masked_fill(~ctx_mask.bool()[:, None, None, :], float("-inf")).softmax(-1)
        x = x + self.o(rearrange(att @ v, "b h l d -> b l (h d)"))
        return x + self.mlp(self.ln_m(x)), att


class ICM(nn.Module):
    def __init__(self, D: int, heads: int, max_len: int, emb_rms: float):
        super().__init__()
        self.e_con = nn.Parameter(torch.randn(1, 1, D) * 0.02)  # content query
        self.e_rel = nn.Parameter(torch.randn(1, 1, D) * 0.02)  # relation query
        self.pos = nn.Parameter(torch.zeros(max_len, D))  # order of T_c's tokens
        self.att1, self.att2, self.att1p = AttnBlock(D, heads), AttnBlock(D, heads), AttnBlock(D, heads)
        # output LayerNorm whose gain starts at the LM's embedding RMS: the two tokens enter the LM
        # at the scale of the word embeddings around them
        self.out = nn.LayerNorm(D)
        nn.init.constant_(self.out.weight, emb_rms)
        self.max_len = max_len

    def forward(self, T_c, c_mask, T_q, q_mask) -> dict:
        """T_c (N, Lc, D), c_mask (N, Lc), T_q (N, Lq, D), q_mask (N, Lq) -> t_con, t_rel (N, D)."""
        N, Lc, _ = T_c.shape
        if Lc > self.max_len:  # defined fallback: keep the first max_len tokens
            T_c, c_mask, Lc = T_c[:, : self.max_len], c_mask[:, : self.max_len], self.max_len
        Tc = T_c + self.pos[:Lc]
        t_con, a_con = self.att1(self.e_con.expand(N, 1, -1), Tc, c_mask)  # (N, 1, D), (N, H, 1, Lc)
        R, _ = self.att2(Tc, T_q, q_mask)  # (N, Lc, D): candidate tokens attend to the query
        t_rel, _ = self.att1p(self.e_rel.expand(N, 1, -1), R, c_mask)  # (N, 1, D)
        return dict(t_con=self.out(t_con[:, 0]), t_rel=self.out(t_rel[:, 0]), attn_con=a_con[:, :, 0])


class Reasoner(nn.Module):
    """theta: the backbone LM plus the ICM. icm_mode picks what stands for a candidate in the prompt."""

    def __init__(self, bb: Backbone, cfg: Config):
        super().__init__()
        self.bb = bb
        with torch.no_grad():
            rms = bb.embed_text(torch.arange(len(bb.tok), device=bb.device)[None]).float().pow(2).mean().sqrt().item()
        self.icm = ICM(bb.D, ICM_HEADS, ICM_MAX_LEN, rms)
        self.mode = cfg.icm_mode  # both | con | rel | off

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        self.bb.save(path)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.icm.state_dict().items()},
                  str(path / "icm.safetensors"))


def load_reasoner(cfg: Config, stage: str, dev: torch.device) -> Reasoner:
    """theta from a finished stage folder (icm / sft / grpo): backbone via save_pretrained, ICM via safetensors."""
    from safetensors.torch import load_file

    ck = Path(cfg.run_dir) / stage
    if not (ck / "state.json").exists():
        raise RetrvError(f"{ck} has no finished '{stage}' stage; run `train --stages {stage}` first")
    check_compatible(read_state(ck).get("config", {}), cfg, str(ck))
    theta = Reasoner(load_backbone(str(ck)), cfg)
    try:
        sd = load_file(str(ck / "icm.safetensors"))
        theta.icm.load_state_dict(sd)
    except Exception as e:
        raise RetrvError(f"{ck / 'icm.safetensors'} does not fit this backbone: {str(e).splitlines()[0]}") from None
    return theta.to(dev)


# =============================================================================================
# 7. Prompt layout, details inspection and the sampler
# =============================================================================================
#
# Prompt (as embeddings):
#   "pick the candidate that best matches the query . query :" T_q "candidates :"
#   "1" t_con_1 t_rel_1  "2" t_con_2 t_rel_2 ... "K" t_con_K t_rel_K  <think>
# Inspection splice: when the model writes  <insp_s> k <insp_e>  the system appends
#   <full> T_{c_k} </full>
# to the context and generation goes on. Spliced tokens are observations: they are never
# scored by any loss or log-prob.

INSTRUCTION = "pick the candidate that best matches the query . query :"


@dataclass
class Prompt:
    embeds: torch.Tensor  # (L, D) the context theta reads, ending in <think>
    full: list  # K tensors (L_k, D): T_{c_k}, what an inspection splices in
    K: int
    open_full: torch.Tensor  # (1, D) embedding of <full>
    close_full: torch.Tensor  # (1, D) embedding of </full>

    def splice(self, k: int) -> torch.Tensor:
        """<full> T_{c_k} </full> as (L_k + 2, D); k is 1-based."""
        return torch.cat([self.open_full, self.full[k - 1], self.close_full])


def bare_prompt(e: torch.Tensor) -> Prompt:
    """A context (L, D) with no candidates to inspect: the sampler as a plain greedy/sampling LM."""
    return Prompt(e, [], 0, e[:0], e[:0])


def build_prompts(theta: Reasoner, emb: Embedder, queries: list[dict], cands: list[list[dict]]) -> list[Prompt]:
    """Queries and their K candidate items -> prompts (differentiable through the ICM)."""
    bb = theta.bb
    B = len(queries)
    Ks = [len(c) for c in cands]
    T_q, q_mask = emb.tokens(queries)  # (B, Lq, D)
    flat = [c for cs in cands for c in cs]
    T_c, c_mask = emb.tokens(flat)  # (B*K, Lc, D)
    # rows via unbind, not T_c[i]: one stack in the backward instead of a batch-sized scatter per row
    full = [t[:n] for t, n in zip(T_c.unbind(0), c_mask.sum(-1).tolist())]
    if theta.mode != "off":
        rep = torch.tensor([b for b in range(B) for _ in range(Ks[b])], device=bb.device)
        z = theta.icm(T_c, c_mask, T_q[rep], q_mask[rep])
        keep = {"both": ["t_con", "t_rel"], "con": ["t_con"], "rel": ["t_rel"]}[theta.mode]
        comp = torch.stack([z[k] for k in keep], dim=1).unbind(0)  # B*K x (1 or 2, D)
    q_rows = [t[:n] for t, n in zip(T_q.unbind(0), q_mask.sum(-1).tolist())]
    rows, i = [], 0
    for b in range(B):
        row = [("ids", bb.ids(INSTRUCTION)), ("emb", q_rows[b]), ("ids", bb.ids("candidates :"))]
        for k in range(1, Ks[b] + 1):
            row.append(("ids", bb.ids(str(k))))
            row.append(("emb", full[i] if theta.mode == "off" else comp[i]))
            i += 1
        row.append(("ids", [bb.tid("<think>")]))
        rows.append(row)
    ctx = assemble(bb, rows)
    specials = bb.embed_text(torch.tensor([[bb.tid("<full>"), bb.tid("</full>")]], device=bb.device))[0]
    out, i = [], 0
    for b in range(B):
        out.append(Prompt(ctx[b], full[i: i + Ks[b]], Ks[b], specials[0:1], specials[1:2]))
        i += Ks[b]
    return out


@dataclass
class Rollout:
    """One generated trace. ids are the generated tokens only; splices[(t, k)] says that after
    generated token t (an <insp_e>) candidate k's full tokens were spliced in."""
    ids: list = field(default_factory=list)
    logp: list = field(default_factory=list)  # log pi(token) under the model, one per id
    splices: list = field(default_factory=list)
    inspected: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # malformed inspections ("index 12 out of range", ...)
    finished: bool = False  # reached </answer> (else: length limit)
    text: str = ""

    @property
    def N_ins(self) -> int:
        return len(self.inspected)


def parse_inspection(bb: Backbone, ids: list[int], K: int, inspected: list[int]) -> tuple[int | None, str | None]:
    """ids ends in <insp_e>. Returns (k, None) for a valid request, or (None, reason).

    Invalid: no matching <insp_s>, not a number, outside 1..K, already inspected, more than K."""
    s_id, e_id = bb.tid("<insp_s>"), bb.tid("<insp_e>")
    start = next((t for t in range(len(ids) - 2, -1, -1) if ids[t] in (s_id, e_id)), None)
    if start is None or ids[start] != s_id:  # none, or the last one was already closed
        return None, "<insp_e> without <insp_s>"
    inner = bb.tok.decode(ids[start + 1: -1]).strip()
    if not inner.isdigit():
        return None, f"inspection index {inner!r} is not a number"
    k = int(inner)
    if not 1 <= k <= K:
        return None, f"inspection index {k} out of range 1..{K}"
    if k in inspected:
        return None, f"candidate {k} inspected twice"
    if len(inspected) >= K:
        return None, f"more than K={K} inspections"
    return k, None


def left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (L_i, D) -> (B, L_max, D) LEFT-padded (so every prompt ends at the same column), mask."""
    L = max(s.shape[0] for s in seqs)
    x = seqs[0].new_zeros(len(seqs), L, seqs[0].shape[1])
    mask = torch.zeros(len(seqs), L, dtype=torch.long, device=seqs[0].device)
    for i, s in enumerate(seqs):
        x[i, L - s.shape[0]:] = s
        mask[i, L - s.shape[0]:] = 1
    return x, mask


@torch.no_grad()
def sample(theta: Reasoner | Backbone, prompts: list[Prompt], max_new: int = 96, greedy: bool = False,
           temperature: float = 1.0, top_p: float = 1.0, seeds: list[int] | None = None,
           inspect: bool = True, return_logits: bool = False, forced: list[list[int]] | None = None,
           stop_ids: tuple | None = None) -> list[Rollout]:
    """Batched generation with a KV cache and details inspection.

    Each step every live sequence feeds its new token; a sequence that just closed a valid
    <insp_s> k <insp_e> also feeds <full> T_{c_k} </full> in the same step. Rows are padded to the
    longest chunk with "holes": positions whose attention-mask entry is 0, so no later token ever
    attends to them, and explicit position ids keep every real token at its true position. The
    result is exactly the sequence a single full forward would see (a test checks it).

        chunk_b = [tok_b] + ([<full>] T_{c_k} [</full>] if b spliced) + holes
        mask    = [mask_past | 1 ... 1 0 ... 0]        pos_b = next_pos_b + 0, 1, 2, ...

    Log-probs are those of the untempered model (log_softmax(logits)); GRPO samples at T = 1, where
    they equal the sampling policy's. Returns one Rollout per prompt (and logits if asked: the
    next-token logits of every step, for tests). `forced` teacher-forces token lists through the
    sampler (inspections still splice): tests, demos and the trace viewer of notebook 02 use it.
    theta may be a bare Backbone: the warm-up's checks sample from the LM before any ICM exists."""
    bb = theta if isinstance(theta, Backbone) else theta.bb
    dev, B = bb.device, len(prompts)
    x, mask = left_pad([p.embeds for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    h, _, cache = bb.lm(x, attention_mask=mask, position_ids=pos, use_cache=True, logits=False)
    next_logits = bb.lm_head(h[:, -1]).float()  # (B, V): the head only where a token is predicted
    next_pos = mask.sum(-1)  # (B,) position of the next token
    gens = None if greedy else [torch.Generator(device="cpu").manual_seed(int(s)) for s in
                                (seeds if seeds is not None else range(B))]
    insp_e, ans_e = bb.tid("<insp_e>"), bb.tid("</answer>")
    stop = {ans_e, bb.tok.eos_token_id} if stop_ids is None else set(stop_ids)
    outs = [Rollout() for _ in range(B)]
    done = [False] * B
    steps_logits = []
    for _ in range(max_new):
        logprobs = next_logits.log_softmax(-1)
        if return_logits:
            steps_logits.append(next_logits.clone())
        if greedy:
            tok = logprobs.argmax(-1)
        else:
            tok = sample_tokens(next_logits, temperature, top_p, gens)
        if forced is not None:
            for b in range(B):
                n = len(outs[b].ids)
                if n < len(forced[b]):
                    tok[b] = forced[b][n]
        lp = logprobs.gather(-1, tok[:, None])[:, 0]
        tok_l, lp_l = tok.tolist(), lp.tolist()  # the one host sync per step
        extras = [None] * B
        for b in range(B):
            if done[b]:
                continue
            r = outs[b]
            r.ids.append(tok_l[b])
            r.logp.append(lp_l[b])
            if tok_l[b] == insp_e and inspect:
                k, err = parse_inspection(bb, r.ids, prompts[b].K, r.inspected)
                if err:
                    r.errors.append(err)
                else:
                    r.inspected.append(k)
                    r.splices.append((len(r.ids) - 1, k))
                    extras[b] = prompts[b].splice(k)
            if tok_l[b] in stop:
                done[b], r.finished = True, tok_l[b] == ans_e
            elif len(r.ids) >= max_new or (forced is not None and len(r.ids) >= len(forced[b])):
                done[b] = True
        if all(done):
            break
        # next input chunk: (B, W, D) with holes
        W = 1 + max((e.shape[0] for e in extras if e is not None), default=0)
        xin = x.new_zeros(B, W, x.shape[-1])
        xin[:, 0] = bb.embed_text(tok[:, None])[:, 0]
        m = torch.zeros(B, W, dtype=torch.long, device=dev)
        m[:, 0] = 1
        for b, e in enumerate(extras):
            if e is not None:
                xin[b, 1: 1 + e.shape[0]] = e
                m[b, 1: 1 + e.shape[0]] = 1
        mask = torch.cat([mask, m], 1)
        p = next_pos[:, None] + torch.arange(W, device=dev)[None]
        h, _, cache = bb.lm(xin, attention_mask=mask, position_ids=p, cache=cache, use_cache=True, logits=False)
        n_real = m.sum(-1)
        next_logits = bb.lm_head(h[torch.arange(B, device=dev), n_real - 1]).float()
        next_pos = next_pos + n_real
    think = [bb.tid("<think>")]  # the prompt's last token opens the trace: the text starts with it
    for r in outs:
        r.text = bb.tok.decode(think + r.ids)
    return (outs, steps_logits) if return_logits else outs


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, gens: list) -> torch.Tensor:
    """One token per row from softmax(logits / T), nucleus-filtered; row b uses generator gens[b]
    so every rollout's randomness is its own (reproducible whatever the batch composition)."""
    probs = (logits / max(temperature, 1e-6)).softmax(-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    probs = probs.cpu()
    out = [torch.multinomial(probs[b], 1, generator=gens[b]) for b in range(probs.shape[0])]
    return torch.cat(out).to(logits.device)


def score(theta: Reasoner, prompts: list[Prompt], rollouts: list[Rollout]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of the generated tokens of finished traces (with gradients).

    Rebuilds prompt + generated tokens + spliced chunks exactly as the sampler fed them, runs ONE
    forward, and reads log pi(id_t | everything before it) at each generated token.
    Returns logp (N, T) and mask (N, T) (1 = a generated token; splices never appear here)."""
    bb = theta.bb
    ids_all = [torch.tensor(r.ids or [bb.tok.eos_token_id], device=bb.device) for r in rollouts]
    tok_embs = bb.embed_text(torch.cat(ids_all)[None])[0].split([len(ids) for ids in ids_all])  # one cat in the backward
    seqs, where = [], []
    for p, r, ids, e in zip(prompts, rollouts, ids_all, tok_embs):
        spl = dict(r.splices)
        parts, L, pos = [p.embeds], p.embeds.shape[0], []
        start = 0
        bounds = sorted(spl)
        if not bounds or bounds[-1] != len(r.ids) - 1:
            bounds.append(len(r.ids) - 1)
        for t in bounds:  # runs of generated tokens, each followed by its splice (if any)
            parts.append(e[start: t + 1])
            pos += list(range(L, L + t + 1 - start))
            L += t + 1 - start
            start = t + 1
            if t in spl:
                ch = p.splice(spl[t])
                parts.append(ch)
                L += ch.shape[0]
        seqs.append(torch.cat(parts))
        where.append(pos)
    x, m = pad_stack(seqs)
    h, _, _ = bb.lm(x, attention_mask=m, logits=False)  # (N, L, D)
    T = max(len(r.ids) for r in rollouts)
    N = len(rollouts)
    rows = torch.tensor([b for b in range(N) for _ in where[b]], device=bb.device)
    cols = torch.tensor([c - 1 for b in range(N) for c in where[b]], device=bb.device)  # predictor
    logits = bb.lm_head(h[rows, cols]).float()  # only where a generated token is predicted
    tgt = torch.cat([ids_all[b][: len(where[b])] for b in range(N)])
    lp = logits.log_softmax(-1).gather(-1, tgt[:, None])[:, 0]
    logp = torch.zeros(N, T, device=bb.device)
    mask = torch.zeros(N, T, device=bb.device)
    tcol = torch.tensor([t for b in range(N) for t in range(len(where[b]))], device=bb.device)
    logp[rows, tcol] = lp
    mask[rows, tcol] = 1.0
    return logp, mask


# =============================================================================================
# 8. Rewards and the curriculum
# =============================================================================================
#
#     r   = r_f + r_r
#     r_f = 1 if the trace is well formed, else 0
#     r_r = 1[answer == positive] * (1 - lam_i * N_ins / K)        lam_i = i / N_iter
#
# Early in RL (lam ~ 0) an inspection is free and the policy learns to be right; as lam -> 1 each
# inspection costs 1/K of the result reward and the policy learns to look only where it must.


def curriculum_lambda(step: int, total: int) -> float:
    """lam_i = i / N_iter, with steps indexed i = 0 .. N_iter - 1 and the last step mapped to 1:
    lam = step / (total - 1), so the first RL step has lam = 0 and the last lam = 1 exactly."""
    if total <= 1:
        return 1.0 if step > 0 else 0.0
    return min(1.0, max(0.0, step / (total - 1)))


def result_reward(correct: bool, n_ins: int, K: int, lam: float) -> float:
    """r_r = 1[correct] * (1 - lam * N_ins / K)."""
    return float(correct) * (1.0 - lam * n_ins / K)


def parse_answer(text: str) -> int | None:
    """The k in '<answer> k </answer>' (the last one), or None when there is no well-formed answer tag."""
    m = re.findall(r"<answer>\s*(\d+)\s*</answer>", text)
    return int(m[-1]) if m else None


def format_reward(text: str, K: int) -> float:
    """r_f = 1 for a well-formed decoded trace, else 0. Well formed:
    exactly one <think> ... </think> block, first; every <insp_s> k <insp_e> inside it with a number
    k in 1..K, no candidate twice, at most K of them; no stray tags; then <answer> k </answer>
    with k in 1..K and nothing after it."""
    t = text.strip()
    m = re.fullmatch(r"<think>(.*)</think>\s*<answer>\s*(\d+)\s*</answer>", t, flags=re.S)
    if not m:
        return 0.0
    body, ans = m.group(1), int(m.group(2))
    if not 1 <= ans <= K:
        return 0.0
    if re.search(r"</?think>|</?answer>|</?full>", body):
        return 0.0
    reqs = re.findall(r"<insp_s>(.*?)<insp_e>", body, flags=re.S)
    if body.count("<insp_s>") != len(reqs) or body.count("<insp_e>") != len(reqs):
        return 0.0
    seen = []
    for r in reqs:
        r = r.strip()
        if not r.isdigit() or not 1 <= int(r) <= K or int(r) in seen:
            return 0.0
        seen.append(int(r))
    return 1.0 if len(seen) <= K else 0.0


def trace_reward(text: str, n_ins: int, errors: list, positives: list[int], K: int, lam: float) -> dict:
    """Both components for one rollout (answers and positives are 1-based candidate indices)."""
    r_f = format_reward(text, K) if not errors else 0.0  # a refused inspection is a format error
    ans = parse_answer(text)
    correct = ans is not None and ans in positives
    r_r = result_reward(correct, n_ins, K, lam)
    return dict(reward=r_f + r_r, r_f=r_f, r_r=r_r, correct=float(correct), N_ins=n_ins)


# ---- GRPO's two pure pieces -------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, G: int, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) within each group of G rollouts of one query.

    std is the population std (unbiased=False: a group of identical rewards has std 0 exactly and
    2 rollouts [1, 0] give +-1). Zero-variance groups carry no signal and get advantage 0.
    (B*G,) -> (B*G,)"""
    r = rearrange(rewards.float(), "(b g) -> b g", g=G)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, unbiased=False, keepdim=True)
    adv = (r - mean) / (std + eps)
    adv = torch.where(std > 0, adv, torch.zeros_like(adv))
    return rearrange(adv, "b g -> (b g)")


def grpo_loss(logp, old_logp, ref_logp, adv, mask, eps_clip: float = 0.2, beta: float = 0.04, agg: str = "token"):
    """The clipped GRPO objective with a k3 KL penalty, as a loss to minimise.

        ratio_t = exp(logp_t - old_logp_t)
        L_t     = -min(ratio_t * A, clip(ratio_t, 1-eps, 1+eps) * A) + beta * KL_t
        KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3: >= 0, unbiased)

    With a single update per batch of rollouts (mu = 1) old_logp == logp.detach(), ratio = 1 and
    the gradient is the plain REINFORCE-with-baseline gradient  -A * grad logp.
    agg = "token": mean over all generated tokens of the batch (long traces weigh more);
    agg = "seq":   mean over each trace's tokens, then over traces (the original GRPO paper).
    logp, old_logp, ref_logp, mask: (N, T); adv: (N,). Returns (loss, stats)."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - eps_clip, 1 + eps_clip) * a
    per_tok = -torch.min(unclipped, clipped)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logp")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + beta * kl
    else:
        kl = torch.zeros_like(logp)
    if agg == "token":
        loss = (per_tok * mask).sum() / mask.sum().clamp(min=1)
    elif agg == "seq":
        loss = ((per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    else:
        raise ValueError(f"agg must be 'token' or 'seq', got {agg!r}")
    with torch.no_grad():
        is_clipped = ((ratio < 1 - eps_clip) & (a < 0)) | ((ratio > 1 + eps_clip) & (a > 0))
        n = mask.sum().clamp(min=1)
        stats = dict(kl=((kl * mask).sum() / n).item(), clip_frac=((is_clipped.float() * mask).sum() / n).item(),
                     ratio_mean=((ratio * mask).sum() / n).item())
    return loss, stats


# =============================================================================================
# 9. Stage 0 -- backbone warm-up (tiny backbone only)
# =============================================================================================
#
# A random-initialised VLM cannot see. Before anything from the paper can work, it learns what a
# pretrained VLM already knows about this world, from FULL tokens:
#   caption:   [T_img] "caption :" -> "a large red circle top left , ... ."
#   relation:  [T_q] "candidate :" [T_c] "relation :" -> "differs : the circle has color blue not red ."
#   check:     "ideal :" caption "candidate :" caption "relation :" -> the relation  (words only; --warmup-check-frac)
#   copy:      text query "ideal :" -> its caption, word for word   (words only; the first --warmup-copy-steps)
# Fresh scenes are drawn every step from a seeded stream of the world (not from the files). A step's
# sequences (25-60 tokens) run in length buckets (bucketed_lm_loss): one loss, less padding.
# Plus the attribute probe (AttributeProbe, --warmup-probe): a linear head reads each cell's shape /
# colour / size straight off the visual tokens, a dense signal the caption loss reaches only through
# the whole LM. The probe is thrown away after the warm-up.

WARMUP_REL_FRAC = 0.5  # share of relation sequences among the image sequences (the rest: captions)


def warmup_example(bb: Backbone, rng: random.Random, kind: str, size: int, match_frac: float = 0.0,
                   structure: str = "star") -> tuple[list, list]:
    """One warm-up sequence (kind: caption | relation | check | copy) as (segments, images); an image is
    (scene, jitter rng or None), rendered and embedded by warmup_rows. A relation's candidate is drawn
    from the target and 3 hard negatives (match_frac = 0), or is the target with probability match_frac.
    `structure` is the world's --neg-structure: a cube world's warm-up sees its 1-2-change negatives."""
    if kind == "caption":
        scene = random_scene(rng)
        return [("img", 0), ("ids", bb.ids("caption :"), False), ("ids", bb.ids(caption(scene)) + [bb.tid("<eos>")], True)], \
            [(scene, None)]
    task = 0 if kind == "copy" else rng.choice([0, 3, 4, 7])
    g = make_group(task, rng, 3, structure)
    q = g["query"]
    if kind == "copy":  # words only: a text query (task 0: the target's caption) -> "ideal :" the same caption
        return [("ids", bb.ids(q["txt"]), False), ("ids", bb.ids("ideal :"), False),
                ("ids", bb.ids(caption(q["target"])) + [bb.tid("<eos>")], True)], []
    if match_frac > 0:
        cand = g["pos"] if rng.random() < match_frac else rng.choice(g["negs"])
    else:
        cand = rng.choice([g["pos"]] + g["negs"])
    rel = bb.ids(describe_relation(q["target"], cand["scene"])) + [bb.tid("<eos>")]
    if kind == "check":  # words only: "ideal :" caption(target) "candidate :" caption(cand) "relation :" -> relation
        return [("ids", bb.ids("ideal :"), False), ("ids", bb.ids(caption(q["target"])), False),
                ("ids", bb.ids("candidate :"), False), ("ids", bb.ids(caption(cand["scene"])), False),
                ("ids", bb.ids("relation :"), False), ("ids", rel, True)], []
    segs, imgs = [], []
    if q["scene"] is not None:
        jit = random.Random(rng.randrange(2**31)) if q["jitter"] else None
        imgs.append((q["scene"], jit))
        segs.append(("img", len(imgs) - 1))
    if q["txt"]:
        segs.append(("ids", bb.ids(q["txt"]), False))
    segs.append(("ids", bb.ids("candidate :"), False))
    if cand["modality"] == "text":
        segs.append(("ids", bb.ids(caption(cand["scene"])), False))
    else:
        imgs.append((cand["scene"], None))
        segs.append(("img", len(imgs) - 1))
    segs.append(("ids", bb.ids("relation :"), False))
    segs.append(("ids", rel, True))
    return segs, imgs


def warmup_kind(rng: random.Random, rel_frac: float, check_frac: float = 0.0) -> str:
    """Draw a sequence kind: check with probability check_frac, else relation with probability rel_frac,
    else caption. (A zero check share draws no random number: the stream is the same as without it.)"""
    if check_frac > 0 and rng.random() < check_frac:
        return "check"
    return "relation" if rng.random() < rel_frac else "caption"


def warmup_sequences(bb: Backbone, rng: random.Random, n: int, rel_frac: float, check_frac: float = 0.0,
                     structure: str = "star", kind: str | None = None) -> tuple[list, torch.Tensor, list]:
    """n warm-up sequences as lm_batch rows, their visual tokens (N_img, n_img, D) and scenes (warmup_rows).
    kind: every sequence of that kind (the copy phase: kind="copy") instead of drawing each one's kind."""
    examples = [warmup_example(bb, rng, kind or warmup_kind(rng, rel_frac, check_frac), IMAGE_SIZE, structure=structure)
                for _ in range(n)]
    return warmup_rows(bb, examples, IMAGE_SIZE)


def warmup_rows(bb: Backbone, examples: list, size: int) -> tuple[list, torch.Tensor, list]:
    """Render and embed the examples' images in one batch -> lm_batch rows, visual tokens, scenes."""
    imgs = [im for _, ims in examples for im in ims]
    vis = None  # a batch of words only (check and copy sequences) has no images
    if imgs:
        pix = torch.stack([torch.from_numpy(np.asarray(render(sc, size, jitter=jit), dtype=np.uint8).copy()).permute(2, 0, 1)
                           for sc, jit in imgs])
        vis = bb.embed_image(pix.to(bb.device))  # (N_img, n_img, D)
    rows, base = [], 0
    per_img = vis.unbind(0) if vis is not None else ()  # unbind: one stack in the backward, not N scatters
    for segs, ims in examples:
        rows.append([("emb", per_img[base + s[1]]) if s[0] == "img" else s for s in segs])
        base += len(ims)
    return rows, vis, [sc for sc, _ in imgs]


class AttributeProbe(nn.Module):
    """Warm-up only (--warmup-probe w): read every cell's (shape, colour, size) -- or "empty" -- straight
    off an image's visual tokens. A dense, direct signal for the vision tower, which the caption loss
    reaches only through the whole LM. Thrown away after the warm-up: theta and phi never see it.

        logits = W . flatten(T_img)  ->  9 cells x (1 + |shapes| + 1 + |colours| + 1 + |sizes|)"""

    def __init__(self, n_img: int, D: int):
        super().__init__()
        self.sizes = (len(SHAPES) + 1, len(COLORS) + 1, len(SIZES) + 1)
        self.head = nn.Linear(n_img * D, 9 * sum(self.sizes))

    def targets(self, scenes: list, device) -> torch.Tensor:
        """(N, 9, 3) class ids; 0 = empty cell."""
        t = torch.zeros(len(scenes), 9, 3, dtype=torch.long)
        for n, sc in enumerate(scenes):
            for shape, color, size, cell in sc:
                t[n, cell] = torch.tensor([SHAPES.index(shape) + 1, COLORS.index(color) + 1, SIZES.index(size) + 1])
        return t.to(device)

    def loss(self, vis: torch.Tensor, scenes: list) -> tuple[torch.Tensor, float]:
        """Mean cross-entropy over cells and attributes, and the shape accuracy on occupied cells."""
        z = self.head(vis.flatten(1).float()).view(len(scenes), 9, -1)  # (N, 9, sum(sizes))
        tgt = self.targets(scenes, vis.device)
        losses, off = [], 0
        for a, n in enumerate(self.sizes):
            losses.append(F.cross_entropy(z[..., off: off + n].reshape(-1, n), tgt[..., a].reshape(-1)))
            if a == 0:
                occ = tgt[..., 0] > 0
                shape_acc = (z[..., :n].argmax(-1) == tgt[..., 0])[occ].float().mean().item()
            off += n
        return sum(losses) / len(losses), shape_acc


@torch.no_grad()
def caption_accuracy(bb: Backbone, n: int = 256, seed: int = 12345, rel_frac: float = 0.0,
                     structure: str = "star") -> dict:
    """Teacher-forced token accuracy on held-out scenes (a seed stream training never uses), overall and
    per attribute word (shape / color / size / position). rel_frac = 1: on relation sequences instead."""
    bb.eval()
    rows, _, _ = warmup_sequences(bb, random.Random(seed), n, rel_frac, structure=structure)
    x, mask, labels = lm_batch(bb, rows)
    _, pred, valid = lm_loss(bb, x, mask, labels)
    tgt = labels[:, 1:]
    ok = (pred == tgt) & valid
    words = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": sorted({w for c in CELLS for w in c.split()})}
    out = {"token_acc": ok.sum().item() / max(1, valid.sum().item())}
    for name, ws in words.items():
        ids = torch.tensor([bb.tid(w) for w in ws], device=tgt.device)
        sel = valid & torch.isin(tgt, ids)
        out[f"{name}_acc"] = (ok & sel).sum().item() / max(1, sel.sum().item())
    bb.train()
    return out


@torch.no_grad()
def match_accuracy(bb: Backbone, n: int = 256, seed: int = 24680, structure: str = "star") -> dict:
    """The decision the inspection phase rests on: shown [T_q] "candidate :" [T_c] "relation :", does
    the relation the LM writes itself (greedy, not teacher-forced) say the right verdict word?
    Held-out relation sequences, half of them matches; accuracy on each half (a model that always
    says "differs" scores 0.0 / 1.0)."""
    bb.eval()
    rng = random.Random(seed)
    examples = [warmup_example(bb, rng, "relation", IMAGE_SIZE, 0.5, structure) for _ in range(n)]
    rows, _, _ = warmup_rows(bb, examples, IMAGE_SIZE)
    m_id, d_id = bb.tid("match"), bb.tid("differs")
    is_match = torch.tensor([m_id in row[-1][1] for row in rows])
    ctx = assemble(bb, [row[:-1] for row in rows])  # everything up to "relation :"
    outs = sample(bb, [bare_prompt(e) for e in ctx], max_new=24, greedy=True, inspect=False)
    says_match = torch.tensor([m_id in r.ids and d_id not in r.ids for r in outs])
    bb.train()
    mean = lambda t: t.float().mean().item() if t.numel() else float("nan")
    return {"on_match": mean(says_match[is_match]), "on_differs": mean(~says_match[~is_match]),
            "balanced": (mean(says_match[is_match]) + mean(~says_match[~is_match])) / 2}


def warmup(cfg: Config, verbose: bool = True) -> dict:
    """Stage 0: caption + relation LM training of the tiny backbone. Skipped for pretrained ones."""
    if cfg.backbone != "tiny":
        if verbose:
            print("[warmup] pretrained backbone: skipped (it already knows how to see)")
        return {}
    dev, dt = pick_device(cfg, verbose)
    seed_everything(cfg.seed)
    bb = new_tiny_backbone().to(dev)
    if verbose:
        n = sum(p.numel() for p in bb.parameters())
        print(f"[warmup] tiny Idefics3: {n / 1e6:.2f}M parameters, vocabulary {len(bb.tok)}")
    probe = None
    if cfg.warmup_probe > 0:  # a throw-away head; part of the checkpointed module while the stage runs
        # visual tokens per image: (image_size / patch_size)^2 patches, pixel shuffle merges scale^2 of them
        n_img = (bb.image_size // bb.vision.config.patch_size) ** 2 // bb.model.config.scale_factor ** 2
        probe = AttributeProbe(n_img, bb.D).to(dev)
        bb.add_module("warmup_probe", probe)
    opt = torch.optim.AdamW(bb.parameters(), lr=cfg.warmup_lr, weight_decay=0.01)
    sched = cosine_schedule(opt, cfg.warmup_steps, warmup=max(1, cfg.warmup_steps // 20))
    rng = random.Random(f"{cfg.seed}-warmup")
    ck = Partial(cfg, "warmup", bb, opt, sched, rng)
    start = ck.resume()
    log = MetricLog(cfg.run_dir, "warmup", start)
    bar = tqdm(range(start, cfg.warmup_steps), initial=start, total=cfg.warmup_steps,
               desc="warm-up (captions + relations)", disable=not verbose)
    bb.train()
    for step in bar:
        with autocast(dev, dt):
            rows, vis, scenes = warmup_sequences(bb, rng, cfg.warmup_batch, WARMUP_REL_FRAC, cfg.warmup_check_frac,
                                                 cfg.neg_structure, kind="copy" if step < cfg.warmup_copy_steps else None)
            loss, right, labelled = bucketed_lm_loss(bb, rows, BUCKETS)
            probed = probe is not None and vis is not None  # a copy step has no image to probe
            if probed:
                probe_loss, probe_shape = probe.loss(vis, scenes)
                loss = loss + cfg.warmup_probe * probe_loss
        check_finite(loss, "warmup", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(bb.parameters(), 1.0)
        opt.step()
        sched.step()
        acc = right / max(1, labelled)
        extra = dict(probe_loss=probe_loss.item(), probe_shape_acc=probe_shape) if probed else {}
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}", **{k: f"{v:.2f}" for k, v in extra.items()})
        if step % LOG_EVERY == 0 or step == cfg.warmup_steps - 1:
            log.log(step=step, loss=loss.item(), token_acc=acc, grad_norm=float(gn), lr=sched.get_last_lr()[0], **extra)
        ck.step_done(step)
    if probe is not None:
        del bb.warmup_probe  # warm-up only; the saved backbone is the plain Idefics3
    held = caption_accuracy(bb)
    held_rel = caption_accuracy(bb, rel_frac=1.0, seed=54321, structure=cfg.neg_structure)
    held_match = match_accuracy(bb, structure=cfg.neg_structure)
    res = {"caption": held, "relation": {"token_acc": held_rel["token_acc"]}, "match": held_match}
    with atomic_dir(Path(cfg.run_dir) / "warmup") as tmp:
        bb.save(tmp)
        (tmp / "state.json").write_text(json.dumps(stage_state(cfg, "warmup", cfg.warmup_steps, heldout=res), indent=2))
    ck.finish()
    if verbose:
        print("[warmup] held-out caption token acc {token_acc:.3f} (shape {shape_acc:.2f}, color {color_acc:.2f}, "
              "size {size_acc:.2f}, position {position_acc:.2f})".format(**held)
              + f"; relation token acc {held_rel['token_acc']:.3f}; verdict of a relation it writes itself: "
              f"right on matches {held_match['on_match']:.2f}, on negatives {held_match['on_differs']:.2f}")
    return res


# =============================================================================================
# 10. Stage 1 -- ICM self-alignment
# =============================================================================================
#
# The LM (and vision encoder) are frozen; only the ICM learns. For a (query, candidate) pair the
# frozen LM first describes, from FULL tokens,
#     content:   [T_c] "caption :"                        -> d_con   (what the candidate shows)
#     relation:  [T_q] "candidate :" [T_c] "relation :"   -> d_rel   (how it differs from the query)
# and the ICM is trained with cross-entropy so that the same frozen LM says the same from the
# compressed tokens:
#     [t_con] "caption :" -> d_con          [t_rel] "relation :" -> d_rel
# Targets are the LM's OWN greedy outputs (self-alignment, as in the paper), so this stage needs no
# labels and runs unchanged on real M-BEIR. Ground-truth descriptions from the scene graphs are used
# only to measure: token accuracy from compressed vs from full tokens on val.


def align_pairs(splits: list[TaskSplit], rng: random.Random, n: int) -> list[tuple[dict, dict, TaskSplit, int, int]]:
    """n (query item, candidate item) pairs: half positives, half hard negatives."""
    out = []
    flat = [(ts, i) for ts in splits for i in range(len(ts)) if ts.pos[i]]
    for _ in range(n):
        ts, i = rng.choice(flat)
        pool = ts.pos[i] if (rng.random() < 0.5 or not ts.neg[i]) else ts.neg[i]
        j = rng.choice(pool)
        out.append((query_item(ts, i), cand_item(ts, j), ts, i, j))
    return out


@torch.no_grad()
def full_descriptions(theta: Reasoner, emb: Embedder, pairs: list, max_new: int = 40) -> tuple[list, list]:
    """The frozen LM's greedy content and relation descriptions from full tokens (token id lists)."""
    bb = theta.bb
    q_items, c_items = [p[0] for p in pairs], [p[1] for p in pairs]
    T_q, q_mask = emb.tokens(q_items)
    T_c, c_mask = emb.tokens(c_items)
    tq = [T_q[i, : int(q_mask[i].sum())] for i in range(len(pairs))]
    tc = [T_c[i, : int(c_mask[i].sum())] for i in range(len(pairs))]
    con = assemble(bb, [[("emb", c), ("ids", bb.ids("caption :"))] for c in tc])
    rel = assemble(bb, [[("emb", q), ("ids", bb.ids("candidate :")), ("emb", c), ("ids", bb.ids("relation :"))]
                        for q, c in zip(tq, tc)])
    outs = sample(theta, [bare_prompt(e) for e in con + rel], max_new=max_new, greedy=True, inspect=False)
    n = len(pairs)
    return [r.ids for r in outs[:n]], [r.ids for r in outs[n:]]


def alignment_batch(theta: Reasoner, emb: Embedder, pairs: list, con_t: list, rel_t: list, compressed: bool = True):
    """LM batch for the alignment loss: compressed ([t_con] / [t_rel]) or full-token inputs."""
    bb = theta.bb
    q_items, c_items = [p[0] for p in pairs], [p[1] for p in pairs]
    T_q, q_mask = emb.tokens(q_items)
    T_c, c_mask = emb.tokens(c_items)
    rows = []
    if compressed:
        z = theta.icm(T_c, c_mask, T_q, q_mask)
        for i in range(len(pairs)):
            rows.append([("emb", z["t_con"][i: i + 1]), ("ids", bb.ids("caption :"), False), ("ids", con_t[i], True)])
        for i in range(len(pairs)):
            rows.append([("emb", z["t_rel"][i: i + 1]), ("ids", bb.ids("relation :"), False), ("ids", rel_t[i], True)])
    else:
        for i in range(len(pairs)):
            rows.append([("emb", T_c[i, : int(c_mask[i].sum())]), ("ids", bb.ids("caption :"), False),
                         ("ids", con_t[i], True)])
        for i in range(len(pairs)):
            rows.append([("emb", T_q[i, : int(q_mask[i].sum())]), ("ids", bb.ids("candidate :"), False),
                         ("emb", T_c[i, : int(c_mask[i].sum())]), ("ids", bb.ids("relation :"), False),
                         ("ids", rel_t[i], True)])
    return lm_batch(bb, rows)


@torch.no_grad()
def description_accuracy(theta: Reasoner, emb: Embedder, pairs: list) -> dict:
    """Teacher-forced token accuracy of the ground-truth descriptions (from the scene graphs), read
    from compressed vs from full tokens. Needs scene graphs (our world)."""
    bb = theta.bb
    con_t, rel_t = [], []
    for q, c, ts, i, j in pairs:
        src = ts.queries[i]["query_src_content"]
        target, cand = scene_of(src, "target"), scene_of(ts.pool[j]["src_content"])
        if target is None or cand is None:
            return {}
        con_t.append(bb.ids(caption(cand)) + [bb.tid("<eos>")])
        rel_t.append(bb.ids(describe_relation(target, cand)) + [bb.tid("<eos>")])
    out = {}
    for name, comp in (("compressed", True), ("full", False)):
        x, mask, labels = alignment_batch(theta, emb, pairs, con_t, rel_t, compressed=comp)
        _, pred, valid = lm_loss(bb, x, mask, labels)
        ok = (pred == labels[:, 1:]) & valid
        n = len(pairs)
        out[f"content_acc_{name}"] = ok[:n].sum().item() / max(1, valid[:n].sum().item())
        out[f"relation_acc_{name}"] = ok[n:].sum().item() / max(1, valid[n:].sum().item())
    return out


def align_icm(cfg: Config, verbose: bool = True) -> dict:
    """Stage 1: train only the ICM so the frozen LM says from 2 tokens what it says from all of them."""
    dev, dt = pick_device(cfg, verbose)
    seed_everything(cfg.seed + 2)
    theta = Reasoner(base_backbone(cfg), cfg).to(dev)
    for p in theta.bb.parameters():  # frozen: LM, vision encoder, connector, embeddings
        p.requires_grad_(False)
    emb = Embedder(theta.bb, ImageCache(theta.bb.image_size), frozen_vision=True)
    rng = random.Random(cfg.seed + 21)
    n_pairs = max(cfg.align_batch * 8, min(4000, cfg.align_steps * cfg.align_batch // 4))
    pairs = align_pairs(load_tasks(cfg, "train"), rng, n_pairs)
    theta.eval()
    con_t, rel_t = [], []
    for i in tqdm(range(0, len(pairs), 128), desc="self-alignment targets (frozen LM, full tokens)",
                  disable=not verbose):
        with autocast(dev, dt):
            c, r = full_descriptions(theta, emb, pairs[i: i + 128], max_new=40)
        con_t += c
        rel_t += r
    opt = torch.optim.AdamW(theta.icm.parameters(), lr=cfg.align_lr, weight_decay=0.01)
    sched = cosine_schedule(opt, cfg.align_steps, warmup=max(1, cfg.align_steps // 20))
    ck = Partial(cfg, "icm", theta.icm, opt, sched, rng)
    start = ck.resume()
    log = MetricLog(cfg.run_dir, "icm", start)
    bar = tqdm(range(start, cfg.align_steps), initial=start, total=cfg.align_steps, desc="ICM self-alignment",
               disable=not verbose)
    theta.icm.train()
    for step in bar:
        idx = rng.sample(range(len(pairs)), min(cfg.align_batch, len(pairs)))
        with autocast(dev, dt):
            x, mask, labels = alignment_batch(theta, emb, [pairs[i] for i in idx], [con_t[i] for i in idx],
                                              [rel_t[i] for i in idx])
            loss, pred, valid = lm_loss(theta.bb, x, mask, labels)
        check_finite(loss, "icm", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(theta.icm.parameters(), 1.0)
        opt.step()
        sched.step()
        acc = ((pred == labels[:, 1:]) & valid).sum().item() / max(1, valid.sum().item())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
        if step % LOG_EVERY == 0 or step == cfg.align_steps - 1:
            log.log(step=step, loss=loss.item(), token_acc=acc, grad_norm=float(gn), lr=sched.get_last_lr()[0])
        ck.step_done(step)
    theta.icm.eval()
    val_pairs = align_pairs(load_tasks(cfg, "val"), random.Random(cfg.seed + 22), 256)
    with autocast(dev, dt):
        val = description_accuracy(theta, emb, val_pairs)
    with atomic_dir(Path(cfg.run_dir) / "icm") as tmp:
        theta.save(tmp)
        (tmp / "state.json").write_text(json.dumps(stage_state(cfg, "icm", cfg.align_steps, val=val), indent=2))
    ck.finish()
    if verbose and val:
        print("[icm] val description token acc: content {content_acc_compressed:.3f} compressed vs "
              "{content_acc_full:.3f} full; relation {relation_acc_compressed:.3f} compressed vs "
              "{relation_acc_full:.3f} full".format(**val))
    return val


# =============================================================================================
# 11. Stage 2 -- retrieval-tailored synthetic CoT and SFT activation
# =============================================================================================
#
# The paper distils a 72B teacher; here a rule-based teacher reads the scene graphs and writes the
# paper's four phases (only traces whose answer is right are kept):
#   1 speculate   "ideal : a large red circle top left , a small blue star center ."
#   2 eliminate   "eliminate : 2 color , 5 size . keep : 1 3 4 ."
#                 color / size changes (and unrelated scenes) are what the compressed view shows
#                 clearly (see the alignment accuracies); shape, position and swap changes are not
#   3 inspect     "<insp_s> 3 <insp_e> differs : the star has shape cross not star ."
#                 "<insp_s> 1 <insp_e> match ."   -- kept candidates in phi's order until a match
#   4 answer      "</think> <answer> 1 </answer>"
# With a single kept candidate the answer follows without inspection, so N_ins varies with how
# many look-alikes phi put in the top-K. The relation sentences are exactly what the warmed-up LM
# learned to say from full tokens, so phase 3 can read what the splice shows. (How often theta's
# verdict after a splice is right is what `eval` reports as "says match after inspecting the
# positive / a negative".)

CLEAR_KINDS = ("color", "size", "many")  # differences the teacher treats as visible when compressed


def relation_kind(rel: str) -> str:
    """'match' | 'color' | 'shape' | 'size' | 'position' | 'swapped' | 'many' from a relation sentence."""
    if rel.startswith("match"):
        return "match"
    for k in ("color", "shape", "size", "position"):
        if f" has {k} " in rel:
            return k
    return "swapped" if "swapped" in rel else "many"


def cot_trace(target, cand_scenes: list, positives: list[int], mode: str = "full") -> tuple[str, list[int]] | None:
    """The teacher's four-phase trace for one query (1-based candidate indices), or None when the
    positive is not among the K candidates (no correct trace exists).
    mode "noinsp" (the w/o-inspection ablation) drops phase 3 and answers from the compressed view;
    mode "direct" (theta without reasoning) is just "<think> </think> <answer> k </answer>"."""
    if not any(1 <= p <= len(cand_scenes) for p in positives):
        return None
    if mode == "direct":
        return f"<think> </think> <answer> {min(p for p in positives if p <= len(cand_scenes))} </answer>", []
    rels = [describe_relation(target, c) for c in cand_scenes]
    elim = [(k, relation_kind(r)) for k, r in enumerate(rels, 1) if relation_kind(r) in CLEAR_KINDS and k not in positives]
    keep = [k for k in range(1, len(rels) + 1) if k not in {e[0] for e in elim}]
    parts = ["<think> ideal :", caption(target), "eliminate :",
             (" , ".join(f"{k} {kind}" for k, kind in elim) or "none") + " .", "keep :", " ".join(map(str, keep)) + " ."]
    inspected = []
    if mode == "noinsp":
        keep = [k for k in keep if k in positives] + [k for k in keep if k not in positives]
    elif len(keep) > 1:
        for k in keep:
            inspected.append(k)
            parts.append(f"<insp_s> {k} <insp_e> {rels[k - 1]}")
            if k in positives:
                break
    answer = inspected[-1] if inspected else keep[0]
    if answer not in positives:
        return None
    parts.append(f"</think> <answer> {answer} </answer>")
    return " ".join(parts), inspected


def format_only_trace(positives: list[int], K: int) -> tuple[str, list[int]] | None:
    """For data without scene graphs (real M-BEIR): inspect phi's candidates in order until the
    positive, then answer. Teaches the format and the inspect-then-answer habit, not the reasoning."""
    p = min((x for x in positives if 1 <= x <= K), default=None)
    if p is None:
        return None
    parts, inspected = ["<think> eliminate : none . keep :", " ".join(map(str, range(1, p + 1))) + " ."], []
    for k in range(1, p + 1):
        inspected.append(k)
        parts.append(f"<insp_s> {k} <insp_e> " + ("match ." if k == p else "differs ."))
    parts.append(f"</think> <answer> {p} </answer>")
    return " ".join(parts), inspected


def load_teacher_cots(path: str | Path) -> dict[str, str]:
    """Teacher CoTs generated by a large MLLM, one JSON object per line:
        {"qid": "8:1234", "trace": "<think> ... <insp_s> 3 <insp_e> ... </think> <answer> 3 </answer>"}
    `trace` is the whole generated text; candidate indices refer to phi's top-K order (1-based) of
    the same run. Lines whose trace fails format_reward are rejected with file:line."""
    out = {}
    for r in read_jsonl(Path(path), {"qid": str, "trace": str}):
        if not format_reward(r["trace"], 10**6):
            raise DataError(f"{path}:{r['_line']}: field 'trace' is not a well-formed trace")
        out[r["qid"]] = r["trace"]
    return out


def trace_rollout(bb: Backbone, text: str) -> Rollout:
    """A teacher trace as a Rollout: token ids, and a splice after every <insp_e> (its k)."""
    ids = bb.ids(text)
    if ids and ids[0] == bb.tid("<think>"):
        ids = ids[1:]  # the prompt already ends with <think>
    r = Rollout(ids=ids, finished=True, text=text)
    e_id = bb.tid("<insp_e>")
    for t, tid in enumerate(ids):
        if tid == e_id:
            k, err = parse_inspection(bb, ids[: t + 1], 10**6, r.inspected)
            if k is not None:
                r.inspected.append(k)
                r.splices.append((t, k))
    return r


@dataclass
class RerankItem:
    """One query with phi's top-K: what SFT, GRPO and evaluation feed theta."""
    query: dict
    cands: list  # K candidate items in phi's order
    rows: list  # their pool rows
    positives: list  # 1-based indices of positives among cands (may be empty: phi missed)
    target: Any  # scene graph the query asks for, or None
    scenes: list  # candidate scene graphs (or Nones)
    task: str
    qid: str


@torch.no_grad()
def rerank_items(cfg: Config, split: str, ret: Retriever | None = None, verbose: bool = True) -> list[RerankItem]:
    """phi's top-K for every query of a split, cached in <run_dir>/topk_<split>_K<K>.json."""
    cache_f = Path(cfg.run_dir) / f"topk_{split}_K{cfg.K}.json"
    splits = load_tasks(cfg, split)
    if cache_f.exists():
        top = json.loads(cache_f.read_text())
    else:
        ret = ret or load_retriever(cfg).to(pick_device(cfg, False)[0])
        top = phi_topk(cfg, ret, splits, desc=f"phi top-{cfg.K} on {split}", verbose=verbose)
        atomic_write_text(cache_f, json.dumps(top))
    items = []
    for ts in splits:
        for i, ranked in enumerate(top[ts.name]):
            rows = ranked[: cfg.K]
            q = ts.queries[i]
            items.append(RerankItem(
                query=query_item(ts, i), cands=[cand_item(ts, j) for j in rows], rows=ranked,
                positives=[n + 1 for n, j in enumerate(rows) if j in ts.pos[i]],
                target=scene_of(q["query_src_content"], "target"),
                scenes=[scene_of(ts.pool[j]["src_content"]) for j in rows], task=task_key(cfg, ts), qid=q["qid"]))
    return items


def build_sft_data(cfg: Config, items: list[RerankItem], teacher: dict | None = None, verbose: bool = True) -> list:
    """(item, trace text) for every train query that has a correct trace; prints the statistics."""
    data, kinds = [], {"scene": 0, "format_only": 0, "teacher": 0}
    for it in items:
        if teacher and it.qid in teacher:
            tr, src = (teacher[it.qid], None), "teacher"
        elif it.target is not None and all(s is not None for s in it.scenes):
            tr, src = cot_trace(it.target, it.scenes, it.positives, cfg.cot_mode), "scene"
        else:
            tr, src = format_only_trace(it.positives, cfg.K), "format_only"
        if tr is None:
            continue
        kinds[src] += 1
        data.append((it, tr[0]))
    if verbose and data:
        n_ins = [t.count("<insp_s>") for _, t in data]
        lens = [len(t.split()) for _, t in data]
        hist = {n: n_ins.count(n) for n in sorted(set(n_ins))}
        print(f"[cot] {len(data)}/{len(items)} train queries have a correct trace ({kinds}); "
              f"words/trace mean {sum(lens) / len(lens):.1f} max {max(lens)}; inspections/trace mean "
              f"{sum(n_ins) / len(n_ins):.2f}, histogram {hist}")
    return data


# ---- LoRA (pretrained backbones only) -------------------------------------------------------


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen, A ~ N(0, 1/r), B = 0 (so training starts at W)."""

    def __init__(self, base: nn.Linear, r: int = 16, alpha: float = 32.0):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.A = nn.Parameter(torch.randn(r, base.in_features, device=base.weight.device) / r)
        self.B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        base.weight.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + (x @ self.A.T.to(x.dtype) @ self.B.T.to(x.dtype)) * self.scale


def add_lora(bb: Backbone, r: int, targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> int:
    """Wrap the LM's attention projections with LoRA; returns the number of wrapped layers."""
    n = 0
    for name, mod in list(bb.text.named_modules()):
        for t in targets:
            child = getattr(mod, t, None)
            if isinstance(child, nn.Linear):
                setattr(mod, t, LoRALinear(child, r))
                n += 1
    return n


def merge_lora(bb: Backbone) -> None:
    """Fold B A into W (so the checkpoint is a plain save_pretrained model)."""
    for mod in list(bb.text.modules()):
        for t, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight += (child.B @ child.A * child.scale).to(child.base.weight.dtype)
                setattr(mod, t, child.base)


LORA_R = 16  # LoRA rank for pretrained LMs (the tiny LM is fully fine-tuned)


def trainable_theta(theta: Reasoner) -> list:
    """Vision encoder + connector frozen; ICM trained; LM fully (tiny) or through LoRA (pretrained)."""
    for p in theta.bb.parameters():
        p.requires_grad_(False)
    if theta.bb.pretrained:
        add_lora(theta.bb, LORA_R)
    else:
        for p in theta.bb.text.parameters():
            p.requires_grad_(True)
        for p in theta.bb.lm_head.parameters():
            p.requires_grad_(True)
    for p in theta.icm.parameters():
        p.requires_grad_(True)
    return [p for p in theta.parameters() if p.requires_grad]


def sft_loss(theta: Reasoner, emb: Embedder, batch: list) -> tuple[torch.Tensor, dict]:
    """L_SFT = -(1 / #tokens) sum_t log pi(y_t | prompt, y_<t, splices): the mean over the teacher's
    generated tokens only; the prompt and the spliced observations never count (score() masks them)."""
    prompts = build_prompts(theta, emb, [it.query for it, _ in batch], [it.cands for it, _ in batch])
    rolls = [trace_rollout(theta.bb, text) for _, text in batch]
    logp, mask = score(theta, prompts, rolls)  # (N, T), (N, T)
    loss = -(logp * mask).sum() / mask.sum().clamp(min=1)
    return loss, dict(tokens=int(mask.sum().item()))


def save_theta(cfg: Config, theta: Reasoner, stage: str, step: int, **extra) -> None:
    with atomic_dir(Path(cfg.run_dir) / stage) as tmp:
        theta.save(tmp)
        (tmp / "state.json").write_text(json.dumps(stage_state(cfg, stage, step, **extra), indent=2))


def train_sft(cfg: Config, verbose: bool = True) -> dict:
    """Stage 2: SFT activation on the synthetic CoT (ICM + LM jointly, vision frozen)."""
    dev, dt = pick_device(cfg, verbose)
    seed_everything(cfg.seed + 3)
    # "none" = a fresh, unaligned ICM: the w/o-self-alignment ablation
    theta = load_reasoner(cfg, "icm", dev) if cfg.sft_from == "icm" else Reasoner(base_backbone(cfg), cfg).to(dev)
    items = rerank_items(cfg, "train", verbose=verbose)
    teacher = load_teacher_cots(cfg.cot_file) if cfg.cot_file else None
    data = build_sft_data(cfg, items, teacher, verbose)
    if not data:
        raise RetrvError("SFT: no train query has a correct trace (phi never retrieves a positive in the top-K?)")
    params = trainable_theta(theta)
    emb = Embedder(theta.bb, ImageCache(theta.bb.image_size), frozen_vision=True)
    opt = torch.optim.AdamW(params, lr=cfg.sft_lr, weight_decay=0.01)
    sched = cosine_schedule(opt, cfg.sft_steps, warmup=max(1, cfg.sft_steps // 20))
    rng = random.Random(cfg.seed + 31)
    ck = Partial(cfg, "sft", theta, opt, sched, rng)
    start = ck.resume()
    log = MetricLog(cfg.run_dir, "sft", start)
    bar = tqdm(range(start, cfg.sft_steps), initial=start, total=cfg.sft_steps, desc="SFT activation",
               disable=not verbose)
    theta.train()
    for step in bar:
        batch = rng.sample(data, min(cfg.sft_batch, len(data)))
        with autocast(dev, dt):
            loss, st = sft_loss(theta, emb, batch)
        check_finite(loss, "sft", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % LOG_EVERY == 0 or step == cfg.sft_steps - 1:
            log.log(step=step, loss=loss.item(), grad_norm=float(gn), lr=sched.get_last_lr()[0], **st)
        ck.step_done(step)
    if theta.bb.pretrained:
        merge_lora(theta.bb)
    theta.eval()
    save_theta(cfg, theta, "sft", cfg.sft_steps, n_traces=len(data))
    ck.finish()
    return {"n_traces": len(data)}


# =============================================================================================
# 12. Stage 3 -- GRPO with the curriculum result-efficiency reward
# =============================================================================================
#
# Per step: B queries x G rollouts (temperature 1, inspection on) from the current policy
# -> rewards r = r_f + r_r with lam_i = i / N_iter -> group advantages -> mu inner updates of the
# clipped objective with the k3 KL to the frozen SFT model (built only when beta > 0).
# How this departs from textbook GRPO (say it plainly):
#   * old_logp are the sampler's log-probs (same weights, a different batch shape); with mu = 1
#     the ratio is exp(0) = 1 up to float noise and the clip never binds;
#   * the ICM is part of the policy: its prompt tokens are rebuilt with gradients in every update;
#   * spliced observation tokens are never scored (score() masks them);
#   * RL data are the harder train queries (those the SFT model does not solve reliably).

EPS_CLIP = 0.2  # PPO clip range epsilon


def rl_queries(cfg: Config, theta: Reasoner, emb: Embedder, items: list[RerankItem], verbose: bool) -> list[RerankItem]:
    """Train queries whose positive phi retrieved, up to grpo_pool of them, hardest first for the SFT
    model: those it gets wrong greedily, then those it gets right where phi's rank 1 is wrong, then the
    rest. Groups the model always solves (or always fails) have zero reward variance, so no signal."""
    cand = [it for it in items if it.positives]
    rng = random.Random(cfg.seed + 41)
    rng.shuffle(cand)
    cand = cand[: cfg.grpo_pool * 2]
    res = rerank(cfg, theta, emb, cand, verbose=verbose, desc="choosing RL queries")
    wrong = [it for it, r in zip(cand, res) if r["pick"] not in it.positives]
    hard_right = [it for it, r in zip(cand, res) if r["pick"] in it.positives and 1 not in it.positives]
    easy = [it for it, r in zip(cand, res) if r["pick"] in it.positives and 1 in it.positives]
    chosen = (wrong + hard_right + easy)[: cfg.grpo_pool]
    if verbose:
        print(f"[grpo] RL pool: {len(chosen)} of {len(cand)} screened train queries: first the {len(wrong)} the SFT "
              f"model gets wrong, then {len(hard_right)} it gets right where phi's rank 1 is wrong, then easy ones")
    return chosen


def train_grpo(cfg: Config, verbose: bool = True) -> dict:
    """Stage 3: GRPO from the SFT model (or from the aligned ICM model: the w/o-SFT ablation)."""
    dev, dt = pick_device(cfg, verbose)
    seed_everything(cfg.seed + 4)
    theta = load_reasoner(cfg, cfg.grpo_from, dev)
    ref = None
    if cfg.beta > 0:  # frozen reference for the KL term
        ref = load_reasoner(cfg, cfg.grpo_from, dev).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    emb = Embedder(theta.bb, ImageCache(theta.bb.image_size), frozen_vision=True)
    ref_emb = Embedder(ref.bb, emb.cache, frozen_vision=True) if ref is not None else None
    items = rerank_items(cfg, "train", verbose=verbose)
    pool = rl_queries(cfg, theta, emb, items, verbose)
    params = trainable_theta(theta)
    opt = torch.optim.AdamW(params, lr=cfg.grpo_lr, weight_decay=0.0)
    sched = cosine_schedule(opt, cfg.grpo_steps * cfg.grpo_mu, warmup=1)
    rng = random.Random(cfg.seed + 42)
    ck = Partial(cfg, "grpo", theta, opt, sched, rng)
    start = ck.resume()
    log = MetricLog(cfg.run_dir, "grpo", start)
    G, K = cfg.G, cfg.K
    bar = tqdm(range(start, cfg.grpo_steps), initial=start, total=cfg.grpo_steps, desc="GRPO", disable=not verbose)
    for step in bar:
        lam = cfg.fixed_lambda if cfg.fixed_lambda >= 0 else curriculum_lambda(step, cfg.grpo_steps)
        batch = rng.sample(pool, min(cfg.grpo_batch, len(pool)))
        t0 = time.perf_counter()
        theta.eval()
        with torch.no_grad(), autocast(dev, dt):  # --- rollouts
            prompts = build_prompts(theta, emb, [it.query for it in batch], [it.cands for it in batch])
            rep = [p for p in prompts for _ in range(G)]  # (B*G) prompts, group-major
            seeds = [cfg.seed * 1_000_003 + step * 10_007 + n for n in range(len(rep))]
            rolls = sample(theta, rep, max_new=cfg.max_new, temperature=1.0, seeds=seeds,
                           inspect=cfg.inspect)
        t_roll = time.perf_counter() - t0
        rw = [trace_reward(r.text, r.N_ins, r.errors, batch[n // G].positives, K, lam) for n, r in enumerate(rolls)]
        rewards = torch.tensor([x["reward"] for x in rw], device=dev)
        adv = group_advantages(rewards, G)  # (B*G,)
        zero_std = (rearrange(rewards, "(b g) -> b g", g=G).std(-1, unbiased=False) == 0).float().mean().item()
        T = max(len(r.ids) for r in rolls)
        old_logp = torch.zeros(len(rolls), T, device=dev)
        for n, r in enumerate(rolls):
            old_logp[n, : len(r.ids)] = torch.tensor(r.logp, device=dev)
        ref_logp = None
        if ref is not None:
            with torch.no_grad(), autocast(dev, dt):
                rp = build_prompts(ref, ref_emb, [it.query for it in batch], [it.cands for it in batch])
                ref_logp, _ = score(ref, [p for p in rp for _ in range(G)], rolls)
        t1 = time.perf_counter()
        theta.train()
        for _ in range(cfg.grpo_mu):  # --- mu inner updates on the same rollouts
            with autocast(dev, dt):
                prompts = build_prompts(theta, emb, [it.query for it in batch], [it.cands for it in batch])
                logp, mask = score(theta, [p for p in prompts for _ in range(G)], rolls)
                loss, st = grpo_loss(logp, old_logp, ref_logp, adv, mask, EPS_CLIP, cfg.beta)
            check_finite(loss, "grpo", step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
        t_upd = time.perf_counter() - t1
        mean = lambda k: sum(x[k] for x in rw) / len(rw)
        row = dict(step=step, lam=lam, reward=mean("reward"), r_f=mean("r_f"), r_r=mean("r_r"),
                   acc=mean("correct"), N_ins=mean("N_ins"), kl=st["kl"], clip_frac=st["clip_frac"],
                   completion_len=sum(len(r.ids) for r in rolls) / len(rolls), frac_zero_std=zero_std,
                   grad_norm=float(gn), loss=loss.item(), rollout_s=t_roll, update_s=t_upd)
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['acc']:.2f}", N_ins=f"{row['N_ins']:.2f}", lam=f"{lam:.2f}")
        if step % LOG_EVERY == 0 or step == cfg.grpo_steps - 1:
            row["sample"] = rolls[0].text
            log.log(**row)
            if verbose and step % (LOG_EVERY * 4) == 0:
                tqdm.write(f"[grpo] step {step} sample (reward {rw[0]['reward']:.2f}): {rolls[0].text[:300]}")
        else:
            log.log(**row)
        ck.step_done(step)
    if theta.bb.pretrained:
        merge_lora(theta.bb)
    theta.eval()
    save_theta(cfg, theta, "grpo", cfg.grpo_steps)
    ck.finish()
    return {"final_reward": row["reward"], "final_N_ins": row["N_ins"]} if start < cfg.grpo_steps else {}


# =============================================================================================
# 13. Evaluation
# =============================================================================================
#
# Protocol: phi ranks the task's local pool; theta (later stages) reorders phi's top-K by putting
# its pick first. Recall@k is M-BEIR's hit rate: 1 if any positive is among the top k.


def recall_at(ranked: list[list[int]], pos: list[list[int]], ks=(1, 5, 10)) -> dict[str, float]:
    """M-BEIR Recall@k = mean over queries of 1[any positive in the top k] (a hit rate)."""
    out = {}
    for k in ks:
        hits = [1.0 if set(r[:k]) & set(p) else 0.0 for r, p in zip(ranked, pos)]
        out[f"R@{k}"] = sum(hits) / max(1, len(hits))
    return out


@torch.no_grad()
def coarse_rank(cfg: Config, ret: Retriever, ts: TaskSplit, depth: int, cache: ImageCache | None = None):
    """phi's ranking of ts's pool for every query: (scores (Q, depth), pool rows (Q, depth))."""
    return topk_search(*coarse_embed(cfg, ret, ts, cache), depth)


def coarse_embed(cfg: Config, ret: Retriever, ts: TaskSplit, cache: ImageCache | None = None):
    """phi's unit embeddings of ts's queries (Q, d) and of its pool (N, d)."""
    emb = Embedder(ret.bb, cache or ImageCache(ret.bb.image_size))
    qs = ret.encode_all(emb, [query_item(ts, i) for i in range(len(ts))], cfg.eval_batch)  # (Q, d)
    cs = ret.encode_all(emb, [cand_item(ts, j) for j in range(len(ts.pool))], cfg.eval_batch)  # (N, d)
    return qs, cs


def phi_topk(cfg: Config, ret: Retriever, splits: list[TaskSplit], desc: str = "phi top-K",
             verbose: bool = False) -> dict[str, list[list[int]]]:
    """{split name: phi's ranked pool rows per query}, deep enough for theta's K and for R@10."""
    top, cache = {}, ImageCache(ret.bb.image_size)
    for ts in tqdm(splits, desc=desc, disable=not verbose):
        check_K(cfg, ts)
        qs, cs = coarse_embed(cfg, ret, ts, cache)  # (Q, d), (N, d)
        _, idx = topk_search(qs, cs, max(cfg.K, min(10, len(ts.pool))))  # (Q, depth)
        top[ts.name] = idx.tolist()
    return top


def check_K(cfg: Config, ts: TaskSplit) -> None:
    if cfg.K > len(ts.pool):
        raise RetrvError(f"K={cfg.K} is larger than the candidate pool {ts.pool_file} ({len(ts.pool)} candidates)")


def coarse_recall(cfg: Config, ret: Retriever, split: str, verbose: bool = True) -> dict:
    """phi alone on a split: per-task and averaged hit rates at 1, 5, 10 and K."""
    splits = load_tasks(cfg, split)
    ks = sorted({1, 5, 10, cfg.K})
    tasks, cache = {}, ImageCache(ret.bb.image_size)
    blind = {}
    for ts in tqdm(splits, desc=f"phi on {split}", disable=not verbose):
        check_K(cfg, ts)
        qs, cs = coarse_embed(cfg, ret, ts, cache)  # (Q, d), (N, d)
        _, idx = topk_search(qs, cs, min(max(ks), len(ts.pool)))
        tasks[task_key(cfg, ts)] = recall_at(idx.tolist(), ts.pos, ks)
        picks = [r[consensus_pick(cs[r[: cfg.K]])] for r in idx.tolist()]
        blind[task_key(cfg, ts)] = sum(p in pos for p, pos in zip(picks, ts.pos)) / max(1, len(ts))
    avg = {f"R@{k}": sum(t[f"R@{k}"] for t in tasks.values()) / len(tasks) for k in ks}
    return {"tasks": tasks, "avg": avg,
            "controls": {"query_blind_consensus_R@1": {**blind, "avg": sum(blind.values()) / len(blind)}}}


def consensus_pick(C: torch.Tensor) -> int:
    """A query-blind control: among phi's top-K (unit embeddings C (K, d)), the candidate closest on
    average to the other K-1,  argmax_k sum_{j != k} <c_k, c_j>.  It never looks at the query (the
    query only chose the K). In the star world every hard negative is one change from the target, so
    the target is the hub of its look-alikes and this rule finds it far more often than phi's own
    rank 1; a reranker's R@1 means something only above it."""
    sim = C @ C.T  # (K, K)
    return int((sim.sum(1) - sim.diagonal()).argmax())


def task_key(cfg: Config, ts: TaskSplit) -> str:
    """Our world: the task id ("0", "3", ...); real M-BEIR: the file name (mbeir_cirr_task7_test)."""
    return str(ts.task_id) if _is_synthetic(cfg) else ts.name


@torch.no_grad()
def rerank(cfg: Config, theta: Reasoner, emb: Embedder, items: list[RerankItem], inspect: bool | None = None,
           verbose: bool = True, desc: str = "theta reranks") -> list[dict]:
    """theta reads each query's top-K and picks one (greedy, with inspection). The final ranking is
    the pick followed by phi's order; a trace without a valid answer falls back to phi's order."""
    theta.eval()
    out = []
    bs = cfg.rerank_batch
    for i in tqdm(range(0, len(items), bs), desc=desc, disable=not verbose, leave=False):
        chunk = items[i: i + bs]
        t0 = time.perf_counter()
        prompts = build_prompts(theta, emb, [it.query for it in chunk], [it.cands for it in chunk])
        rolls = sample(theta, prompts, max_new=cfg.max_new, greedy=True, inspect=cfg.inspect if inspect is None else inspect)
        ms = (time.perf_counter() - t0) * 1000 / len(chunk)
        for it, p, r in zip(chunk, prompts, rolls):
            ans = parse_answer(r.text)
            ok = format_reward(r.text, p.K) > 0 and not r.errors
            pick = it.rows[ans - 1] if ans is not None and 1 <= ans <= p.K else None
            ranking = ([pick] + [j for j in it.rows if j != pick]) if pick is not None else list(it.rows)
            ctx = p.embeds.shape[0] + sum(p.splice(k).shape[0] for _, k in r.splices) + len(r.ids)
            out.append(dict(task=it.task, qid=it.qid, ranking=ranking, pick=ans, positives=it.positives,
                            N_ins=r.N_ins, format_ok=ok, ctx=ctx, prompt_tokens=p.embeds.shape[0], ms=ms,
                            phi_top1=1 in it.positives, text=r.text, errors=r.errors, inspected=r.inspected))
    return out


def summarize_rerank(cfg: Config, res: list[dict], pos_rows: dict) -> dict:
    """Per-task and averaged recall of the reranked lists, plus efficiency figures."""
    ks = sorted({1, 5, 10, cfg.K})
    tasks = {}
    for t in dict.fromkeys(r["task"] for r in res):
        rs = [r for r in res if r["task"] == t]
        tasks[t] = recall_at([r["ranking"] for r in rs], [pos_rows[r["qid"]] for r in rs], ks)
    avg = {f"R@{k}": sum(v[f"R@{k}"] for v in tasks.values()) / len(tasks) for k in ks}
    mean = lambda xs: sum(xs) / max(1, len(xs))
    top1 = [r["N_ins"] for r in res if r["phi_top1"]]
    rest = [r["N_ins"] for r in res if not r["phi_top1"]]
    eff = {"context_tokens_per_query": mean([r["ctx"] for r in res]),
           "prompt_tokens_per_query": mean([r["prompt_tokens"] for r in res]),
           "inspections_per_query": mean([r["N_ins"] for r in res]),
           "inspections_when_phi_top1_right": mean(top1), "inspections_when_phi_top1_wrong": mean(rest),
           "rerank_ms_per_query": mean([r["ms"] for r in res]),
           "format_valid_rate": mean([float(r["format_ok"]) for r in res])}
    return {"tasks": tasks, "avg": avg, "efficiency": eff}


def phase3_text(seg: str) -> str:
    """What theta wrote after one splice (seg = the text after an <insp_e>): up to the next request or
    the end of thinking."""
    return seg.split("<insp_s>")[0].split("</think>")[0].strip()


def trace_diagnostics(items: list[RerankItem], res: list[dict]) -> dict:
    """Where theta's reasoning goes wrong, phase by phase (synthetic data: needs the scene graphs).

        ideal_exact                    phase 1: the share of "ideal"s equal to the target's caption, per task
        positive_kept                  phase 2: share of queries (positive in the top-K) whose
                                       "keep" list still holds the positive
        answered_inspected_positive    phase 3: of the queries where it inspected the positive, the
                                       share it then answered with it
        match_on_positive / _negative  phase 3, per inspection: how often the words after the splice
                                       say "match" when the candidate is the positive / a negative
                                       (equal rates = the verdict ignores what the splice shows)
        pick_share                     the share of answers that are phi's rank k (a rank prior shows
                                       up as one k taking most of the mass)"""
    by_qid = {it.qid: it for it in items}
    ideal, kept, answered = {}, [], []
    said_match: dict[bool, list] = {True: [], False: []}  # is the inspected candidate a positive? -> says match
    picks: dict[str, int] = {}
    for r in res:
        it, text = by_qid[r["qid"]], r["text"]
        picks[str(r["pick"])] = picks.get(str(r["pick"]), 0) + 1
        if it.target is None:
            continue
        m = re.search(r"ideal :(.*?)(?:eliminate :|keep :|<insp_s>|</think>|$)", text)
        ideal.setdefault(r["task"], []).append((m.group(1).split() if m else []) == caption(it.target).split())
        if not r["positives"]:
            continue
        m = re.search(r"keep :([^.<]*)", text)
        if m:
            kept.append(any(str(p) in m.group(1).split() for p in r["positives"]))
        if any(k in r["positives"] for k in r.get("inspected", [])):
            answered.append(r["pick"] in r["positives"])
        for k, seg in zip(r.get("inspected", []), text.split("<insp_e>")[1:]):
            said_match[k in r["positives"]].append("match" in phase3_text(seg).split())
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    return {"ideal_exact": {t: mean(v) for t, v in ideal.items()},
            "positive_kept": mean(kept), "n_with_keep": len(kept),
            "answered_inspected_positive": mean(answered), "n_inspected_positive": len(answered),
            "match_on_positive": mean(said_match[True]), "match_on_negative": mean(said_match[False]),
            "n_inspections": {"positive": len(said_match[True]), "negative": len(said_match[False])},
            "pick_share": {k: v / len(res) for k, v in sorted(picks.items())}}


def format_diagnostics(d: dict) -> str:
    f = lambda v: "–" if v is None else f"{v:.2f}"
    return ("phase 1 ideal exact (per task): " + " ".join(f"{t}:{f(v)}" for t, v in d["ideal_exact"].items())
            + f"\nphase 2 positive kept {f(d['positive_kept'])} (of {d['n_with_keep']})"
            + f" | phase 3 answered the inspected positive {f(d['answered_inspected_positive'])}"
            + f" (of {d['n_inspected_positive']}); says \"match\" after inspecting the positive "
            + f"{f(d['match_on_positive'])}, a negative {f(d['match_on_negative'])}"
            + "\nanswers by phi rank: " + " ".join(f"{k}:{v:.2f}" for k, v in d["pick_share"].items()))


def peak_mem_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except Exception:
        return float("nan")


def furthest_stage(cfg: Config) -> str:
    for s in ("grpo", "sft"):
        if stage_done(cfg, s):
            return s
    return "coarse"


def evaluate(cfg: Config, split: str | None = None, stage: str | None = None, verbose: bool = True,
             write: bool = True) -> dict:
    """Evaluate a run on a split; writes <run_dir>/eval_<split>.json and, for theta's stages, every
    trace to <run_dir>/traces_<stage>_<split>.jsonl.
    stage: coarse (phi alone) | icm | sft | grpo (phi's top-K reranked by theta after that stage).
    eval_<split>.json: {stage, split, K, tasks: {task: {R@k}}, avg: {R@k}, efficiency: {context tokens,
    inspections, rerank ms, format-valid rate, peak memory}, controls (coarse) | diagnosis (theta)}."""
    split = split or cfg.split
    stage = stage or cfg.stage or furthest_stage(cfg)
    if stage not in ("coarse", "sft", "grpo", "icm"):
        raise RetrvError(f"--stage must be coarse, icm, sft or grpo (got {stage!r})")
    dev, dt = pick_device(cfg, verbose)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    ks = sorted({1, 5, 10, cfg.K})
    if stage == "coarse":
        ret = load_retriever(cfg).to(dev)
        rec = coarse_recall(cfg, ret, split, verbose)
        eff = {"context_tokens_per_query": None, "inspections_per_query": None, "rerank_ms_per_query": None,
               "format_valid_rate": None}
    else:
        items = rerank_items(cfg, split, verbose=verbose)
        theta = load_reasoner(cfg, stage, dev)
        emb = Embedder(theta.bb, ImageCache(theta.bb.image_size), frozen_vision=True)
        with autocast(dev, dt):
            res = rerank(cfg, theta, emb, items, verbose=verbose)
        pos_rows = {}
        for ts in load_tasks(cfg, split):
            for i in range(len(ts)):
                pos_rows[ts.queries[i]["qid"]] = ts.pos[i]
        rec = summarize_rerank(cfg, res, pos_rows)
        eff = rec["efficiency"]
    out = {"stage": stage, "split": split, "K": cfg.K,
           "tasks": {t: {f"R@{k}": v[f"R@{k}"] for k in ks} for t, v in rec["tasks"].items()},
           "avg": {f"R@{k}": rec["avg"][f"R@{k}"] for k in ks},
           "efficiency": {**eff, "peak_mem_mb": peak_mem_mb(dev)}}
    if stage == "coarse":
        out["controls"] = rec["controls"]
    if stage != "coarse" and any(it.target is not None for it in items):
        out["diagnosis"] = trace_diagnostics(items, res)
    if write:
        atomic_write_text(Path(cfg.run_dir) / f"eval_{split}.json", json.dumps(out, indent=2))
        if stage != "coarse":  # every trace theta wrote, for reading and for offline diagnostics
            keys = ("qid", "task", "pick", "positives", "inspected", "N_ins", "format_ok", "errors", "text")
            atomic_write_text(Path(cfg.run_dir) / f"traces_{stage}_{split}.jsonl",
                              "".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in res))
    if verbose:
        print(format_table(out))
        if "controls" in out:
            c = out["controls"]["query_blind_consensus_R@1"]
            print(f"query-blind control (phi's top-{cfg.K}, then the candidate closest to the other {cfg.K - 1}, "
                  f"never the query): R@1 {c['avg']:.3f} (" + ", ".join(f"{t} {v:.2f}" for t, v in c.items() if t != "avg")
                  + ") -- a reranker's R@1 is worth something above this line")
        e = out["efficiency"]
        if e.get("inspections_per_query") is not None:
            print("context tokens/query {context_tokens_per_query:.1f}  inspections/query {inspections_per_query:.2f} "
                  "(phi right at rank 1: {inspections_when_phi_top1_right:.2f}, else {inspections_when_phi_top1_wrong:.2f})"
                  "  rerank {rerank_ms_per_query:.1f} ms/query  format-valid {format_valid_rate:.3f}".format(**e))
        if "diagnosis" in out:
            print(format_diagnostics(out["diagnosis"]))
        if write:
            print(f"[eval] wrote {Path(cfg.run_dir) / f'eval_{split}.json'}"
                  + ("" if stage == "coarse" else f" and {Path(cfg.run_dir) / f'traces_{stage}_{split}.jsonl'}"))
    return out


def demo(cfg: Config, verbose: bool = True) -> dict:
    """One query end to end: phi's top-K, theta's trace (inspections marked), and a PNG of the query
    and its K candidates with theta's pick (green) and the positive (gold) marked."""
    stage = cfg.stage or furthest_stage(cfg)
    if stage == "coarse":
        raise RetrvError(f"{cfg.run_dir} has no trained theta (sft/grpo); run `train` first")
    dev, dt = pick_device(cfg, verbose)
    items = rerank_items(cfg, cfg.split, verbose=False)
    it = next((x for x in items if x.qid == cfg.qid), None) if cfg.qid else items[0]
    if it is None:
        raise RetrvError(f"--qid {cfg.qid!r} is not a {cfg.split} query of {cfg.data_root}")
    theta = load_reasoner(cfg, stage, dev)
    emb = Embedder(theta.bb, ImageCache(theta.bb.image_size), frozen_vision=True)
    with torch.no_grad(), autocast(dev, dt):
        p = build_prompts(theta, emb, [it.query], [it.cands])[0]
        r = sample(theta, [p], max_new=cfg.max_new, greedy=True)[0]
    text = r.text
    for k in r.inspected:  # show where the full tokens were spliced
        text = text.replace(f"<insp_s> {k} <insp_e>", f"<insp_s> {k} <insp_e> [<full> {p.full[k - 1].shape[0]} tokens "
                            f"of candidate {k} </full>]", 1)
    ans = parse_answer(r.text)
    print(f"query {it.qid} (task {it.task}): {it.query.get('txt') or ''} {'[image]' if it.query.get('img') else ''}")
    for k, c in enumerate(it.cands, 1):
        mark = ("<- positive " if k in it.positives else "") + ("<- theta's pick" if k == ans else "") + \
               (" [inspected]" if k in r.inspected else "")
        print(f"  {k}. {c.get('txt') or c.get('img')} {mark}")
    print(f"trace ({len(r.ids)} generated tokens, N_ins = {r.N_ins}, context {p.embeds.shape[0]} prompt tokens):\n  {text}")
    if r.errors:
        print(f"  malformed inspections: {r.errors}")
    png = Path(cfg.run_dir) / f"demo_{it.qid.replace(':', '_')}.png"
    plot_query_and_candidates(it, ans, r.inspected, png)
    print(f"[demo] wrote {png}")
    return dict(qid=it.qid, text=r.text, pick=ans, positives=it.positives, inspected=r.inspected, png=str(png))


def plot_query_and_candidates(it: RerankItem, pick: int | None, inspected: list, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: works headless and leaves notebook backends alone

    K = len(it.cands)
    fig = Figure(figsize=(1.6 * (K + 1), 2.2))
    axes = fig.subplots(1, K + 1)
    cache = ImageCache(128)

    def show(ax, item, title, color=None):
        if item.get("img"):
            ax.imshow(cache.get(item["root"], item["img"], item["where"]).permute(1, 2, 0).numpy())
        else:
            ax.text(0.5, 0.5, "\n".join(textwrap.wrap(item.get("txt") or "", 18)), ha="center", va="center", fontsize=5)
        ax.set_title(title, fontsize=7, color=color or "black")
        ax.set_xticks([])
        ax.set_yticks([])
        if color:
            for s in ax.spines.values():
                s.set_edgecolor(color)
                s.set_linewidth(3)

    show(axes[0], it.query, "query" + (f"\n{it.query['txt'][:24]}" if it.query.get("txt") and it.query.get("img") else ""))
    for k, c in enumerate(it.cands, 1):
        col = "green" if k == pick else ("goldenrod" if k in it.positives else None)
        tag = (" pick" if k == pick else "") + (" pos" if k in it.positives else "") + (" insp" if k in inspected else "")
        show(axes[k], c, f"{k}{tag}", col)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ---- ablate: the paper's ablation rows at small scale --------------------------------------------

# row -> (Config overrides, stages trained in the row's own folder, stage evaluated, paper CIRR R@5)
ABLATION_ROWS: dict[str, tuple[dict, list, str, float | None]] = {
    "phi only": ({}, [], "coarse", None),
    "theta w/o reasoning": ({"cot_mode": "direct"}, ["sft"], "sft", None),
    "w/o ICM": ({"icm_mode": "off", "sft_from": "none"}, ["sft", "grpo"], "grpo", 68.8),
    "w/o t_con": ({"icm_mode": "rel"}, ["sft", "grpo"], "grpo", 60.7),
    "w/o t_rel": ({"icm_mode": "con"}, ["sft", "grpo"], "grpo", 64.7),
    "w/o self-alignment": ({"sft_from": "none"}, ["sft", "grpo"], "grpo", 64.3),
    "w/o inspection": ({"cot_mode": "noinsp", "inspect": False}, ["sft", "grpo"], "grpo", 62.3),
    "w/o SFT": ({"grpo_from": "icm"}, ["grpo"], "grpo", 63.0),
    "full": ({}, ["sft", "grpo"], "grpo", 67.9),
    "w/o RL": ({}, [], "sft", 61.1),  # the full row's SFT model
    "fixed lambda = 0.5": ({"fixed_lambda": 0.5}, ["grpo"], "grpo", 66.6),  # from the full row's SFT model
}


def ablate(cfg: Config, verbose: bool = True) -> dict:
    """Train and evaluate every ablation row; stages shared by rows are trained once and copied.
    Rows already in ablation.json are skipped (resume); --rows picks a subset (comma list)."""
    root = Path(cfg.run_dir)
    rows = list(ABLATION_ROWS) if not cfg.rows else [r.strip() for r in cfg.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ABLATION_ROWS]
    if bad:
        raise RetrvError(f"unknown ablation row(s) {bad}; rows: {list(ABLATION_ROWS)}")
    shared = dataclasses.replace(cfg, run_dir=str(root / "shared"), stages="warmup,retriever,icm")
    train(shared, verbose=verbose)
    out_f = root / "ablation.json"
    results = json.loads(out_f.read_text()) if out_f.exists() else {}
    t_all = time.time()
    for name in tqdm(rows, desc="ablation rows", disable=not verbose):
        if name in results:
            continue
        over, stages, ev, _ = ABLATION_ROWS[name]
        rdir = root / "rows" / name.replace(" ", "_").replace("/", "").replace("=", "")
        rcfg = dataclasses.replace(cfg, run_dir=str(rdir), **over)
        rdir.mkdir(parents=True, exist_ok=True)
        for s in ("warmup", "retriever", "icm"):
            if not (rdir / s).exists():
                shutil.copytree(root / "shared" / s, rdir / s)
        for f in (root / "shared").glob("topk_*.json"):
            shutil.copy(f, rdir / f.name)
        if name in ("w/o RL", "fixed lambda = 0.5"):  # reuse the full row's SFT model
            full = root / "rows" / "full" / "sft"
            if not full.exists():
                ablate(dataclasses.replace(cfg, rows="full"), verbose)
                results = json.loads(out_f.read_text())
            if not (rdir / "sft").exists():
                shutil.copytree(full, rdir / "sft")
        t0 = time.time()
        if stages:
            train(dataclasses.replace(rcfg, stages=",".join(stages)), verbose=verbose)
        res = evaluate(rcfg, stage=ev, verbose=False)
        res["train_s"] = time.time() - t0
        results[name] = res
        atomic_write_text(out_f, json.dumps(results, indent=2))
        for f in rdir.glob("topk_*.json"):  # phi's top-K is shared: keep the copies in sync
            if not (root / "shared" / f.name).exists():
                shutil.copy(f, root / "shared" / f.name)
    md = ablation_table(results, cfg)
    atomic_write_text(root / "ablation.md", md)
    if verbose:
        print(md)
        print(f"[ablate] {time.time() - t_all:.0f}s; wrote {out_f} and {root / 'ablation.md'}")
    return results


def ablation_table(results: dict, cfg: Config) -> str:
    lines = [f"split {cfg.split}, K = {cfg.K}, seed {cfg.seed}, preset {cfg.preset}",
             "| row | R@1 | R@5 | R@10 | inspections / query | context tokens / query | rerank ms / query | "
             "format-valid | paper (CIRR R@5) |", "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"
    for name in ABLATION_ROWS:
        if name not in results:
            continue
        r, e = results[name], results[name]["efficiency"]
        paper = ABLATION_ROWS[name][3]
        lines.append(f"| {name} | {f(r['avg']['R@1'])} | {f(r['avg']['R@5'])} | {f(r['avg']['R@10'])} | "
                     f"{f(e.get('inspections_per_query'), 2)} | {f(e.get('context_tokens_per_query'), 1)} | "
                     f"{f(e.get('rerank_ms_per_query'), 1)} | {f(e.get('format_valid_rate'))} | "
                     f"{'–' if paper is None else paper} |")
    return "\n".join(lines)


# ---- bench: speed and memory -------------------------------------------------------------------


@torch.no_grad()
def naive_generate(theta: Reasoner, prompts: list[Prompt], max_new: int) -> list[list[int]]:
    """Greedy decoding that recomputes the whole sequence every step (no KV cache): the baseline."""
    bb = theta.bb
    x, mask = left_pad([p.embeds for p in prompts])
    out = [[] for _ in prompts]
    for _ in range(max_new):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        _, logits, _ = bb.lm(x, attention_mask=mask, position_ids=pos)
        tok = logits[:, -1].argmax(-1)
        for b, t in enumerate(tok.tolist()):
            out[b].append(t)
        x = torch.cat([x, bb.embed_text(tok[:, None])], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return out


def _median_time(fn, dev, reps: int = 3) -> float:
    """Median wall seconds of fn over reps calls, after one warm-up call (CUDA synchronised)."""
    fn()
    ts = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def icm_cost(theta: Reasoner, emb: Embedder, items_for, dev, dt, Ks=(4, 8, 16, 32), n_queries: int = 32,
             new_tokens: int = 32, reps: int = 2) -> dict:
    """What compression buys as the rerank depth K grows: ICM ([t_con, t_rel] per candidate) vs full
    tokens (T_c per candidate), on the same n_queries queries and candidates, theta's weights unchanged.

        read_ms   = build the prompt (ICM included) + one forward over it   (the context cost)
        rerank_ms = read + greedy decoding of new_tokens tokens, no inspection (a whole rerank)

    Both per query, median of reps after a warm-up call. items_for(n, K) -> [(query, K candidates)]."""
    out = {k: {"icm": {}, "full": {}} for k in ("rerank_ms", "read_ms", "context_tokens")}
    out.update(icm_speedup={}, read_speedup={})
    mode0 = theta.mode
    for K in Ks:
        qs = items_for(n_queries, K)
        for mode, name in (("both", "icm"), ("off", "full")):
            theta.mode = mode

            def read():
                with torch.no_grad(), autocast(dev, dt):
                    ps = build_prompts(theta, emb, [q for q, _ in qs], [c for _, c in qs])
                    x, m = left_pad([p.embeds for p in ps])  # (B, L, D), (B, L)
                    h, _, _ = theta.bb.lm(x, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0), logits=False)
                    theta.bb.lm_head(h[:, -1])  # the next-token logits, as a rerank needs them
                out["context_tokens"][name][str(K)] = m.sum().item() / len(ps)  # the same every call

            def whole():
                with torch.no_grad(), autocast(dev, dt):
                    ps = build_prompts(theta, emb, [q for q, _ in qs], [c for _, c in qs])
                    sample(theta, ps, max_new=new_tokens, greedy=True, inspect=False, stop_ids=())

            out["read_ms"][name][str(K)] = 1000 * _median_time(read, dev, reps) / len(qs)
            out["rerank_ms"][name][str(K)] = 1000 * _median_time(whole, dev, reps) / len(qs)
        for a, b in (("icm_speedup", "rerank_ms"), ("read_speedup", "read_ms")):
            out[a][str(K)] = out[b]["full"][str(K)] / out[b]["icm"][str(K)]
    theta.mode = mode0
    return out


def bench(cfg: Config, verbose: bool = True) -> dict:
    """Speed and memory: (1) sampler throughput vs transformers.generate and a cache-less loop, (2) ICM vs
    full tokens as the rerank depth K grows, (3) SFT / GRPO step times and peak memory. Writes
    <run_dir>/bench.json and bench.md. Uses the run's furthest theta (or an untrained tiny one if
    none: speed does not depend on training). Every figure is a median over repeats after a warm-up call."""
    dev, dt = pick_device(cfg, verbose)
    stage = next((s for s in ("grpo", "sft", "icm") if stage_done(cfg, s)), None)
    if stage:
        theta = load_reasoner(cfg, stage, dev)
    else:
        theta = Reasoner(new_tiny_backbone() if cfg.backbone == "tiny" else load_backbone(cfg.backbone), cfg).to(dev)
    theta.eval()
    ensure_world(cfg, verbose=False)
    emb = Embedder(theta.bb, ImageCache(theta.bb.image_size), frozen_vision=True)
    splits = load_tasks(cfg, "val")
    rng = random.Random(cfg.seed)
    pool = [(ts, i) for ts in splits for i in range(len(ts))]

    def items_for(n: int, K: int):
        out = []
        for ts, i in rng.sample(pool, n):
            rows = (ts.pos[i] + ts.neg[i] + rng.sample(range(len(ts.pool)), K))[:K]
            out.append((query_item(ts, i), [cand_item(ts, j) for j in rows]))
        return out

    res: dict[str, Any] = {"device": f"{dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU, %d threads' % torch.get_num_threads()})",
                           "theta_stage": stage or "untrained", "preset": cfg.preset,
                           "backbone": f"LM {theta.bb.model.config.text_config.num_hidden_layers} layers x {theta.bb.D}, "
                                       f"{sum(p.numel() for p in theta.bb.text.parameters()) / 1e6:.1f}M params"}
    res.update(bench_sampler(cfg, theta, emb, items_for, dev, dt))  # 1. sampler throughput
    # 2. rerank latency and context tokens, ICM vs full tokens, as K grows (at --rerank-batch queries)
    res.update(icm_cost(theta, emb, items_for, dev, dt, n_queries=cfg.rerank_batch))
    res.update(bench_steps(cfg, theta, emb, items_for, dev, dt))  # 3. SFT / GRPO step times, peak memory
    atomic_write_text(Path(cfg.run_dir) / "bench.json", json.dumps(res, indent=2))
    atomic_write_text(Path(cfg.run_dir) / "bench.md", format_bench(res) + "\n")
    if verbose:
        print(format_bench(res))
        print(f"[bench] wrote {Path(cfg.run_dir) / 'bench.json'} and {Path(cfg.run_dir) / 'bench.md'}")
    return res


def bench_sampler(cfg: Config, theta: Reasoner, emb: Embedder, items_for, dev, dt) -> dict:
    """1. Sampler throughput: a batch of the GRPO size, greedy, no inspection, 64 new tokens, three ways."""
    n_new = 64
    batch = items_for(max(1, cfg.grpo_batch * cfg.G // cfg.K), cfg.K)
    with torch.no_grad(), autocast(dev, dt):
        prompts = build_prompts(theta, emb, [q for q, _ in batch], [c for _, c in batch])
    prompts = (prompts * (cfg.grpo_batch * cfg.G // max(1, len(prompts)) + 1))[: cfg.grpo_batch * cfg.G]
    B = len(prompts)
    eos = theta.bb.tok.eos_token_id
    x, m = left_pad([p.embeds for p in prompts])

    def ours():
        with autocast(dev, dt):
            return sample(theta, prompts, max_new=n_new, greedy=True, inspect=False, stop_ids=())

    def hf():
        with torch.no_grad(), autocast(dev, dt):
            return theta.bb.model.generate(inputs_embeds=x, attention_mask=m, max_new_tokens=n_new, min_new_tokens=n_new,
                                           do_sample=False, pad_token_id=theta.bb.tok.pad_token_id, eos_token_id=eos)

    def naive():
        with autocast(dev, dt):
            return naive_generate(theta, prompts, n_new)

    t_ours, t_hf, t_naive = _median_time(ours, dev), _median_time(hf, dev), _median_time(naive, dev, reps=1)
    res = dict(sampler_tok_s=B * n_new / t_ours, generate_tok_s=B * n_new / t_hf, naive_tok_s=B * n_new / t_naive)
    res["sampler_vs_generate"] = res["sampler_tok_s"] / res["generate_tok_s"]
    res["sampler_vs_naive"] = res["sampler_tok_s"] / res["naive_tok_s"]
    return res


def bench_steps(cfg: Config, theta: Reasoner, emb: Embedder, items_for, dev, dt) -> dict:
    """3. Training step times (SFT step; GRPO rollout and update) and peak memory; theta's weights
    are not changed (gradients are dropped, no optimiser step)."""
    res = {}
    sft_batch = [(RerankItem(q, c, [], [1], None, [], "0", "bench"),
                  "<think> keep : 1 2 . <insp_s> 1 <insp_e> match . </think> <answer> 1 </answer>")
                 for q, c in items_for(cfg.sft_batch, cfg.K)]
    for p in theta.bb.text.parameters():
        p.requires_grad_(True)

    def sft_step():
        with autocast(dev, dt):
            loss, _ = sft_loss(theta, emb, sft_batch)
        loss.backward()
        theta.zero_grad(set_to_none=True)

    res["sft_step_s"] = _median_time(sft_step, dev, reps=2)
    gb = items_for(cfg.grpo_batch, cfg.K)

    def rollout():
        with torch.no_grad(), autocast(dev, dt):
            ps = build_prompts(theta, emb, [q for q, _ in gb], [c for _, c in gb])
            return sample(theta, [p for p in ps for _ in range(cfg.G)], max_new=cfg.max_new, seeds=list(range(len(ps) * cfg.G)))

    res["grpo_rollout_s"] = _median_time(rollout, dev, reps=1)
    rolls = rollout()

    def update():
        with autocast(dev, dt):
            ps = build_prompts(theta, emb, [q for q, _ in gb], [c for _, c in gb])
            logp, mask = score(theta, [p for p in ps for _ in range(cfg.G)], rolls)
            loss, _ = grpo_loss(logp, logp.detach(), None, torch.randn(len(rolls), device=dev), mask, beta=0.0)
        loss.backward()
        theta.zero_grad(set_to_none=True)

    res["grpo_update_s"] = _median_time(update, dev, reps=1)
    res["peak_mem_mb"] = peak_mem_mb(dev)
    return res


def format_bench(r: dict) -> str:
    """The bench figures as text."""
    return "\n".join([
        f"device: {r['device']}   theta: {r['theta_stage']}   {r['backbone']}",
        f"sampler {r['sampler_tok_s']:.0f} tok/s | transformers.generate {r['generate_tok_s']:.0f} tok/s | "
        f"naive (no cache) {r['naive_tok_s']:.0f} tok/s  ->  {r['sampler_vs_generate']:.2f}x generate, "
        f"{r['sampler_vs_naive']:.2f}x naive",
        format_icm_cost(r),
        f"SFT step {r['sft_step_s']:.2f} s | GRPO rollout {r['grpo_rollout_s']:.2f} s, update "
        f"{r['grpo_update_s']:.2f} s | peak memory {r['peak_mem_mb']:.0f} MB"])


def format_icm_cost(r: dict) -> str:
    """The ICM-vs-full table of icm_cost (per query; read = prompt + one forward, rerank = read + decoding)."""
    lines = ["| K | ctx tokens ICM | full | read ms ICM | full | read speed-up | rerank ms ICM | full | "
             "rerank speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for K in r["icm_speedup"]:
        lines.append(f"| {K} | {r['context_tokens']['icm'][K]:.0f} | {r['context_tokens']['full'][K]:.0f} | "
                     f"{r['read_ms']['icm'][K]:.2f} | {r['read_ms']['full'][K]:.2f} | {r['read_speedup'][K]:.2f}x | "
                     f"{r['rerank_ms']['icm'][K]:.1f} | {r['rerank_ms']['full'][K]:.1f} | {r['icm_speedup'][K]:.2f}x |")
    return "\n".join(lines)


def format_table(res: dict) -> str:
    ks = [k for k in res["avg"]]
    head = "| task | " + " | ".join(ks) + " |"
    lines = [f"stage: {res['stage']}   split: {res['split']}   K = {res['K']}", head,
             "|" + "---|" * (len(ks) + 1)]
    for t, v in res["tasks"].items():
        name = TASK_NAMES.get(int(t), t) if str(t).isdigit() else t
        lines.append(f"| {t} {name} | " + " | ".join(f"{v[k]:.3f}" for k in ks) + " |")
    lines.append("| **average** | " + " | ".join(f"{res['avg'][k]:.3f}" for k in ks) + " |")
    return "\n".join(lines)


# =============================================================================================
# 14. CLI
# =============================================================================================

ALL_STAGES = ["warmup", "retriever", "icm", "sft", "grpo"]


def train(cfg: Config, verbose: bool = True) -> dict:
    """Run the requested stages in order, skipping finished ones (delete a stage's folder to redo it)."""
    stages = ALL_STAGES if cfg.stages == "all" else [s.strip() for s in cfg.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in ALL_STAGES]
    if bad:
        raise RetrvError(f"unknown stage(s) {bad}; available now: {ALL_STAGES}")
    if _is_synthetic(cfg) or cfg.data_root == default_data_root(cfg):
        ensure_world(cfg, verbose)
    elif not Path(cfg.data_root).exists():
        raise RetrvError(f"--data-root {cfg.data_root} does not exist (only the default data/synthetic-<world> "
                         f"is generated on demand; `python retrv_r1.py data --data-root DIR` writes one anywhere)")
    save_config(cfg)
    out = {}
    fns = {"warmup": warmup, "retriever": train_retriever, "icm": align_icm, "sft": train_sft,
           "grpo": train_grpo}
    for s in stages:
        if stage_done(cfg, s):
            if verbose:
                print(f"[train] {s}: already done in {cfg.run_dir}/{s} (skipped)")
            continue
        t0 = time.time()
        try:
            out[s] = fns[s](cfg, verbose=verbose)
        except StopRun as e:
            print(f"[train] {e}")
            out[s] = {"stopped": True}
            return out
        if verbose:
            print(f"[train] {s}: {time.time() - t0:.1f}s")
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        cmd, cfg = config_from_args(argv)
        if cmd == "data":
            root = generate_world(cfg)
            print(f"[data] wrote the '{cfg.world}' world to {root}")
        elif cmd == "train":
            print(json.dumps(dataclasses.asdict(cfg)))
            train(cfg)
        elif cmd == "eval":
            evaluate(cfg)
        elif cmd == "demo":
            demo(cfg)
        elif cmd == "bench":
            bench(cfg)
        elif cmd == "ablate":
            ablate(cfg)
        else:
            raise RetrvError(f"unknown command {cmd!r}")
    except RetrvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
