"""The one decode loop (``DecodeRun.denoise``) that bidirectional and block decoding share: its
contract, the trajectory of a block model, the ``random`` strategy's schedule, the sub-block
cache where it is exact, and the suffix of an infill reaching the model."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lightning_dlm.core import get_schedule
from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.model import BackboneConfig, DiffusionModel
from lightning_dlm.model.loading import load_tokenizer
from lightning_dlm.sampling import (
    ConfidenceOrder,
    FunctionDenoiser,
    SamplerConfig,
    Strategy,
    block_decode,
    build_canvas,
    decode,
    generate,
)
from lightning_dlm.sampling.engine import DecodeRun
from tests.conftest import TINY_LLAMA, TINY_TOKENIZER

MASK, PAD = 96, 0
LINEAR = get_schedule("linear")
HOLE = "\u2591"  # how a still-masked slot is shown in a trajectory (never a token's text)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def tiny_block_net(tokenizer, block_size=4, sharpen=40.0, seed=0):
    """A tiny block diffusion LLaMA (as tests/test_block_diffusion.py builds it), its LM head
    sharpened so that decoding commits several slots per step."""
    torch.manual_seed(seed)
    vocab = len(tokenizer) + 1
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation="sdpa")
    net = DiffusionModel(LlamaForCausalLM(cfg).eval(), vocab - 1, False, tokenizer=tokenizer,
                         diffusion=DiffusionConfig(attention="block", block_size=block_size).check())
    with torch.no_grad():
        net.model.lm_head.weight.mul_(sharpen)
    return net


@pytest.fixture(scope="module")
def text_model():
    """A tiny bidirectional LLaMA over the fixture tokenizer, with an added mask token."""
    torch.manual_seed(0)
    tok = load_tokenizer(TINY_TOKENIZER)
    config = dict(TINY_LLAMA, vocab_size=len(tok), max_position_embeddings=48)
    return DiffusionModel.from_config(BackboneConfig(config=config), tok).eval(), tok


def peaked(vocab=97, scale=30.0):
    """A stub denoiser whose every position puts almost all mass on token (column % 50) + 1."""

    def fn(ids, attn):
        logits = torch.zeros(ids.shape[0], ids.shape[1], vocab)
        for col in range(ids.shape[1]):
            logits[:, col, col % 50 + 1] = scale
        return logits

    return FunctionDenoiser(fn)


class Recording(ConfidenceOrder):
    """The confidence strategy, keeping the slot-aligned logits it was shown at every step."""

    name = "recording_test"  # not registered: passed as an instance

    def __init__(self):
        super().__init__()
        self._seen = []

    def step(self, ctx):
        self._seen.append(ctx.logits().clone())
        return super().step(ctx)


# --- the loop's contract -----------------------------------------------------------------------------
def test_the_loop_refuses_a_strategy_that_leaves_slots_undecided():
    class Lazy(Strategy):
        name = "lazy_test"

        def step(self, ctx):
            return None

    run = DecodeRun(SamplerConfig(strategy=Lazy()), LINEAR, [0, 1], 2, torch.device("cpu"), None)
    tokens, open_ = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="left slots undecided"):
        run.denoise(tokens, open_, torch.ones(4, dtype=torch.bool), 3, lambda step, eligible: None)
    assert run.stats.steps == 3 and run.stats.committed_per_step == [[0, 0]] * 3


def test_the_loop_commits_only_allowed_slots_and_reports_them_per_batch_row():
    run = DecodeRun(SamplerConfig(strategy="confidence", temperature=0.0, capture_trajectory=True), LINEAR,
                    [0, 1, 2], 3, torch.device("cpu"), None)
    tokens, open_ = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool)
    allowed = torch.tensor([False, True, True, False])
    logits = torch.zeros(2, 4, 10)
    logits[..., 7] = 5.0
    run.denoise(tokens, open_, allowed, 2, lambda step, eligible: logits, rows=[2, 0], snapshot=tokens.clone)
    assert tokens.tolist() == [[0, 7, 7, 0]] * 2 and open_.tolist() == [[True, False, False, True]] * 2
    assert run.stats.committed_per_step == [[1, 0, 1]] * 2  # span row j is batch row rows[j]
    assert len(run.trajectory) == 2


# --- a block model's trajectory ----------------------------------------------------------------------
@pytest.mark.parametrize("kv_cache", [True, False])
def test_a_block_models_trajectory_shows_its_generated_span_at_every_step(tokenizer, kv_cache):
    net = tiny_block_net(tokenizer)
    prompts = ["the cat", "a much longer prompt that spans more than one block", "x"]
    out = generate(net, prompts, length=10, strategy="confidence", temperature=0.0, seed=2, kv_cache=kv_cache,
                   capture_trajectory=True)
    a, b = out.target_span
    assert b - a == 10 and len(out.trajectory) == out.stats.steps > 3
    assert torch.equal(out.trajectory[-1], out.ids)
    for r, prompt in enumerate(prompts):
        assert out.ids[r, a:b].tolist() == out.token_ids[r]
        assert out.ids[r, :a].tolist()[-len(tokenizer(prompt)["input_ids"]):] == tokenizer(prompt)["input_ids"]
        views = out.trajectory_texts(tokenizer, row=r, mask_text=HOLE)
        assert all(views) and views[0].count(HOLE) >= 10 - 4  # one block at most decided after one step
        holes = [v.count(HOLE) for v in views]
        assert holes == sorted(holes, reverse=True)  # slots are only ever committed
        assert views[-1] == out.texts[r] and HOLE not in views[-1]


def test_a_block_models_trajectory_with_eos_stopping_ends_at_the_text(tokenizer):
    net = tiny_block_net(tokenizer, sharpen=1.0)
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # make EOS likely (as tests/test_block_diffusion.py does), so that a row stops early
        weight = net.model.lm_head.weight
        weight[eos] += 0.6 * weight.abs().mean() * torch.sign(weight[eos] + 1e-3)
        weight.mul_(8.0)
    prompts = ["the cat", "one two three four five", "x", "long prompt of many words here"]
    out = generate(net, prompts, max_length=24, strategy="threshold", temperature=1.0, top_p=1.0, seed=0,
                   capture_trajectory=True)
    assert any(out.stopped_at_eos) and not all(out.stopped_at_eos)
    a, b = out.target_span
    for r in range(len(prompts)):
        views = out.trajectory_texts(tokenizer, row=r, mask_text=HOLE)
        assert all(views) and HOLE not in views[-1] and views[-1].startswith(out.texts[r])
        assert out.ids[r, a:a + len(out.token_ids[r])].tolist() == out.token_ids[r]
        if out.stopped_at_eos[r]:  # EOS, then padding, as in the bidirectional canvas
            assert out.ids[r, a + len(out.token_ids[r])] == eos


def test_block_decode_returns_a_canvas_with_the_targets_aligned(tokenizer):
    net = tiny_block_net(tokenizer)
    prefixes = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14]]
    out = block_decode(net, prefixes, 5, SamplerConfig(steps=4, strategy="confidence", temperature=0.0),
                       block_size=4, schedule=LINEAR, seeds=[0, 1, 2], pad_id=3)
    assert out.target_span == (6, 11) and out.ids.shape == (3, 11)
    assert out.ids[:, :6].tolist() == [[3, 3, 3, 5, 6, 7], [3, 3, 3, 3, 3, 8], [9, 10, 11, 12, 13, 14]]
    assert out.ids[:, 6:].tolist() == out.tokens


# --- the random strategy follows the schedule ---------------------------------------------------------
def test_random_strategy_spreads_its_commits_over_the_steps():
    """Linear schedule, T = 8 steps over 8 slots: a slot is committed at step 0 with probability 1/8."""
    rows = 16
    canvas = build_canvas([[3, 4]] * rows, 8, MASK, PAD, 1, align_targets=True)
    out = decode(peaked(), canvas, SamplerConfig(steps=8, strategy="random", temperature=0.0), schedule=LINEAR,
                 seeds=list(range(rows)))
    first = out.stats.committed_per_step[0]
    assert sum(first) <= 0.4 * 8 * rows  # about 1/8 of the slots, not all of them
    assert all(c < 8 for c in first) and out.stats.steps == 8
    assert sum(map(sum, out.stats.committed_per_step)) == 8 * rows


def test_random_strategy_on_a_block_model_takes_several_steps_per_block(tokenizer):
    net = tiny_block_net(tokenizer)
    out = generate(net, ["the cat"], length=8, strategy="random", seed=1)
    assert len(out.token_ids[0]) == 8
    assert max(row[0] for row in out.stats.committed_per_step) < 4  # never a whole block of 4 in one step


# --- the sub-block cache is exact where it must be ------------------------------------------------------
def test_sub_block_cache_with_one_sub_block_is_the_exact_computation(tokenizer):
    """With the sub-block as large as the block, no column of the block is stale: the sub-block
    cache's cached steps must see the logits of the uncached reference (and decode the same)."""
    net = tiny_block_net(tokenizer)
    prompts = ["the cat", "a much longer prompt that spans more than one block"]
    runs = {}
    for name, options in (("uncached", dict(kv_cache=False)), ("sub_cache", dict(sub_block=4, sub_block_cache=True))):
        strategy = Recording()
        out = generate(net, prompts, length=11, steps=11, strategy=strategy, temperature=0.0, seed=4, **options)
        runs[name] = out, strategy._seen
    (ref, ref_seen), (sub, sub_seen) = runs["uncached"], runs["sub_cache"]
    assert sub.token_ids == ref.token_ids
    assert len(sub_seen) == len(ref_seen) > 4 and sub.stats.steps == ref.stats.steps
    for got, want in zip(sub_seen, ref_seen):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_sub_block_cache_decodes_the_same_as_the_exact_cache_at_one_step_per_sub_block(tokenizer):
    """Two steps per block of 4, sub-blocks of 2: every step is a sub-block's first, computed exactly."""
    net = tiny_block_net(tokenizer)
    kw = dict(length=8, steps=4, strategy="confidence", temperature=0.0, seed=1, sub_block=2)
    exact, sub = generate(net, ["the cat", "x"], **kw), generate(net, ["the cat", "x"], sub_block_cache=True, **kw)
    assert sub.token_ids == exact.token_ids and sub.stats.steps == exact.stats.steps


# --- infilling: the suffix reaches the model ------------------------------------------------------------
def _recording_forward(net, monkeypatch):
    seen = []
    forward = net.cached_forward

    def record(input_ids, *args, **kwargs):
        logits, cache = forward(input_ids, *args, **kwargs)
        seen.append((input_ids.clone(), logits.detach().clone()))
        return logits, cache

    monkeypatch.setattr(net, "cached_forward", record)
    return seen


def test_the_suffix_of_an_infill_reaches_the_model(text_model, monkeypatch):
    net, tok = text_model
    runs = {}
    for suffix in ("sat on the mat", "ran away fast"):
        seen = _recording_forward(net, monkeypatch)
        out = generate(net, ["the cat"], suffixes=[suffix], length=6, steps=3, strategy="confidence",
                       temperature=0.0, tokenizer=tok)
        ids = tok(suffix, add_special_tokens=False)["input_ids"]
        a, b = out.target_span
        assert out.ids[0, b:b + len(ids)].tolist() == ids
        assert len(seen) == 3 and all(x[0, b:b + len(ids)].tolist() == ids for x, _ in seen)  # every pass sees it
        runs[suffix] = seen[0][1]
    first, second = runs.values()
    assert not torch.allclose(first, second)  # and the target's logits depend on it
