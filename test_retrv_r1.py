"""Tests for retrv_r1.py: CPU only, fixed seeds, fast. Run: pytest -q test_retrv_r1.py"""
import dataclasses
import json
import math
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retrv_r1 as R

ROOT = Path(__file__).resolve().parent


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
    cfg = R.make_config("smoke", data_root=str(root), n_train=6, n_val=4, n_test=4, n_hard_neg=7,
                        vision_layers=1, text_layers=2)
    torch.manual_seed(0)
    bb = R.new_tiny_backbone(cfg).eval()
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
def test_argparse_is_generated_from_every_config_field():
    p = R.build_argparser()
    flags = {a.dest for a in p._actions}
    assert {f.name for f in R.dataclasses.fields(R.Config)} <= flags
    cmd, cfg = R.config_from_args(["train", "--preset", "smoke", "--warmup-steps", "7", "--no-deterministic"])
    assert cmd == "train" and cfg.warmup_steps == 7 and cfg.deterministic is False and cfg.run_dir == "runs/smoke"


def test_cli_starts_from_the_runs_own_config_and_flags_given_override_it(tmp_path):
    run = tmp_path / "al"
    made = R.make_config("aligned", run_dir=str(run), max_new=384, cot_restate=True, K=6)
    run.mkdir()
    R.save_config(made)
    for cmd in ("eval", "demo", "bench", "train"):  # no flags but the run dir: the run's own settings
        _, cfg = R.config_from_args([cmd, "--run-dir", str(run)], verbose=False)
        assert (cfg.preset, cfg.relation_format, cfg.max_new, cfg.cot_restate, cfg.K) == ("aligned", "aligned", 384, True, 6)
        assert cfg.split == "test" and cfg.stage == ""  # per-call fields are not the run's
    _, cfg = R.config_from_args(["eval", "--run-dir", str(run), "--max-new", "64", "--no-cot-restate", "--split", "val"],
                                verbose=False)
    assert (cfg.max_new, cfg.cot_restate, cfg.relation_format, cfg.split) == (64, False, "aligned", "val")
    _, cfg = R.config_from_args(["eval", "--preset", "aligned", "--run-dir", str(run)], verbose=False)
    assert cfg.max_new == 384  # naming the run's own preset changes nothing
    with pytest.raises(R.RetrvError, match="was made with --preset aligned, not smoke"):
        R.config_from_args(["eval", "--preset", "smoke", "--run-dir", str(run)], verbose=False)
    _, cfg = R.config_from_args(["data", "--run-dir", str(run)], verbose=False)
    assert cfg.max_new == 128 and cfg.relation_format == "sentence"  # `data` only writes a world
    _, cfg = R.config_from_args(["eval", "--run-dir", str(tmp_path / "fresh")], verbose=False)
    assert cfg.max_new == 128 and cfg.preset == "tiny"  # no config.json: the preset's defaults


def test_a_runs_config_json_that_is_old_or_bad_gets_a_clear_answer(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    f = run / "config.json"
    f.write_text(json.dumps({"world": "tinycube", "neg_structure": "cube", "retired_field": 3}))  # older version
    _, cfg = R.config_from_args(["eval", "--run-dir", str(run)], verbose=False)
    assert cfg.neg_structure == "cube" and cfg.data_root == "data/synthetic-tinycube"
    # a field whose default changed since: an old run keeps the value it was made with
    assert cfg.ret_order == "image_text" and R.make_config("smoke").ret_order == "text_image"
    _, cfg = R.config_from_args(["eval", "--run-dir", str(run), "--ret-order", "text_image"], verbose=False)
    assert cfg.ret_order == "text_image"  # a flag still wins
    with pytest.raises(R.RetrvError, match="ret_order='image_text' \\(checkpoint\\)"):
        R.check_compatible({"ret_dim": cfg.ret_dim}, cfg, "old/retriever", keys=R.RET_FIELDS)  # from before the field
    R.check_compatible({"ret_dim": cfg.ret_dim}, cfg, "old/warmup")  # a warm-up serves any phi
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
    """The same bytes in every file again, whether the (split, task) parts ran side by side (the fixture:
    --threads 0, one process per core) or one after another in this process (--threads 1)."""
    cfg, root = world
    again = R.generate_world(dataclasses.replace(cfg, threads=1), tmp_path / "again", verbose=False)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (root / f).read_bytes() == (again / f).read_bytes(), f
    assert (root / "mbeir_images").exists() and (root / "qrels" / "test").exists()
    assert any(f.suffix == ".png" for f in files)


def test_hard_negatives_differ_by_one_change():
    rng = random.Random(0)
    for task in (0, 3, 4, 7):
        for _ in range(20):
            g = R.make_group(task, rng, 15)
            target = g["query"]["target"]
            assert R.describe_relation(target, g["pos"]["scene"]) == "match ."
            assert len({R.canon(n["scene"]) for n in g["negs"]}) == 15
            for n in g["negs"]:
                rel = R.describe_relation(target, n["scene"])
                assert rel.startswith("differs") and "many changes" not in rel, rel


def test_edit_source_is_a_hard_negative():
    g = R.make_group(7, random.Random(3), 15)
    assert R.canon(g["query"]["scene"]) in {R.canon(n["scene"]) for n in g["negs"]}


def _n_changes(a, b) -> int:
    """Attribute changes between two scenes of the same objects (objects matched by base order)."""
    return sum(x != y for oa, ob in zip(a, b) for x, y in zip(oa, ob))


def test_cube_world_has_no_hub_and_its_edit_is_one_change():
    rng = random.Random(0)
    for task in (0, 3, 4, 7):
        for _ in range(10):
            g = R.make_group(task, rng, 15, "cube")
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
    # the star world: the target is one change from all 15, each negative from fewer
    g = R.make_group(0, random.Random(1), 15)
    scenes = [g["pos"]["scene"]] + [n["scene"] for n in g["negs"]]
    one = lambda a, b: (r := R.describe_relation(a, b)).startswith("differs") and "many" not in r
    degree = [sum(one(a, b) for b in scenes if b is not a) for a in scenes]
    assert degree[0] == 15 and max(degree[1:]) < 15
    with pytest.raises(R.RetrvError, match="neg-structure"):
        R.make_group(0, random.Random(1), 15, "ring")


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


def test_caption_order_shape_is_another_world(tmp_path):
    """--caption-order shape writes 'circle red large top left': the same objects, shape first; it is
    its own world (data root and signature), and every stage sets the order from its config."""
    scene = [("star", "blue", "small", 4), ("circle", "red", "large", 0)]
    attr, shape = R.make_config("smoke"), R.make_config("smoke", caption_order="shape", n_train=2, n_val=2,
                                                        n_test=2, n_hard_neg=3)
    assert attr.data_root != shape.data_root
    old = tmp_path / "old"  # a world written before the option existed: no caption_order in world.json
    old.mkdir()
    sig = R.world_signature(attr)
    del sig["caption_order"]
    (old / "world.json").write_text(json.dumps(sig))
    R.ensure_world(R.make_config("smoke", data_root=str(old)), verbose=False)  # accepted: absent = the default
    try:
        R.use_caption_order(shape)
        assert R.caption(scene) == "circle red large top left , star blue small center ."
        root = R.generate_world(shape, tmp_path / "w", verbose=False)
        ts = R.load_split(root, "test", [0])[0]
        assert ts.queries[0]["query_txt"].split()[0] in R.SHAPES
        with pytest.raises(R.RetrvError, match="other parameters"):
            R.ensure_world(R.make_config("smoke", data_root=str(root), n_train=2, n_val=2, n_test=2, n_hard_neg=3),
                           verbose=False)
    finally:
        R.use_caption_order(attr)
    assert R.caption(scene) == "a large red circle top left , a small blue star center ."
    with pytest.raises(R.RetrvError, match="caption-order"):
        R.make_config("smoke", caption_order="colour")


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

    cfg = R.make_config("smoke", vision_layers=1, text_layers=1)
    tok = R.build_tiny_tokenizer()
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
    mcfg = R.tiny_idefics3_config(cfg, foreign)
    model = Idefics3ForConditionalGeneration(mcfg)
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    foreign.save_pretrained(d)
    ip = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 64},
                                max_image_size={"longest_edge": 64})
    Idefics3Processor(image_processor=ip, tokenizer=foreign, image_seq_len=16).save_pretrained(d)
    bb = R.load_backbone(str(d))
    assert bb.pretrained
    assert len(bb.tok) >= len(vocab) + len(R.SPECIAL_TOKENS)
    assert bb.model.get_input_embeddings().weight.shape[0] >= len(bb.tok)
    for s in R.SPECIAL_TOKENS:
        assert bb.tid(s) not in (None, bb.tok.unk_token_id)
    vis = bb.embed_image(torch.randint(0, 255, (2, 3, 40, 50), dtype=torch.uint8))
    assert vis.shape == (2, 16, cfg.text_hidden)


def test_corrupt_backbone_is_a_clear_error(tmp_path):
    bb = R.new_tiny_backbone(R.make_config("smoke", vision_layers=1, text_layers=1))
    bb.save(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(R.RetrvError, match="unreadable|cannot load"):
        R.load_backbone(str(tmp_path))


# ---------------------------------------------------------------- 6-7. ICM, prompt, sampler, scorer
def test_icm_shapes_and_token_counts(small):
    cfg, theta, emb, prompts = small
    K = prompts[0].K
    full_ctx = sum(f.shape[0] for f in prompts[0].full)
    # prompt = instruction + query + "candidates :" + K * (index word + 2 ICM tokens) + <think>
    assert prompts[0].embeds.shape[0] < full_ctx
    T = torch.randn(3, 5, theta.bb.D)
    z = theta.icm(T, torch.ones(3, 5), torch.randn(3, 7, theta.bb.D), torch.ones(3, 7))
    assert z["t_con"].shape == (3, theta.bb.D) and z["t_rel"].shape == (3, theta.bb.D)
    assert z["attn_con"].shape == (3, cfg.icm_heads, 5)
    assert torch.allclose(z["attn_con"].sum(-1), torch.ones(3, cfg.icm_heads))


def test_retriever_pooling_reads_the_last_real_token_of_a_right_padded_row(small):
    """ret_pool: 'last' is the state of each row's last real token (padding ignored), 'mean_last' the
    sum of the masked mean and that state; an unknown pooling is a clear error."""
    cfg, theta, emb, prompts = small
    bb = theta.bb
    torch.manual_seed(1)
    T = torch.randn(2, 6, bb.D)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    enc = {p: R.Retriever(bb, 8, p).eval() for p in R.RET_POOLS}
    for r in enc.values():
        r.proj.weight.data.copy_(enc["mean"].proj.weight.data)
    with torch.no_grad():
        h, _, _ = bb.lm(T, attention_mask=mask, logits=False)
        last = torch.stack([h[0, 5], h[1, 2]])
        mean = R.masked_mean(h, mask[..., None], dim=1)
        W = enc["mean"].proj.weight
        for p, pooled in (("last", last), ("mean", mean), ("mean_last", mean + last)):
            assert torch.allclose(enc[p].encode_tokens(T, mask), torch.nn.functional.normalize(pooled @ W.T, dim=-1), atol=1e-5), p
        # what follows the last real token of row 1 (padding) cannot change its 'last' embedding
        T2 = T.clone()
        T2[1, 3:] = torch.randn(3, bb.D)
        assert torch.allclose(enc["last"].encode_tokens(T, mask)[1], enc["last"].encode_tokens(T2, mask)[1], atol=1e-5)
    with pytest.raises(R.RetrvError, match="--ret-pool"):
        R.Retriever(bb, 8, "max")


def test_retriever_text_first_order_puts_a_composed_querys_words_before_its_image(small, world):
    """ret_order text_image: an item with image and text reads words then visual tokens (so the image's
    states can attend to the edit text); items with one modality are unchanged; a bad order is an error."""
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
    r = R.Retriever(theta.bb, 8, "mean", "text_image").eval()
    with torch.no_grad():
        assert torch.allclose(r.encode(emb, [q]), r.encode_tokens(T1[:1, : m1[0].sum()], m1[:1, : m1[0].sum()]), atol=1e-5)
    with pytest.raises(R.RetrvError, match="--ret-order"):
        R.Retriever(theta.bb, 8, "mean", "sideways")
    with pytest.raises(R.RetrvError, match="--ret-order"):
        R.make_config("smoke", ret_order="sideways")


def test_length_buckets_give_the_same_loss_and_embeddings_with_less_padding(small, world):
    """--buckets n: warm-up rows and phi's items are padded per length bucket. The token-mean LM loss, its
    gradient and phi's embeddings (in item order) equal the one padded batch's up to float rounding."""
    cfg, theta, emb, _ = small
    _, root = world
    assert R.length_buckets([5, 1, 3], 1) == [[0, 1, 2]]  # one group: the original order
    groups = R.length_buckets([5, 1, 3, 9, 2], 2)
    assert sorted(i for g in groups for i in g) == list(range(5)) and groups == [[1, 4], [2, 0, 3]]
    assert R.length_buckets([4, 2], 9) == [[1], [0]]  # never more groups than rows
    bb = theta.bb
    rows, _, _ = R.warmup_sequences(bb, random.Random(3), 12, 0.5, 64)
    losses, grads = [], []
    for n in (1, 4):
        bb.zero_grad(set_to_none=True)
        loss, right, count = R.bucketed_lm_loss(bb, rows, n)
        loss.backward(retain_graph=True)
        losses.append((loss.item(), right, count))
        grads.append(bb.text.layers[0].mlp.down_proj.weight.grad.clone())
    bb.zero_grad(set_to_none=True)
    x, mask, labels, _ = R.warmup_batch(bb, random.Random(3), 12, 0.5, 64)
    ref, pred, valid = R.lm_loss(bb, x, mask, labels)
    assert losses[0][2] == losses[1][2] == int(valid.sum()) and losses[0][1] == losses[1][1]
    assert abs(losses[0][0] - ref.item()) < 1e-5 and abs(losses[1][0] - ref.item()) < 1e-5
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    items = [R.query_item(ts, i) for ts in R.load_split(root, "val") for i in range(3)]  # text, image, image+text
    r1 = R.Retriever(bb, 8, "mean", "text_image", buckets=1).eval()
    r4 = R.Retriever(bb, 8, "mean", "text_image", buckets=4).eval()
    r4.proj.weight.data.copy_(r1.proj.weight.data)
    with torch.no_grad():
        assert torch.allclose(r1.encode(emb, items), r4.encode(emb, items), atol=1e-5)
    assert len({len(t) for t in emb.sequences(items)}) > 1  # the buckets had something to sort


def test_phi_trains_the_lm_with_the_vision_side_frozen_unless_asked(world, tmp_path):
    """Default (--no-ret-vision): phi's InfoNCE leaves the vision encoder and connector as the warm-up
    made them and trains the LM; --ret-vision trains them too. A run from before the field keeps True."""
    _, root = world
    cfg = R.make_config("smoke", data_root=str(root), run_dir=str(tmp_path / "run"), ret_steps=3, ret_batch=4,
                        warmup_steps=2, warmup_batch=4, ckpt_every=0)
    R.warmup(cfg, verbose=False)
    base = R.base_backbone(cfg)
    ret, _ = R.fit_retriever(cfg, "retriever", lambda qid: True, random.Random(0), verbose=False)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert same(ret.bb.vision, base.vision) and same(ret.bb.connector, base.connector)
    assert not same(ret.bb.text, base.text)
    cfg.ret_vision, cfg.run_dir = True, str(tmp_path / "run2")
    shutil.copytree(tmp_path / "run" / "warmup", tmp_path / "run2" / "warmup")
    ret2, _ = R.fit_retriever(cfg, "retriever", lambda qid: True, random.Random(0), verbose=False)
    assert not same(ret2.bb.vision, base.vision)
    assert R.LEGACY_DEFAULTS["ret_vision"] is True and "ret_vision" in R.RET_FIELDS


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


def test_shape256m_preset_has_smolvlm_256m_language_model_and_64_visual_tokens():
    """The bench-only preset: SmolLM2-135M's shape and 64 tokens per image (config only, no weights)."""
    cfg = R.make_config("shape256m")
    c = R.tiny_idefics3_config(cfg, R.build_tiny_tokenizer())
    t, v = c.text_config, c.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size) \
        == (576, 30, 9, 3, 1536)
    assert (v.image_size // v.patch_size) ** 2 // c.scale_factor ** 2 == 64
    assert v.hidden_size % v.num_attention_heads == 0 and cfg.bench_parts == "icm"
    assert R.make_config("tiny").bench_parts == "sampler,icm,steps"


def test_bench_rejects_unknown_parts_before_any_work(tmp_path):
    cfg = R.make_config("smoke", run_dir=str(tmp_path / "run"), bench_parts="icm,speed")
    with pytest.raises(R.RetrvError, match="bench-parts"):
        R.bench(cfg, verbose=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("ks", ["8,x", "0,8", " , "])
def test_bench_rejects_bad_rerank_depths_before_any_work(tmp_path, ks):
    cfg = R.make_config("smoke", run_dir=str(tmp_path / "run"), bench_ks=ks)
    with pytest.raises(R.RetrvError, match="bench-ks"):
        R.bench(cfg, verbose=False)
    assert not (tmp_path / "run").exists()


def test_bench_writes_its_json_and_markdown(world, tmp_path):
    cfg, root = world
    cfg = dataclasses.replace(cfg, data_root=str(root), run_dir=str(tmp_path / "b"), bench_parts="icm",
                              bench_ks="2,4", rerank_batch=2, bench_smoke=False, vision_layers=1, text_layers=1)
    res = R.bench(cfg, verbose=False)  # no trained theta in the run dir: an untrained one (speed only)
    md = (tmp_path / "b" / "bench.md").read_text()
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["theta_stage"] == "untrained"
    assert md.strip() == R.format_bench(res) and "| 4 |" in md and "| 2 |" in md
    for K in ("2", "4"):  # four context tokens per candidate fewer is the ICM's whole point
        assert res["context_tokens"]["icm"][K] < res["context_tokens"]["full"][K]


def test_format_bench_leaves_out_parts_not_measured():
    r = {"device": "cpu", "theta_stage": "untrained", "smoke_train_s": None, "sampler_tok_s": 100.0,
         "generate_tok_s": 50.0, "naive_tok_s": 10.0, "sampler_vs_generate": 2.0, "sampler_vs_naive": 10.0}
    out = R.format_bench(r)
    assert "2.00x generate" in out and "SFT step" not in out and "| K |" not in out


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
                        n_hard_neg=7, vision_layers=1, text_layers=2, align_steps=3, align_batch=4)
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
    # candidates with a color / size change are eliminated without inspection
    for k, s in enumerate(scenes, 1):
        kind = R.relation_kind(R.describe_relation(target, s))
        if kind in R.CLEAR_KINDS:
            assert k not in inspected
    # positive missing from the top-K: no correct trace exists
    assert R.cot_trace(target, scenes[:7], [8]) is None
    # a single plausible candidate: answer without inspection
    t1, ins1 = R.cot_trace(target, [g["pos"]["scene"]], [1])
    assert ins1 == [] and "<insp_s>" not in t1


def test_warmup_ideal_sequences_label_the_target_caption_and_keep_the_default_stream(small):
    cfg, theta, emb, _ = small
    bb = theta.bb
    # an "ideal" sequence: the query's tokens unlabelled, then "ideal :" and the target's caption labelled
    for seed in range(8):
        rng = random.Random(seed)
        segs, imgs = R.warmup_example(bb, rng, "ideal", 64)
        labelled = [s for s in segs if s[0] == "ids" and s[2]]
        assert len(labelled) == 1 and bb.tok.decode(labelled[0][1][:-1]).startswith("a ")
        assert labelled[0][1][-1] == bb.tid("<eos>")
        assert [s for s in segs if s[0] == "ids"][-2][1] == bb.ids("ideal :")
        assert len(imgs) == sum(s[0] == "img" for s in segs)
    # with ideal_frac 0 the kinds (and the random stream) are those of the caption/relation mix
    a, b = random.Random(3), random.Random(3)
    kinds = [R.warmup_kind(a, 0.5) for _ in range(200)]
    assert kinds == [("relation" if b.random() < 0.5 else "caption") for _ in range(200)]
    assert a.random() == b.random()
    mix = [R.warmup_kind(random.Random(i), 0.5, 0.25) for i in range(400)]
    assert 0.15 < mix.count("ideal") / 400 < 0.35 and "caption" in mix and "relation" in mix


def test_warmup_copy_sequences_are_words_only_copies_of_a_text_query(small):
    """--warmup-copy-steps: a copy sequence is a task-0 text query (its target's caption), then "ideal :"
    and the same caption, labelled; a copy batch holds no image and labels only the copy."""
    cfg, theta, emb, _ = small
    bb = theta.bb
    for seed in range(8):
        segs, imgs = R.warmup_example(bb, random.Random(seed), "copy", 64)
        assert imgs == [] and all(s[0] == "ids" for s in segs)
        (q, _), (ideal, _), (copy, lab) = [(s[1], s[2]) for s in segs]
        assert ideal == bb.ids("ideal :") and lab and copy == q + [bb.tid("<eos>")]
        assert not segs[0][2] and not segs[1][2]
    x, mask, labels, (vis, scenes) = R.warmup_batch(bb, random.Random(0), 6, 0.5, 64, kind="copy")
    assert vis is None and scenes == []
    n_lab = (labels != -100).sum(1)
    assert all(n == len(bb.ids(R.caption(s))) + 1 for n, s in zip(n_lab.tolist(), [
        R.make_group(0, r, 3)["query"]["target"] for r in [random.Random(0)] for _ in range(6)]))
    # --warmup-copy-check-frac: some of the copy phase's sequences are the words-only check instead
    check_segs, _ = R.warmup_example(bb, random.Random(9), "check", 64)
    x2, _, labels2, (vis2, _) = R.warmup_batch(bb, random.Random(5), 40, 0.5, 64, kind="copy", copy_check_frac=0.5)
    verdicts = {bb.tid("match"), bb.tid("differs")}  # a check labels its relation, which opens with the verdict
    n_check = sum(bool(verdicts & set(row.tolist())) for row in labels2)
    assert vis2 is None and 10 <= n_check <= 30 and len(check_segs) == 6
    ca = R.caption_accuracy(bb, n=8, kind="copy")  # the warm-up's held-out copy check
    assert 0 <= ca["shape_acc"] <= 1 and 0 <= ca["token_acc"] <= 1 and ca["position_acc"] <= 1
    with pytest.raises(R.RetrvError, match="--warmup-copy-steps must be between 0 and --warmup-steps 60"):
        R.make_config("smoke", warmup_copy_steps=61)
    with pytest.raises(R.RetrvError, match="--warmup-copy-check-frac is a share, between 0 and 1"):
        R.make_config("smoke", warmup_copy_check_frac=1.5)


def test_warmup_match_frac_sets_the_share_of_matching_relations_and_match_accuracy_reads_the_first_word(small):
    cfg, theta, emb, _ = small
    bb = theta.bb
    first = lambda segs: [s for s in segs if s[0] == "ids" and s[2]][0][1][0]
    for frac, lo, hi in ((0.0, 0.15, 0.35), (0.5, 0.4, 0.6), (1.0, 1.0, 1.0)):
        rng = random.Random(11)
        words = [first(R.warmup_example(bb, rng, "relation", 64, frac)[0]) for _ in range(300)]
        assert set(words) <= {bb.tid("match"), bb.tid("differs")}
        assert lo <= words.count(bb.tid("match")) / 300 <= hi
    # the default (frac 0) draws exactly the stream it always drew: one choice over [pos] + negs
    a, b = random.Random(4), random.Random(4)
    R.warmup_example(bb, a, "relation", 64)
    R.warmup_example(bb, b, "relation", 64, 0.0)
    assert a.random() == b.random()
    m = R.match_accuracy(bb, n=32, seed=1)
    assert set(m) == {"on_match", "on_differs", "balanced"}
    assert 0.0 <= m["on_match"] <= 1.0 and 0.0 <= m["on_differs"] <= 1.0
    assert m["balanced"] == pytest.approx((m["on_match"] + m["on_differs"]) / 2)
    mc = R.match_accuracy(bb, n=16, seed=1, kind="check")  # the same decision on words only
    assert set(mc) == {"on_match", "on_differs", "balanced"} and 0.0 <= mc["balanced"] <= 1.0


def test_warmup_relations_come_from_the_worlds_neg_structure(small):
    """A cube world's warm-up must see its multi-change negatives ('differs : many changes .'), which the
    star world's never has (and the star world's swaps, which the cube never makes)."""
    cfg, theta, emb, _ = small
    bb = theta.bb
    text = lambda segs: bb.tok.decode([t for s in segs if s[0] == "ids" and s[2] for t in s[1]])
    kinds = {}
    for structure in ("star", "cube"):
        rng = random.Random(5)
        rels = [text(R.warmup_example(bb, rng, "relation", 64, structure=structure)[0]) for _ in range(200)]
        kinds[structure] = {R.relation_kind(r) for r in rels}
    assert "many" in kinds["cube"] and "swapped" not in kinds["cube"]
    assert "many" not in kinds["star"] and "swapped" in kinds["star"]


def test_object_check_names_each_changed_object_and_ends_in_the_verdict():
    rng = random.Random(9)
    for task in (0, 3, 4, 7):
        g = R.make_group(task, rng, 15)
        target = g["query"]["target"]
        assert R.describe_relation(target, g["pos"]["scene"], "objects").endswith(" . match .")
        assert "differs" not in R.object_check(target, target)
        for n in g["negs"]:
            kind = R.relation_kind(R.describe_relation(target, n["scene"]))
            check = R.object_check(target, n["scene"])
            assert check.endswith(" . differs .") and "match" not in check.split()
            per_obj = check[: -len(" . differs .")].split(" , ")
            assert len(per_obj) == len(n["scene"])  # one check per candidate object
            changed = [c for c in per_obj if not c.endswith(" same")]
            if kind in ("color", "size", "position", "shape"):
                assert len(changed) == 1 and changed[0].endswith(" " + kind)
            elif kind == "swapped":
                assert len(changed) == 2 and all(c.endswith(" position") for c in changed)
    n = g["negs"][0]["scene"]
    assert R.describe_relation(target, n, "shows") == f"shows : {R.caption(n)} {R.object_check(target, n)}"
    with pytest.raises(R.RetrvError, match="relation-format"):
        R.describe_relation(target, target, "prose")


def test_aligned_diagnostics_tell_reading_from_copying():
    """Phase 3 step by step: a theta that reads the candidate but writes the ideal's value as a copy of
    it must show read 1.0, looked_up 0.0, copied 1.0; the honest check shows looked_up 1.0."""
    target = [("circle", "red", "large", 0), ("star", "blue", "small", 8)]
    neg = [("circle", "green", "large", 0), ("star", "blue", "small", 8)]  # one colour differs
    it = R.RerankItem(query={}, cands=[{}, {}], rows=[0, 1], positives=[2], target=target, scenes=[neg, target],
                      task="t", qid="q")
    honest = R.aligned_check(target, neg)
    copying = honest.replace("green red different", "green green same").replace("differs .", "match .")
    assert R.parse_aligned_check(honest)["objects"]["circle"][0] == ("green", "red", "different")
    assert R.parse_aligned_check("no check here") is None
    for text, looked, copied in ((honest, 1.0, 0.0), (copying, 0.0, 1.0)):
        res = [dict(qid="q", task="t", text=f"<think> <insp_s> 1 <insp_e> {text} </think> <answer> 1 </answer>",
                    inspected=[1], positives=[2], pick=1)]
        d = R.aligned_diagnostics([it], res)
        assert d["n_differing"] == 1 and d["read"] == 1.0 and d["consistent"] == 1.0
        assert d["looked_up"] == looked and d["copied"] == copied
    assert d["n_own"] == 0  # no ideal written: nothing to score against theta's own ideal
    # Against the ideal theta wrote itself: a wrong ideal that holds the candidate's value makes the
    # "copy" a faithful lookup; with the right ideal, copying is a failed lookup.
    for ideal_color, text, want in (("green", copying, dict(own_is_target=0.0, own_is_candidate=1.0, followed_own=1.0,
                                                              looked_up_own_right=None)),
                                    ("red", copying, dict(own_is_target=1.0, own_is_candidate=0.0, followed_own=0.0,
                                                          looked_up_own_right=0.0)),
                                    ("red", honest, dict(own_is_target=1.0, followed_own=1.0, looked_up_own_right=1.0))):
        ideal = f"a large {ideal_color} circle top left , a small blue star bottom right ."
        assert R.parse_caption(ideal) == {"circle": (ideal_color, "large", "top left"), "star": ("blue", "small", "bottom right")}
        res[0]["text"] = f"<think> ideal : {ideal} keep : 1 2 . <insp_s> 1 <insp_e> {text} </think> <answer> 1 </answer>"
        d = R.aligned_diagnostics([it], res)
        assert d["n_own"] == 1 and {k: d[k] for k in want} == want
    assert R.parse_caption("a large red circle top left , a blue star , banana .") == {"circle": ("red", "large", "top left")}
    res[0]["text"] = "<think> <insp_s> 1 <insp_e> differs : the circle has color green not red . </think>"
    assert R.aligned_diagnostics([it], res) is None  # not the aligned format


def test_scramble_keeps_shapes_and_changes_the_scene():
    rng = random.Random(5)
    for _ in range(50):
        s = R.random_scene(rng)
        t = R.scramble(s, rng)
        assert sorted(o[0] for o in t) == sorted(o[0] for o in s) and R.canon(t) != R.canon(s)
        assert len({o[3] for o in t}) == len(t)  # one object per cell


def test_aligned_check_puts_each_pair_next_to_its_comparison():
    rng = random.Random(13)
    words = set(R.build_tiny_tokenizer().get_vocab())
    for task in (0, 3, 4, 7):
        g = R.make_group(task, rng, 15)
        target = g["query"]["target"]
        ok = R.describe_relation(target, g["pos"]["scene"], "aligned")
        assert ok.endswith(" . match .") and "different" not in ok.split() and set(ok.split()) <= words
        for n in g["negs"]:
            kind = R.relation_kind(R.describe_relation(target, n["scene"]))
            check = R.aligned_check(target, n["scene"])
            assert check.endswith(" . differs .") and "different" in check.split() and set(check.split()) <= words
            objs = check[: -len(" . differs .")].split(" ; ")
            assert len(objs) == len(n["scene"])  # one entry per candidate object
            for o in objs:
                shape, rest = o.split(" : ")
                if rest == "none different":  # the ideal has no object of that shape
                    assert shape not in {t[0] for t in target}
                    continue
                for pair in rest.split(" , "):  # "a b same" iff a == b (positions may be two words)
                    *ab, verdict = pair.split()
                    half = len(ab) // 2
                    assert verdict == ("same" if ab[:half] == ab[half:] else "different")
            if kind == "color":
                assert check.count("different") == 1


def test_shows_relations_in_the_warmup_write_the_ideal_first(small):
    cfg, theta, emb, _ = small
    bb = theta.bb
    for seed in range(6):
        segs, imgs = R.warmup_example(bb, random.Random(seed), "relation", 64, 0.0, "shows")
        texts = [bb.tok.decode(s[1]) for s in segs if s[0] == "ids"]
        labelled = [bb.tok.decode(s[1]) for s in segs if s[0] == "ids" and s[2]]
        assert texts.index("ideal :") < texts.index("candidate :") < texts.index("relation :")
        assert len(labelled) == 2 and labelled[1].startswith("shows : a ")  # the ideal, then the relation
        assert labelled[0] == texts[texts.index("ideal :") + 1]
    segs, _ = R.warmup_example(bb, random.Random(0), "relation", 64, 0.0, "aligned")  # aligned: the ideal first too
    texts = [bb.tok.decode(s[1]) for s in segs if s[0] == "ids"]
    assert texts.index("ideal :") < texts.index("candidate :") < texts.index("relation :")


def test_replay_in_the_trace_layout_wraps_the_candidate_like_a_splice(small):
    bb = small[1].bb
    for seed in range(4):
        plain, im_p = R.warmup_example(bb, random.Random(seed), "relation", 64, 0.0, "aligned")
        trace, im_t = R.warmup_example(bb, random.Random(seed), "relation", 64, 0.0, "aligned", wrap="trace")
        tp = [bb.tok.decode(s[1]) for s in plain if s[0] == "ids"]
        tt = [bb.tok.decode(s[1]) for s in trace if s[0] == "ids"]
        assert "candidate :" in tp and "relation :" in tp and "candidate :" not in tt
        i = next(j for j, t in enumerate(tt) if t.startswith("<insp_s>"))
        assert re.fullmatch(r"<insp_s> [1-8] <insp_e> <full>", tt[i]) and "</full> relation :" in tt[i + 1:]
        assert [s[1] for s in plain if s[0] == "ids" and s[2]] == [s[1] for s in trace if s[0] == "ids" and s[2]]
        assert [sc for sc, _ in im_p] == [sc for sc, _ in im_t]  # the same scenes, only the wrapping changes
    ks = set()
    for seed in range(40):
        segs, _ = R.warmup_example(bb, random.Random(seed), "relation", 64, 0.0, "aligned", wrap="trace", K=3)
        ks |= {bb.tok.decode(s[1]).split()[1] for s in segs if s[0] == "ids" and bb.tok.decode(s[1]).startswith("<insp_s>")}
    assert ks == {"1", "2", "3"}  # k is drawn from the run's 1..K
    with pytest.raises(R.RetrvError, match="sft-replay-wrap must be plain or trace"):
        R.warmup_example(bb, random.Random(0), "relation", 64, 0.0, "aligned", wrap="bogus")


def test_cot_trace_with_object_checks_writes_them_after_each_inspection():
    rng = random.Random(5)
    g = R.make_group(4, rng, 15)
    target = g["query"]["target"]
    scenes = [n["scene"] for n in g["negs"][:7]] + [g["pos"]["scene"]]
    a, ins_a = R.cot_trace(target, scenes, [8])
    b, ins_b = R.cot_trace(target, scenes, [8], rel_format="objects")
    assert ins_a == ins_b  # the same teacher decisions; only phase 3's words change
    assert a.split("<insp_s>")[0] == b.split("<insp_s>")[0]
    assert R.format_reward(b, 8) == 1.0
    for k, seg in zip(ins_b, b.split("<insp_e>")[1:]):
        said = seg.split("<insp_s>")[0].split("</think>")[0].strip()
        assert said == R.object_check(target, scenes[k - 1])


def test_cot_restate_writes_the_ideal_before_each_inspection_and_the_check_after():
    rng = random.Random(5)
    g = R.make_group(4, rng, 15)
    target = g["query"]["target"]
    scenes = [n["scene"] for n in g["negs"][:7]] + [g["pos"]["scene"]]
    a, ins_a = R.cot_trace(target, scenes, [8], rel_format="aligned")
    b, ins_b = R.cot_trace(target, scenes, [8], rel_format="aligned", restate=True)
    assert ins_a == ins_b and len(ins_b) >= 2  # the same teacher decisions, two inspections or more
    assert R.format_reward(b, 8) == 1.0 and b.split("<insp_s>")[0] != a.split("<insp_s>")[0]
    restated = f"ideal : {R.caption(target)}"
    assert b.count(restated) == 1 + len(ins_b)  # phase 1, then once before every request
    for k, seg_a, seg_b in zip(ins_b, a.split("<insp_e>")[1:], b.split("<insp_e>")[1:]):
        assert seg_b.startswith(" relation : ")
        assert R.phase3_text(seg_b) == R.phase3_text(seg_a) == R.aligned_check(target, scenes[k - 1])
    assert R.parse_answer(b) == 8


def test_check_sequences_are_words_only_and_end_in_the_relation(small):
    cfg, theta, emb, _ = small
    bb = theta.bb
    for seed in range(6):
        segs, imgs = R.warmup_example(bb, random.Random(seed), "check", 64, 0.0, "objects")
        assert imgs == [] and all(s[0] == "ids" for s in segs)
        assert [s[2] for s in segs] == [False] * 5 + [True]
        texts = [bb.tok.decode(s[1]) for s in segs]
        assert texts[0] == "ideal :" and texts[2] == "candidate :" and texts[4] == "relation :"
        assert texts[5].replace(" <eos>", "").endswith(("match .", "differs ."))
    x, mask, labels, (vis, scenes) = R.warmup_batch(bb, random.Random(1), 4, 0.5, 64, check_frac=1.0)
    assert vis is None and scenes == [] and x.shape[0] == 4  # a batch of words only
    mix = [R.warmup_kind(random.Random(i), 0.5, 0.0, 0.25) for i in range(400)]
    assert 0.15 < mix.count("check") / 400 < 0.35


def test_attribute_probe_targets_and_loss():
    scene = [("circle", "red", "large", 0), ("star", "blue", "small", 4)]
    probe = R.AttributeProbe(n_img=4, D=8)
    t = probe.targets([scene], "cpu")
    assert t.shape == (1, 9, 3)
    assert t[0, 0].tolist() == [R.SHAPES.index("circle") + 1, R.COLORS.index("red") + 1, R.SIZES.index("large") + 1]
    assert t[0, 4].tolist() == [R.SHAPES.index("star") + 1, R.COLORS.index("blue") + 1, R.SIZES.index("small") + 1]
    assert t[0, [1, 2, 3, 5, 6, 7, 8]].abs().sum() == 0  # empty cells are class 0
    vis = torch.randn(2, 4, 8, requires_grad=True)
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
    n = len(ref.split())
    assert d["ideal_word_acc"]["0"] == pytest.approx((1 + (n - 1) / n + 1) / 3)
    assert d["positive_kept"] == 1.0 and d["n_with_keep"] == 2  # c has no positive: not counted
    assert d["answered_inspected_positive"] == 0.5 and d["n_inspected_positive"] == 2
    # per inspection: a's candidate 1 (negative) got "x", a's 2 (positive) "match", b's 3 (positive) "x"
    assert d["match_on_positive"] == 0.5 and d["match_on_negative"] == 0.0
    assert d["n_inspections"] == {"positive": 2, "negative": 1}
    assert "a negative 0.00" in R.format_diagnostics(d)
    assert d["pick_share"] == {"1": 1 / 3, "2": 1 / 3, "None": 1 / 3}


def test_permute_item_moves_candidates_positives_and_scenes_together():
    rng = random.Random(3)
    g = R.make_group(0, rng, 15)
    scenes = [g["pos"]["scene"]] + [n["scene"] for n in g["negs"][:7]]  # positive at 1 in phi's order
    cands = [{"txt": f"c{k}"} for k in range(8)]
    it = R.RerankItem({"txt": "q"}, cands, list(range(100, 110)), [1], g["query"]["target"], scenes, "0", "q0")
    seen = set()
    for seed in range(6):
        p = R.permute_item(it, random.Random(seed))
        assert sorted(c["txt"] for c in p.cands) == [c["txt"] for c in cands]
        assert len(p.positives) == 1 and p.cands[p.positives[0] - 1]["txt"] == "c0"
        assert p.rows[p.positives[0] - 1] == 100 and p.rows[8:] == [108, 109]
        assert [p.rows[n] - 100 for n in range(8)] == [int(c["txt"][1:]) for c in p.cands]
        text, _ = R.cot_trace(p.target, p.scenes, p.positives)
        assert text.endswith(f"<answer> {p.positives[0]} </answer>")
        seen.add(p.positives[0])
    assert len(seen) > 1  # the positive does not stay at one position
    cfg = R.make_config("smoke")
    assert R.train_views(cfg, [it], random.Random(0)) == [it]  # phi's order by default
    with pytest.raises(R.RetrvError, match="cand-order"):
        R.train_views(R.make_config("smoke", cand_order="random"), [it], random.Random(0))


def test_ret_holdout_splits_train_queries_between_phi_and_theta():
    cfg = R.make_config("smoke", ret_holdout=0.5)
    qids = [f"10:{i}" for i in range(2000)]
    held = [q for q in qids if R.held_out(cfg, q)]
    assert 0.45 < len(held) / len(qids) < 0.55
    assert held == [q for q in qids if R.held_out(cfg, q)]  # a fixed hash, not a random draw
    items = [R.RerankItem({}, [], [], [1], None, [], "0", q) for q in qids[:50]]
    assert [it.qid for it in R.theta_train_items(cfg, items)] == [q for q in qids[:50] if R.held_out(cfg, q)]
    off = R.make_config("smoke")
    assert not any(R.held_out(off, q) for q in qids) and R.theta_train_items(off, items) == items


def test_ret_folds_rank_every_train_query_with_a_phi_that_never_saw_it(world, tmp_path, monkeypatch):
    cfg = _resume_cfg(world, tmp_path, ret_folds=2)
    trained_on = {}  # retriever name -> the qids its InfoNCE pairs came from
    fit = R.fit_retriever

    def spy(cfg, name, keep, rng, verbose=True):
        trained_on[name] = keep
        return fit(cfg, name, keep, rng, verbose)

    monkeypatch.setattr(R, "fit_retriever", spy)
    R.train(cfg, verbose=False)
    assert sorted(trained_on) == ["retriever", "retriever_fold0", "retriever_fold1"]
    items = R.rerank_items(cfg, "train", verbose=False)
    folds = [R.fold_of(cfg, it.qid) for it in items]
    assert set(folds) == {0, 1}
    for it, f in zip(items, folds):  # ranked by phi_f, which never trained on fold f; phi itself saw all
        assert not trained_on[f"retriever_fold{f}"](it.qid) and trained_on[f"retriever_fold{1 - f}"](it.qid)
        assert trained_on["retriever"](it.qid)
        assert len(it.cands) == cfg.K
    own = R.rerank_items(dataclasses.replace(cfg, ret_folds=0), "train", verbose=False)
    assert [it.qid for it in own] == [it.qid for it in items]
    assert any(a.rows != b.rows for a, b in zip(own, items))  # not phi's own top-K under another name
    assert not list(tmp_path.glob("*_partial"))  # finished folds leave no partial checkpoints
    splits = R.load_split(cfg.data_root, "train", R.parse_tasks(cfg.tasks))
    chunks, by_qid = R.test_sized_chunks(cfg, splits), {}
    for ts in splits:
        for q_rows, p_rows in chunks[ts.name]:
            by_qid.update({ts.queries[i]["qid"]: set(p_rows) for i in q_rows})
    assert all(set(it.rows) <= by_qid[it.qid] for it in items)  # ranked in its chunk's pool only
    shutil.rmtree(tmp_path / "retriever_fold1")  # a lost fold is redone on demand, to the same lists
    assert [it.rows for it in R.rerank_items(cfg, "train", verbose=False)] == [it.rows for it in items]
    with pytest.raises(R.RetrvError, match="--ret-holdout and --ret-folds"):
        R.train_retriever(dataclasses.replace(cfg, ret_holdout=0.5), verbose=False)
    st = json.loads((tmp_path / "retriever_fold0" / "state.json").read_text())
    del st["pool"]  # a fold ranked by an older version (in the whole train pool) is not reused silently
    (tmp_path / "retriever_fold0" / "state.json").write_text(json.dumps(st))
    with pytest.raises(R.RetrvError, match="whole train pool.*delete"):
        R.rerank_items(cfg, "train", verbose=False)


def test_sized_chunks_give_each_train_query_a_pool_the_size_of_test(world):
    cfg, root = world
    cfg = dataclasses.replace(cfg, data_root=str(root))
    train = R.load_split(root, "train", R.parse_tasks(cfg.tasks))
    test = {ts.task_id: len(ts.pool) for ts in R.load_split(root, "test", R.parse_tasks(cfg.tasks))}
    chunks = R.test_sized_chunks(cfg, train)
    for ts in train:
        ch = chunks[ts.name]
        assert len(ch) == round(len(ts.pool) / test[ts.task_id]) == 2  # 6 train queries, 4 test: 48 vs 32 rows
        assert sorted(i for q, _ in ch for i in q) == list(range(len(ts)))  # queries partitioned
        assert sorted(j for _, p in ch for j in p) == list(range(len(ts.pool)))  # pool partitioned
        for q_rows, p_rows in ch:
            assert all(j in p_rows for i in q_rows for j in ts.pos[i] + ts.neg[i])  # its own hard negatives stay
            assert abs(len(p_rows) - test[ts.task_id]) <= test[ts.task_id] // 2
    gone = dataclasses.replace(cfg, data_root=str(root / "nowhere"))  # no test split found: one chunk, the whole pool
    assert all(len(v) == 1 and len(v[0][1]) == len(ts.pool) for ts, v in zip(train, R.test_sized_chunks(gone, train).values()))


def test_sft_loss_counts_generated_tokens_only(small):
    cfg, theta, emb, prompts = small
    bb = theta.bb
    text = "<think> ideal : a red circle . <insp_s> 2 <insp_e> match . </think> <answer> 2 </answer>"
    roll = R.trace_rollout(bb, text)
    assert roll.splices == [(roll.ids.index(bb.tid("<insp_e>")), 2)]
    logp, mask = R.score(theta, prompts[:1], [roll])
    # every generated token is scored, nothing else: not the prompt, not the spliced <full> T_c </full>
    assert mask.sum().item() == len(roll.ids) == len(bb.ids(text)) - 1
    assert bb.tid("<full>") not in roll.ids


def test_sft_lookup_weight_weighs_only_the_ideals_differing_values(small, world):
    cfg, theta, emb, _ = small
    target = [("cross", "cyan", "large", 5), ("star", "red", "small", 0)]
    neg = [("cross", "yellow", "large", 5), ("star", "red", "small", 2)]  # colour of the cross, cell of the star
    text = (f"<think> ideal : {R.caption(target)} . <insp_s> 1 <insp_e> {R.aligned_check(target, neg)} "
            f"<insp_s> 2 <insp_e> {R.aligned_check(target, target)} </think> <answer> 2 </answer>")
    w = R.lookup_weights(text, 5.0)
    words = text.split()
    assert [x for x, v in zip(words, w) if v != 1.0] == ["top", "left", "cyan"]  # the ideal's values, nothing else
    assert words[[i for i, v in enumerate(w) if v != 1.0][-1] - 1] == "yellow"  # right after the candidate's value
    ts = R.load_split(world[1], "val")[0]
    it = R.RerankItem(R.query_item(ts, 0), [R.cand_item(ts, j) for j in (ts.pos[0] + ts.neg[0])[:2]],
                      [], [2], None, [], ts.name, "q0")
    with torch.no_grad():
        plain, st = R.sft_loss(theta, emb, [(it, text)])
        heavy, st2 = R.sft_loss(theta, emb, [(it, text)], lookup_weight=5.0)
        same = text.split("<insp_s> 1")[0] + "<insp_s> 2" + text.split("<insp_s> 2")[1]  # no differing pair left
        assert torch.allclose(R.sft_loss(theta, emb, [(it, same)])[0], R.sft_loss(theta, emb, [(it, same)], lookup_weight=5.0)[0])
    assert st == st2 and heavy.item() > plain.item()  # same tokens counted; the three looked-up words weigh 5x


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


def test_data_malformed_json_line(root):
    qf = root / TEST_Q
    _set_line(qf, 2, _lines(qf)[1][:40])  # truncated JSON on line 2
    msg = _load_err(root)
    assert f"{qf}:2" in msg and "malformed JSON" in msg


def test_data_line_is_json_list(root):
    qf = root / TEST_Q
    _set_line(qf, 2, '["10:1", 3]')
    msg = _load_err(root)
    assert f"{qf}:2" in msg and "expected a JSON object" in msg and "list" in msg


def test_data_line_is_json_null(root):
    qf = root / TEST_Q
    _set_line(qf, 3, "null")
    msg = _load_err(root)
    assert f"{qf}:3" in msg and "expected a JSON object" in msg


def test_data_blank_lines_are_skipped_and_line_numbers_kept(root):
    qf = root / TEST_Q
    ls = _lines(qf)
    qf.write_text(ls[0] + "\n\n   \n" + "\n".join(ls[1:]) + "\n")
    ts = {t.task_id: t for t in R.load_split(root, "test")}[3]
    assert len(ts) == 3 and [ts.queries[i]["_line"] for i in range(3)] == [1, 4, 5]


def test_data_missing_field_qid(root):
    qf = root / TEST_Q
    _edit(qf, 2, lambda d: d.pop("qid"))
    msg = _load_err(root)
    assert f"{qf}:2" in msg and "missing field 'qid'" in msg


def test_data_missing_field_modality_in_pool(root):
    pf = root / TEST_P
    _edit(pf, 5, lambda d: d.pop("modality"))
    msg = _load_err(root)
    assert f"{pf}:5" in msg and "missing field 'modality'" in msg


# ---- wrongly typed fields -------------------------------------------------------------------


@pytest.mark.parametrize("field,value,tname", [
    ("task_id", "7", "str"),
    ("task_id", True, "bool"),
    ("task_id", 3.0, "float"),
    ("pos_cand_list", "10:32000000", "str"),
    ("qid", 7, "int"),
    ("query_modality", ["image"], "list"),
    ("query_txt", 5, "int"),
])
def test_data_wrong_type_query_field(root, field, value, tname):
    qf = root / TEST_Q
    _edit(qf, 2, lambda d: d.__setitem__(field, value))
    msg = _load_err(root)
    assert f"{qf}:2" in msg and f"field '{field}'" in msg and f"type {tname}" in msg


@pytest.mark.parametrize("field,value,tname", [
    ("did", 12, "int"),
    ("txt", 3, "int"),
    ("img_path", ["a.png"], "list"),
    ("modality", 3, "int"),
])
def test_data_wrong_type_pool_field(root, field, value, tname):
    pf = root / TEST_P
    _edit(pf, 2, lambda d: d.__setitem__(field, value))
    msg = _load_err(root)
    assert f"{pf}:2" in msg and f"field '{field}'" in msg and f"type {tname}" in msg


# ---- modality strings -----------------------------------------------------------------------


def test_data_modality_text_image_order_refused_in_query(root):
    qf = root / "query/test/mbeir_synth_task7_test.jsonl"
    _edit(qf, 1, lambda d: d.__setitem__("query_modality", "text,image"))
    msg = _load_err(root)
    assert f"{qf}:1" in msg and "field 'query_modality'" in msg and "'text,image'" in msg
    assert "image,text" in msg  # the message lists what is accepted


def test_data_modality_unknown_in_pool(root):
    pf = root / TEST_P
    _edit(pf, 3, lambda d: d.__setitem__("modality", "text,image"))
    msg = _load_err(root)
    assert f"{pf}:3" in msg and "field 'modality'" in msg and "'text,image'" in msg


def test_data_modality_wrong_case_refused(root):
    pf = root / TEST_P
    _edit(pf, 3, lambda d: d.__setitem__("modality", "Text"))
    msg = _load_err(root)
    assert f"{pf}:3" in msg and "field 'modality'" in msg and "'Text'" in msg


# ---- content rules --------------------------------------------------------------------------


def test_data_candidate_txt_and_img_both_null(root):
    pf = root / TEST_P
    _edit(pf, 4, lambda d: d.update(txt=None, img_path=None))
    msg = _load_err(root)
    assert f"{pf}:4" in msg and "'txt'" in msg and "'img_path'" in msg and "both null" in msg


def test_data_query_txt_and_img_both_null(root):
    qf = root / TEST_Q
    _edit(qf, 2, lambda d: d.update(query_txt=None, query_img_path=None))
    msg = _load_err(root)
    assert f"{qf}:2" in msg and "'query_txt'" in msg and "'query_img_path'" in msg and "both null" in msg


def test_data_duplicate_did_names_both_lines(root):
    pf = root / TEST_P
    first = json.loads(_lines(pf)[1])["did"]  # did on line 2
    _edit(pf, 7, lambda d: d.__setitem__("did", first))
    msg = _load_err(root)
    assert f"{pf}:7" in msg and "field 'did'" in msg and repr(first) in msg and "duplicate" in msg
    assert "line 2" in msg


def test_data_positive_not_in_pool(root):
    qf = root / TEST_Q
    _edit(qf, 3, lambda d: d.__setitem__("pos_cand_list", ["10:999"]))
    msg = _load_err(root)
    assert f"{qf}:3" in msg and "'pos_cand_list'" in msg and "'10:999'" in msg
    assert "mbeir_synth_task3_test_cand_pool.jsonl" in msg


def test_data_negatives_not_in_pool_are_dropped(root):
    """neg_cand_list is optional and only informative: ids absent from the pool are skipped."""
    qf = root / TEST_Q
    _edit(qf, 1, lambda d: d.__setitem__("neg_cand_list", ["10:999"] + d["neg_cand_list"][:1]))
    ts = {t.task_id: t for t in R.load_split(root, "test")}[3]
    assert len(ts.neg[0]) == 1


def test_data_empty_pool_file(root):
    pf = root / TEST_P
    pf.write_text("")
    msg = _load_err(root)
    assert str(pf) in msg and "empty" in msg


def test_data_pool_of_blank_lines_is_empty(root):
    pf = root / TEST_P
    pf.write_text("\n  \n\n")
    msg = _load_err(root)
    assert str(pf) in msg and "empty" in msg


def test_data_no_local_pool_file(root):
    (root / TEST_P).unlink()
    msg = _load_err(root)
    assert "mbeir_synth_task3_test.jsonl" in msg and "no local candidate pool" in msg
    assert "mbeir_synth_task3_test_cand_pool.jsonl" in msg and "mbeir_synth_task3_cand_pool.jsonl" in msg
    assert str(root / "cand_pool" / "local") in msg


def test_data_missing_split_directory(root):
    shutil.rmtree(root / "query" / "test")
    msg = _load_err(root)
    assert str(root / "query" / "test") in msg and "no such directory" in msg


def test_data_unknown_split_name(small_world):
    msg = _load_err(small_world, split="dev")
    assert str(small_world / "query" / "dev") in msg and "no such directory" in msg


def test_data_root_that_does_not_exist(tmp_path):
    msg = _load_err(tmp_path / "nope")
    assert str(tmp_path / "nope") in msg


def test_data_split_directory_without_query_files(root):
    for f in (root / "query" / "test").glob("*.jsonl"):
        f.unlink()
    msg = _load_err(root)
    assert str(root / "query" / "test") in msg and "no query files" in msg


# ---- cases that once crashed deep in a stack; now clear errors ---------------------------
def test_data_invalid_utf8_line(root):
    qf = root / TEST_Q
    ls = qf.read_bytes().split(b"\n")
    ls[1] = ls[1].replace(b'"query_src_content"', b'"note": "caf\xe9", "query_src_content"')
    qf.write_bytes(b"\n".join(ls))
    msg = _load_err(root)
    assert f"{qf}:2" in msg
def test_data_pos_cand_list_of_objects(root):
    qf = root / TEST_Q
    _edit(qf, 2, lambda d: d.__setitem__("pos_cand_list", [{"did": d["pos_cand_list"][0]}]))
    msg = _load_err(root)
    assert f"{qf}:2" in msg and "'pos_cand_list'" in msg
def test_data_neg_cand_list_not_a_list(root):
    qf = root / TEST_Q
    _edit(qf, 2, lambda d: d.__setitem__("neg_cand_list", 5))
    msg = _load_err(root)
    assert f"{qf}:2" in msg and "'neg_cand_list'" in msg
def test_data_neg_cand_list_of_objects(root):
    qf = root / TEST_Q
    _edit(qf, 2, lambda d: d.__setitem__("neg_cand_list", [{"did": "10:1"}]))
    msg = _load_err(root)
    assert f"{qf}:2" in msg and "'neg_cand_list'" in msg


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


# ---------------------------------------------------------------- notebooks (run top to bottom, smoke preset)
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    """Every notebook executes without an error (they train/reuse runs/smoke, so they run in order)."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()


# ---------------------------------------------------------------- robustness: resume, determinism, safe loading
def _resume_cfg(world, run_dir, **kw):
    cfg, root = world
    base = dict(data_root=str(root), run_dir=str(run_dir), n_train=6, n_val=4, n_test=4, n_hard_neg=7,
                vision_layers=1, text_layers=1, warmup_steps=6, warmup_batch=4, ret_steps=4, ret_batch=4,
                ckpt_every=2, log_every=1, stages="warmup,retriever")
    return R.make_config("smoke", **{**base, **kw})


def test_probe_scores_each_pair_alone_so_candidate_order_does_not_matter(small, world):
    cfg, theta, emb, _ = small
    ts = R.load_split(world[1], "val")[0]
    items = [R.RerankItem(query=R.query_item(ts, i), cands=[R.cand_item(ts, j) for j in (ts.pos[i] + ts.neg[i])[:4]],
                          rows=[], positives=[1], target=None, scenes=[None] * 4, task="t", qid=str(i)) for i in range(2)]
    torch.manual_seed(0)
    head = torch.nn.Linear(theta.bb.D, 1)
    with torch.no_grad():
        s = R.probe_scores(theta.bb, emb, head, items)  # (2, 4)
        perm = [2, 0, 3, 1]
        s2 = R.probe_scores(theta.bb, emb, head, [dataclasses.replace(it, cands=[it.cands[k] for k in perm]) for it in items])
    assert s.shape == (2, 4) and s.std() > 0
    assert torch.allclose(s[:, perm], s2, atol=1e-5)


def test_cross_encoder_probe_trains_on_a_run_and_leaves_it_untouched(world, tmp_path):
    cfg = _resume_cfg(world, tmp_path / "r", K=4, probe_steps=4, probe_batch=2, split="val")
    R.train(cfg, verbose=False)
    before = (tmp_path / "r" / "warmup" / "model.safetensors").read_bytes()
    out = R.evaluate(dataclasses.replace(cfg, stage="probe"), verbose=False)
    assert [c["step"] for c in out["curve"]] == [0, 1, 2, 3, 4] and out["chance"] == 0.25
    assert all(0 <= c["avg"] <= 1 for c in out["curve"]) and math.isfinite(out["final_train_loss"])
    assert json.loads((tmp_path / "r" / "probe_phi_val.json").read_text())["curve"] == out["curve"]
    assert (tmp_path / "r" / "warmup" / "model.safetensors").read_bytes() == before
    # --probe-vision trains the vision side too: its own file, the run still untouched
    outv = R.evaluate(dataclasses.replace(cfg, stage="probe", probe_vision=True, probe_steps=2), verbose=False)
    assert outv["vision_trained"] and not out["vision_trained"] and [c["step"] for c in outv["curve"]] == [0, 1, 2]
    assert json.loads((tmp_path / "r" / "probe_phi_vision_val.json").read_text())["curve"] == outv["curve"]
    assert json.loads((tmp_path / "r" / "probe_phi_val.json").read_text())["curve"] == out["curve"]
    assert (tmp_path / "r" / "warmup" / "model.safetensors").read_bytes() == before
    # easy lists: the positive sits where `positives` says, the K-1 others come from other queries of its task
    # (a 4-step phi finds few positives, so each list's first candidate stands in for one here)
    items = [dataclasses.replace(it, positives=[1]) for it in R.rerank_items(cfg, "train", verbose=False)]
    easy = R.easy_lists(items, random.Random(0))
    assert len(easy) == len(items)
    for it, e in zip(items, easy):
        assert len(e.cands) == 4 and e.cands[e.positives[0] - 1] is it.cands[it.positives[0] - 1]
        mine = {id(c) for c in it.cands}
        others = {id(c) for o in items if o.task == it.task and o.qid != it.qid for c in o.cands}
        assert all(id(c) in others and id(c) not in mine for k, c in enumerate(e.cands) if k != e.positives[0] - 1)
    with pytest.raises(R.RetrvError, match="needs at least 4 queries of task"):  # too few queries with a positive
        R.evaluate(dataclasses.replace(cfg, stage="probe", probe_lists="easy"), verbose=False)
    with pytest.raises(R.RetrvError, match="probe-lists must be phi or easy"):
        R.evaluate(dataclasses.replace(cfg, stage="probe", probe_lists="hard"), verbose=False)


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


def test_sft_replay_adds_the_warmup_loss_and_eval_reports_the_kept_check(world, tmp_path):
    kw = dict(stages="warmup,retriever,icm,sft", relation_format="aligned", align_steps=2, align_batch=4,
              sft_steps=3, sft_batch=2, max_new=24, ckpt_every=0)
    R.train(_resume_cfg(world, tmp_path / "plain", **dict(kw, stages="warmup,retriever,icm")), verbose=False)
    shutil.copytree(tmp_path / "plain", tmp_path / "replay")  # the same warm-up, phi and ICM under both SFTs
    R.train(_resume_cfg(world, tmp_path / "plain", **dict(kw, stages="sft")), verbose=False)
    R.train(_resume_cfg(world, tmp_path / "replay", sft_replay=2, **dict(kw, stages="sft")), verbose=False)
    plain, replay = R.read_metrics(tmp_path / "plain", "sft"), R.read_metrics(tmp_path / "replay", "sft")
    assert all("replay_loss" not in m for m in plain) and len(replay) == len(plain) == 3
    for m in replay:  # the replay term is extra and positive
        assert m["replay_loss"] > 0 and math.isfinite(m["replay_loss"]) and m["loss"] > m["replay_loss"]
    # step 0: the same traces and weights, so the loss is the plain loss plus the replay term
    assert replay[0]["loss"] == pytest.approx(plain[0]["loss"] + replay[0]["replay_loss"], rel=1e-4)
    out = R.evaluate(_resume_cfg(world, tmp_path / "replay", **kw), split="val", stage="sft", verbose=False)
    d = out["diagnosis"]
    assert 0 <= d["warmup_check"]["on_match"] <= 1 and 0 <= d["warmup_check"]["on_differs"] <= 1
    # eval also writes every trace theta wrote, one JSON line per query, with what was scored
    rows = [json.loads(x) for x in (tmp_path / "replay" / "traces_sft_val.jsonl").read_text().splitlines()]
    wcfg, root = world
    n_val = sum(len(ts) for ts in R.load_split(root, "val", R.parse_tasks(wcfg.tasks)))
    assert len(rows) == n_val and all(isinstance(r["text"], str) and r["qid"] for r in rows)
    assert sum(r["N_ins"] for r in rows) / len(rows) == pytest.approx(out["efficiency"]["inspections_per_query"])


def test_tied_embeddings_share_the_table_through_a_killed_and_resumed_warmup(world, tmp_path):
    """--tie-embeddings: the LM head is the input embedding table, before and after a mid-stage resume
    (safetensors drops the shared copy on save) and in the saved checkpoint; an untied run refuses it."""
    kw = dict(stages="warmup", tie_embeddings=True)
    R.train(_resume_cfg(world, tmp_path / "a", **kw), verbose=False)
    R.train(_resume_cfg(world, tmp_path / "b", stop_after=3, **kw), verbose=False)  # killed after step 3
    R.train(_resume_cfg(world, tmp_path / "b", **kw), verbose=False)
    assert R.read_metrics(tmp_path / "a", "warmup") == R.read_metrics(tmp_path / "b", "warmup")
    bb = R.load_backbone(str(tmp_path / "b" / "warmup"))
    assert bb.lm_head.weight.data_ptr() == bb.text.get_input_embeddings().weight.data_ptr()
    ref = R.load_backbone(str(tmp_path / "a" / "warmup"))
    assert torch.equal(bb.lm_head.weight, ref.lm_head.weight)
    untied = R.new_tiny_backbone(_resume_cfg(world, tmp_path / "c"))
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in bb.parameters()) == bb.lm_head.weight.numel()
    with pytest.raises(R.RetrvError, match=r"tie_embeddings=True \(checkpoint\) vs False \(now\)"):
        R.train(_resume_cfg(world, tmp_path / "b", stages="warmup,retriever"), verbose=False)


def test_a_warmup_with_a_copy_phase_resumes_across_the_phase_boundary(world, tmp_path):
    """The copy phase is decided by the step index, so a run killed inside it resumes to the same warm-up."""
    kw = dict(stages="warmup", warmup_copy_steps=3)
    R.train(_resume_cfg(world, tmp_path / "a", **kw), verbose=False)
    R.train(_resume_cfg(world, tmp_path / "b", stop_after=2, **kw), verbose=False)  # killed inside the copy phase
    R.train(_resume_cfg(world, tmp_path / "b", **kw), verbose=False)
    ma = R.read_metrics(tmp_path / "a", "warmup")
    assert ma == R.read_metrics(tmp_path / "b", "warmup") and len(ma) == 6
    wa = R.load_backbone(str(tmp_path / "a" / "warmup")).state_dict()
    wb = R.load_backbone(str(tmp_path / "b" / "warmup")).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # copy steps only: the vision tower gets no gradient and keeps its initial weights; the LM moves
    cc = _resume_cfg(world, tmp_path / "c", stages="warmup", warmup_steps=3, warmup_copy_steps=3)
    R.train(cc, verbose=False)
    R.seed_everything(cc.seed)
    fresh = R.new_tiny_backbone(cc).state_dict()
    wc = R.load_backbone(str(tmp_path / "c" / "warmup")).state_dict()
    vis_keys = [k for k in wc if "vision" in k]
    assert vis_keys and all(torch.equal(wc[k], fresh[k]) for k in vis_keys)
    assert any(not torch.equal(wc[k], fresh[k]) for k in wc if k not in vis_keys)
    assert any(not torch.equal(wa[k], fresh[k]) for k in vis_keys)  # the 3 image steps after the copies do move it


def test_partial_checkpoint_from_another_config_is_refused(world, tmp_path):
    R.train(_resume_cfg(world, tmp_path, stop_after=2), verbose=False)
    with pytest.raises(R.RetrvError, match=r"warmup_lr=0\.001 \(checkpoint\) vs 0\.002 \(now\)"):
        R.train(_resume_cfg(world, tmp_path, warmup_lr=2e-3), verbose=False)


def test_nan_loss_stops_the_stage_and_saves_nothing(world, tmp_path):
    with pytest.raises(R.RetrvError, match="warmup-lr must be a finite number"):
        _resume_cfg(world, tmp_path, warmup_lr=float("nan"))
    cfg = _resume_cfg(world, tmp_path, warmup_lr=1e12, warmup_steps=30, stages="warmup", ckpt_every=0)
    with pytest.raises(R.RetrvError, match=r"warmup: loss is (nan|inf) at step \d+; stopping before the bad update"):
        R.train(cfg, verbose=False)
    assert not (tmp_path / "warmup").exists()


def test_finished_stage_from_another_config_is_refused(world, tmp_path):
    R.train(_resume_cfg(world, tmp_path, stages="warmup"), verbose=False)
    with pytest.raises(R.RetrvError, match=r"text_layers=1 \(checkpoint\) vs 2 \(now\)"):
        R.base_backbone(_resume_cfg(world, tmp_path, text_layers=2))


def test_runaway_trace_is_cut_at_max_new_and_is_a_format_error(small):
    cfg, theta, emb, prompts = small
    bb = theta.bb
    forced = [bb.ids("red " * 40)] * len(prompts)
    outs = R.sample(theta, prompts, max_new=12, forced=forced)
    for o in outs:
        assert len(o.ids) == 12 and not o.finished
        assert R.format_reward(o.text, 8) == 0.0 and R.parse_answer(o.text) is None
        assert R.trace_reward(o.text, o.N_ins, o.errors, [1], 8, 0.0)["reward"] == 0.0


def test_rl_pool_balanced_takes_equal_shares_of_phi_ranks_and_bad_mode_is_clear():
    """--grpo-pool-mode balanced: as many queries with the positive at phi's rank 1 as at rank 2 and at
    rank 3 or lower (the hard pool inherits the SFT model's rank bias); queries phi missed never enter."""
    mk = lambda i, pos: R.RerankItem(query={}, cands=[], rows=[], positives=pos, target=None, scenes=[], task="t",
                                     qid=f"q{i}")
    items = [mk(i, [1 + i % 5] if i % 7 else []) for i in range(70)]
    cfg = R.make_config("smoke", grpo_pool_mode="balanced", grpo_pool=24)
    pool = R.rl_queries(cfg, None, None, items, verbose=False)
    ranks = [min(3, it.positives[0]) for it in pool]
    assert len(pool) == 24 and all(ranks.count(r) == 8 for r in (1, 2, 3))
    assert len({it.qid for it in pool}) == 24
    with pytest.raises(R.RetrvError, match="hard, all or balanced"):
        R.rl_queries(R.make_config("smoke", grpo_pool_mode="easy"), None, None, items, verbose=False)
