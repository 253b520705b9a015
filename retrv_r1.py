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

    pip install -r requirements.txt
    python retrv_r1.py train                     # every stage on the tiny preset
    python retrv_r1.py eval                      # R@1/5/10 per task -> runs/tiny/eval_test.json
                                                 # (every command but `data` reads the run's config.json)
    python retrv_r1.py eval --stage probe --split val   # can this backbone tell phi's candidates apart?
    python retrv_r1.py train --preset smoke      # a 1-2 minute pass, what tests and notebooks use
    python retrv_r1.py train --preset aligned    # aligned checks, 1200 warm-up steps: better phi / SFT, ~40 min

One GPU, pretrained SmolVLM (weights from the hub or a local directory):

    python retrv_r1.py train --preset smolvlm --backbone HuggingFaceTB/SmolVLM-256M-Instruct

Sections (read top to bottom; nothing is used before it is defined):

    1. Config                 Config dataclass, presets (smoke / tiny / aligned / smolvlm), argparse from the fields
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
   13. Evaluation             M-BEIR Recall@k (hit rate), reranking, efficiency, demo; a cross-encoder
                              probe of the backbone (`eval --stage probe`: a diagnostic, not the paper)
   14. CLI                    data | train | eval | demo | ablate | bench

Deviations from the paper
-------------------------
* Backbone: the paper uses Qwen2.5-VL-3B/7B; here it is the Idefics3/SmolVLM family, either a
  ~3M-parameter random-initialised Idefics3 with a word-level tokenizer (CPU, offline) or a
  pretrained SmolVLM checkpoint (GPU). Pretrained images are resized to one square tile (no
  SmolVLM image splitting).
* Stage 0 (warm-up) does not exist in the paper: a random-initialised backbone knows nothing, so
  we first teach it to caption scenes and to describe query-candidate differences from full
  tokens. This stands in for the knowledge of a pretrained VLM and is skipped for pretrained ones.
  A throw-away linear probe reads every cell's shape / colour / size off the visual tokens during
  the warm-up (--warmup-probe 1.0, the default since the thirty-third session): a dense signal for
  the vision side, which lets 500 steps do what 600 did without it (README, "A shorter warm-up").
  An optional extra, off by default because it did not help on val (README, "Experiments"):
  "ideal" sequences, query -> caption of its target (--warmup-ideal-frac). More for the phase-3
  verdict (match or differs), which the tiny LM never learns from full tokens -- nor, greedily, on
  words alone (README, "Diagnosis" 4): --warmup-match-frac (more matching pairs), --relation-format
  objects (check every object, then the verdict), --relation-format shows (caption the candidate,
  then check it against the ideal), --relation-format aligned (each attribute next to the ideal's,
  compared right away: the only format whose verdict catches one-change negatives -- 0.72 after 800
  words-only steps, 0.42 with images in a 600-step warm-up, 0.66 in the 1200-step warm-up of the
  `aligned` preset), --warmup-check-frac (the same check on words only, mixed into every batch) and
  --warmup-scramble-frac (relation candidates with every attribute redrawn, against the copy
  shortcut of phase 3: README, "the aligned configuration end to end"), and --caption-order shape
  (a world whose captions put the shape first, so that phase 3's lookup reads on from the shape:
  faster on words only, no better with images -- README, "Shape-first captions"), and
  --warmup-copy-steps (a words-only phase that copies text queries into "ideal :" first: it fixes
  phase 1's copy of a text query, and the check then copies the ideal instead of the candidate;
  --warmup-copy-check-frac mixes words-only checks into that phase: the best warm-up check so far,
  which SFT then forgets -- README, "theta cannot copy a shape word").
* Data: a synthetic world of coloured shapes on a 3x3 grid written in the M-BEIR layout (task
  ids 0, 3, 4, 7), with one-change hard negatives (--neg-structure star, the default: the target
  is the hub of its negatives, a query-blind shortcut) or the 16 corners of a 4-cube of
  independent changes (--neg-structure cube: no hub; the warm-up then draws its relation pairs
  from the cube too), instead of the 16 M-BEIR evaluations. The
  reader also accepts the real M-BEIR root. Scene graphs travel in the M-BEIR `src_content`
  field as JSON.
* Coarse retriever phi: the paper uses an existing MLLM embedding model (LamRA-style). Here phi
  is a copy of the warmed-up backbone, mean-pooled and projected, trained with InfoNCE on the
  train split. A composed query (image + edit text) is read text first (--ret-order text_image,
  the default since the thirtieth session): under causal attention the image's tokens, most of
  the mean, can then read the edit; image first, they never saw it and the query embedded as its
  source image (composed R@8 on val 0.70-0.86 in five runs -> 0.92). --ret-pool last / mean_last
  (the last token's state instead / as well) were no better beyond noise (README, "Experiments on val").
  InfoNCE trains the LM and the projection only: the vision encoder and connector stay as the
  warm-up left them (as theta's do in stages 1-3; --ret-vision trains them too, the default until
  the thirty-first session), so each image's tokens are computed once, not every step. A step
  holds 48 queries, each with its positive and 2 of its hard negatives (32 x 4 until the
  thirty-second session), and the world has 600 train queries per task (300 before): most of what
  outranks a positive in a test pool comes from other queries' groups, and with 300 phi memorised
  its training queries (README, "phi's recipe, chosen on an independent draw of the world").
* ICM: each ATT is one pre-norm cross-attention block (+MLP); a learnable position table is added
  to T_c (word embeddings carry no order); e_con and e_rel are separate vectors. Self-alignment
  targets are the frozen LM's own greedy descriptions from full tokens ("caption :" / "relation :"
  prompts learned in the warm-up).
* Synthetic CoT: a rule-based teacher over scene graphs instead of Qwen2.5-VL-72B. Its
  "eliminate" phase treats color / size changes as visible in the compressed view and shape /
  position / swap changes as needing inspection. Real M-BEIR data get a format-only trace, or
  teacher CoTs read from a JSONL file (`--cot-file`). Three switches against phase 3's copy
  shortcut (aligned checks), off by default because none taught the lookup on val (README, "the aligned
  configuration end to end"): --sft-lookup-weight (weigh the ideal's differing values in the loss),
  --cot-restate (restate the ideal just before each inspection) and --sft-replay n (warm-up
  relation sequences in every SFT step, which keeps the warm-up's check: SFT alone forgets it).
* GRPO: rollouts at temperature 1; log-probs are the untempered model's; with mu = 1 the ratio is
  1 (the clip never binds) and the update is REINFORCE with a group baseline plus the KL term.
  RL queries are the train queries the SFT model gets wrong first (--grpo-pool-mode all: a
  random sample of the train distribution instead; balanced: phi's rank 1 / 2 / 3+ in equal shares,
  since the SFT model's failures favour whichever rank it does not answer).
* Training data for theta: phi's top-K of the train queries, in phi's order -- the same queries
  phi was trained on, so their rank statistics are rosier than at test time (README, "Diagnosis").
  Three switches for experiments, all off by default: --ret-holdout f keeps a share f of the train
  queries away from phi for SFT/GRPO; --ret-folds F gives theta out-of-fold top-K lists instead
  (cross-fitting: F extra phi trainings, each blind to one fold, each query ranked in a pool the
  size of a test pool); --cand-order shuffle trains on shuffled candidate orders.
* Scale: K = 8 (paper: 50), a few hundred optimiser steps per stage on CPU. The ICM's speed-up
  is measured at SmolVLM-256M's LM shape without downloading it (`bench --preset shape256m`,
  random weights): 2.9x faster reranks at K = 8, 10.3x at K = 32 (tiny preset: 1.9x / 3.2x).

Determinism: on CPU the same seed gives the same checkpoints and the same eval JSON, interrupted
and resumed or not (tests check it). On CUDA, cuBLAS/SDPA kernels are not bit-deterministic by
default; `--deterministic` turns on torch.use_deterministic_algorithms (slower) and sets
CUBLAS_WORKSPACE_CONFIG.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import multiprocessing
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


@dataclass
class Config:
    # --- run -----------------------------------------------------------------------------
    preset: str = "tiny"  # smoke | tiny | aligned | smolvlm | shape256m (named bundles of the fields below)
    seed: int = 0  # one seed for data, init, batching and sampling
    run_dir: str = ""  # checkpoints + metrics; "" -> runs/<preset>
    data_root: str = ""  # M-BEIR root (ours or the real one); "" -> data/<preset world>
    stages: str = "all"  # train: all | comma list of warmup,retriever (later: icm,sft,grpo)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False  # torch.use_deterministic_algorithms (GPU runs; CPU already is)
    threads: int = 0  # torch CPU threads (and world-writing processes); 0 -> all cores
    buckets: int = 4  # warm-up and phi batches run in N length buckets (padded per bucket: the same loss, less padding); 1 = one padded batch
    # --- the synthetic world (section 3) ----------------------------------------------------
    world: str = "tiny"  # name of the generated world; data lives in data/synthetic-<world>
    tasks: str = "0,3,4,7"  # M-BEIR task ids to generate: t->i, i->t, i->i, (i,t)->i
    n_train: int = 600  # train queries per task (300 until the thirty-second session: phi memorised them)
    n_val: int = 50  # val queries per task
    n_test: int = 100  # test queries per task
    n_hard_neg: int = 15  # one-change hard negatives per target, all in the local pool
    neg_structure: str = "star"  # star: every hard negative one change from the target | cube: the 16 corners of 4 independent changes (see make_group)
    image_size: int = 64  # rendered scene side in pixels
    caption_order: str = "attr"  # how scenes are written: attr 'a large red circle top left' | shape 'circle red large top left'
    # --- backbone (section 4) -------------------------------------------------------------
    backbone: str = "tiny"  # "tiny" (random init, offline) or an Idefics3/SmolVLM dir / hub id
    vision_hidden: int = 128  # tiny: SigLIP-style vision width
    vision_layers: int = 2  # tiny: vision transformer layers
    patch_size: int = 8  # tiny: 64/8 = 8x8 patches -> pixel shuffle x2 -> 16 visual tokens
    text_hidden: int = 256  # tiny: Llama width D
    text_layers: int = 4  # tiny: Llama layers
    text_heads: int = 4  # tiny: attention heads
    text_kv_heads: int = 2  # tiny: grouped-query KV heads
    text_mlp: int = 512  # tiny: MLP width
    tie_embeddings: bool = False  # tiny: the LM head is the input embedding table (SmolLM2 / SmolVLM tie theirs)
    # --- stage 0: warm-up (section 9) -------------------------------------------------------
    warmup_steps: int = 500  # optimiser steps on captions + relation descriptions (600 until the thirty-third session)
    warmup_lr: float = 1e-3  # AdamW lr (2e-3 left shape at chance in the prototype)
    warmup_batch: int = 48  # sequences per step (64 until the thirty-first session; 32 left colour unlearned at 600 steps)
    warmup_rel_frac: float = 0.5  # share of relation (query-candidate difference) sequences among the rest
    warmup_ideal_frac: float = 0.0  # share of "ideal" sequences (query -> caption of its target), drawn first
    relation_format: str = "sentence"  # how relations are written (warm-up, alignment check, CoT phase 3): sentence | objects | shows | aligned
    warmup_check_frac: float = 0.0  # share of text-only "check" sequences: ideal caption, candidate caption -> relation
    warmup_match_frac: float = 0.0  # > 0: share of relation sequences whose candidate IS the target (0: 1 in 4, drawn)
    warmup_scramble_frac: float = 0.0  # share of relation candidates replaced by the target with every colour, size and cell redrawn
    warmup_probe: float = 1.0  # weight of the attribute-probe loss on the visual tokens (0 = off, as until the thirty-third session; warm-up only)
    warmup_copy_steps: int = 0  # the first N of warmup_steps are words-only copies: text query -> "ideal :" its caption
    warmup_copy_check_frac: float = 0.0  # share of words-only check sequences among the copy steps' (the rest: copies)
    # --- coarse retriever phi (section 5) ---------------------------------------------------
    ret_steps: int = 250  # InfoNCE steps (400 until the thirty-first session, 300 in it)
    ret_lr: float = 5e-4  # AdamW lr
    ret_batch: int = 48  # queries per step (in-batch negatives = the other queries' candidates; 32 until the thirty-second session)
    ret_hard_negs: int = 2  # hard negatives per query from neg_cand_list (4 until the thirty-second session)
    ret_tau: float = 0.05  # InfoNCE temperature
    ret_dim: int = 128  # embedding width after the projection
    ret_pool: str = "mean"  # how phi pools the LM's states: mean (all tokens) | last (the last token) | mean_last (their sum)
    ret_order: str = "text_image"  # phi's token order for an item with both: text_image (the image's tokens read the text) | image_text
    ret_vision: bool = False  # phi also trains the vision encoder + connector (False: frozen like theta's, each image's tokens computed once)
    ret_holdout: float = 0.0  # share of train queries phi never sees; SFT and GRPO then use only those
    ret_folds: int = 0  # >= 2: theta trains on out-of-fold top-K (phi_f never saw fold f's queries); 0 = off
    # --- ICM (section 6) -------------------------------------------------------------------
    icm_mode: str = "both"  # both: [t_con, t_rel] | con: t_con only | rel: t_rel only | off: full T_c
    icm_heads: int = 4  # attention heads of ATT1, ATT2, ATT1'
    icm_max_len: int = 96  # longest candidate token sequence the ICM's position table covers
    # --- sampler (section 7) ----------------------------------------------------------------
    max_new: int = 128  # generated tokens per trace (spliced observation tokens not counted)
    temperature: float = 1.0  # sampling temperature (GRPO rollouts)
    top_p: float = 1.0  # nucleus sampling threshold (1.0 = off)
    # --- stage 1: ICM self-alignment (section 10) ---------------------------------------------
    align_steps: int = 200  # optimiser steps, LM and vision frozen, ICM trained
    align_lr: float = 1e-3  # AdamW lr of the ICM
    align_batch: int = 48  # (query, candidate) pairs per step
    # --- stage 2: synthetic CoT + SFT (section 11) -------------------------------------------
    sft_steps: int = 400  # optimiser steps on teacher traces
    sft_lr: float = 5e-4  # AdamW lr (LM + ICM; LoRA adapters for pretrained backbones)
    sft_batch: int = 16  # traces per step
    sft_from: str = "icm"  # icm: start from the aligned ICM | none: fresh ICM (the w/o self-alignment ablation)
    lora_r: int = 16  # LoRA rank (pretrained backbones only; the tiny LM is fully fine-tuned)
    cot_file: str = ""  # optional JSONL of teacher CoTs {"qid", "trace"} from a large MLLM
    cot_mode: str = "full"  # full: four phases | noinsp: no inspection phase | direct: answer only (ablations)
    cot_restate: bool = False  # phase 3: restate the ideal before each inspection (ideal, candidate, relation: the warm-up's order)
    inspect: bool = True  # allow details inspection when sampling (False: the w/o-inspection ablation)
    cand_order: str = "phi"  # order of the K candidates in SFT/GRPO prompts: phi | shuffle (eval: always phi)
    sft_views: int = 1  # with cand_order=shuffle: shuffled copies of each train query's top-K in the SFT data
    sft_lookup_weight: float = 1.0  # aligned traces: SFT loss weight on the ideal's value where it differs from the candidate's (lookup_weights)
    sft_replay: int = 0  # warm-up relation sequences added to every SFT step (0: none), so SFT does not forget the warm-up's check
    sft_replay_wrap: str = "plain"  # replayed candidates as in the warm-up ("candidate :") | trace: in the trace's <insp_s> k <insp_e> <full>..</full>
    # --- stage 3: GRPO (section 12) -------------------------------------------------------------
    grpo_steps: int = 60  # N_iter: RL steps (lam_i = i / N_iter)
    grpo_batch: int = 8  # queries per step (B)
    G: int = 8  # rollouts per query
    grpo_mu: int = 1  # inner updates per batch of rollouts (mu)
    grpo_lr: float = 1e-4  # AdamW lr
    eps_clip: float = 0.2  # PPO clip range epsilon
    beta: float = 0.04  # weight of the k3 KL to the frozen SFT reference (0 = no reference model)
    grpo_agg: str = "token"  # token: mean over all tokens | seq: mean per sequence, then over sequences
    grpo_clip: float = 1.0  # gradient-norm clip
    grpo_pool: int = 256  # RL queries
    grpo_pool_mode: str = "hard"  # hard: the SFT model's failures first | all: train distribution (online filter) | balanced: phi rank 1 / 2 / 3+ in equal shares
    grpo_from: str = "sft"  # sft | icm (the w/o-SFT ablation: RL straight from the aligned model)
    fixed_lambda: float = -1.0  # >= 0: fixed lam instead of the curriculum (ablation: 0.5)
    # --- reranking / evaluation (section 13) ------------------------------------------------
    K: int = 8  # rerank depth: phi's top-K go to theta (paper: K = 50)
    split: str = "test"  # eval: val | test
    stage: str = ""  # eval: coarse | sft | grpo | probe ("" -> the furthest trained; probe: see cross_encoder_probe)
    eval_batch: int = 256  # items per embedding batch
    rerank_batch: int = 32  # queries theta reranks at once
    qid: str = ""  # demo: which query
    probe_steps: int = 400  # eval --stage probe: steps of the cross-encoder probe (a diagnostic, not the paper)
    probe_lr: float = 5e-4  # eval --stage probe: AdamW lr of the probe (LM + linear head; vision frozen)
    probe_batch: int = 8  # eval --stage probe: queries per step (x K scored pairs)
    probe_lists: str = "phi"  # eval --stage probe: phi (phi's top-K) | easy (the positive + K-1 candidates of other queries)
    probe_vision: bool = False  # eval --stage probe: also train the vision tower and connector (frozen by default, as in SFT)
    bench_smoke: bool = True  # bench: also time `train --preset smoke` in a temp dir
    bench_parts: str = "sampler,icm,steps"  # bench: which figures (sampler: throughput | icm: ICM vs full tokens | steps: SFT/GRPO step times)
    bench_ks: str = "4,8,16,32"  # bench: the rerank depths K at which ICM and full tokens are timed
    rows: str = ""  # ablate: comma list of rows ("" = all)
    log_every: int = 25  # steps between metric lines
    ckpt_every: int = 50  # mid-stage checkpoint every N optimiser steps (0 = only at the end)
    stop_after: int = 0  # stop a stage after N steps of this run, checkpointed (tests; 0 = never)


PRESETS: dict[str, dict[str, Any]] = {
    # ~1-2 minutes on 2 CPU cores: what the tests and notebooks use. The numbers mean little.
    "smoke": dict(world="smoke", n_train=48, n_val=16, n_test=16, n_hard_neg=15,
                  warmup_steps=60, warmup_batch=32, ret_steps=30, ret_batch=16, align_steps=20, align_batch=16,
                  sft_steps=20, sft_batch=8, grpo_steps=4, grpo_batch=2, G=4, grpo_pool=16, ckpt_every=5,
                  log_every=10),
    # the default CPU run (numbers in README.md)
    "tiny": dict(),
    # the best phi and SFT measured on CPU, at about twice the default's time (README: "the aligned
    # configuration end to end"): relations as aligned checks, a twice-as-long warm-up, longer traces,
    # an RL pool balanced over phi's ranks (the "hard" pool taught this SFT model to answer rank 2)
    # (it keeps what it was measured with: the warm-up batch without the probe, phi's recipe and trained
    # vision side, and 300 train queries per task -- a world of its own, tiny300, whose val and test are
    # the tiny world's)
    "aligned": dict(relation_format="aligned", warmup_steps=1200, max_new=256, grpo_pool_mode="balanced",
                    warmup_batch=64, warmup_probe=0.0, ret_steps=400, ret_vision=True, world="tiny300", n_train=300,
                    ret_batch=32, ret_hard_negs=4),
    # pretrained SmolVLM on one GPU; images are resized to the checkpoint's tile size
    "smolvlm": dict(world="tiny", backbone="HuggingFaceTB/SmolVLM-256M-Instruct", warmup_steps=0,
                    ret_batch=32, ret_lr=1e-4, eval_batch=64),
    # for `bench` only: a random-initialised backbone with SmolVLM-256M's language model (SmolLM2-135M:
    # 30 layers, width 576, 9 heads, 3 KV heads, MLP 1536) and its 64 visual tokens per image (64-px
    # scenes, 4-px patches, pixel shuffle x2; the vision tower is smaller than SigLIP-base, but its
    # cost is paid once per image in both modes). Speed does not depend on the weights' values, so
    # this measures what the ICM saves at the scale of the `smolvlm` preset, offline, on a CPU.
    "shape256m": dict(world="tiny", text_hidden=576, text_layers=30, text_heads=9, text_kv_heads=3, text_mlp=1536,
                      vision_hidden=768, vision_layers=12, patch_size=4, icm_heads=9, rerank_batch=4,
                      bench_parts="icm", bench_smoke=False),
}


# fields that may change between a run and its resumption without changing what is computed
_RUNTIME_FIELDS = {"preset", "run_dir", "data_root", "stages", "device", "deterministic", "threads", "buckets", "split", "stage",
                   "eval_batch", "rerank_batch", "qid", "log_every", "ckpt_every", "stop_after", "bench_smoke", "bench_parts", "bench_ks", "rows",
                   "probe_steps", "probe_lr", "probe_batch", "probe_lists", "probe_vision"}
# fields whose default changed: a config saved before the field existed was made with this value
# (ret_order: phi read image then text until the thirtieth session; ret_vision: phi trained the vision
# side too until the thirty-first)
LEGACY_DEFAULTS = {"ret_order": "image_text", "ret_vision": True}


class RetrvError(Exception):
    """Any error caused by the user's input or files; the CLI prints it as one line."""


def check_choice(flag: str, value: str, choices: tuple) -> None:
    """A clear error for a value outside a flag's choices (e.g. check_choice("--ret-pool", "max", RET_POOLS))."""
    if value not in choices:
        raise RetrvError(f"{flag} must be one of {choices} (got {value!r})")


def _field_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]


def build_argparser() -> argparse.ArgumentParser:
    """One flag per Config field (--warmup-steps 50); bools get --x / --no-x. Nothing hand-written."""
    p = argparse.ArgumentParser(prog="retrv_r1.py", description="Retrv-R1 in one file")
    p.add_argument("command", choices=["data", "train", "eval", "demo", "ablate", "bench"])
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        t = _field_type(f)
        if t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(flag, type=t, default=None, metavar=t.__name__.upper())
    return p


def make_config(preset: str = "tiny", **overrides) -> Config:
    """Config of a preset plus overrides; fills run_dir / data_root defaults. Used by CLI and notebooks."""
    if preset not in PRESETS:
        raise RetrvError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    kw = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name for f in fields(Config)}
    bad = sorted(set(kw) - names)
    if bad:
        raise RetrvError(f"unknown Config field(s): {bad}")
    cfg = Config(preset=preset, **kw)
    if not cfg.run_dir:
        cfg.run_dir = f"runs/{preset}"
    check_choice("--caption-order", cfg.caption_order, CAPTION_ORDERS)
    if not cfg.data_root:  # the words are part of the world: another caption order is another world
        cfg.data_root = default_data_root(cfg)
    if cfg.K < 1:
        raise RetrvError(f"--K must be >= 1 (got {cfg.K})")
    check_choice("--ret-pool", cfg.ret_pool, RET_POOLS)  # phi checks them too; here a bad value fails
    check_choice("--ret-order", cfg.ret_order, RET_ORDERS)  # before the warm-up, not after it
    if not 0 <= cfg.warmup_copy_steps <= cfg.warmup_steps:
        raise RetrvError(f"--warmup-copy-steps must be between 0 and --warmup-steps {cfg.warmup_steps} "
                         f"(got {cfg.warmup_copy_steps}); the copy steps are part of the warm-up's steps")
    if not 0 <= cfg.warmup_copy_check_frac <= 1:
        raise RetrvError(f"--warmup-copy-check-frac is a share, between 0 and 1 (got {cfg.warmup_copy_check_frac})")
    for f in fields(Config):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise RetrvError(f"--{f.name.replace('_', '-')} must be a finite number (got {v})")
        if f.name.endswith("_lr") and v <= 0:
            raise RetrvError(f"--{f.name.replace('_', '-')} must be > 0 (got {v})")
    return cfg


def default_data_root(cfg: Config) -> str:
    """data/synthetic-<world>; another caption order writes other words, so it is another world."""
    return f"data/synthetic-{cfg.world}" + ("" if cfg.caption_order == "attr" else f"-{cfg.caption_order}")


# fields a run's config.json does not decide: where to read and write, how to run, what to evaluate
# (data_root and preset are not among them: a run trained on another M-BEIR root is evaluated there by
# default, and a run keeps the name of the preset it was made with)
_PER_CALL_FIELDS = _RUNTIME_FIELDS - {"data_root", "preset"}


def with_run_config(cfg: Config, given: dict, verbose: bool = True) -> Config:
    """The run's saved settings, then the flags given now. Why: `eval --run-dir runs/x` must score the
    model with the settings it was trained with (--max-new, --relation-format, --K ...), not the preset's
    defaults -- a forgotten flag would otherwise give a silently different number. Prints what it took."""
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
    saved = {**LEGACY_DEFAULTS, **saved}  # a run from before a default changed keeps its old value
    types = {f.name: _field_type(f) for f in fields(Config)}
    kw = {}
    for k, v in saved.items():
        if k not in types or k in _PER_CALL_FIELDS or k in given:
            continue  # a field of an older version, a per-call field, or one the command line sets
        ok = isinstance(v, types[k]) and not (types[k] is int and isinstance(v, bool))
        if types[k] is float and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            raise RetrvError(f"{path}: field {k!r} should be {types[k].__name__}, got {v!r}")
        kw[k] = v
    out = dataclasses.replace(cfg, **kw)
    if "data_root" not in given and "data_root" not in kw:
        out.data_root = default_data_root(out)  # an older config.json without data_root: follow its world
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
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
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


# fields that decide tensor shapes (or, tie_embeddings, which tensors exist): a checkpoint made with
# other values cannot be loaded
SHAPE_FIELDS = ("backbone", "vision_hidden", "vision_layers", "patch_size", "text_hidden", "text_layers",
                "text_heads", "text_kv_heads", "text_mlp", "tie_embeddings", "image_size", "icm_heads", "icm_max_len")
# ... and, for phi's checkpoints only, how its weights are read (a warm-up serves any of them)
RET_FIELDS = ("ret_dim", "ret_pool", "ret_order", "ret_vision")


def check_compatible(saved: dict, cfg: Config, where: str, keys=SHAPE_FIELDS) -> None:
    """Refuse a checkpoint whose config differs from ours in a field that matters, naming them."""
    saved = {**LEGACY_DEFAULTS, **saved} if saved else saved
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in keys if k in saved and saved.get(k) != getattr(cfg, k)}
    if diff:
        raise RetrvError(f"{where} was made with a different config: " +
                         ", ".join(f"{k}={a!r} (checkpoint) vs {b!r} (now)" for k, (a, b) in diff.items()))


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RetrvError(f"{path / 'state.json'} is unreadable ({e}); delete {path} to redo that stage") from None


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
                         keys=[f.name for f in fields(Config) if f.name not in _RUNTIME_FIELDS])
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


CAPTION_ORDERS = ("attr", "shape")
_caption_order = ["attr"]  # the world's word order; set from the config at every stage's start (enter_stage)


def use_caption_order(cfg: Config) -> None:
    """Make caption() write scenes in cfg.caption_order (a module-wide setting: the world's words)."""
    _caption_order[0] = cfg.caption_order


def enter_stage(cfg: Config, verbose: bool = True) -> tuple[torch.device, torch.dtype]:
    """Every stage's first line: the world's caption order from cfg, then the device and dtype."""
    use_caption_order(cfg)
    return pick_device(cfg, verbose)


def caption(scene) -> str:
    """Objects in reading order, in the world's caption order (--caption-order):
        attr:  'a large red circle top left , a small blue star center .'
        shape: 'circle red large top left , star blue small center .'
    Why "shape": in an aligned check (phase 3) the ideal's colour of the cross must be looked up in
    the ideal's caption. With shape first, the values follow the shape in the check's own order
    (colour, size, cell), so the lookup is "find the shape, read on" -- the copy pattern small LMs
    learn first. Measured: on words only a fresh tiny LM learns the check faster this way (lookup
    0.73 vs 0.58-0.68 after 800 steps); with images, through warm-up and SFT, it does not help (README,
    "Shape-first captions"). The default stays "attr"."""
    objs = sorted(scene, key=lambda o: o[3])
    if _caption_order[0] == "shape":
        return " , ".join(f"{o[0]} {o[1]} {o[2]} {CELLS[o[3]]}" for o in objs) + " ."
    return " , ".join(f"a {o[2]} {o[1]} {o[0]} {CELLS[o[3]]}" for o in objs) + " ."


def parse_caption(text: str) -> dict[str, tuple[str, str, str]]:
    """The inverse of caption(), forgiving: {shape: (color, size, cell)} for every well-formed object
    of a written caption (theta's phase-1 "ideal", say); malformed objects are skipped, not fatal.
        'a large red circle top left , a small blue star center .' -> {'circle': ('red', 'large', 'top left'), ...}"""
    out = {}
    for part in text.strip().removesuffix(".").split(" , "):
        ws = part.split()
        if _caption_order[0] == "shape":
            shape, color, size, cell = (ws[0], ws[1], ws[2], " ".join(ws[3:])) if len(ws) >= 4 else (None,) * 4
        else:
            shape, color, size, cell = (ws[3], ws[2], ws[1], " ".join(ws[4:])) if len(ws) >= 5 and ws[0] == "a" else (None,) * 4
        if shape in SHAPES and color in COLORS and size in SIZES and cell in CELLS and shape not in out:
            out[shape] = (color, size, cell)
    return out


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


def describe_relation(target, cand, fmt: str = "sentence") -> str:
    """The 'relation description' between the scene a query asks for and a candidate's scene.

    sentence: 'match .' | 'differs : the circle has color blue not red .' | 'differs : the circle and
    the star are swapped .' | 'differs : many changes .'  Objects are matched exactly first; what is
    left over is the difference. The verdict comes first, in one word.
    objects:  object_check -- one check per candidate object, then the verdict (see there).
    shows:    'shows : <caption of the candidate> <object check>' -- say what the candidate shows in
              words first, so the check compares text with text (the ideal written before it).
    aligned:  aligned_check -- each attribute next to the ideal's, then same / different (see there)."""
    if fmt == "objects":
        return object_check(target, cand)
    if fmt == "aligned":
        return aligned_check(target, cand)
    if fmt == "shows":
        return f"shows : {caption(cand)} {object_check(target, cand)}"
    if fmt != "sentence":
        raise RetrvError(f"--relation-format must be sentence, objects, shows or aligned (got {fmt!r})")
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


def object_check(target, cand) -> str:
    """The relation written as a check, object by object, then the verdict:
        'the circle same , the star color . differs .'      'the circle same , the star same . match .'
    For every object of the candidate in reading order: 'same', or which of its colour / size / position
    differ from the target's object of the same shape, or 'shape' when the target has no such shape
    (shapes are unique within a scene). Why: a small LM that must say match/differs in its first word
    has to compare whole scenes in one step, and at this scale it never learns to (it says "differs"
    every time). One check per object is still one comparison per step: written greedily, the tiny LM
    calls almost every object "same", even on words only (README, "Diagnosis" 4); aligned_check
    makes each comparison local."""
    by_shape = {o[0]: o for o in target}
    checks = []
    for o in sorted(cand, key=lambda o: o[3]):
        t = by_shape.get(o[0])
        diff = ["shape"] if t is None else [n for n, k in (("color", 1), ("size", 2), ("position", 3)) if t[k] != o[k]]
        checks.append(f"the {o[0]} " + (" ".join(diff) or "same"))
    same = canon(target) == canon(cand)
    return " , ".join(checks) + (" . match ." if same else " . differs .")


def aligned_check(target, cand) -> str:
    """The relation as an aligned check: for every candidate object, each attribute written next to
    the ideal's (the target object of the same shape), then 'same' or 'different' right after the pair:
        'cross : yellow cyan different , large large same , right right same ; star : none different . differs .'
    Why: object_check asks for the comparison in one step ('the cross color'); a small LM then learns
    to name objects and calls each 'same'. Here every step is a lookup or a copy, and the comparison is
    between two adjacent words. It is the only format so far whose greedy verdict catches one-change
    negatives: 0.72 of them after 800 words-only steps, 0.42 with images after the default 600-step
    warm-up, where it also lifts caption shape accuracy from 0.68 to 0.95 (README, "Diagnosis" 4)."""
    by_shape = {o[0]: o for o in target}
    parts = []
    for o in sorted(cand, key=lambda o: o[3]):
        t = by_shape.get(o[0])
        if t is None:
            parts.append(f"{o[0]} : none different")
            continue
        pairs = [(o[1], t[1]), (o[2], t[2]), (CELLS[o[3]], CELLS[t[3]])]
        parts.append(f"{o[0]} : " + " , ".join(f"{a} {b} " + ("same" if a == b else "different") for a, b in pairs))
    return " ; ".join(parts) + (" . match ." if canon(target) == canon(cand) else " . differs .")


def pair_cut(ws: list[str], values) -> int | None:
    """Where the words of one aligned pair split into the candidate's value and the ideal's:
    ['top', 'right', 'top', 'left'] -> 2 (values = CELLS); None if no split gives two values."""
    return next((j for j in range(1, len(ws)) if " ".join(ws[:j]) in values and " ".join(ws[j:]) in values), None)


def parse_aligned_check(seg: str) -> dict | None:
    """'cross : yellow cyan different , large large same , right right same ; star : none different . differs .'
    -> {"objects": {shape: [(cand, ideal, word) x 3] or None (= "none")}, "verdict": "differs"}; None if malformed."""
    body, _, tail = seg.strip().rpartition(" . ")
    verdict = tail.strip(" .")
    if verdict not in ("match", "differs") or not body:
        return None
    objects = {}
    for part in body.split(" ; "):
        shape, sep, rest = part.partition(" : ")
        if not sep:
            return None
        if rest.strip() == "none different":
            objects[shape.strip()] = None
            continue
        pairs = []
        for i, p in enumerate(rest.split(" , ")):
            ws = p.split()
            if i < 2 and len(ws) == 3:
                pairs.append((ws[0], ws[1], ws[2]))
                continue
            cut = pair_cut(ws[:-1], CELLS)
            if i != 2 or cut is None:
                return None
            pairs.append((" ".join(ws[:cut]), " ".join(ws[cut:-1]), ws[-1]))
        if len(pairs) != 3:
            return None
        objects[shape.strip()] = pairs
    return {"objects": objects, "verdict": verdict}


def check_steps(ref: dict, gen: dict) -> dict[str, list]:
    """A written aligned check against the reference one (both from parse_aligned_check), over the
    attributes where the candidate's and the ideal's values really differ: did it read the candidate's
    value, look up the ideal's, or copy the word it had just written? (README, "Diagnosis")"""
    out: dict[str, list] = {"read": [], "looked_up": [], "copied": []}
    for shape, pairs in ref["objects"].items():
        for (a, b, _), (ga, gb, _) in zip(pairs or [], gen["objects"].get(shape) or []):
            if a != b:
                out["read"].append(ga == a)
                out["looked_up"].append(gb == b)
                out["copied"].append(gb == ga)
    return out


def scramble(scene, rng: random.Random) -> list[Obj]:
    """The same shapes with every colour, size and cell drawn afresh (never the scene itself).
    Why (warm-up, --warmup-scramble-frac): in an aligned check of a one-change negative only one pair
    in ten differs, and an inspected positive has none, so writing the ideal's value as a copy of the
    candidate's value just before it is right on 99% of them in the SFT traces -- and that is what SFT
    learned (check_steps; README, "the aligned configuration end to end"). Here most pairs differ."""
    while True:
        cells = rng.sample(range(9), len(scene))
        out = sorted((o[0], rng.choice(COLORS), rng.choice(SIZES), c) for o, c in zip(scene, cells))
        if canon(out) != canon(scene):
            return out


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
    find it (README, "A shortcut in the world"). "cube": see cube_group."""
    if structure == "cube":
        return cube_group(task, rng, n_neg)
    if structure != "star":
        raise RetrvError(f"--neg-structure must be star or cube (got {structure!r})")
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
    keys = ["seed", "tasks", "n_train", "n_val", "n_test", "n_hard_neg", "neg_structure", "image_size", "caption_order"]
    return {k: getattr(cfg, k) for k in keys}


PNG_LEVEL = 1  # zlib level of the world's PNGs: 4x faster to write than the default 6, the same pixels, ~40% more bytes


def generate_world(cfg: Config, root: str | Path | None = None, verbose: bool = True) -> Path:
    """Write the synthetic benchmark in the M-BEIR layout under `root` (see data/README.md).

    query/{split}/mbeir_synth_task{N}_{split}.jsonl, cand_pool/local/mbeir_synth_task{N}_{split}_cand_pool.jsonl
    (one local pool per task and split, named like MSCOCO's test pools), qrels/{split}/..., mbeir_images/...,
    instructions/query_instructions.tsv, and world.json (the parameters it was generated from)."""
    root = Path(root or cfg.data_root)
    use_caption_order(cfg)
    tmp = root.with_name(f".{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tasks = parse_tasks(cfg.tasks)
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    total = sum(sizes.values()) * len(tasks)
    # the (split, task) parts -- 12 for four tasks -- share no random stream: one process each, side by
    # side where fork exists (--threads caps the processes); the files are the same either way
    jobs = [(cfg, tmp, si, split, n, task) for si, (split, n) in enumerate(sizes.items()) for task in tasks]
    workers = min(len(jobs), cfg.threads or os.cpu_count() or 1)
    with tqdm(total=total, desc=f"world -> {root}", disable=not verbose) as bar:
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for n in pool.imap_unordered(_world_part, jobs):
                    bar.update(n)
        else:
            for job in jobs:
                bar.update(_world_part(job))
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


def _world_part(job: tuple) -> int:
    """One (split, task) of generate_world: its images, query file, local pool and qrels under tmp.
    job = (cfg, tmp, si, split, n, task), si the split's index (0 train, 1 val, 2 test: part of every id),
    n its queries per task. -> n. Module-level, so that a process pool can run it."""
    cfg, tmp, si, split, n, task = job
    use_caption_order(cfg)
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
                render(c["scene"], cfg.image_size).save(tmp / rel, compress_level=PNG_LEVEL)
                line["img_path"] = str(rel)
            plines.append(line)
        q = g["query"]
        qimg = None
        if q["scene"] is not None:
            qimg = img_dir / f"q{qn}.png"
            jit = random.Random(f"{cfg.seed}-{split}-{task}-{qn}-jitter") if q["jitter"] else None
            render(q["scene"], cfg.image_size, jitter=jit).save(tmp / qimg, compress_level=PNG_LEVEL)
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
    return n


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


def tiny_idefics3_config(cfg: Config, tok):
    from transformers import Idefics3Config

    return Idefics3Config(
        vision_config=dict(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_hidden * 2,
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=max(4, cfg.vision_hidden // 64),
                           image_size=cfg.image_size, patch_size=cfg.patch_size),
        text_config=dict(model_type="llama", hidden_size=cfg.text_hidden, intermediate_size=cfg.text_mlp,
                         num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                         num_key_value_heads=cfg.text_kv_heads, vocab_size=len(tok),
                         max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=cfg.tie_embeddings),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id,
        tie_word_embeddings=cfg.tie_embeddings)


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
        image (Embedder(..., frozen_vision=True)). phi (by default), theta and the probe use it."""
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


def new_tiny_backbone(cfg: Config) -> Backbone:
    from transformers import Idefics3ForConditionalGeneration

    tok = build_tiny_tokenizer()
    model = Idefics3ForConditionalGeneration(tiny_idefics3_config(cfg, tok))
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
    (text first when tokens(..., text_first=True): phi's --ret-order text_image)"""

    def __init__(self, bb: Backbone, cache: ImageCache, max_txt: int = 64, frozen_vision: bool = False):
        self.bb, self.cache, self.max_txt = bb, cache, max_txt
        # with the vision side frozen (phi by default, stages 1-3, the probe) an image's tokens never change: compute once
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
    # times -- it was 40% of a retriever step. F.pad's backward is one narrow per row.
    L = max(s.shape[0] for s in seqs)
    out = torch.stack([F.pad(s, (0, 0, 0, L - s.shape[0])) for s in seqs])  # (N, L_max, D)
    mask = torch.zeros(len(seqs), L, dtype=torch.long, device=seqs[0].device)
    for i, s in enumerate(seqs):
        mask[i, : s.shape[0]] = 1
    return out, mask


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
# A composed query (image + edit text) is read text first (--ret-order text_image): under causal
# attention its 16 visual tokens -- most of the mean -- then attend to the edit, where image first they
# never saw it and the query embedded as its source image, one of the target's hard negatives.
# --ret-pool last / mean_last replace / add the last real token's state (the only one that has read
# the edit when the image comes first); measured on val, neither is better beyond noise (README).
# The vision encoder and connector are frozen here (--ret-vision trains them): InfoNCE shapes the LM's
# reading of the visual tokens, each image is encoded once (Embedder's cache), and a step costs the LM
# alone. Every batch is encoded in --buckets length buckets (length_buckets): images are 16 tokens,
# captions about 8, a composed query about 22, and one padded batch was 20-37% padding.
# A step holds B = --ret-batch queries, each with its positive and H = --ret-hard-negs of its hard
# negatives (48 x 2 by default): in a test pool most of what outranks a positive belongs to other
# queries' groups, which only in-batch negatives teach (16 x 10 was far worse than 32 x 4 or 48 x 2).


RET_POOLS = ("mean", "last", "mean_last")
RET_ORDERS = ("image_text", "text_image")


class Retriever(nn.Module):
    def __init__(self, bb: Backbone, dim: int, pool: str = "mean", order: str = "text_image", buckets: int = 1):
        super().__init__()
        check_choice("--ret-pool", pool, RET_POOLS)
        check_choice("--ret-order", order, RET_ORDERS)
        self.bb, self.pool, self.order, self.buckets = bb, pool, order, buckets
        self.proj = nn.Linear(bb.D, dim, bias=False)

    def encode_tokens(self, T: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """e = normalize(W pool(h)),  h = LM(T) (N, L, D); pool: the masked mean over all tokens (mean),
        the last real token's state (last), or their sum (mean_last). T, mask right-padded -> e (N, dim)."""
        h, _, _ = self.bb.lm(T, attention_mask=mask, logits=False)  # (N, L, D)
        pooled = 0
        if self.pool in ("mean", "mean_last"):
            pooled = masked_mean(h, mask[..., None], dim=1)  # (N, D)
        if self.pool in ("last", "mean_last"):
            last = mask.sum(1) - 1  # right-padded: index of the last real token, (N,)
            pooled = pooled + h[torch.arange(h.shape[0], device=h.device), last]  # (N, D)
        return F.normalize(self.proj(pooled.float()), dim=-1)  # (N, dim)

    def encode(self, emb: Embedder, items: list[dict]) -> torch.Tensor:
        """Items -> e (N, dim), encoded in self.buckets length buckets (length_buckets), returned in item order."""
        seqs = emb.sequences(items, text_first=self.order == "text_image")
        groups = length_buckets([len(t) for t in seqs], self.buckets)
        if len(groups) == 1:
            return self.encode_tokens(*pad_stack(seqs))
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

    check_compatible(read_state(ck).get("config", {}), cfg, str(ck), keys=SHAPE_FIELDS + RET_FIELDS)
    bb = load_backbone(str(ck))
    r = Retriever(bb, cfg.ret_dim, cfg.ret_pool, cfg.ret_order, cfg.buckets)
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


def held_out(cfg: Config, qid: str) -> bool:
    """Is this train query hidden from phi (and kept for theta)? A fixed hash of (seed, qid).

    Why: phi memorises its own training queries (on train its rank 1 is the positive about twice as
    often as on val/test), so a theta trained on phi's top-K of those same queries learns rank
    statistics that do not hold at test time. With --ret-holdout f, phi trains on the other queries."""
    if cfg.ret_holdout <= 0:
        return False
    h = int(hashlib.sha1(f"{cfg.seed}:{qid}".encode()).hexdigest()[:8], 16) / 16**8
    return h < cfg.ret_holdout


def theta_train_items(cfg: Config, items: list) -> list:
    """The train items SFT and GRPO use: all of them, or only phi's held-out queries."""
    return [it for it in items if held_out(cfg, it.qid)] if cfg.ret_holdout > 0 else items


@torch.enable_grad()  # fold_topk may call it lazily from inside rerank_items' no_grad
def fit_retriever(cfg: Config, name: str, keep, rng: random.Random, verbose: bool = True) -> tuple[Retriever, Partial]:
    """InfoNCE on the train queries for which keep(qid) holds, from the warmed-up (or pretrained)
    backbone; mid-stage checkpoints under <run_dir>/<name>_partial. Returns phi (eval mode) and its
    Partial, whose finish() the caller calls once phi's result is saved."""
    dev, dt = pick_device(cfg, False)
    seed_everything(cfg.seed + 1)
    bb = base_backbone(cfg).to(dev)
    ret = Retriever(bb, cfg.ret_dim, cfg.ret_pool, cfg.ret_order, cfg.buckets).to(dev)
    if not cfg.ret_vision:  # only the LM and the projection W learn; an image's tokens are computed once
        bb.freeze_vision()
    emb = Embedder(bb, ImageCache(bb.image_size), frozen_vision=not cfg.ret_vision)
    train = load_split(cfg.data_root, "train", parse_tasks(cfg.tasks) if _is_synthetic(cfg) else None)
    pairs = [(ts, i) for ts in train for i in range(len(ts)) if ts.pos[i] and keep(ts.queries[i]["qid"])]
    opt = torch.optim.AdamW([p for p in ret.parameters() if p.requires_grad], lr=cfg.ret_lr, weight_decay=0.01)
    sched = cosine_schedule(opt, cfg.ret_steps, warmup=max(1, cfg.ret_steps // 20))
    ck = Partial(cfg, name, ret, opt, sched, rng)
    start = ck.resume()
    log = MetricLog(cfg.run_dir, name, start)
    bar = tqdm(range(start, cfg.ret_steps), initial=start, total=cfg.ret_steps,
               desc=f"{name} (InfoNCE)", disable=not verbose)
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
        logits = eq @ ec.T / cfg.ret_tau  # (B, B + B*H)
        target = torch.arange(len(batch), device=dev)
        loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(ret.parameters(), 1.0)
        check_finite(loss, name, step)
        opt.step()
        sched.step()
        acc = (logits.argmax(-1) == target).float().mean().item()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
        if step % cfg.log_every == 0 or step == cfg.ret_steps - 1:
            log.log(step=step, loss=loss.item(), batch_acc=acc, grad_norm=float(gn), lr=sched.get_last_lr()[0])
        ck.step_done(step)
    return ret.eval(), ck


def train_retriever(cfg: Config, verbose: bool = True) -> dict:
    """Stage: phi by InfoNCE on the train split (all of it, or what --ret-holdout leaves), then, with
    --ret-folds F, the F cross-fitting retrievers that give theta honest top-K lists (fold_topk)."""
    enter_stage(cfg, verbose)
    if cfg.ret_holdout > 0 and cfg.ret_folds >= 2:
        raise RetrvError("--ret-holdout and --ret-folds are two answers to one question; use one of them")
    ret, ck = fit_retriever(cfg, "retriever", lambda qid: not held_out(cfg, qid), random.Random(cfg.seed + 11), verbose)
    val = coarse_recall(cfg, ret, "val", verbose=False)
    with atomic_dir(Path(cfg.run_dir) / "retriever") as tmp:
        ret.save(tmp)
        (tmp / "state.json").write_text(json.dumps(stage_state(cfg, "retriever", cfg.ret_steps, val=val), indent=2))
    ck.finish()
    if verbose:
        print(f"[retriever] val R@1 {val['avg']['R@1']:.3f}  R@{cfg.K} {val['avg'][f'R@{cfg.K}']:.3f}")
    if cfg.ret_folds >= 2:
        fold_topk(cfg, verbose)
    return val


# Cross-fitting (--ret-folds F): phi is trained on the train queries, so on those queries its rank 1
# is right about twice as often as on val/test (README, "Diagnosis", 2), and a theta trained on
# phi's top-K of them learns rank statistics that test will not have. The standard remedy is
# out-of-fold prediction: split the train queries into F folds by a hash of their qid; for each
# fold f, train phi_f on the other F - 1 folds and rank fold f's queries with it. Every train query
# then gets a top-K from a phi that never saw it -- the situation of a test query -- while theta
# still trains on all of them, and the phi used at evaluation is still the one trained on all.
# One more difference from a test query remains: the pool. Our train pool is 3x a test pool (16
# candidates per query in every split), so each train query is ranked in a chunk of it the size of
# the task's test pool (test_sized_chunks): its own hard negatives plus those of its neighbours.


def fold_of(cfg: Config, qid: str) -> int:
    """Which of the cfg.ret_folds folds a train query is in: a fixed hash of (seed, qid)."""
    return int(hashlib.sha1(f"{cfg.seed}:fold:{qid}".encode()).hexdigest()[:8], 16) % cfg.ret_folds


FOLD_POOL = "test-sized chunks"  # recorded in retriever_fold*/state.json: how fold f's queries were ranked


def test_sized_chunks(cfg: Config, splits: list[TaskSplit]) -> dict[str, list[tuple[list[int], list[int]]]]:
    """{split name: [(query rows, pool rows) per chunk]}: each train task cut into chunks whose pool
    is the size of the task's test pool, so an out-of-fold query competes with as many candidates as
    a test query does (our train pool holds 3x test's). A chunk's pool is the candidates its queries
    list (positives + neg_cand_list); rows no query lists are dealt round-robin. Where no test pool of
    the task is found (a real M-BEIR train split) the whole pool is one chunk."""
    try:
        test = {ts.name: len(ts.pool) for ts in load_split(cfg.data_root, "test", [s.task_id for s in splits])}
    except (RetrvError, OSError):
        test = {}
    out = {}
    for ts in splits:
        t = test.get(ts.name.removesuffix("_train") + "_test")
        n = max(1, min(len(ts), round(len(ts.pool) / t))) if t else 1
        q_of = [i * n // len(ts) for i in range(len(ts))]  # contiguous blocks of queries
        row_of = [-1] * len(ts.pool)
        for i in range(len(ts)):
            for j in ts.pos[i] + ts.neg[i]:
                if row_of[j] < 0:
                    row_of[j] = q_of[i]
        row_of = [c if c >= 0 else j % n for j, c in enumerate(row_of)]
        out[ts.name] = [([i for i in range(len(ts)) if q_of[i] == c], [j for j in range(len(ts.pool)) if row_of[j] == c])
                        for c in range(n)]
    return out


def fold_topk(cfg: Config, verbose: bool = True) -> dict:
    """Out-of-fold top-K of the train split: {split name: [ranked pool rows per query]}, as
    rerank_items caches it. Fold f's retriever is trained (resumably) unless <run_dir>/retriever_fold<f>
    already holds its ranking; only the rankings are kept, not the fold retrievers' weights."""
    splits = load_split(cfg.data_root, "train", parse_tasks(cfg.tasks) if _is_synthetic(cfg) else None)
    top: dict[str, list] = {ts.name: [None] * len(ts) for ts in splits}
    for f in range(cfg.ret_folds):
        d = Path(cfg.run_dir) / f"retriever_fold{f}"
        if not (d / "state.json").exists():
            name = f"retriever_fold{f}"
            ret, ck = fit_retriever(cfg, name, lambda qid, f=f: fold_of(cfg, qid) != f,
                                    random.Random(f"{cfg.seed}-{name}"), verbose)
            with torch.no_grad():
                ranked = phi_topk(cfg, ret, splits, chunks=test_sized_chunks(cfg, splits))
            ranks = {ts.name: {i: ranked[ts.name][i] for i in range(len(ts)) if fold_of(cfg, ts.queries[i]["qid"]) == f}
                     for ts in splits}  # fold f's queries only
            with atomic_dir(d) as tmp:
                (tmp / "topk.json").write_text(json.dumps(ranks))
                (tmp / "state.json").write_text(json.dumps(stage_state(cfg, name, cfg.ret_steps, pool=FOLD_POOL)))
            ck.finish()
            if verbose:
                print(f"[retriever] fold {f + 1}/{cfg.ret_folds}: phi_{f} ranked its "
                      f"{sum(len(v) for v in ranks.values())} held-out train queries")
        st = read_state(d)
        check_compatible(st["config"], cfg, str(d), keys=SHAPE_FIELDS + RET_FIELDS + ("seed", "ret_folds", "K"))
        if st.get("pool") != FOLD_POOL:
            raise RetrvError(f"{d} was ranked in {st.get('pool', 'the whole train pool')!r}, not in {FOLD_POOL!r} "
                             f"(an older version); delete {d} to redo it")
        try:
            ranks = json.loads((d / "topk.json").read_text())
            for split_name, rows in ranks.items():
                for i, ranked in rows.items():
                    top[split_name][int(i)] = ranked
        except (OSError, json.JSONDecodeError, KeyError, ValueError, IndexError) as e:
            raise RetrvError(f"{d / 'topk.json'} is unreadable ({type(e).__name__}: {e}); delete {d} to redo it") from None
    missing = [(n, i) for n, rows in top.items() for i, r in enumerate(rows) if r is None]
    if missing:
        raise RetrvError(f"cross-fitting left {len(missing)} train queries unranked (e.g. {missing[0]}); "
                         f"delete {cfg.run_dir}/retriever_fold* to redo it")
    return top


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


def _is_synthetic(cfg: Config) -> bool:
    return (Path(cfg.data_root) / "world.json").exists()


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
        self.icm = ICM(bb.D, cfg.icm_heads, cfg.icm_max_len, rms)
        self.mode = cfg.icm_mode
        if self.mode not in ("both", "con", "rel", "off"):
            raise RetrvError(f"--icm-mode must be both, con, rel or off (got {self.mode!r})")

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
        raise RetrvError(f"{ck / 'icm.safetensors'} does not fit this config (--icm-heads/--icm-max-len/"
                         f"width?): {str(e).splitlines()[0]}") from None
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
# A random-initialised VLM cannot see. Before anything from the paper can work, we teach it what a
# pretrained VLM already knows about this world, from FULL tokens:
#   caption:   [T_img]  "caption :"  -> "a large red circle top left , ... ."
#   relation:  [T_q] "candidate :" [T_c] "relation :" -> "differs : the circle has color blue not red ."
#   ideal:     [T_q] "ideal :" -> caption of the scene the query asks for (--warmup-ideal-frac)
#   copy:      caption(target) "ideal :" -> the same caption (words only; the first --warmup-copy-steps)
#              (--warmup-copy-check-frac f: a share f of the copy steps' sequences are words-only checks)
# Fresh scenes are drawn every step from a seeded stream of the world (not from the files). A step's
# sequences (25-60 tokens) run in --buckets length buckets (bucketed_lm_loss): one loss, less padding.
# Plus, by default, the attribute probe (AttributeProbe, --warmup-probe 1.0): a linear head reads each
# cell's shape / colour / size straight off the visual tokens. Without it colour is learned in a late
# jump that 500 steps miss (held-out colour 0.65; 600 steps: 0.99); with it 500 steps reach colour 0.99
# and a phi that is better on an independent draw of the world (README, "A shorter warm-up").
# Why offer "ideal": phase 1 of the CoT ("speculate the ideal target") needs the LM to read the query
# and write the target's caption -- copy a text query word by word, caption an image query, apply an
# edit. The SFT model's "ideal" gets the sentence's shape and positions right but binds the wrong
# colours and shapes to them, even when the query IS the caption (README, "Diagnosis"). Training it
# here raised the teacher-forced accuracy (0.67 -> 0.86) but not the copy theta writes on its own,
# so it is off by default -- a starting point for the exercise in notebook 03.
# Why offer "copy": a text query's ideal (task 0) is a word-for-word copy, yet after the mixed warm-up
# theta's shape words in it are at chance (teacher-forced 0.17, colour 1.00). On words alone a fresh
# LM learns that copy late, in a jump (shape 0.17 -> 1.00 between steps 150 and 250), and an image
# mix delays it (README, "theta cannot copy a shape word from a text query"). A copy learned first
# survives the image steps after it (held-out copy 1.00, task 0's ideal exact 0.98-1.00 after SFT),
# but SFT's R@1 on val does not rise, so it is off by default.


def warmup_example(bb: Backbone, rng: random.Random, kind: str, size: int, match_frac: float = 0.0,
                   rel_format: str = "sentence", scramble_frac: float = 0.0, structure: str = "star",
                   wrap: str = "plain", K: int = 8) -> tuple[list, list]:
    """One warm-up sequence (kind: caption | relation | ideal | check | copy) as (segments, images); an image is
    (scene, jitter rng or None), rendered and embedded by warmup_batch. A relation's candidate is drawn
    from the target and 3 hard negatives (match_frac = 0), or is the target with probability match_frac;
    with probability scramble_frac it is then replaced by scramble(target) (see there). `structure` is the
    world's --neg-structure: a cube world's warm-up sees its 1-2-change negatives ("many changes").
    wrap "trace" (SFT replay, --sft-replay-wrap): a relation's candidate comes in the trace's own tokens,
    '<insp_s> k <insp_e> <full>' T_c '</full> relation :' (k drawn from 1..K, the run's rerank depth),
    instead of 'candidate :' T_c 'relation :'."""
    if wrap not in ("plain", "trace"):
        raise RetrvError(f"--sft-replay-wrap must be plain or trace (got {wrap!r})")
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
    if scramble_frac > 0 and kind in ("relation", "check") and rng.random() < scramble_frac:
        cand = dict(cand, scene=scramble(q["target"], rng))
    if kind == "check":  # words only: "ideal :" caption(target) "candidate :" caption(cand) "relation :" -> relation
        return [("ids", bb.ids("ideal :"), False), ("ids", bb.ids(caption(q["target"])), False),
                ("ids", bb.ids("candidate :"), False), ("ids", bb.ids(caption(cand["scene"])), False),
                ("ids", bb.ids("relation :"), False),
                ("ids", bb.ids(describe_relation(q["target"], cand["scene"], rel_format)) + [bb.tid("<eos>")], True)], []
    segs, imgs = [], []
    if q["scene"] is not None:
        jit = random.Random(rng.randrange(2**31)) if q["jitter"] else None
        imgs.append((q["scene"], jit))
        segs.append(("img", len(imgs) - 1))
    if q["txt"]:
        segs.append(("ids", bb.ids(q["txt"]), False))
    if kind == "relation" and rel_format in ("shows", "aligned"):  # as in the CoT: the ideal first, then the candidate
        segs += [("ids", bb.ids("ideal :"), False), ("ids", bb.ids(caption(q["target"])), True)]
    if kind == "ideal":
        segs.append(("ids", bb.ids("ideal :"), False))
        segs.append(("ids", bb.ids(caption(q["target"])) + [bb.tid("<eos>")], True))
        return segs, imgs
    segs.append(("ids", bb.ids(f"<insp_s> {rng.randint(1, K)} <insp_e> <full>" if wrap == "trace" else "candidate :"), False))
    if cand["modality"] == "text":
        segs.append(("ids", bb.ids(caption(cand["scene"])), False))
    else:
        imgs.append((cand["scene"], None))
        segs.append(("img", len(imgs) - 1))
    segs.append(("ids", bb.ids("</full> relation :" if wrap == "trace" else "relation :"), False))
    segs.append(("ids", bb.ids(describe_relation(q["target"], cand["scene"], rel_format)) + [bb.tid("<eos>")], True))
    return segs, imgs


def warmup_kind(rng: random.Random, rel_frac: float, ideal_frac: float = 0.0, check_frac: float = 0.0) -> str:
    """Draw a sequence kind: check with probability check_frac, ideal with probability ideal_frac, else
    relation with probability rel_frac, else caption. (A zero share draws no extra random number.)"""
    if check_frac > 0 and rng.random() < check_frac:
        return "check"
    if ideal_frac > 0 and rng.random() < ideal_frac:
        return "ideal"
    return "relation" if rng.random() < rel_frac else "caption"


def warmup_batch(bb: Backbone, *args, **kwargs):
    """-> inputs_embeds, attention mask, labels (lm_batch), and (visual tokens (N_img, n_img, D), their scenes);
    the arguments are warmup_sequences'."""
    rows, vis, scenes = warmup_sequences(bb, *args, **kwargs)
    return (*lm_batch(bb, rows), (vis, scenes))


def warmup_sequences(bb: Backbone, rng: random.Random, n: int, rel_frac: float, size: int, ideal_frac: float = 0.0,
                     match_frac: float = 0.0, rel_format: str = "sentence", check_frac: float = 0.0,
                     scramble_frac: float = 0.0, structure: str = "star", wrap: str = "plain", kind: str | None = None,
                     copy_check_frac: float = 0.0, K: int = 8) -> tuple[list, torch.Tensor, list]:
    """n warm-up sequences as lm_batch rows, their visual tokens (N_img, n_img, D) and scenes (warmup_rows).
    kind: every sequence of that kind (the copy phase: kind="copy") instead of drawing each one's kind;
    with kind="copy", a share copy_check_frac of them are words-only checks instead."""
    def pick() -> str:
        if kind == "copy" and copy_check_frac > 0 and rng.random() < copy_check_frac:
            return "check"
        return kind or warmup_kind(rng, rel_frac, ideal_frac, check_frac)
    examples = [warmup_example(bb, rng, pick(), size, match_frac, rel_format, scramble_frac, structure, wrap, K)
                for _ in range(n)]
    return warmup_rows(bb, examples, size)


def warmup_rows(bb: Backbone, examples: list, size: int) -> tuple[list, torch.Tensor, list]:
    """Render and embed the examples' images in one batch -> lm_batch rows, visual tokens, scenes."""
    imgs = [im for _, ims in examples for im in ims]
    vis = None  # a batch of words only (check sequences) has no images
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
    reaches only through the whole LM; shape in particular learns slowly that way. Thrown away after
    the warm-up: theta and phi never see it.

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
                     ideal_frac: float = 0.0, rel_format: str = "sentence", structure: str = "star",
                     kind: str | None = None) -> dict:
    """Teacher-forced token accuracy on held-out scenes (a seed stream training never uses),
    overall and per attribute word (shape / color / size / position). kind="copy": on text queries'
    ideals (task 0), which are word-for-word copies (the same tokens theta predicts after a text query's
    "ideal :" in any relation format, since the LM is causal)."""
    bb.eval()
    rng = random.Random(seed)
    x, mask, labels, _ = warmup_batch(bb, rng, n, rel_frac, bb.image_size, ideal_frac, rel_format=rel_format,
                                      structure=structure, kind=kind)
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
def match_accuracy(bb: Backbone, n: int = 256, seed: int = 24680, rel_format: str = "sentence",
                   max_new: int = 0, kind: str = "relation", structure: str = "star") -> dict:
    """The decision the inspection phase rests on: shown [T_q] "candidate :" [T_c] "relation :", does
    the relation the LM writes itself (greedy, not teacher-forced) contain the right verdict word?
    Held-out relation sequences, half of them matches; accuracy on each half (a model that always
    says "differs" scores 0.0 / 1.0). Greedy decoding matters: with teacher forcing, an object check's
    verdict would just read the given checks. kind="check": the same decision on words only
    ("ideal :" caption "candidate :" caption "relation :")."""
    bb.eval()
    max_new = max_new or {"sentence": 24, "aligned": 110}.get(rel_format, 72)
    rng = random.Random(seed)
    examples = [warmup_example(bb, rng, kind, bb.image_size, 0.5, rel_format, structure=structure) for _ in range(n)]
    rows, _, _ = warmup_rows(bb, examples, bb.image_size)
    m_id, d_id = bb.tid("match"), bb.tid("differs")
    is_match = torch.tensor([m_id in row[-1][1] for row in rows])
    ctx = assemble(bb, [row[:-1] for row in rows])  # everything up to "relation :"
    outs = sample(bb, [bare_prompt(e) for e in ctx], max_new=max_new, greedy=True, inspect=False)
    says_match = torch.tensor([m_id in r.ids and d_id not in r.ids for r in outs])
    bb.train()
    mean = lambda t: t.float().mean().item() if t.numel() else float("nan")
    out = {"on_match": mean(says_match[is_match]), "on_differs": mean(~says_match[~is_match]),
           "balanced": (mean(says_match[is_match]) + mean(~says_match[~is_match])) / 2}
    if rel_format == "aligned":  # step by step, against the reference check (see aligned_diagnostics)
        eos = bb.tok.eos_token_id
        steps: dict[str, list] = {"read": [], "looked_up": [], "copied": []}
        for row, r in zip(rows, outs):
            ref = parse_aligned_check(bb.tok.decode([t for t in row[-1][1] if t != eos]))
            gen = parse_aligned_check(bb.tok.decode(r.ids[: r.ids.index(eos)] if eos in r.ids else r.ids))
            if ref and gen:
                for k, v in check_steps(ref, gen).items():
                    steps[k] += v
        out.update({k: sum(v) / len(v) if v else float("nan") for k, v in steps.items()})
    return out


def warmup(cfg: Config, verbose: bool = True) -> dict:
    """Stage 0: caption + relation LM training of the tiny backbone. Skipped for pretrained ones."""
    if cfg.backbone != "tiny":
        if verbose:
            print("[warmup] pretrained backbone: skipped (it already knows how to see)")
        return {}
    dev, dt = enter_stage(cfg, verbose)
    seed_everything(cfg.seed)
    bb = new_tiny_backbone(cfg).to(dev)
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
            rows, vis, scenes = warmup_sequences(bb, rng, cfg.warmup_batch, cfg.warmup_rel_frac, cfg.image_size,
                                                 cfg.warmup_ideal_frac, cfg.warmup_match_frac, cfg.relation_format,
                                                 cfg.warmup_check_frac, cfg.warmup_scramble_frac, cfg.neg_structure,
                                                 kind="copy" if step < cfg.warmup_copy_steps else None,
                                                 copy_check_frac=cfg.warmup_copy_check_frac)
            loss, right, labelled = bucketed_lm_loss(bb, rows, cfg.buckets)
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
        if step % cfg.log_every == 0 or step == cfg.warmup_steps - 1:
            log.log(step=step, loss=loss.item(), token_acc=acc, grad_norm=float(gn), lr=sched.get_last_lr()[0], **extra)
        ck.step_done(step)
    if probe is not None:
        del bb.warmup_probe  # warm-up only; the saved backbone is the plain Idefics3
    ns = cfg.neg_structure
    held = caption_accuracy(bb)
    held_rel = caption_accuracy(bb, rel_frac=1.0, seed=54321, rel_format=cfg.relation_format, structure=ns)
    held_ideal = caption_accuracy(bb, ideal_frac=1.0, seed=98765, structure=ns)
    held_copy = caption_accuracy(bb, seed=13579, kind="copy", structure=ns)
    held_match = match_accuracy(bb, rel_format=cfg.relation_format, structure=ns)
    res = {"caption": held, "relation": {"token_acc": held_rel["token_acc"]}, "ideal": held_ideal, "copy": held_copy,
           "match": held_match}
    with atomic_dir(Path(cfg.run_dir) / "warmup") as tmp:
        bb.save(tmp)
        (tmp / "state.json").write_text(json.dumps(stage_state(cfg, "warmup", cfg.warmup_steps, heldout=res), indent=2))
    ck.finish()
    if verbose:
        print("[warmup] held-out caption token acc {token_acc:.3f} (shape {shape_acc:.2f}, color {color_acc:.2f}, "
              "size {size_acc:.2f}, position {position_acc:.2f})".format(**held)
              + f"; relation token acc {held_rel['token_acc']:.3f}; ideal (query -> target caption) token acc "
              f"{held_ideal['token_acc']:.3f} (color {held_ideal['color_acc']:.2f}, shape {held_ideal['shape_acc']:.2f}; "
              f"of a text query, a copy: color {held_copy['color_acc']:.2f}, shape {held_copy['shape_acc']:.2f})"
              f"; verdict of a relation it writes itself (match_accuracy) right on matches {held_match['on_match']:.2f}, "
              f"on negatives {held_match['on_differs']:.2f}"
              + ("" if "copied" not in held_match else
                 f"; where candidate and ideal differ: candidate's value read {held_match['read']:.2f}, ideal's "
                 f"looked up {held_match['looked_up']:.2f}, copied from the candidate's {held_match['copied']:.2f}"))
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
def description_accuracy(theta: Reasoner, emb: Embedder, pairs: list, rel_format: str = "sentence") -> dict:
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
        rel_t.append(bb.ids(describe_relation(target, cand, rel_format)) + [bb.tid("<eos>")])
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
    dev, dt = enter_stage(cfg, verbose)
    seed_everything(cfg.seed + 2)
    theta = Reasoner(base_backbone(cfg), cfg).to(dev)
    for p in theta.bb.parameters():  # frozen: LM, vision encoder, connector, embeddings
        p.requires_grad_(False)
    emb = Embedder(theta.bb, ImageCache(theta.bb.image_size), frozen_vision=True)
    tasks = parse_tasks(cfg.tasks) if _is_synthetic(cfg) else None
    rng = random.Random(cfg.seed + 21)
    n_pairs = max(cfg.align_batch * 8, min(4000, cfg.align_steps * cfg.align_batch // 4))
    pairs = align_pairs(load_split(cfg.data_root, "train", tasks), rng, n_pairs)
    theta.eval()
    con_t, rel_t = [], []
    for i in tqdm(range(0, len(pairs), 128), desc="self-alignment targets (frozen LM, full tokens)",
                  disable=not verbose):
        with autocast(dev, dt):
            c, r = full_descriptions(theta, emb, pairs[i: i + 128], max_new={"sentence": 40, "aligned": 120}.get(cfg.relation_format, 80))
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
        if step % cfg.log_every == 0 or step == cfg.align_steps - 1:
            log.log(step=step, loss=loss.item(), token_acc=acc, grad_norm=float(gn), lr=sched.get_last_lr()[0])
        ck.step_done(step)
    theta.icm.eval()
    val_pairs = align_pairs(load_split(cfg.data_root, "val", tasks), random.Random(cfg.seed + 22), 256)
    with autocast(dev, dt):
        val = description_accuracy(theta, emb, val_pairs, cfg.relation_format)
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
# learned to say from full tokens, so phase 3 reads what the splice shows -- in principle: at the
# tiny scale the warm-up never learns the verdict itself (match_accuracy: "differs" every time), so
# theta's "match" after a splice is a coin flip (README, "Diagnosis" 4). --relation-format objects |
# shows changes phase 3's words (and the warm-up's) to a per-object check, an experiment.

CLEAR_KINDS = ("color", "size", "many")  # differences the teacher treats as visible when compressed


def relation_kind(rel: str) -> str:
    """'match' | 'color' | 'shape' | 'size' | 'position' | 'swapped' | 'many' from a relation sentence."""
    if rel.startswith("match"):
        return "match"
    for k in ("color", "shape", "size", "position"):
        if f" has {k} " in rel:
            return k
    return "swapped" if "swapped" in rel else "many"


def cot_trace(target, cand_scenes: list, positives: list[int], mode: str = "full",
              rel_format: str = "sentence", restate: bool = False) -> tuple[str, list[int]] | None:
    """The teacher's four-phase trace for one query (1-based candidate indices), or None when the
    positive is not among the K candidates (no correct trace exists).
    mode "noinsp" (the w/o-inspection ablation) drops phase 3 and answers from the compressed view;
    mode "direct" (theta without reasoning) is just "<think> </think> <answer> k </answer>".
    restate (--cot-restate): every inspection is written in the warm-up's relation order,
        'ideal : <caption> <insp_s> k <insp_e> <full>..</full> relation : <check>'
    so the ideal the check must look up sits just before the splice instead of back in phase 1
    (behind the eliminate list and earlier checks). Measured on val: theta still copies the
    candidate's value (looked up 0.18 vs 0.14), so distance is not the cause (README)."""
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
            rel = describe_relation(target, cand_scenes[k - 1], rel_format)
            parts += [f"ideal : {caption(target)} <insp_s> {k} <insp_e> relation : {rel}"] if restate else [
                f"<insp_s> {k} <insp_e> {rel}"]
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
    """phi's top-K for every query of a split, cached in <run_dir>/topk_<split>.json (the train split
    with --ret-folds: the out-of-fold rankings of fold_topk instead)."""
    cache_f = Path(cfg.run_dir) / f"topk_{split}_K{cfg.K}.json"
    splits = load_split(cfg.data_root, split, parse_tasks(cfg.tasks) if _is_synthetic(cfg) else None)
    if split == "train" and cfg.ret_folds >= 2:  # cross-fitting: each query ranked by a phi that never saw it
        top = fold_topk(cfg, verbose)
    elif cache_f.exists():
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


def permute_item(it: RerankItem, rng: random.Random) -> RerankItem:
    """The same query with its K candidates in a random order (positives re-indexed). Training on
    shuffled orders takes away phi's rank as a shortcut: the position of the positive in phi's
    top-K is far from uniform (often rank 2, behind a one-change hard negative), and a small
    theta learns "answer 2" instead of comparing candidates."""
    K = len(it.cands)
    perm = list(range(K))
    rng.shuffle(perm)  # new position n holds old candidate perm[n]
    pos = [n + 1 for n, o in enumerate(perm) if o + 1 in it.positives]
    return dataclasses.replace(it, cands=[it.cands[o] for o in perm], rows=[it.rows[o] for o in perm] + it.rows[K:],
                               positives=pos, scenes=[it.scenes[o] for o in perm])


def train_views(cfg: Config, items: list[RerankItem], rng: random.Random, views: int = 1) -> list[RerankItem]:
    """What SFT/GRPO train on: phi's order, or `views` shuffled copies of every item."""
    if cfg.cand_order == "phi":
        return items
    if cfg.cand_order != "shuffle":
        raise RetrvError(f"--cand-order must be phi or shuffle (got {cfg.cand_order!r})")
    return [permute_item(it, rng) for it in items for _ in range(views)]


def build_sft_data(cfg: Config, items: list[RerankItem], teacher: dict | None = None, verbose: bool = True) -> list:
    """(item, trace text) for every train query that has a correct trace; prints the statistics."""
    data, kinds = [], {"scene": 0, "format_only": 0, "teacher": 0}
    for it in items:
        if teacher and it.qid in teacher:
            tr, src = (teacher[it.qid], None), "teacher"
        elif it.target is not None and all(s is not None for s in it.scenes):
            tr, src = cot_trace(it.target, it.scenes, it.positives, cfg.cot_mode, cfg.relation_format, cfg.cot_restate), "scene"
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


def trainable_theta(theta: Reasoner, cfg: Config) -> list:
    """Vision encoder + connector frozen; ICM trained; LM fully (tiny) or through LoRA (pretrained)."""
    for p in theta.bb.parameters():
        p.requires_grad_(False)
    if theta.bb.pretrained:
        add_lora(theta.bb, cfg.lora_r)
    else:
        for p in theta.bb.text.parameters():
            p.requires_grad_(True)
        for p in theta.bb.lm_head.parameters():
            p.requires_grad_(True)
    for p in theta.icm.parameters():
        p.requires_grad_(True)
    return [p for p in theta.parameters() if p.requires_grad]


def lookup_weights(text: str, w: float) -> list[float]:
    """Per-word SFT loss weights of one aligned trace: w on the words of the ideal's value in every
    phase-3 pair whose two values differ ('cross : yellow CYAN different'), 1 everywhere else.

        L = - sum_t w_t log pi(y_t | y_<t) / #{t}        (w_t = 1 for every other token)

    Why (--sft-lookup-weight): in a phase-3 check the ideal's value has to be looked up in phase 1
    (the same-shape object of the ideal), but in the traces it equals the candidate's value written
    one word earlier on 99% of pairs (an inspected positive has no differing pair, a one-change
    negative one in ten), so SFT learns "repeat the previous word" instead of the lookup (README,
    "the aligned configuration end to end"). Weighting the few pairs where that copy is wrong makes
    copying cost what it should. Words, not tokens: the tiny word-level tokenizer only."""
    words = text.split()
    out, in_check, seg = [1.0] * len(words), False, []
    for i, x in enumerate(words):
        if x == "<insp_e>":
            in_check, seg = True, []
        elif x in ("<insp_s>", "</think>"):
            in_check = False
        elif in_check and x == "different" and len(seg) >= 2:
            cut = pair_cut([v for _, v in seg], COLORS + SIZES + CELLS)
            for j, _ in seg[cut:] if cut else []:
                out[j] = w
            seg = []
        elif in_check:
            seg = [] if x in (":", ",", ";", ".", "same", "different") else seg + [(i, x)]
    return out


def sft_loss(theta: Reasoner, emb: Embedder, batch: list, lookup_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """-mean log p(teacher tokens): prompt and spliced observations never count (score() masks them);
    with lookup_weight != 1 the ideal's differing values in aligned checks count that much (lookup_weights)."""
    prompts = build_prompts(theta, emb, [it.query for it, _ in batch], [it.cands for it, _ in batch])
    rolls = [trace_rollout(theta.bb, text) for _, text in batch]
    logp, mask = score(theta, prompts, rolls)
    weight = mask
    if lookup_weight != 1.0:
        weight = torch.ones_like(mask)
        for b, ((_, text), r) in enumerate(zip(batch, rolls)):
            w = lookup_weights(text, lookup_weight)
            w = w[1:] if text.split()[:1] == ["<think>"] else w  # trace_rollout drops the leading <think>
            if len(w) != len(r.ids):
                raise RetrvError("--sft-lookup-weight needs the word-level tokenizer of the tiny backbone "
                                 f"({len(r.ids)} tokens for {len(w)} words in a trace)")
            weight[b, : len(w)] = torch.tensor(w, device=mask.device)
        weight = weight * mask
    loss = -(logp * weight).sum() / mask.sum().clamp(min=1)
    return loss, dict(tokens=int(mask.sum().item()))


def save_theta(cfg: Config, theta: Reasoner, stage: str, step: int, **extra) -> None:
    with atomic_dir(Path(cfg.run_dir) / stage) as tmp:
        theta.save(tmp)
        (tmp / "state.json").write_text(json.dumps(stage_state(cfg, stage, step, **extra), indent=2))


def train_sft(cfg: Config, verbose: bool = True) -> dict:
    """Stage 2: SFT activation on the synthetic CoT (ICM + LM jointly, vision frozen).
    --sft-replay n adds n warm-up relation sequences to every step (their LM loss, weight 1). Why: SFT
    makes the tiny LM forget the warm-up's check -- on held-out relation pairs (match_accuracy) the
    aligned warm-up catches 0.64 of one-change negatives, the SFT model on top of it 0.25 (README)."""
    dev, dt = enter_stage(cfg, verbose)
    seed_everything(cfg.seed + 3)
    if cfg.sft_from not in ("icm", "none"):
        raise RetrvError(f"--sft-from must be icm or none (got {cfg.sft_from!r})")
    # "none" = a fresh, unaligned ICM: the w/o-self-alignment ablation
    theta = load_reasoner(cfg, "icm", dev) if cfg.sft_from == "icm" else Reasoner(base_backbone(cfg), cfg).to(dev)
    items = theta_train_items(cfg, rerank_items(cfg, "train", verbose=verbose))
    teacher = load_teacher_cots(cfg.cot_file) if cfg.cot_file else None
    if teacher is None:  # a teacher file's traces refer to phi's order: never shuffled
        items = train_views(cfg, items, random.Random(cfg.seed + 33), cfg.sft_views)
    data = build_sft_data(cfg, items, teacher, verbose)
    if not data:
        raise RetrvError("SFT: no train query has a correct trace (phi never retrieves a positive in the top-K?)")
    if verbose and cfg.sft_lookup_weight != 1.0:
        n_w = sum(v != 1.0 for _, t in data for v in lookup_weights(t, cfg.sft_lookup_weight))
        print(f"[sft] lookup weight {cfg.sft_lookup_weight:g} on {n_w} words (the ideal's values that differ from "
              f"the candidate's) of {sum(len(t.split()) for _, t in data)} in {len(data)} traces")
    params = trainable_theta(theta, cfg)
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
            loss, st = sft_loss(theta, emb, batch, cfg.sft_lookup_weight)
            if cfg.sft_replay > 0:  # L = L_SFT + L_LM(warm-up relation sequences)
                x, mask, labels, _ = warmup_batch(theta.bb, rng, cfg.sft_replay, 1.0, theta.bb.image_size,
                                                  rel_format=cfg.relation_format, structure=cfg.neg_structure,
                                                  wrap=cfg.sft_replay_wrap, K=cfg.K)
                replay, _, _ = lm_loss(theta.bb, x, mask, labels)
                loss, st = loss + replay, dict(st, replay_loss=replay.item())
        check_finite(loss, "sft", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.log_every == 0 or step == cfg.sft_steps - 1:
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


def rl_queries(cfg: Config, theta: Reasoner, emb: Embedder, items: list[RerankItem], verbose: bool) -> list[RerankItem]:
    """Train queries whose positive phi retrieved, up to grpo_pool of them. hard: ranked hardest first
    for the SFT model (those it gets wrong greedily, then those where phi's rank-1 is wrong); all: a
    random sample of the train distribution; balanced: equal shares of queries whose positive is phi's
    rank 1, rank 2 and rank 3 or lower, so that no fixed rank earns the reward. (Why: "hard" keeps the
    SFT model's failures, i.e. the queries where the rank it favours is wrong, and GRPO then learns to
    answer another fixed rank -- README, "the aligned configuration end to end".)"""
    cand = [it for it in items if it.positives]
    rng = random.Random(cfg.seed + 41)
    rng.shuffle(cand)
    if cfg.grpo_pool_mode == "balanced":
        buckets = [[it for it in cand if min(it.positives) == r] for r in (1, 2)]
        buckets.append([it for it in cand if min(it.positives) >= 3])
        n = min(cfg.grpo_pool // 3, *map(len, buckets))
        chosen = [it for b in buckets for it in b[:n]]
        rng.shuffle(chosen)
        if verbose:
            print(f"[grpo] RL pool: {len(chosen)} train queries, {n} each with the positive at phi's rank 1, 2 and 3+")
        return chosen
    if cfg.grpo_pool_mode == "all":  # the train distribution; groups the model solves (or fails)
        if verbose:  # reliably have zero reward variance, so advantage 0: the filter happens online
            print(f"[grpo] RL pool: {min(len(cand), cfg.grpo_pool)} random train queries whose positive phi retrieved")
        return cand[: cfg.grpo_pool]
    if cfg.grpo_pool_mode != "hard":
        raise RetrvError(f"--grpo-pool-mode must be hard, all or balanced (got {cfg.grpo_pool_mode!r})")
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
    dev, dt = enter_stage(cfg, verbose)
    seed_everything(cfg.seed + 4)
    theta = load_reasoner(cfg, cfg.grpo_from, dev)
    ref = None
    if cfg.beta > 0:  # frozen reference for the KL term
        ref = load_reasoner(cfg, cfg.grpo_from, dev).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    emb = Embedder(theta.bb, ImageCache(theta.bb.image_size), frozen_vision=True)
    ref_emb = Embedder(ref.bb, emb.cache, frozen_vision=True) if ref is not None else None
    items = theta_train_items(cfg, rerank_items(cfg, "train", verbose=verbose))
    pool = rl_queries(cfg, theta, emb, items, verbose)
    params = trainable_theta(theta, cfg)
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
        batch = train_views(cfg, rng.sample(pool, min(cfg.grpo_batch, len(pool))), rng)
        t0 = time.perf_counter()
        theta.eval()
        with torch.no_grad(), autocast(dev, dt):  # --- rollouts
            prompts = build_prompts(theta, emb, [it.query for it in batch], [it.cands for it in batch])
            rep = [p for p in prompts for _ in range(G)]  # (B*G) prompts, group-major
            seeds = [cfg.seed * 1_000_003 + step * 10_007 + n for n in range(len(rep))]
            rolls = sample(theta, rep, max_new=cfg.max_new, temperature=cfg.temperature, top_p=cfg.top_p, seeds=seeds,
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
                loss, st = grpo_loss(logp, old_logp, ref_logp, adv, mask, cfg.eps_clip, cfg.beta, cfg.grpo_agg)
            check_finite(loss, "grpo", step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grpo_clip)
            opt.step()
            sched.step()
        t_upd = time.perf_counter() - t1
        mean = lambda k: sum(x[k] for x in rw) / len(rw)
        row = dict(step=step, lam=lam, reward=mean("reward"), r_f=mean("r_f"), r_r=mean("r_r"),
                   acc=mean("correct"), N_ins=mean("N_ins"), kl=st["kl"], clip_frac=st["clip_frac"],
                   completion_len=sum(len(r.ids) for r in rolls) / len(rolls), frac_zero_std=zero_std,
                   grad_norm=float(gn), loss=loss.item(), rollout_s=t_roll, update_s=t_upd)
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['acc']:.2f}", N_ins=f"{row['N_ins']:.2f}", lam=f"{lam:.2f}")
        if step % cfg.log_every == 0 or step == cfg.grpo_steps - 1:
            row["sample"] = rolls[0].text
            log.log(**row)
            if verbose and step % (cfg.log_every * 4) == 0:
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
             verbose: bool = False, chunks: dict | None = None) -> dict[str, list[list[int]]]:
    """{split name: phi's ranked pool rows per query}, deep enough for theta's K and for R@10.
    With `chunks` ({split name: [(query rows, pool rows)]}) each query is ranked in its chunk's pool."""
    top, cache = {}, ImageCache(ret.bb.image_size)
    for ts in tqdm(splits, desc=desc, disable=not verbose):
        check_K(cfg, ts)
        qs, cs = coarse_embed(cfg, ret, ts, cache)  # (Q, d), (N, d)
        rows: list = [None] * len(ts)
        whole = [(list(range(len(ts))), list(range(len(ts.pool))))]  # one chunk: every query, the whole pool
        for q_rows, p_rows in (chunks[ts.name] if chunks else whole):
            if not q_rows:
                continue
            if cfg.K > len(p_rows):
                raise RetrvError(f"K={cfg.K} is larger than a chunk of {ts.pool_file} ({len(p_rows)} candidates)")
            _, idx = topk_search(qs[q_rows], cs[p_rows], max(cfg.K, min(10, len(p_rows))))  # (Q_c, depth)
            for i, r in zip(q_rows, idx.tolist()):
                rows[i] = [p_rows[j] for j in r]
        top[ts.name] = rows
    return top


def check_K(cfg: Config, ts: TaskSplit) -> None:
    if cfg.K > len(ts.pool):
        raise RetrvError(f"K={cfg.K} is larger than the candidate pool {ts.pool_file} ({len(ts.pool)} candidates)")


def coarse_recall(cfg: Config, ret: Retriever, split: str, verbose: bool = True) -> dict:
    """phi alone on a split: per-task and averaged hit rates at 1, 5, 10 and K."""
    splits = load_split(cfg.data_root, split, parse_tasks(cfg.tasks) if _is_synthetic(cfg) else None)
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
    query only chose the K). In the default world every hard negative is one change from the target,
    so the target is the hub of its look-alikes and this rule finds it far more often than phi's own
    rank 1 (README, "A shortcut in the world"); a reranker's R@1 means something only above it."""
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
    the end of thinking, without the 'relation :' and the next restated ideal of --cot-restate traces."""
    s = seg.split("<insp_s>")[0].split("</think>")[0].split(" ideal :")[0].strip()
    return s.removeprefix("relation :").strip()


def trace_diagnostics(items: list[RerankItem], res: list[dict]) -> dict:
    """Where theta's reasoning goes wrong, phase by phase (synthetic data: needs the scene graphs).

        ideal_exact / ideal_word_acc   phase 1: the "ideal" it wrote vs the caption of the target
                                       (exact, and word-by-word at the same position), per task
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
    ideal, words, kept, answered = {}, {}, [], []
    said_match: dict[bool, list] = {True: [], False: []}  # is the inspected candidate a positive? -> says match
    picks: dict[str, int] = {}
    for r in res:
        it, text = by_qid[r["qid"]], r["text"]
        picks[str(r["pick"])] = picks.get(str(r["pick"]), 0) + 1
        if it.target is None:
            continue
        m = re.search(r"ideal :(.*?)(?:eliminate :|keep :|<insp_s>|</think>|$)", text)
        gen, ref = (m.group(1).split() if m else []), caption(it.target).split()
        ideal.setdefault(r["task"], []).append(gen == ref)
        words.setdefault(r["task"], []).append(sum(a == b for a, b in zip(gen, ref)) / len(ref))
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
            "ideal_word_acc": {t: mean(v) for t, v in words.items()},
            "positive_kept": mean(kept), "n_with_keep": len(kept),
            "answered_inspected_positive": mean(answered), "n_inspected_positive": len(answered),
            "match_on_positive": mean(said_match[True]), "match_on_negative": mean(said_match[False]),
            "n_inspections": {"positive": len(said_match[True]), "negative": len(said_match[False])},
            "pick_share": {k: v / len(res) for k, v in sorted(picks.items())},
            "aligned": aligned_diagnostics(items, res)}


def aligned_diagnostics(items: list[RerankItem], res: list[dict]) -> dict | None:
    """Phase 3 step by step for --relation-format aligned traces (None for other formats). After a
    splice theta writes, per candidate object, "<candidate's value> <ideal's value> same|different".
    Over the attributes where the inspected candidate and the target really differ:
        read       the first word is the candidate's value (theta read the splice)
        looked_up  the second word is the target's value (theta looked the ideal up)
        copied     the second word repeats the first (the shortcut: every pair then says "same")
    consistent: the same/different word agrees with the two words before it (all pairs).
    "looked up" above is scored against the *true* target. theta looks up the ideal it wrote itself
    (phase 1, or the restated one just before the splice), which can be wrong; "own" separates the two
    (same differing values, where theta's ideal names the object's shape):
        own_is_target      theta's ideal holds the target's value there
        own_is_candidate   theta's ideal holds the candidate's value (then copying = a faithful lookup
                           of a wrong ideal)
        followed_own       the second word is theta's own ideal's value, whatever it is
        looked_up_own_right  looked_up, counted only where theta's ideal is right there"""
    by_qid = {it.qid: it for it in items}
    steps: dict[str, list] = {"read": [], "looked_up": [], "copied": []}
    own: dict[str, list] = {"own_is_target": [], "own_is_candidate": [], "followed_own": [], "looked_up_own_right": []}
    consistent, parsed = [], []
    for r in res:
        it = by_qid[r["qid"]]
        if it.target is None:
            continue
        chunks = r["text"].split("<insp_e>")
        for i, (k, seg) in enumerate(zip(r.get("inspected", []), chunks[1:])):
            gen = parse_aligned_check(phase3_text(seg))
            parsed.append(gen is not None)
            if gen is None:
                continue
            consistent += [(word == "same") == (a == b) for pairs in gen["objects"].values() for a, b, word in pairs or []]
            ref = parse_aligned_check(aligned_check(it.target, it.scenes[k - 1]))
            for key, v in check_steps(ref, gen).items():
                steps[key] += v
            before = "<insp_e>".join(chunks[: i + 1]).rpartition("ideal :")[2]  # the nearest ideal theta wrote
            mine = parse_caption(re.split(r"eliminate :|keep :|<insp_s>|</think>", before)[0])
            for shape, pairs in ref["objects"].items():
                for j, ((a, b, _), (ga, gb, _)) in enumerate(zip(pairs or [], gen["objects"].get(shape) or [])):
                    if a == b or shape not in mine:
                        continue
                    o = mine[shape][j]
                    own["own_is_target"].append(o == b)
                    own["own_is_candidate"].append(o == a)
                    own["followed_own"].append(gb == o)
                    if o == b:
                        own["looked_up_own_right"].append(gb == b)
    if not any(parsed):
        return None
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    return {"parsed": mean(parsed), "n_differing": len(steps["read"]), **{k: mean(v) for k, v in steps.items()},
            "consistent": mean(consistent), "n_own": len(own["own_is_target"]),
            "n_own_right": len(own["looked_up_own_right"]), **{k: mean(v) for k, v in own.items()}}


def format_diagnostics(d: dict) -> str:
    f = lambda v: "–" if v is None else f"{v:.2f}"
    return ("phase 1 ideal exact (per task): " + " ".join(f"{t}:{f(v)}" for t, v in d["ideal_exact"].items())
            + " | word acc: " + " ".join(f"{t}:{f(v)}" for t, v in d["ideal_word_acc"].items())
            + f"\nphase 2 positive kept {f(d['positive_kept'])} (of {d['n_with_keep']})"
            + f" | phase 3 answered the inspected positive {f(d['answered_inspected_positive'])}"
            + f" (of {d['n_inspected_positive']}); says \"match\" after inspecting the positive "
            + f"{f(d.get('match_on_positive'))}, a negative {f(d.get('match_on_negative'))}"
            + "\nanswers by phi rank: "
            + " ".join(f"{k}:{v:.2f}" for k, v in d["pick_share"].items())
            + ("" if not d.get("aligned") else
               "\nphase 3 aligned checks, where candidate and target differ (of {n_differing} values): "
               "candidate's value read {read}, ideal's value looked up {looked_up}, copied from the "
               "candidate's {copied}; same/different agrees with its two words {consistent}"
               "\n  against theta's own ideal (of {n_own} values whose shape it names): its ideal holds the target's value "
               "{own_is_target}, the candidate's {own_is_candidate}; the check writes its own ideal's value "
               "{followed_own}; looked up where its ideal is right {looked_up_own_right} (of {n_own_right})".format(
                   **{k: v if k.startswith("n_") else f(v) for k, v in d["aligned"].items()}))
            + ("" if not d.get("warmup_check") else
               "\nthe warm-up's own check, held-out pairs (match_accuracy: what theta kept of stage 0): says match on "
               "matches {on_match}, differs on one-change negatives {on_differs}".format(
                   **{k: f(v) for k, v in d["warmup_check"].items()})))


# ---- a cross-encoder probe: can this backbone tell phi's candidates apart at all? ---------------
#
#   s(q, c) = w . h_last( LM([T_q ; "candidate :" ; T_c ; "relation :"]) )
#   L = -log softmax_k s(q, c_k)[k = positive]          over phi's top-K of one train query
# Not part of the paper: a diagnostic (`eval --stage probe`). Every theta above must compare a query
# with its candidates inside the LM's attention. The probe asks that question with everything else
# taken away -- no generation, no ICM, no rank prior (each pair is scored alone, so phi's order is
# invisible): trained directly to pick the positive, does the LM learn the comparison? The head starts
# as the LM's own verdict logit, "match" minus "differs" (step 0 is zero-shot). --probe-lists easy
# replaces the K-1 negatives by candidates of other queries of the same task: the sanity check that
# the probe learns when the comparison is coarse.


def easy_lists(items: list[RerankItem], rng: random.Random) -> list[RerankItem]:
    """Each item with a positive -> its first positive at a random place among K-1 candidates drawn from
    other queries' top-K of the same task (other scene groups; a sanity check for the probe)."""
    keep = [it for it in items if it.positives]
    by_task: dict[str, list[RerankItem]] = {}
    for it in keep:
        by_task.setdefault(it.task, []).append(it)
    out = []
    for it in keep:
        K = len(it.cands)
        others = [o for o in by_task[it.task] if o.qid != it.qid]
        if len(others) < K - 1:
            raise RetrvError(f"--probe-lists easy needs at least {K} queries of task {it.task} (got {len(others) + 1})")
        picks = [(o, rng.randrange(K)) for o in rng.sample(others, K - 1)]
        k = rng.randrange(K)
        p = it.positives[0] - 1
        cands = [o.cands[j] for o, j in picks]
        scenes = [o.scenes[j] for o, j in picks]
        out.append(dataclasses.replace(it, cands=cands[:k] + [it.cands[p]] + cands[k:], positives=[k + 1],
                                       scenes=scenes[:k] + [it.scenes[p]] + scenes[k:], rows=[]))
    return out


def probe_scores(bb: Backbone, emb: Embedder, head: nn.Linear, items: list[RerankItem]) -> torch.Tensor:
    """The probe's score of every (query, candidate) pair -> (B, K); each pair is one sequence."""
    qT, qm = emb.tokens([it.query for it in items])  # (B, Lq, D)
    cT, cm = emb.tokens([c for it in items for c in it.cands])  # (B*K, Lc, D)
    sep, rel = (bb.embed_text(torch.tensor([bb.ids(w)], device=bb.device))[0] for w in ("candidate :", "relation :"))  # (L_w, D)
    K = len(items[0].cands)
    seqs = [torch.cat([qT[i, : int(qm[i].sum())], sep, cT[i * K + k, : int(cm[i * K + k].sum())], rel])
            for i in range(len(items)) for k in range(K)]
    x, m = pad_stack(seqs)  # (B*K, L, D)
    h, _, _ = bb.lm(x, attention_mask=m, logits=False)
    last = h[torch.arange(len(seqs), device=h.device), m.sum(1) - 1]  # (B*K, D): at "relation :"
    return head(last.float()).view(len(items), K)


def cross_encoder_probe(cfg: Config, split: str | None = None, verbose: bool = True) -> dict:
    """Train the probe above on the train split's lists (phi's top-K, or easy ones) from this run's
    warmed-up backbone; R@1 on `split` at step 0, every quarter and at the end. Writes
    <run_dir>/probe_<lists>[_vision]_<split>.json (--probe-vision: the vision tower and connector train too).
    Nothing of the run is changed."""
    split = split or cfg.split
    if cfg.probe_lists not in ("phi", "easy"):
        raise RetrvError(f"--probe-lists must be phi or easy (got {cfg.probe_lists!r})")
    dev, dt = enter_stage(cfg, verbose)
    seed_everything(cfg.seed)
    rng = random.Random(f"{cfg.seed}-probe")
    train = [it for it in rerank_items(cfg, "train", verbose=verbose) if it.positives]
    test = rerank_items(cfg, split, verbose=verbose)
    if cfg.probe_lists == "easy":
        train, test = easy_lists(train, rng), easy_lists(test, rng)
    if not train:
        raise RetrvError("the probe has no train query whose positive is in phi's top-K")
    bb = base_backbone(cfg).to(dev)
    if not cfg.probe_vision:  # as in SFT: the vision side is frozen, so its tokens are computed once
        bb.freeze_vision()
    emb = Embedder(bb, ImageCache(bb.image_size), frozen_vision=not cfg.probe_vision)
    head = nn.Linear(bb.D, 1).to(dev)
    with torch.no_grad():  # step 0 = the LM's own verdict: logit("match") - logit("differs")
        words = [bb.ids(w) for w in ("match", "differs")]
        head.weight.zero_()
        head.bias.zero_()
        if all(len(w) == 1 for w in words):
            head.weight.copy_((bb.lm_head.weight[words[0][0]] - bb.lm_head.weight[words[1][0]]).float()[None])

    @torch.no_grad()
    def r_at_1() -> dict:
        bb.eval()
        hits: dict[str, list[bool]] = {}
        for i in range(0, len(test), 32):
            chunk = test[i: i + 32]
            with autocast(dev, dt):
                s = probe_scores(bb, emb, head, chunk)  # (b, K)
            for it, pick in zip(chunk, s.argmax(-1).tolist()):
                hits.setdefault(it.task, []).append(pick + 1 in it.positives)
        bb.train()
        every = [h for v in hits.values() for h in v]
        return {"avg": sum(every) / len(every), "tasks": {t: sum(v) / len(v) for t, v in hits.items()}}

    params = [prm for prm in bb.parameters() if prm.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.probe_lr, weight_decay=0.01)
    sched = cosine_schedule(opt, cfg.probe_steps, warmup=max(1, cfg.probe_steps // 20))
    curve = [{"step": 0, **r_at_1()}]
    accs, losses = [], []
    bar = tqdm(range(cfg.probe_steps), desc=f"cross-encoder probe ({cfg.probe_lists} lists)", disable=not verbose)
    for step in bar:
        batch = rng.sample(train, min(cfg.probe_batch, len(train)))
        with autocast(dev, dt):
            s = probe_scores(bb, emb, head, batch)  # (B, K)
        tgt = torch.tensor([rng.choice(it.positives) - 1 for it in batch], device=dev)
        loss = F.cross_entropy(s.float(), tgt)
        check_finite(loss, "probe", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        accs.append((s.argmax(-1) == tgt).float().mean().item())
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{sum(accs[-25:]) / len(accs[-25:]):.2f}")
        if (step + 1) % max(1, cfg.probe_steps // 4) == 0 or step == cfg.probe_steps - 1:
            curve.append({"step": step + 1, **r_at_1()})
    n = min(25, len(losses))
    out = {"lists": cfg.probe_lists, "split": split, "K": cfg.K, "steps": cfg.probe_steps, "lr": cfg.probe_lr,
           "vision_trained": cfg.probe_vision,
           "chance": 1 / cfg.K, "phi_R@1": sum(1 in it.positives for it in test) / len(test), "curve": curve,
           "final_train_loss": sum(losses[-n:]) / max(1, n), "final_train_acc": sum(accs[-n:]) / max(1, n)}
    name = f"probe_{cfg.probe_lists}{'_vision' if cfg.probe_vision else ''}_{split}.json"
    atomic_write_text(Path(cfg.run_dir) / name, json.dumps(out, indent=2))
    if verbose:
        print(f"[probe] cross-encoder on {cfg.probe_lists} lists, {split} R@1 by step (chance {out['chance']:.3f}, "
              f"phi's rank 1 on the same lists {out['phi_R@1']:.3f}): "
              + ", ".join(f"{c['step']}: {c['avg']:.3f}" for c in curve)
              + f"; train loss {out['final_train_loss']:.3f} (ln K = {math.log(cfg.K):.3f}), train acc "
              f"{out['final_train_acc']:.2f} (last {n} steps)")
        print("[probe] per task at the end: " + ", ".join(f"{t} {v:.2f}" for t, v in sorted(curve[-1]["tasks"].items())))
    return out


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
    """Evaluate a run on a split; writes <run_dir>/eval_<split>.json (schema in DESIGN.md section 9) and,
    for theta's stages, every trace to <run_dir>/traces_<stage>_<split>.jsonl.
    stage: coarse (phi alone) | sft | grpo (phi's top-K reranked by theta after that stage) | probe (a
    cross-encoder trained on the warmed-up backbone; see cross_encoder_probe, which it returns)."""
    split = split or cfg.split
    stage = stage or cfg.stage or furthest_stage(cfg)
    if stage == "probe":  # a diagnostic of the backbone, not a stage of the pipeline
        return cross_encoder_probe(cfg, split, verbose)
    if stage not in ("coarse", "sft", "grpo", "icm"):
        raise RetrvError(f"--stage must be coarse, icm, sft, grpo or probe (got {stage!r})")
    dev, dt = enter_stage(cfg, verbose)
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
        for ts in load_split(cfg.data_root, split, parse_tasks(cfg.tasks) if _is_synthetic(cfg) else None):
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
        if cfg.relation_format == "aligned" and not theta.bb.pretrained:  # what theta kept of the warm-up's check
            wc = match_accuracy(theta.bb, rel_format="aligned", structure=cfg.neg_structure)
            out["diagnosis"]["warmup_check"] = {k: None if v != v else v for k, v in wc.items()}  # NaN is not JSON
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
    dev, dt = enter_stage(cfg, verbose)
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
    """Speed and memory figures (DESIGN.md section 9); writes <run_dir>/bench.json and bench.md.

    Uses the run's furthest theta (or an untrained tiny one if none: speed does not depend on
    training). Every figure is a median over repeats after one warm-up call."""
    parts = {x.strip() for x in cfg.bench_parts.split(",") if x.strip()}
    if not parts or parts - {"sampler", "icm", "steps"}:
        raise RetrvError(f"--bench-parts must be a comma list of sampler, icm, steps (got {cfg.bench_parts!r})")
    try:
        Ks = tuple(int(k) for k in cfg.bench_ks.split(",") if k.strip())
    except ValueError:
        Ks = ()
    if not Ks or min(Ks) < 1:
        raise RetrvError(f"--bench-ks must be a comma list of positive rerank depths, e.g. 4,8,16,32 (got {cfg.bench_ks!r})")
    dev, dt = enter_stage(cfg, verbose)
    stage = next((s for s in ("grpo", "sft", "icm") if stage_done(cfg, s)), None)
    if stage:
        theta = load_reasoner(cfg, stage, dev)
    else:
        theta = Reasoner(new_tiny_backbone(cfg), cfg).to(dev)
    theta.eval()
    ensure_world(cfg, verbose=False)
    emb = Embedder(theta.bb, ImageCache(theta.bb.image_size), frozen_vision=True)
    splits = load_split(cfg.data_root, "val", parse_tasks(cfg.tasks) if _is_synthetic(cfg) else None)
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
    if "sampler" in parts:  # 1. sampler throughput (bench_sampler)
        res.update(bench_sampler(cfg, theta, emb, items_for, dev, dt))
    # 2. rerank latency and context tokens, ICM vs full tokens, as K grows (at --rerank-batch queries)
    if "icm" in parts:
        res.update(icm_cost(theta, emb, items_for, dev, dt, Ks=Ks, n_queries=cfg.rerank_batch))
    if "steps" in parts:  # 3. SFT / GRPO step times and peak memory (bench_steps)
        res.update(bench_steps(cfg, theta, emb, items_for, dev, dt))
    # 4. wall time of `train --preset smoke` in a fresh run directory (a subprocess, like a user)
    if cfg.bench_smoke:
        with tempfile_dir() as d:
            t0 = time.time()
            rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "train", "--preset", "smoke",
                                 "--run-dir", str(Path(d) / "run"), "--device", cfg.device],
                                capture_output=True, text=True)
            res["smoke_train_s"] = time.time() - t0 if rc.returncode == 0 else None
    else:
        res["smoke_train_s"] = None
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


def tempfile_dir():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="retrv_r1_bench_")


def format_bench(r: dict) -> str:
    """The bench figures as text; parts that were not measured are left out."""
    lines = [f"device: {r['device']}   theta: {r['theta_stage']}   {r.get('backbone', '')}"]
    if "sampler_tok_s" in r:
        lines.append(f"sampler {r['sampler_tok_s']:.0f} tok/s | transformers.generate {r['generate_tok_s']:.0f} tok/s | "
                     f"naive (no cache) {r['naive_tok_s']:.0f} tok/s  ->  {r['sampler_vs_generate']:.2f}x generate, "
                     f"{r['sampler_vs_naive']:.2f}x naive")
    if "icm_speedup" in r:
        lines.append(format_icm_cost(r))
    if "sft_step_s" in r:
        lines.append(f"SFT step {r['sft_step_s']:.2f} s | GRPO rollout {r['grpo_rollout_s']:.2f} s, update "
                     f"{r['grpo_update_s']:.2f} s | peak memory {r['peak_mem_mb']:.0f} MB")
    lines.append("train --preset smoke " + (f"{r['smoke_train_s']:.0f} s" if r.get("smoke_train_s") else "not measured"))
    return "\n".join(lines)


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
