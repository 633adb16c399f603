"""Block diffusion (``diffusion.attention: block``): the objective, its masks, the block sampler
with its exact KV cache, evaluation, exact resume across a block-size schedule, bad input."""

import copy
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lightning_dlm.core import causal_allowed, get_schedule
from lightning_dlm.core.blocks import (
    allowed_2l,
    block_attention_allowed,
    block_mask_mod,
    block_size_at,
    block_sources,
    block_times,
    check_block_seq_len,
)
from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.evaluation.evaluators import DiffusionEvaluator
from lightning_dlm.evaluation.likelihood import block_nelbo
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig
from lightning_dlm.objectives import build_objective
from lightning_dlm.objectives.ar import causal_terms
from lightning_dlm.objectives.block import BlockObjective, block_loss_terms
from lightning_dlm.sampling import generate
from lightning_dlm.sampling.block_decode import block_decode
from lightning_dlm.sampling.engine import SamplerConfig
from lightning_dlm.training.module import DiffusionLM
from lightning_dlm.training.optim import OptimConfig
from tests.conftest import TINY_TOKENIZER
from tests.test_training import MODEL, LossRecorder, StopAfter, make_data, make_trainer

L_SEQ = 16


def tiny_net(block_size=4, impl="eager", vocab=97, seed=0, tokenizer=None, **diffusion):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation=impl)
    hf = LlamaForCausalLM(cfg).eval()
    mask_id = vocab - 1
    net = DiffusionModel(hf, mask_id, False, tokenizer=tokenizer, attn_implementation=impl,
                         diffusion=DiffusionConfig(attention="block", block_size=block_size, **diffusion).check())
    return net


def sample_batch(batch=3, length=L_SEQ, vocab=96, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- block size 1 is the causal LM ----------------------------------------------------------------
def test_block_size_one_is_exactly_the_causal_lm():
    net = tiny_net(block_size=1)
    x0 = sample_batch()
    plain = copy.deepcopy(net.model)
    plain.config.is_causal = True
    with torch.no_grad():
        reference = plain(input_ids=x0).logits
        ours = net(x0, allowed=causal_allowed(L_SEQ))
    assert torch.equal(ours, reference)
    # the training objective at block size 1 reads every prediction from the clean (causal) copy
    t = torch.full((3, L_SEQ), 0.5)
    terms, masked, _ = block_loss_terms(net, x0, t, get_schedule("linear"), 1, True, torch.Generator().manual_seed(2))
    sources, slots = block_sources(masked, 1, True)
    assert not sources[:, :L_SEQ].any()  # the noised copy is never read
    rows = sources.nonzero()
    ce = F.cross_entropy(reference[rows[:, 0], rows[:, 1] - L_SEQ], x0[rows[:, 0], slots], reduction="none")
    assert torch.allclose(terms.weighted_sum, 2.0 * ce.sum(), rtol=1e-6, atol=0)
    assert int(terms.num_scored) == int(masked.sum()) > 0


def test_block_objective_at_block_size_one_is_the_ar_objective():
    """Through the registry: ``model.objective: diffusion`` under block attention is the block
    objective, and at block size 1 with every target masked (linear schedule, t = 1: w = 1) its
    terms are the AR objective's, padding and prompt included."""
    net = tiny_net(block_size=1)
    x0 = sample_batch()
    pad = torch.ones_like(x0)
    pad[1, :5] = 0
    prompt = torch.zeros_like(x0, dtype=torch.bool)
    prompt[2, :3] = True
    cfg = DiffusionConfig(attention="block", block_size=1).check()
    block = build_objective("diffusion", cfg)
    ar = build_objective("ar", cfg)
    assert isinstance(block, BlockObjective) and type(ar).__name__ == "CausalObjective"
    with torch.no_grad():
        ours = block.level_terms(net, x0, torch.ones(3), pad, torch.Generator().manual_seed(0), None, prompt)
        theirs, targets = causal_terms(net, x0, pad, protected=prompt)
        trained = ar.train_terms(net, {"input_ids": x0, "attention_mask": pad, "prompt_mask": prompt}, step=0, counter=0,
                                 rank=0)
    assert int(ours.num_scored) == int(theirs.num_scored) == int(targets.sum()) == int(ours.num_targets)
    torch.testing.assert_close(ours.weighted_sum, theirs.weighted_sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.normalized("elbo"), trained.terms.normalized("elbo"), rtol=1e-6, atol=1e-6)


# --- the vectorized 2L objective equals a loop over blocks ----------------------------------------
def per_block_loop(net, x0, masked, t_pos, block_size, schedule):
    """The model run once per block on [clean prefix, noised block]; weighted CE of the masked slots."""
    xt = torch.where(masked, torch.full_like(x0, net.mask_token_id), x0)
    total = torch.zeros((), dtype=torch.float64)
    for lo in range(0, x0.shape[1], block_size):
        hi = lo + block_size
        ids = torch.cat([x0[:, :lo], xt[:, lo:hi]], dim=1)
        pos = torch.arange(hi)
        logits = net(ids, allowed=(pos[None, :] // block_size) <= (pos[:, None] // block_size))
        for j in range(max(lo, 1), hi):
            ce = F.cross_entropy(logits[:, j - 1], x0[:, j], reduction="none")
            total += (ce * masked[:, j] * schedule.weight(t_pos[:, j])).sum().double()
    return total


@pytest.mark.parametrize("block_size,per_block", [(2, False), (4, True), (8, True), (16, False)])
def test_vectorized_2l_loss_equals_a_per_block_loop(block_size, per_block):
    net = tiny_net(block_size=block_size)
    schedule = get_schedule("linear")
    x0 = sample_batch()
    g = torch.Generator().manual_seed(3)
    t_pos = block_times(3, L_SEQ, block_size, per_block, lambda n: 0.05 + 0.9 * torch.rand(n, generator=g))
    with torch.no_grad():
        terms, masked, _ = block_loss_terms(net, x0, t_pos, schedule, block_size, True, torch.Generator().manual_seed(4))
        loop = per_block_loop(net, x0, masked, t_pos, block_size, schedule)
    assert masked.any() and (~masked[:, 1:]).any()
    assert torch.allclose(terms.weighted_sum.double(), loop, rtol=1e-5, atol=1e-5)
    if per_block:
        assert len(set(t_pos[0, ::block_size].tolist())) > 1  # one time per block


def test_complementary_masks_cover_every_target_once():
    net = tiny_net(block_size=4, complementary_masks=True)
    x0 = sample_batch()
    t_pos = torch.full((3, L_SEQ), 0.3)
    with torch.no_grad():
        terms, masked, maskable = block_loss_terms(net, x0, t_pos, get_schedule("linear"), 4, True,
                                                   torch.Generator().manual_seed(5), complementary=True)
    assert int(terms.num_scored) == int(maskable.sum())  # mask + complement = every target exactly once
    assert int(terms.num_targets) == 2 * int(maskable.sum())


# --- masks: the one definition, dense and as a FlexAttention mask_mod ------------------------------
def test_three_part_mask_and_flex_mask_mod_agree():
    length, block = 8, 4
    dense = block_attention_allowed(length, block)
    q, k = torch.arange(2 * length)[:, None], torch.arange(2 * length)[None, :]
    expected = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for i in range(2 * length):
        for j in range(2 * length):
            bi, bj = (i % length) // block, (j % length) // block
            if i < length and j < length:
                expected[i, j] = bi == bj  # noised block to itself
            elif i < length:
                expected[i, j] = bj < bi  # noised block to the clean blocks before it
            elif j >= length:
                expected[i, j] = bj <= bi  # clean copy, block-causal
    assert torch.equal(dense, expected)
    pad = torch.ones(2, length, dtype=torch.long)
    pad[1, 6:] = 0
    mod = block_mask_mod(length, block, pad)
    b = torch.arange(2)[:, None, None]
    grid = mod(b, 0, q[None], k[None])
    keys = torch.cat([pad, pad], 1).bool()[:, None, :]
    assert torch.equal(grid, (dense[None] & keys) | torch.eye(2 * length, dtype=torch.bool)[None])
    assert torch.equal(allowed_2l(q, k, length, 1)[length:, length:], causal_allowed(length))


def test_flex_attention_forward_equals_the_dense_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    sdpa, flexed = tiny_net(4, impl="sdpa"), tiny_net(4, impl="flex_attention")
    flexed.model.load_state_dict(sdpa.model.state_dict())
    x0 = sample_batch()
    masked = torch.rand(x0.shape, generator=torch.Generator().manual_seed(6)) < 0.5
    masked[:, 0] = False
    xt = torch.where(masked, torch.full_like(x0, sdpa.mask_token_id), x0)
    sources, _ = block_sources(masked, 4, True)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        dense = sdpa.block_scored_logits(x0, xt, sources, 4)
        kernel = flexed.block_scored_logits(x0, xt, sources, 4)
    assert torch.allclose(dense, kernel, atol=1e-5)


# --- the sampler: exact cache, strategies, batches, EOS --------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


@pytest.mark.parametrize("strategy,temperature,sub_block", [("threshold", 0.0, None), ("threshold", 0.9, 2),
                                                            ("confidence", 0.9, None), ("random", 0.9, None)])
def test_cached_block_sampler_equals_uncached_token_for_token(tokenizer, strategy, temperature, sub_block):
    net = tiny_net(4, impl="sdpa", vocab=len(tokenizer) + 1, tokenizer=tokenizer)
    with torch.no_grad():  # sharpen the model so threshold decoding commits several slots per step
        net.model.lm_head.weight.mul_(40.0)
    prompts = ["the cat", "a much longer prompt that spans more than one block", "x"]
    kw = dict(length=13, strategy=strategy, temperature=temperature, seed=3, sub_block=sub_block)
    cached, uncached = generate(net, prompts, **kw), generate(net, prompts, kv_cache=False, **kw)
    assert cached.token_ids == uncached.token_ids
    assert all(len(r) == 13 for r in cached.token_ids)
    if strategy == "threshold":
        assert cached.stats.tokens_per_forward > 1.0  # parallel commits
    alone = generate(net, prompts[1:2], **kw)
    assert alone.token_ids[0] == cached.token_ids[1]  # a prompt decodes the same alone as in a batch


def test_no_shift_cached_block_sampler_equals_uncached_token_for_token(tokenizer):
    """BD3LM's convention (slot i read from position i itself): the cached decode, the uncached one,
    the static-cache passes and the sub-block cache agree, and a row decodes the same alone."""
    net = tiny_net(4, impl="sdpa", vocab=len(tokenizer) + 1, tokenizer=tokenizer, shift=False)
    with torch.no_grad():
        net.model.lm_head.weight.mul_(40.0)
    prompts = ["the cat", "a much longer prompt that spans more than one block", "x"]
    for strategy, temperature in (("threshold", 0.0), ("random", 0.9)):
        kw = dict(length=13, strategy=strategy, temperature=temperature, seed=3)
        cached, uncached = generate(net, prompts, **kw), generate(net, prompts, kv_cache=False, **kw)
        assert cached.token_ids == uncached.token_ids, strategy
        assert generate(net, prompts[1:2], **kw).token_ids[0] == cached.token_ids[1]
        assert net.mask_token_id not in sum(cached.token_ids, [])
    same = dict(length=8, strategy="confidence", temperature=0.0, seed=1)
    assert generate(net, ["the cat"], graphs="none", **same).token_ids == generate(net, ["the cat"], **same).token_ids
    approx = generate(net, ["the cat", "x"], length=9, sub_block=2, sub_block_cache=True, seed=1)
    assert [len(r) for r in approx.token_ids] == [9, 9] and net.mask_token_id not in sum(approx.token_ids, [])


def reference_no_shift_decode(net, prompt, length, B):
    """Greedy confidence decoding, one slot a step, written from the equations with no cache: at
    every step the whole sequence so far (committed tokens, then the current block with masks in its
    undecided slots, the last block filled to its end with masks) runs under the block-causal mask;
    slot i's distribution is the logits at
    position i (no shift); the most probable undecided slot of the block gets its argmax token."""
    end = len(prompt) + length
    tokens = list(prompt) + [net.mask_token_id] * (-(-end // B) * B - len(prompt))  # whole blocks of masks
    for start in range(len(prompt) // B * B, end, B):
        while True:
            open_slots = [i for i in range(start, min(start + B, end)) if i >= len(prompt)
                          and tokens[i] == net.mask_token_id]
            if not open_slots:
                break
            width = start + B
            pos = torch.arange(width)
            allowed = (pos[None, :] // B) <= (pos[:, None] // B)
            mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
            with torch.no_grad():
                logits = net.model(input_ids=torch.tensor([tokens[:width]]), attention_mask=mask[None, None],
                                   position_ids=pos[None]).logits[0].float()
            logits[:, net.mask_token_id] = float("-inf")
            probs = logits.softmax(-1)
            best = max(open_slots, key=lambda i: float(probs[i].max()))
            tokens[best] = int(probs[best].argmax())
    return tokens[len(prompt):end]


@pytest.mark.parametrize("prompt", [[5, 6, 7], [5, 6, 7, 8, 9, 10, 11, 12], []])  # mid-block, aligned, empty
def test_no_shift_block_decoding_is_the_reference_loop(prompt):
    """Catches a shift left in the no-shift path (slot i read from query i - 1) or a block read
    from the wrong queries: the cached decoder must give the test's own loop token for token."""
    net = tiny_net(4, impl="sdpa", shift=False)
    with torch.no_grad():
        net.model.lm_head.weight.mul_(20.0)
    config = SamplerConfig(steps=4, temperature=0.0, strategy="confidence")
    out = block_decode(net, [prompt], 10, config, block_size=4, schedule=get_schedule("linear"), seeds=[0],
                       shift=False, suppress_ids=(net.mask_token_id,))
    assert out.tokens[0] == reference_no_shift_decode(net, prompt, 10, 4)
    shifted = block_decode(net, [prompt or [3]], 10, config, block_size=4, schedule=get_schedule("linear"),
                           seeds=[0], shift=True, suppress_ids=(net.mask_token_id,))
    assert shifted.tokens[0] != out.tokens[0]  # the two conventions read different logits


def test_block_sampler_stops_rows_at_eos(tokenizer):
    net = tiny_net(4, impl="sdpa", vocab=len(tokenizer) + 1, tokenizer=tokenizer)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        net.model.lm_head.weight[eos] += 0.6 * net.model.lm_head.weight.abs().mean() * torch.sign(
            net.model.lm_head.weight[eos] + 1e-3)
        net.model.lm_head.weight.mul_(8.0)
    prompts = ["the cat", "one two three four five", "x", "long prompt of many words here"]
    kw = dict(max_length=24, strategy="threshold", temperature=1.0, top_p=1.0, seed=0)
    cached, uncached = generate(net, prompts, **kw), generate(net, prompts, kv_cache=False, **kw)
    assert cached.token_ids == uncached.token_ids and cached.stopped_at_eos == uncached.stopped_at_eos
    lengths = [len(r) for r in cached.token_ids]
    assert any(cached.stopped_at_eos) and min(lengths) < 24
    for row, stopped in zip(cached.token_ids, cached.stopped_at_eos):
        assert eos not in row and (stopped or len(row) == 24)


def test_block_size_one_decoding_is_the_causal_lms_greedy_decoding(tokenizer):
    net = tiny_net(1, impl="sdpa", vocab=len(tokenizer) + 1, tokenizer=tokenizer)
    plain = copy.deepcopy(net.model)
    plain.config.is_causal = True
    ids = tokenizer("the cat sat", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = plain.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                   pad_token_id=0)[0, ids.shape[1]:].tolist()
    out = generate(net, ["the cat sat"], length=12, temperature=0.0)
    assert out.token_ids[0] == reference
    assert out.forward_passes == 12  # prefill, then one commit pass per token (the next slot's logits come with it)


def test_sub_block_cache_is_an_option_that_decodes(tokenizer):
    net = tiny_net(4, impl="sdpa", vocab=len(tokenizer) + 1, tokenizer=tokenizer)
    out = generate(net, ["the cat", "x"], length=9, sub_block=2, sub_block_cache=True, seed=1)
    assert [len(r) for r in out.token_ids] == [9, 9]
    assert net.mask_token_id not in sum(out.token_ids, [])


# --- evaluation ----------------------------------------------------------------------------------
def test_block_nelbo_at_block_size_one_is_the_exact_ar_nll():
    net = tiny_net(1)
    blocks = sample_batch(4)
    plain = copy.deepcopy(net.model)
    plain.config.is_causal = True
    with torch.no_grad():
        logits = plain(input_ids=blocks).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()
    out = block_nelbo(net, blocks, 1, levels=3, draws=2, batch_size=3)
    assert out["nll_per_token"] == pytest.approx(nll, rel=1e-5) and out["se"] == pytest.approx(0.0, abs=1e-6)
    # block size 4: a bound, estimated with the same keys as a bidirectional model's (finite, above the AR NLL here)
    ev = DiffusionEvaluator(tiny_net(4, tokenizer=AutoTokenizer.from_pretrained(TINY_TOKENIZER), vocab=513))
    res = ev.likelihood(torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0)), levels=2, draws=2)
    assert res["bound"] and res["nll_per_token"] > 0 and res["tokens"] == 2 * 15


def test_choice_scores_of_a_block_model_at_block_size_one_are_the_ar_loglikelihood(tokenizer):
    from lightning_dlm.evaluation.evaluators import CausalEvaluator

    net = tiny_net(1, impl="sdpa", vocab=len(tokenizer) + 1, tokenizer=tokenizer)
    plain = copy.deepcopy(net.model)
    plain.config.is_causal = True
    contexts, continuations = ["the cat", "a dog ran"], [" sat on the mat", " away"]
    ours = DiffusionEvaluator(net).choice(contexts, continuations, levels=1)  # level 1 of 1: every token masked
    ar = CausalEvaluator(plain, tokenizer).choice(contexts, continuations)
    assert ours["tokens"] == ar["tokens"]
    assert ours["loglik"] == pytest.approx(ar["loglik"], rel=1e-5)
    four = DiffusionEvaluator(tiny_net(4, impl="sdpa", vocab=len(tokenizer) + 1, tokenizer=tokenizer))
    assert all(v < 0 for v in four.choice(contexts, continuations, levels=3)["loglik"])


def test_lm_eval_rolling_loglikelihood_of_a_block_model_scores_block_by_block(tokenizer):
    """At block size 1 with the shift, lm-eval's rolling log-likelihood of a block model is the
    causal LM's exact log-likelihood of the text (a bidirectional pass over the masked window
    would give another number)."""
    from lm_eval.api.instance import Instance

    import lightning_dlm.evaluation.harness as harness

    net = tiny_net(1, impl="sdpa", vocab=len(tokenizer) + 1, tokenizer=tokenizer)
    lm = harness.DiffusionHarnessLM(evaluator=DiffusionEvaluator(net), levels=1, max_length=64)
    text = "the cat sat on the mat and a dog ran away"
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ev = lm.evaluator
    ids = torch.tensor([[ev.start_id] + ev.encode(text)])
    plain = copy.deepcopy(net.model)
    plain.config.is_causal = True
    with torch.no_grad():
        logp = torch.log_softmax(plain(input_ids=ids).logits[0, :-1].double(), -1)
    exact = logp.gather(-1, ids[0, 1:, None]).sum().item()
    assert total == pytest.approx(exact, rel=1e-5)


# --- training: exact resume across a block-size change ---------------------------------------------
def block_module(schedule=((0, 1), (2, 2), (4, 4))):
    return DiffusionLM(
        backbone=BackboneConfig(config=dict(MODEL), tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig(mode="add")),
        diffusion=DiffusionConfig(attention="block", block_size=4, block_size_schedule=[list(s) for s in schedule],
                                  block_t="block", t_sampling="stratified"),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, lr_schedule="cosine"),
        val_t_levels=2,
    )


def test_resume_is_exact_across_a_block_size_change(tmp_path):
    assert [block_size_at(s, 4, [[0, 1], [2, 2], [4, 4]]) for s in range(6)] == [1, 1, 2, 2, 4, 4]
    L.seed_everything(0)
    full = LossRecorder()
    make_trainer(tmp_path / "full", 6, [full]).fit(block_module(), make_data())
    L.seed_everything(0)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    first = LossRecorder()
    make_trainer(tmp_path / "a", 6, [first, ckpt, StopAfter(3)]).fit(block_module(), make_data())
    resumed = LossRecorder()
    path = os.path.join(tmp_path / "ck", os.listdir(tmp_path / "ck")[0])
    L.seed_everything(99)
    make_trainer(tmp_path / "b", 6, [resumed]).fit(block_module(), make_data(), ckpt_path=path)
    assert sorted(resumed.losses) == [3, 4, 5]  # the block size grows from 2 to 4 at step 4, after the resume
    for step in range(3):
        assert first.losses[step] == full.losses[step]
    for step in range(3, 6):
        assert resumed.losses[step] == full.losses[step], step
    module = block_module()
    trainer = L.Trainer(default_root_dir=str(tmp_path / "v"), accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2)
    val = trainer.validate(module, make_data(), verbose=False)[0]
    assert torch.isfinite(torch.tensor(val["val/nelbo"]))


# --- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,words", [
    (dict(block_size_schedule={0: 4, 10: 2}, block_size=2), "shrinks"),
    (dict(block_size_schedule=[[0, 1], [5, 8]], block_size=4), "ends at block size 8"),
    (dict(anneal_steps=10), "annealing"),
    (dict(complementary_masks=True, schedule="cosine"), "linear schedule"),
    (dict(block_size=0), "block_size must be >= 1"),
])
def test_bad_block_options_are_refused_in_one_line(options, words):
    with pytest.raises(DLMError, match=words) as err:
        DiffusionConfig(attention="block", **options).check()
    assert "\n" not in str(err.value)


def test_block_sizes_must_fit_the_sequence_length(tmp_path):
    with pytest.raises(DLMError, match="does not divide data.seq_len 30"):
        check_block_seq_len(DiffusionConfig(attention="block", block_size=4), 30)
    with pytest.raises(DLMError, match="above data.seq_len 16"):
        check_block_seq_len(DiffusionConfig(attention="block", block_size=32), 16)
    with pytest.raises(DLMError, match="block size 8 does not divide"):
        check_block_seq_len(DiffusionConfig(attention="block", block_size=16, block_size_schedule={0: 8, 3: 16}), 36)
    with pytest.raises(DLMError, match="block size 4 does not divide data.seq_len 30"):  # checked where seq_len is known
        make_trainer(tmp_path, 1).fit(block_module(schedule=((0, 4),)), make_data(seq_len=30))


def test_block_model_refuses_bidirectional_only_sampling_options(tokenizer):
    net = tiny_net(4, impl="sdpa", vocab=len(tokenizer) + 1, tokenizer=tokenizer)
    for kw, words in ((dict(cache="dual"), "approximate cache"), (dict(cache="prefix"), "approximate cache"),
                      (dict(suffixes=["end"]), "cannot infill"), (dict(refresh_every=2), "refresh_every")):
        with pytest.raises(DLMError, match=words) as err:
            generate(net, ["the"], length=4, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(DLMError, match="sub_block 3 must"):
        block_decode(net, [[1, 2]], 4, SamplerConfig(steps=4), block_size=4, schedule=get_schedule("linear"),
                     seeds=[0], sub_block=3)


def test_export_round_trip_keeps_the_block_options(tmp_path, tokenizer):
    net = tiny_net(4, impl="sdpa", vocab=len(tokenizer) + 1, tokenizer=tokenizer, block_size_schedule={0: 2, 5: 4})
    tokenizer.add_special_tokens({"mask_token": "<|mask|>"}) if tokenizer.mask_token is None else None
    net.mask_token_id = tokenizer.mask_token_id
    loaded = DiffusionModel.from_pretrained(net.save_pretrained(str(tmp_path / "export")))
    assert loaded.diffusion.is_block and loaded.diffusion.block_size == 4
    assert block_size_at(6, 4, loaded.diffusion.block_size_schedule) == 4
    assert generate(loaded, ["the cat"], length=5, seed=0).token_ids == generate(net, ["the cat"], length=5,
                                                                               seed=0).token_ids


# --- the experiment config and the benchmark script ------------------------------------------------
def test_block_experiment_config_parses_with_a_growing_block_size():
    from tests.test_cli import REPO, parse

    cfg = parse(os.path.join(REPO, "experiments", "smollm2_block.yaml"))
    module = DiffusionLM(**cfg.model.as_dict())
    diffusion = module.diffusion_cfg
    assert diffusion.is_block and diffusion.anneal_steps == 0
    assert [block_size_at(s, diffusion.block_size, diffusion.block_size_schedule) for s in (0, 16, 48, 159)] == [1, 4, 16, 32]
    check_block_seq_len(diffusion, cfg.data.seq_len)


def test_decode_vs_ar_quick_mode_runs(tmp_path):
    import importlib.util

    from tests.test_cli import REPO

    spec = importlib.util.spec_from_file_location("decode_vs_ar", os.path.join(REPO, "benchmarks", "decode_vs_ar.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    names = [r["name"].split(" ")[0] for r in out["rows"]]
    assert names == ["AR", "block", "bidirectional"] * 2 and [r["batch"] for r in out["rows"]] == [1, 1, 1, 2, 2, 2]
    for row in out["rows"]:
        assert row["tokens"] == (2 * 16) and row["tokens_per_s"] > 0 and row["gen_ppl"] > 1
    assert "verdict" in (tmp_path / "r.md").read_text()


def test_checkpoints_from_before_block_mode_resume_unchanged():
    from dataclasses import asdict

    from lightning_dlm.training.resume import compare_hparams

    now = {"diffusion": asdict(DiffusionConfig())}
    old = {"diffusion": {k: v for k, v in now["diffusion"].items()
                         if k not in ("attention", "block_size", "block_size_schedule", "block_t", "complementary_masks")}}
    assert compare_hparams(old, now) == ([], [])
    block = {"diffusion": asdict(DiffusionConfig(attention="block"))}
    assert [key for key, _, _ in compare_hparams(old, block)[1]] == ["diffusion.attention"]
