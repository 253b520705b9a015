"""The notebooks' shared helpers: which run to read (`setup`), and the self-checks of the
"implement it" exercises (`check_*`).

`setup(stages)` returns the config of the run a notebook reads: `runs/tiny` when
`python retrv_r1.py train` has finished the stages the notebook needs, otherwise the `smoke` preset,
whose missing stages it trains on the spot (a few minutes on a CPU) and says so. The tests set the
environment variable RETRV_R1_NOTEBOOK_PRESET=smoke so that they never depend on a local tiny run.

Every exercise is a stub cell (a function that raises NotImplementedError until you fill it in) and a
check cell that calls `check_<name>(your_function)`. The check runs your function and the reference in
retrv_r1.py on the same inputs -- first a few hand-picked cases that catch the usual mistakes, then
random ones -- and

  * prints a reminder while your function still raises NotImplementedError (the stub as committed);
  * raises CheckFailed at the first input where the two differ, naming the input, what your function
    returned and what the reference returns, with a hint where the difference has a typical cause;
  * prints "passed" when every case agrees.

`REFERENCE` maps each exercise to the function in retrv_r1.py it must reproduce. Read that function
only after your own attempt: it is the answer.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root, where retrv_r1.py lives
sys.path.insert(0, str(ROOT))
import retrv_r1 as R  # noqa: E402


def setup(stages: str) -> R.Config:
    """Make the repository root the working directory and return the run this notebook reads."""
    os.chdir(ROOT)  # relative paths (runs/tiny, data/synthetic-tiny) mean what they mean for the CLI
    need = stages.split(",")
    tiny = R.make_config("tiny")
    if os.environ.get("RETRV_R1_NOTEBOOK_PRESET") != "smoke" and all(R.stage_done(tiny, s) for s in need):
        R.pick_device(tiny)  # applies cfg.threads (all cores) to torch
        print(f"Reading runs/tiny: the default preset, trained by `python retrv_r1.py train` (stages {stages}).")
        return tiny
    cfg = R.make_config("smoke")
    print(f"runs/tiny has not finished the stages this notebook reads ({stages}), so it uses the smoke preset\n"
          "and trains what is missing in runs/smoke now. Smoke numbers show that the code runs, not that the\n"
          "method works: run `python retrv_r1.py train` (about 25 minutes on a laptop CPU), then rerun the notebook.")
    t0 = time.time()
    R.train(R.make_config("smoke", stages=stages), verbose=False)  # finished stages are skipped
    print(f"smoke stages ready in {time.time() - t0:.0f} s")
    return cfg


class CheckFailed(AssertionError):
    """Your function differs from the reference on one input (the message says which and how)."""


REFERENCE = {
    "info_nce": R.info_nce,
    "consensus_pick": R.consensus_pick,
    "masked_attention": R.masked_attention,
    "parse_inspection": R.parse_inspection,
    "verdict_score": R.verdict_score,
    "trace_rollout": R.trace_rollout,
    "format_reward": R.format_reward,
    "curriculum_reward": lambda correct, n_ins, K, step, total: R.result_reward(
        correct, n_ins, K, R.curriculum_lambda(step, total)),
    "group_advantages": R.group_advantages,
    "grpo_loss": R.grpo_loss,
    "recall_at": R.recall_at,
}


# ------------------------------------------------------------------------------------- helpers
def _short(x, n: int = 300) -> str:
    if isinstance(x, torch.Tensor):
        s = f"tensor{tuple(x.shape)} " + str([round(v, 4) for v in x.detach().flatten().tolist()[:12]])
        s += " ..." if x.numel() > 12 else ""
    else:
        s = repr(x)
    return s if len(s) <= n else s[:n] + " ..."


def _run(name: str, fn, args: tuple, kwargs: dict | None = None):
    """Call the student's fn; NotImplementedError propagates (the caller reports it), any other error
    becomes a CheckFailed that names the input."""
    try:
        return fn(*args, **(kwargs or {}))
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001 - shown to the student with the input that raised it
        raise CheckFailed(f"{name} raised {type(e).__name__}: {e}\n  on input {_inputs(args, kwargs)}") from e


def _inputs(args: tuple, kwargs: dict | None) -> str:
    parts = [_short(a, 160) for a in args] + [f"{k}={_short(v, 80)}" for k, v in (kwargs or {}).items()]
    return "(" + ", ".join(parts) + ")"


def _fail(name: str, args: tuple, got, want, hint: str = "", kwargs: dict | None = None):
    msg = (f"{name}{_inputs(args, kwargs)}\n  returned {_short(got)}\n  expected {_short(want)}")
    raise CheckFailed(msg + (f"\n  hint: {hint}" if hint else ""))


def _tensor_case(name: str, fn, ref, args: tuple, hints, atol: float = 1e-5, kwargs: dict | None = None):
    """One case for a function returning a tensor (or a tuple of tensors): shape and values."""
    want = ref(*args, **(kwargs or {}))
    got = _run(name, fn, args, kwargs)
    wants = want if isinstance(want, tuple) else (want,)
    gots = got if isinstance(got, tuple) else (got,)
    if len(gots) != len(wants):
        _fail(name, args, got, want, f"return {len(wants)} value(s), got {len(gots)}", kwargs)
    for g, w in zip(gots, wants):
        g = torch.as_tensor(g, dtype=w.dtype) if not isinstance(g, torch.Tensor) else g
        if g.shape != w.shape:
            _fail(name, args, got, want, f"shape {tuple(g.shape)}, expected {tuple(w.shape)}", kwargs)
        if not torch.allclose(g.float(), w.float(), atol=atol, rtol=1e-4, equal_nan=True):
            hint = next((h for wrong, h in hints if _close(wrong(*args, **(kwargs or {})), got, atol)), "")
            _fail(name, args, got, want, hint, kwargs)
    return got


def _close(a, b, atol: float) -> bool:
    """Do a known wrong answer a and the student's b agree (then that mistake's hint applies)?"""
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    try:
        return len(a) == len(b) and all(torch.allclose(torch.as_tensor(x).float(), torch.as_tensor(y).float(), atol=atol)
                                        for x, y in zip(a, b))
    except (RuntimeError, TypeError, ValueError):  # shapes or types that cannot be compared: not this mistake
        return False


def _report(name: str, body) -> bool:
    """Run the cases; True when every one agrees, False while the stub is not filled in."""
    try:
        n = body()
    except NotImplementedError:
        print(f"[ ] {name}: not implemented yet -- fill in the stub above, run it, then run this cell again")
        return False
    print(f"[x] {name}: passed ({n} cases agree with the reference in retrv_r1.py)")
    return True


# ------------------------------------------------------------------ notebook 01: phi and its control
def check_info_nce(fn) -> bool:
    """fn(e_q (B, d), e_c (M, d), tau) -> scalar InfoNCE loss; query i's positive is row i of e_c."""
    name = "info_nce"
    hints = [(lambda q, c, tau: R.info_nce(q, c, 1.0), "the logits are e_q . e_c / tau: divide by tau"),
             (lambda q, c, tau: R.info_nce(c[: len(q)], q, tau), "softmax over the candidates (each query's row), not over the queries"),
             (lambda q, c, tau: -(q * c[: len(q)]).sum(-1).div(tau).mean(), "a contrastive loss needs the log-sum-exp over every candidate, not only the positive's score")]

    def body():
        g = torch.Generator().manual_seed(0)
        n = 0
        for B, M in [(1, 1), (2, 2), (3, 9), (4, 12), (5, 7), (1, 4), (6, 6), (6, 18), (2, 7), (3, 3)]:
            q = torch.nn.functional.normalize(torch.randn(B, 16, generator=g), dim=-1)
            c = torch.nn.functional.normalize(torch.randn(M, 16, generator=g), dim=-1)
            _tensor_case(name, fn, R.info_nce, (q, c, R.TAU), hints, atol=1e-4)
            n += 1
        return n
    return _report(name, body)


def check_consensus_pick(fn) -> bool:
    """fn(C (K, d)) -> int: the row closest on average to the OTHER rows (no query involved)."""
    name = "consensus_pick"

    def body():
        g = torch.Generator().manual_seed(1)
        cases = [torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]),  # the middle one is closest to both others
                 torch.tensor([[3.0, 0.0], [1.0, 0.2], [1.0, -0.2]])]  # long row 0: its self-similarity 9 must not count
        cases += [torch.randn(K, 8, generator=g) * (1 + torch.rand(K, 1, generator=g)) for K in (2, 4, 8, 8, 16) * 4]
        for C in cases:
            want, got = R.consensus_pick(C), _run(name, fn, (C,))
            if int(got) != want:
                with_self = int((C @ C.T).sum(1).argmax())
                hint = ("leave out each row's similarity with itself (the diagonal of C C^T)" if with_self == int(got)
                        else "the pick is argmax over k of sum_{j != k} <c_k, c_j> (a 0-based row index)")
                _fail(name, (C,), got, want, hint)
        return len(cases)
    return _report(name, body)


# ------------------------------------------------------------------- notebook 02: the ICM, inspection
def check_masked_attention(fn) -> bool:
    """fn(q (B, H, Lq, d), k (B, H, Lk, d), v (B, H, Lk, d), mask (B, Lk)) -> (out, att)."""
    name = "masked_attention"

    def no_scale(q, k, v, m):
        return R.masked_attention(q * math.sqrt(q.shape[-1]), k, v, m)

    def no_mask(q, k, v, m):
        return R.masked_attention(q, k, v, torch.ones_like(m))

    hints = [(no_scale, "scale the scores by 1 / sqrt(d), d = q.shape[-1]"),
             (no_mask, "masked keys (mask == 0) must get attention weight 0: fill their scores with -inf before the softmax")]

    def body():
        g = torch.Generator().manual_seed(2)
        n = 0
        for B, H, Lq, Lk, d in [(1, 1, 1, 3, 4), (2, 2, 1, 5, 8), (2, 4, 3, 9, 8), (3, 1, 4, 6, 16)] * 3:
            q, k, v = (torch.randn(B, H, L, d, generator=g) for L in (Lq, Lk, Lk))
            mask = (torch.rand(B, Lk, generator=g) > 0.3).long()
            mask[:, 0] = 1  # at least one key per row
            _tensor_case(name, fn, R.masked_attention, (q, k, v, mask), hints, atol=1e-5)
            n += 1
        return n
    return _report(name, body)


_BB = None


def tokenizer_backbone():
    """A small untrained backbone: only its tokenizer matters to the token-level checks."""
    global _BB
    if _BB is None:
        torch.manual_seed(0)
        _BB = R.new_tiny_backbone(vision_layers=1, text_layers=1).eval()
    return _BB


def _inspection_cases(bb, rng: random.Random):
    """(text, K, inspected): each text ends in <insp_e>."""
    fixed = [("<insp_s> 3 <insp_e>", 8, []), ("<insp_s> 8 <insp_e>", 8, []), ("<insp_s> 9 <insp_e>", 8, []),
             ("<insp_s> 0 <insp_e>", 8, []), ("<insp_s> <insp_e>", 8, []), ("<insp_s> red <insp_e>", 8, []),
             ("3 <insp_e>", 8, []), ("<insp_s> 1 <insp_e> 2 <insp_e>", 8, [1]), ("<insp_s> 2 <insp_e>", 8, [2]),
             ("<insp_s> 4 <insp_e>", 4, [1, 2, 3]), ("<insp_s> 2 <insp_e>", 2, [1, 3]),
             ("ideal : a red circle . <insp_s> 5 <insp_e> differs . <insp_s> 6 <insp_e>", 8, [5])]
    words = ["<insp_s>", "<insp_e>", "1", "2", "3", "5", "8", "9", "10", "red", "circle", ".", "match"]
    rand = []
    for _ in range(60):
        toks = [rng.choice(words) for _ in range(rng.randint(0, 6))] + rng.choice(
            [["<insp_s>", str(rng.randint(0, 10))], ["<insp_s>"], [str(rng.randint(1, 8))], ["<insp_s>", "2", "3"]])
        K = rng.choice([2, 4, 8])
        rand.append((" ".join(toks + ["<insp_e>"]), K, rng.sample(range(1, K + 1), rng.randint(0, K))))
    return [(bb.ids(t), K, ins, t) for t, K, ins in fixed + rand]


def check_parse_inspection(fn, bb=None) -> bool:
    """fn(bb, ids, K, inspected) -> (k, None) for a valid request, (None, reason) otherwise."""
    name = "parse_inspection"

    def body():
        b = bb or tokenizer_backbone()
        cases = _inspection_cases(b, random.Random(3))
        for ids, K, ins, text in cases:
            want = R.parse_inspection(b, ids, K, list(ins))
            got = _run(name, fn, (b, ids, K, list(ins)))
            if not (isinstance(got, tuple) and len(got) == 2):
                _fail(name, ("bb", text, K, ins), got, want, "return a pair (k, reason)")
            if got[0] != want[0] or (got[1] is None) != (want[1] is None):
                _fail(name, ("bb", text, K, ins), got, want,
                      f"the reference's reason: {want[1]!r}" if want[1] else "this request is valid: return (k, None)")
        return len(cases)
    return _report(name, body)


def check_verdict_score(fn) -> bool:
    """fn(lp (N, T), mask (N, T)) -> (N,): the weakest masked word's log-prob."""
    name = "verdict_score"
    hints = [(lambda lp, m: R.masked_mean(lp, m, dim=-1), "the WEAKEST word decides (a min), not the average"),
             (lambda lp, m: lp.min(-1).values, "positions with mask == 0 are padding: they hold arbitrary numbers and must not count")]

    def body():
        g = torch.Generator().manual_seed(4)
        n = 0
        for N, T in [(1, 1), (1, 5), (3, 6), (5, 12)] * 4:
            lp = -torch.rand(N, T, generator=g) * 6
            mask = torch.ones(N, T)
            for i in range(N):
                mask[i, torch.randint(1, T + 1, (1,), generator=g).item():] = 0
            lp = torch.where(mask > 0, lp, torch.full_like(lp, -50.0))  # padding: arbitrary numbers
            _tensor_case(name, fn, R.verdict_score, (lp, mask), hints)
            n += 1
        return n
    return _report(name, body)


# --------------------------------------------------------------------- notebook 03: the SFT sequence
def _teacher_texts(rng: random.Random) -> list[str]:
    texts = ["<think> ideal : a red circle center . eliminate : none . keep : 1 2 3 . <insp_s> 2 <insp_e> match . "
             "</think> <answer> 2 </answer>",
             "ideal : a red circle center . <insp_s> 1 <insp_e> differs . <insp_s> 3 <insp_e> match . </think> <answer> 3 </answer>",
             "<think> <insp_s> 1 <insp_e> <insp_s> 2 <insp_e> match . </think> <answer> 2 </answer>",   # first verdict missing
             "<think> <insp_s> 4 <insp_e> match </think> <answer> 4 </answer>",                        # no full stop after it
             "<think> <insp_s> 2 <insp_e> differs . <insp_s> 2 <insp_e> differs . </think> <answer> 1 </answer>",  # twice
             "<think> </think> <answer> 1 </answer>"]
    for i in range(24):  # the teacher's own traces for random groups
        g = R.make_group(rng.choice([0, 3, 4, 7]), random.Random(i), 7)
        target = g["query"]["target"]
        scenes = [c["scene"] for c in [g["pos"]] + g["negs"]]
        rng.shuffle(scenes)
        pos = [k + 1 for k, s in enumerate(scenes) if s == target]
        tr = R.cot_trace(target, scenes, pos)
        if tr:
            texts.append(tr[0])
    return texts


def check_trace_rollout(fn, bb=None) -> bool:
    """fn(bb, text) -> R.Rollout with ids, splices [(t, k)], verdicts, inspected."""
    name = "trace_rollout"

    def body():
        b = bb or tokenizer_backbone()
        texts = _teacher_texts(random.Random(5))
        for text in texts:
            want = R.trace_rollout(b, text)
            got = _run(name, fn, (b, text))
            for field in ("ids", "splices", "verdicts", "inspected"):
                gv, wv = list(getattr(got, field, None) or []), list(getattr(want, field))
                if gv != wv:
                    hint = {"ids": "theta's tokens: the text's ids without a leading <think> (the prompt ends with it) "
                                   "and without each verdict 'match .' / 'differs .' that follows an <insp_e>",
                            "splices": "one (t, k) per valid inspection, t = the position of its <insp_e> in ids",
                            "verdicts": "per splice the verdict word that followed it, or None when none did",
                            "inspected": "the valid inspection indices in order (a repeated one is not valid)"}[field]
                    shown = b.tok.convert_ids_to_tokens(gv) if field == "ids" else gv
                    wshown = b.tok.convert_ids_to_tokens(wv) if field == "ids" else wv
                    raise CheckFailed(f"{name}(bb, {text!r})\n  .{field} = {_short(shown)}\n  expected {_short(wshown)}"
                                      f"\n  hint: {hint}")
        return len(texts)
    return _report(name, body)


# ------------------------------------------------------------------- notebook 04: rewards and GRPO
def _format_cases(rng: random.Random) -> list[tuple[str, int]]:
    good = "<think> ideal : a red circle . <insp_s> 2 <insp_e> differs . <insp_s> 5 <insp_e> match . </think> <answer> 5 </answer>"
    fixed = [good, "<think> </think> <answer> 1 </answer>", "<think> ideal : x . </think> <answer> 9 </answer>",
             "<think> ideal : x . <answer> 1 </answer>", "<think> <insp_s> 3 <insp_e> <insp_s> 3 <insp_e> </think> <answer> 3 </answer>",
             "<think> </think> <insp_s> 3 <insp_e> <answer> 3 </answer>", "<think> </think> <answer> 3 </answer> more",
             "<think> <full> </think> <answer> 3 </answer>", "<think> <think> </think> <answer> 3 </answer>",
             "<think> <insp_s> two <insp_e> </think> <answer> 2 </answer>", "<think> <insp_s> 0 <insp_e> </think> <answer> 2 </answer>",
             "ideal : x . </think> <answer> 2 </answer>", "<think> </think> <answer> </answer>",
             "<think> <insp_s> 4 </think> <answer> 4 </answer>", "  <think> </think>  <answer>  7 </answer>  "]
    toks = good.split()
    rand = []
    for _ in range(80):
        t = list(toks)
        for _ in range(rng.randint(1, 2)):
            op, i = rng.choice("dsrx"), rng.randrange(len(t))
            if op == "d":
                del t[i]
            elif op == "s":
                j = rng.randrange(len(t)); t[i], t[j] = t[j], t[i]
            elif op == "r":
                t[i] = rng.choice(["<think>", "</think>", "<insp_s>", "<insp_e>", "<answer>", "</answer>", "9", "3", "x"])
            else:
                t.insert(i, t[i])
        rand.append(" ".join(t))
    return [(x, 8) for x in fixed + rand]


def check_format_reward(fn) -> bool:
    """fn(text, K) -> 1.0 for a well-formed decoded trace, else 0.0."""
    name = "format_reward"

    def body():
        cases = _format_cases(random.Random(6))
        for text, K in cases:
            want, got = R.format_reward(text, K), _run(name, fn, (text, K))
            if float(got) != want:
                _fail(name, (text, K), got, want, "this trace is well formed" if want else
                      "this trace breaks a rule of the docstring: find which one")
        return len(cases)
    return _report(name, body)


def check_curriculum_reward(fn) -> bool:
    """fn(correct, n_ins, K, step, total) -> r_r = 1[correct] (1 - lam_step N_ins / K), lam = step / (total - 1)."""
    name = "curriculum_reward"
    ref = REFERENCE[name]

    def body():
        rng = random.Random(7)
        cases = [(True, 0, 8, 0, 60), (True, 2, 8, 0, 60), (True, 2, 8, 59, 60), (True, 8, 8, 59, 60), (False, 1, 8, 30, 60),
                 (True, 4, 8, 30, 61), (True, 3, 8, 0, 1), (True, 3, 8, 1, 1), (True, 2, 4, 5, 11)]
        cases += [(rng.random() < 0.7, rng.randint(0, 8), 8, s, tot) for tot in (2, 5, 60) for s in range(tot)][:80]
        for args in cases:
            want, got = ref(*args), _run(name, fn, args)
            if not math.isclose(float(got), want, abs_tol=1e-9):
                c, n, K, s, tot = args
                hint = ("the last step must have lam = 1 exactly: lam = step / (total - 1)"
                        if tot > 1 and math.isclose(float(got), R.result_reward(c, n, K, s / tot), abs_tol=1e-9) else
                        "a wrong answer earns 0 whatever it inspected" if not c else
                        "with a single step (total = 1), lam is 0 at step 0")
                _fail(name, args, got, want, hint)
        return len(cases)
    return _report(name, body)


def check_group_advantages(fn) -> bool:
    """fn(rewards (B*G,), G) -> (B*G,): normalised within each group of G (population std, eps = 1e-4)."""
    name = "group_advantages"

    def unbiased(r, G):
        x = r.view(-1, G)
        std = x.std(-1, keepdim=True)
        return torch.where(std > 0, (x - x.mean(-1, keepdim=True)) / (std + 1e-4), torch.zeros_like(x)).flatten()

    hints = [(lambda r, G: R.group_advantages(r, len(r)), "normalise each query's G rewards on their own, not the whole batch"),
             (unbiased, "use the population std (unbiased=False): rewards [1, 0] give advantages +1, -1")]

    def body():
        g = torch.Generator().manual_seed(8)
        cases = [(torch.tensor([1.0, 0.0]), 2), (torch.tensor([2.0, 2.0, 2.0, 2.0]), 4), (torch.tensor([2.0, 0, 0, 0, 2, 2, 2, 0]), 4)]
        cases += [((torch.rand(B * G, generator=g) * 2).round(decimals=1), G) for B, G in [(1, 4), (2, 4), (3, 8), (4, 2)] * 4]
        for r, G in cases:
            _tensor_case(name, fn, R.group_advantages, (r, G), hints, atol=1e-3)
        return len(cases)
    return _report(name, body)


def check_grpo_loss(fn) -> bool:
    """fn(logp, old_logp, ref_logp, adv, mask, eps_clip, beta) -> scalar loss (token mean).
    Checked: the loss value and its gradient with respect to logp."""
    name = "grpo_loss"

    def body():
        g = torch.Generator().manual_seed(9)
        n = 0
        for N, T, beta in [(2, 5, 0.0), (2, 5, 0.04), (3, 7, 0.5), (4, 3, 0.0), (4, 9, 0.1)] * 3:
            old = -torch.rand(N, T, generator=g) * 3
            ref = old + 0.3 * torch.randn(N, T, generator=g)
            base = old + 0.5 * torch.randn(N, T, generator=g)  # the policy has moved: some ratios leave [0.8, 1.2]
            adv = torch.randn(N, generator=g)
            mask = (torch.rand(N, T, generator=g) > 0.25).float()
            mask[:, 0] = 1
            want_lp = base.clone().requires_grad_(True)
            want, _ = R.grpo_loss(want_lp, old, ref, adv, mask, 0.2, beta)
            want.backward()
            lp = base.clone().requires_grad_(True)
            args = (lp, old, ref, adv, mask, 0.2, beta)
            got = _run(name, fn, args)
            got = got[0] if isinstance(got, tuple) else got
            if not isinstance(got, torch.Tensor) or got.dim() != 0:
                _fail(name, args, got, want, "return the loss as a 0-dim tensor (then .backward() works)")
            wrong = [(lambda *a: R.grpo_loss(*a[:5], 10.0, a[6])[0], "clip the ratio to [1 - eps, 1 + eps] and take the min of the clipped and unclipped terms"),
                     (lambda lp_, o, r, a, m, e, b: R.grpo_loss(lp_, o, r, a, torch.ones_like(m), e, b)[0], "average over the tokens where mask == 1 only"),
                     (lambda lp_, o, r, a, m, e, b: R.grpo_loss(lp_, o, r, a, m, e, 0.0)[0], "add beta * k3, k3 = exp(d) - d - 1 with d = ref_logp - logp")]
            if not torch.allclose(got.detach(), want.detach(), atol=1e-5):
                hint = next((h for w, h in wrong if torch.allclose(w(*args).detach(), got.detach(), atol=1e-5)), "")
                _fail(name, args, got, want, hint)
            if not got.requires_grad:
                raise CheckFailed(f"{name}: the loss has no gradient with respect to logp (did you .detach() or use .item()?)")
            got.backward()
            if lp.grad is None or not torch.allclose(lp.grad, want_lp.grad, atol=1e-5):
                raise CheckFailed(f"{name}{_inputs(args, None)}\n  the loss value is right, but d loss / d logp = "
                                  f"{_short(lp.grad)}\n  expected {_short(want_lp.grad)}\n  hint: the clipped term must be "
                                  "clamp(ratio) * A with ratio computed from logp (no gradient where the clip binds); old_logp and ref_logp are constants")
            n += 1
        return n
    return _report(name, body)


# ------------------------------------------------------------------------- notebook 05: evaluation
def check_recall_at(fn) -> bool:
    """fn(ranked, pos, ks) -> {"R@k": hit rate}: mean over queries of 1[any positive in the top k]."""
    name = "recall_at"

    def body():
        rng = random.Random(10)
        cases = [([[3, 1, 2]], [[1]], (1, 2)), ([[3, 1, 2], [5, 6, 7]], [[3, 9], [7]], (1, 3)),
                 ([[0, 1, 2, 3]], [[1, 2]], (1, 2, 4)), ([[4, 5]], [[6]], (1, 5, 10))]
        for _ in range(40):
            Q, n = rng.randint(1, 6), rng.randint(3, 12)
            ranked = [rng.sample(range(20), n) for _ in range(Q)]
            pos = [rng.sample(range(20), rng.randint(1, 3)) for _ in range(Q)]
            cases.append((ranked, pos, (1, 5, 10)))
        for args in cases:
            want, got = R.recall_at(*args), _run(name, fn, args)
            if not isinstance(got, dict) or set(got) != set(want) or any(
                    not math.isclose(float(got[k]), want[k], abs_tol=1e-9) for k in want):
                _fail(name, args, got, want, "a hit rate: 1 for a query when ANY of its positives is in its top k, "
                      "0 otherwise; keys 'R@1', 'R@5', ...")
        return len(cases)
    return _report(name, body)


CHECKS = {name: globals()[f"check_{name}"] for name in REFERENCE}
