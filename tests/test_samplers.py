"""The sampler library: strategies, blocks, KV caches, EOS stopping, batch invariance, errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from lightning_dlm.core import get_schedule
from lightning_dlm.core.errors import DLMError
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig
from lightning_dlm.model.loading import load_tokenizer
from lightning_dlm.sampling import (
    STRATEGIES,
    FunctionDenoiser,
    ModelDenoiser,
    SamplerConfig,
    Strategy,
    build_canvas,
    decode,
    generate,
    register,
    row_seeds,
    slot_logits,
)
from tests.conftest import TINY_LLAMA, TINY_TOKENIZER

MASK, EOS, PAD = 96, 2, 0
LINEAR = get_schedule("linear")
STRATEGY_CASES = [
    ("random", {}, 1.0),
    ("confidence", {"confidence": "probability"}, 0.0),
    ("confidence", {"confidence": "margin", "rank_noise": 0.5}, 0.8),
    ("confidence", {"confidence": "entropy"}, 0.0),
    ("threshold", {"threshold": 0.02}, 0.0),
]
CASE_IDS = ["random", "conf-prob", "conf-margin-noise-sampled", "conf-entropy", "threshold"]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    cfg = BackboneConfig(config=dict(TINY_LLAMA), mask_token=MaskTokenConfig(mode="reuse", id=MASK))
    return DiffusionModel.from_config(cfg).eval()


@pytest.fixture(scope="module")
def text_model():
    """A tiny LLaMA over the 512-token fixture tokenizer, with an added mask token."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    config = dict(TINY_LLAMA, vocab_size=len(tokenizer), max_position_embeddings=48)
    net = DiffusionModel.from_config(BackboneConfig(config=config), tokenizer).eval()
    return net, tokenizer


def _canvas(prefixes=([3, 4, 5], [6]), length=8, suffixes=([7, 8], [9])):
    return build_canvas(list(prefixes), length, MASK, PAD, 1, list(suffixes) if suffixes is not None else None,
                        align_targets=True)


def _decode(denoiser, canvas, seeds=None, **options):
    config = SamplerConfig(**options)
    seeds = seeds if seeds is not None else list(range(1, canvas.batch_size + 1))
    return decode(denoiser, canvas, config, schedule=LINEAR, seeds=seeds, eos_id=EOS, pad_id=PAD,
                  suppress_ids=[MASK])


def peaked(token_of_slot, vocab=97, scale=30.0, shift=True):
    """A stub denoiser whose logits put almost all mass on ``token_of_slot(column)``."""

    def fn(ids, attn):
        width = ids.shape[1]
        logits = torch.zeros(ids.shape[0], width, vocab)
        for col in range(width):
            slot = col + 1 if shift else col
            logits[:, col, token_of_slot(slot)] = scale
        return logits

    return FunctionDenoiser(fn)


# --- every strategy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("block_size", [None, 3])
@pytest.mark.parametrize("strategy,options,temperature", STRATEGY_CASES, ids=CASE_IDS)
def test_prefix_and_suffix_preserved_and_target_decoded(net, strategy, options, temperature, block_size, cache):
    canvas = _canvas()
    out = _decode(ModelDenoiser(net), canvas, steps=6, temperature=temperature, top_p=0.9, strategy=strategy,
                  strategy_options=options, block_size=block_size, cache=cache)
    assert torch.equal(out.ids[~canvas.target], canvas.ids[~canvas.target])
    assert not (out.ids[canvas.target] == MASK).any()
    assert [len(t) for t in out.tokens] == [8, 8]
    assert 1 <= out.stats.forward_passes <= 6
    assert sum(map(sum, out.stats.committed_per_step)) == 16


def _suffix_reader(vocab=97, scale=30.0):
    """A denoiser whose every slot predicts (the row's last real token) + 10: the infill is a
    function of the suffix, so a sampler that lost or moved the suffix decodes something else."""

    def fn(ids, attn):
        logits = torch.zeros(ids.shape[0], ids.shape[1], vocab)
        for row in range(ids.shape[0]):
            real = [int(tok) for tok, a in zip(ids[row], attn[row]) if a and int(tok) not in (MASK, PAD)]
            logits[row, :, (real[-1] + 10) % vocab] = scale
        return logits

    return FunctionDenoiser(fn)


@pytest.mark.parametrize("block_size", [None, 3])
@pytest.mark.parametrize("strategy,options,temperature", STRATEGY_CASES, ids=CASE_IDS)
def test_the_infill_is_read_from_the_suffix(strategy, options, temperature, block_size):
    a = _decode(_suffix_reader(), _canvas(suffixes=([7, 8], [9])), steps=6, temperature=temperature,
                strategy=strategy, strategy_options=options, block_size=block_size)
    b = _decode(_suffix_reader(), _canvas(suffixes=([7, 40], [50])), steps=6, temperature=temperature,
                strategy=strategy, strategy_options=options, block_size=block_size)
    assert a.tokens == [[18] * 8, [19] * 8]  # the suffix reached the denoiser, and only the target changed
    assert b.tokens == [[50] * 8, [60] * 8]
    no_suffix = _decode(_suffix_reader(), _canvas(suffixes=None), steps=6, temperature=temperature,
                        strategy=strategy, strategy_options=options, block_size=block_size)
    # without a suffix the last real token is a committed target or the prompt's: never 18/19
    assert all(tok not in (18, 19) for row in no_suffix.tokens for tok in row[:1])


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("block_size", [None, 4])
def test_a_real_model_sees_the_suffix_through_every_cache(net, cache, block_size):
    """The model's inputs carry the suffix: in every pass without a cache or with the prefix cache
    (the suffix is never cached there), in the pass that fills the dual cache; and the first
    pass's logits of the target slots change with the suffix."""
    calls = []
    hook = net.model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(kwargs["input_ids"].clone()),
                                               with_kwargs=True)
    try:
        first_logits = []
        for suffixes in (([7, 8], [9]), ([60, 61], [62])):
            calls.clear()
            _decode(ModelDenoiser(net), _canvas(suffixes=suffixes), steps=8, temperature=0.0, strategy="confidence",
                    block_size=block_size, cache=cache)
            with_suffix = [bool((ids == suffixes[0][-1]).any(-1)[0]) for ids in calls]
            assert with_suffix[0], "the first pass did not see the suffix"
            if cache in ("none", "prefix"):
                assert all(with_suffix), with_suffix
            with torch.no_grad():
                first_logits.append(net(calls[0]).float())
    finally:
        hook.remove()
    assert not torch.allclose(first_logits[0][:, 3:11], first_logits[1][:, 3:11])


@pytest.mark.parametrize("confidence", ["probability", "margin", "entropy"])
def test_confidence_order_with_T_equal_to_masked_commits_one_per_step(net, confidence):
    canvas = _canvas(length=7)
    out = _decode(ModelDenoiser(net), canvas, steps=7, temperature=0.0, strategy="confidence",
                  strategy_options={"confidence": confidence})
    assert out.stats.committed_per_step == [[1, 1]] * 7
    assert out.stats.forward_passes == 7


def test_confidence_order_commits_the_most_confident_slot_first():
    # slot confidence rises to the right: the rightmost slot goes first, then leftwards
    def fn(ids, attn):
        logits = torch.zeros(ids.shape[0], ids.shape[1], 97)
        for col in range(ids.shape[1]):
            logits[:, col, 10 + col] = 0.5 * (col + 1)
        return logits

    canvas = _canvas(prefixes=[[3]], length=4, suffixes=None)
    out = _decode(FunctionDenoiser(fn), canvas, steps=4, temperature=0.0, strategy="confidence",
                  capture_trajectory=True)
    order = [int((a != b).nonzero()[0, 1]) for a, b in zip([canvas.ids] + out.trajectory[:-1], out.trajectory)]
    assert order == [4, 3, 2, 1]
    assert out.tokens == [[10, 11, 12, 13]]  # slot i reads logits i-1 (the shift)


def test_threshold_commits_many_slots_when_the_model_is_confident(net):
    canvas = _canvas(prefixes=[[3, 4]], length=8, suffixes=None)
    confident = _decode(peaked(lambda slot: 10 + slot), canvas, steps=8, temperature=0.0, strategy="threshold",
                        strategy_options={"threshold": 0.9})
    assert confident.stats.committed_per_step == [[8]]
    assert confident.stats.forward_passes == 1
    assert confident.tokens == [list(range(12, 20))]
    unsure = _decode(ModelDenoiser(net), canvas, steps=8, temperature=0.0, strategy="threshold",
                     strategy_options={"threshold": 0.9})  # a random model is never that sure: one per step
    assert unsure.stats.committed_per_step == [[1]] * 8


@pytest.mark.parametrize("strategy,options,temperature", STRATEGY_CASES, ids=CASE_IDS)
def test_block_decoding_never_commits_outside_the_current_block(net, strategy, options, temperature):
    canvas = _canvas(length=10)
    start, end = canvas.target_span()
    out = _decode(ModelDenoiser(net), canvas, steps=10, temperature=temperature, strategy=strategy,
                  strategy_options=options, block_size=4, capture_trajectory=True)
    blocks = [(start, start + 4), (start + 4, start + 8), (start + 8, end)]
    previous, current = canvas.ids, 0
    for state in out.trajectory:
        changed = (state != previous).any(0).nonzero().flatten().tolist()
        if changed:
            while not all(blocks[current][0] <= c < blocks[current][1] for c in changed):
                assert not (previous[:, blocks[current][0]:blocks[current][1]] == MASK).any()  # block done
                current += 1
        previous = state
    assert current == 2 and not (out.ids[canvas.target] == MASK).any()


def test_steps_are_split_over_blocks(net):
    canvas = _canvas(length=8)
    out = _decode(ModelDenoiser(net), canvas, steps=8, temperature=0.0, strategy="confidence", block_size=2)
    assert out.stats.committed_per_step == [[1, 1]] * 8
    with pytest.raises(DLMError, match="at least one step per block"):
        _decode(ModelDenoiser(net), canvas, steps=3, block_size=2)


def test_random_order_reveals_slots_at_the_schedule_rate():
    """Going from t to s, the expected share of the region committed is alpha(s) - alpha(t)."""
    cosine = get_schedule("cosine")
    canvas = build_canvas([[3]] * 64, 32, MASK, PAD, 1, align_targets=True)
    config = SamplerConfig(steps=8, temperature=1.0, strategy="random")
    out = decode(peaked(lambda slot: 5), canvas, config, schedule=cosine, seeds=list(range(64)))
    per_step = torch.tensor(out.stats.committed_per_step, dtype=torch.float64).mean(1) / 32
    grid = torch.linspace(1.0, 0.0, 9, dtype=torch.float64)
    expected = cosine.alpha(grid[1:]) - cosine.alpha(grid[:-1])
    assert torch.allclose(per_step, expected, atol=0.03)


def test_sampling_respects_top_k_and_rank_noise_is_seeded(net):
    def fn(ids, attn):  # five equally likely tokens everywhere, then a long tail
        logits = torch.zeros(ids.shape[0], ids.shape[1], 97)
        logits[..., 40:45] = 5.0
        return logits

    canvas = _canvas(length=12)
    out = _decode(FunctionDenoiser(fn), canvas, steps=4, temperature=1.0, top_k=5, strategy="confidence")
    assert ((out.ids[canvas.target] >= 40) & (out.ids[canvas.target] < 45)).all()
    runs = [_decode(ModelDenoiser(net), canvas, seeds=seeds, steps=12, temperature=0.0, strategy="confidence",
                    strategy_options={"rank_noise": 5.0}, capture_trajectory=True)
            for seeds in ([1, 2], [1, 2], [3, 4])]
    orders = [[tuple((state != prev).nonzero()[:, 1].tolist()) for prev, state in
               zip([canvas.ids] + r.trajectory[:-1], r.trajectory)] for r in runs]
    assert orders[0] == orders[1] and orders[0] != orders[2]


# --- KV caching -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("strategy,options,temperature", [STRATEGY_CASES[0], STRATEGY_CASES[2], STRATEGY_CASES[4]],
                         ids=["random", "conf-margin-noise-sampled", "threshold"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_cache_refreshed_every_step_reproduces_uncached(net, cache, strategy, options, temperature, padded):
    canvas = _canvas(length=9) if padded else _canvas(prefixes=[[3, 4], [5, 6]], length=9, suffixes=None)
    common = dict(steps=9, temperature=temperature, strategy=strategy, strategy_options=options, block_size=3)
    plain = _decode(ModelDenoiser(net), canvas, **common)
    cached = _decode(ModelDenoiser(net), canvas, cache=cache, refresh_every=1, **common)
    assert torch.equal(cached.ids, plain.ids)
    assert cached.stats.committed_per_step == plain.stats.committed_per_step
    stale = _decode(ModelDenoiser(net), canvas, cache=cache, **common)  # refreshed once per block
    assert stale.stats.positions_computed < plain.stats.positions_computed
    assert stale.stats.full_passes == 3 and plain.stats.full_passes == plain.stats.forward_passes


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_window_pass_equals_the_full_pass_on_a_fresh_cache(family_config, cache, padded):
    """The cached forward pass (positions, padding, key order) is right: on the state it was
    refreshed on, it gives the full pass's logits (LLaMA: rotary positions; GPT-2: learned)."""
    torch.manual_seed(0)
    cfg = BackboneConfig(config=family_config, mask_token=MaskTokenConfig(mode="reuse", id=MASK))
    net = DiffusionModel.from_config(cfg).eval()
    canvas = _canvas(length=9) if padded else _canvas(prefixes=[[3, 4, 5], [6, 7, 8]], length=9, suffixes=[[7], [9]])
    ids, attn = canvas.ids.clone(), canvas.attention_mask
    assert (attn is None) != padded
    ids[:, 4:6] = 11  # some committed slots
    denoiser, rows = ModelDenoiser(net), torch.arange(2)
    keep, width = (6, 9), ids.shape[1]
    window = (6, width) if cache == "prefix" else (6, 10)
    full = denoiser.refresh(ids, attn, keep, window, cache, rows)
    assert torch.allclose(denoiser.cached(ids, attn, keep, window, rows), full, atol=1e-5)
    with torch.no_grad():
        reference = net(ids, attention_mask=attn)[:, 6:9]
    assert torch.allclose(full, reference, atol=1e-5)
    one = denoiser.cached(ids[1:], attn[1:] if padded else None, keep, window, rows[1:])  # a subset of the rows
    assert torch.allclose(one, full[1:], atol=1e-5)


# --- EOS --------------------------------------------------------------------------------------------
def _eos_at(rel, start):
    return lambda slot: EOS if slot - start == rel else 20 + slot


@pytest.mark.parametrize("strategy", ["confidence", "random", "threshold"])
def test_eos_stops_generation_and_pads_the_rest(strategy):
    canvas = _canvas(prefixes=[[3, 4]], length=8, suffixes=None)
    start, end = canvas.target_span()
    out = _decode(peaked(_eos_at(3, start)), canvas, steps=8, temperature=0.0, strategy=strategy,
                  stop_at_eos=True, strategy_options={"threshold": 0.999} if strategy == "threshold" else {})
    assert out.stopped_at_eos == [True]
    assert out.tokens == [[20 + start, 21 + start, 22 + start]]
    assert out.ids[0, start + 3] == EOS and (out.ids[0, start + 4:end] == PAD).all()
    if strategy == "confidence":  # left to right on ties: stops after the EOS, 4 of 8 steps
        assert out.stats.forward_passes == 4 and out.stats.steps == 4
    free = _decode(peaked(_eos_at(3, start)), canvas, steps=8, temperature=0.0, strategy=strategy)
    assert free.stopped_at_eos == [False] and len(free.tokens[0]) == 8  # without stop_at_eos: all 8


def test_eos_waits_until_everything_left_of_it_is_decided():
    # the EOS slot is the most confident, so it is committed first; the row stops only once the
    # three slots left of it are decided
    def fn(ids, attn):
        logits = torch.zeros(ids.shape[0], ids.shape[1], 97)
        for col in range(ids.shape[1]):
            logits[:, col, 30] = 1.0
        logits[:, 2 + 3 - 1, EOS] = 50.0  # slot start+3 (start = 2), read with the shift
        return logits

    canvas = _canvas(prefixes=[[3, 4]], length=8, suffixes=None)
    out = _decode(FunctionDenoiser(fn), canvas, steps=8, temperature=0.0, strategy="confidence", stop_at_eos=True)
    assert out.stats.committed_per_step == [[1]] * 4
    assert out.tokens == [[30, 30, 30]] and out.stopped_at_eos == [True]


def test_generate_max_length_stops_rows_at_eos(text_model):
    net, tokenizer = text_model
    eos = tokenizer.eos_token_id
    free = generate(net, ["ab", "hello"], max_length=12, steps=12, tokenizer=tokenizer, temperature=0.0,
                    strategy="confidence")
    assert all(len(t) <= 12 and eos not in t for t in free.token_ids)

    def boost_eos(module, inputs, output):  # the model now wants to stop everywhere
        output[..., eos] += 100.0
        return output

    hook = net.model.lm_head.register_forward_hook(boost_eos)
    try:
        out = generate(net, ["ab", "hello"], max_length=12, steps=12, tokenizer=tokenizer, temperature=0.0,
                       strategy="confidence")
    finally:
        hook.remove()
    assert out.stopped_at_eos == [True, True] and out.token_ids == [[], []] and out.texts == ["", ""]
    assert out.stats.tokens == 0 and out.stats.forward_passes < 12


# --- batches ----------------------------------------------------------------------------------------
BATCH_CASES = [
    dict(strategy="random", temperature=1.0, top_p=0.9),
    dict(strategy="confidence", temperature=0.8, confidence="margin", rank_noise=0.3, block_size=4),
    dict(strategy="threshold", temperature=0.0, threshold=0.05, block_size=4, cache="dual"),
    dict(strategy="confidence", temperature=0.7, top_k=20, block_size=4, cache="prefix"),
]


@pytest.mark.parametrize("options", BATCH_CASES, ids=[c["strategy"] + "-" + c.get("cache", "none") for c in BATCH_CASES])
def test_batch_of_different_lengths_equals_each_prompt_alone(text_model, options):
    net, tokenizer = text_model
    prompts = ["a", "hello world, and then", "the cat"]
    suffixes = ["end.", "x", "and a much longer suffix here"]
    batch = generate(net, prompts, suffixes=suffixes, length=8, steps=8, seed=3, tokenizer=tokenizer, **options)
    for i, (prompt, suffix) in enumerate(zip(prompts, suffixes)):
        alone = generate(net, [prompt], suffixes=[suffix], length=8, steps=8, seed=3, tokenizer=tokenizer, **options)
        assert alone.token_ids[0] == batch.token_ids[i]
        assert alone.seeds[0] == batch.seeds[i]


def test_row_seeds_depend_on_the_row_only_and_repeats_differ(text_model):
    a, b = [5, 6], [7]
    assert row_seeds(0, [a, b])[1] == row_seeds(0, [b])[0] == row_seeds(0, [a, a, b])[2]
    repeats = row_seeds(0, [a, a, a])
    assert len(set(repeats)) == 3 and repeats[0] == row_seeds(0, [a])[0]
    assert row_seeds(0, [a], [[1]]) != row_seeds(0, [a]) and row_seeds(1, [a]) != row_seeds(0, [a])
    net, tokenizer = text_model
    out = generate(net, ["the", "the"], length=6, steps=6, temperature=1.0, tokenizer=tokenizer)
    assert out.token_ids[0] != out.token_ids[1]


# --- the text API -----------------------------------------------------------------------------------
def test_generate_reports_statistics_and_trajectory(text_model):
    net, tokenizer = text_model
    out = generate(net, ["hello", "a"], suffixes=["world", "b"], length=6, steps=3, tokenizer=tokenizer,
                   strategy="confidence", temperature=0.0, capture_trajectory=True)
    stats = out.stats
    assert stats.forward_passes == out.forward_passes == 3 and stats.steps == 3
    assert stats.committed_per_step == [[2, 2]] * 3 and stats.tokens == 12
    assert stats.wall_time_s > 0 and stats.tokens_per_s > 0 and stats.tokens_per_forward == 4
    assert set(stats.as_dict()) >= {"forward_passes", "committed_per_step", "wall_time_s", "tokens_per_s"}
    assert len(out.trajectory) == 3 and torch.equal(out.trajectory[-1], out.ids)
    views = out.trajectory_texts(tokenizer, row=1)
    assert views[0].count("_") == 4 and "_" not in views[-1] and views[-1] == out.texts[1]
    assert all(isinstance(t, str) for t in out.texts) and [len(t) for t in out.token_ids] == [6, 6]
    mask = net.mask_token_id
    assert mask >= 512 and not (out.ids == mask).any()  # the added mask token is never sampled


def test_random_strategy_greedy_one_step_is_argmax_of_one_forward(net):
    canvas = _canvas()
    out = _decode(ModelDenoiser(net), canvas, steps=1, temperature=0.0, strategy="random")
    with torch.no_grad():
        logits = slot_logits(net(canvas.ids, attention_mask=canvas.attention_mask), True)
        logits[..., MASK] = float("-inf")
    assert torch.equal(out.ids[canvas.target], logits.argmax(-1)[canvas.target])
    assert out.stats.forward_passes == 1


def test_a_new_strategy_registers_by_name(net):
    @register
    class LeftToRight(Strategy):
        name = "left_to_right_test"

        def step(self, ctx):
            first = ctx.eligible.float().argmax(1)
            commit = torch.zeros_like(ctx.eligible)
            rows = ctx.eligible.any(1)
            commit[rows, first[rows]] = True
            if ctx.is_last:
                commit = ctx.eligible.clone()
            return commit, ctx.logits().argmax(-1)

    try:
        canvas = _canvas(length=4)
        out = _decode(ModelDenoiser(net), canvas, steps=4, strategy="left_to_right_test", capture_trajectory=True)
        start, _ = canvas.target_span()
        for i, state in enumerate(out.trajectory):
            assert not (state[:, start:start + i + 1] == MASK).any() and (state[:, start + i + 1:start + 4] == MASK).all()
    finally:
        STRATEGIES.pop("left_to_right_test")


# --- bad input --------------------------------------------------------------------------------------
def test_bad_input_gives_one_line_errors(net, text_model, tmp_path):
    tiny, tokenizer = text_model
    cases = [
        (dict(length=40, suffixes=["one two three four five six seven eight nine ten"]), "above the model's limit"),
        (dict(length=0), "length must be >= 1"),
        (dict(steps=0), "steps T must be >= 1"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(strategy="beam"), "unknown sampling strategy 'beam'"),
        (dict(strategy="random", threshold=0.5), "takes no option"),
        (dict(strategy="confidence", confidence="vibes"), "unknown confidence"),
        (dict(cache="full"), "unknown cache mode"),
        (dict(block_size=0), "block_size must be >= 1"),
        (dict(length=4, max_length=4), "either length"),
        (dict(seeds=[1, 2], length=4), "one seed per prompt"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DLMError, match=message) as err:
            generate(tiny, ["hello there"], tokenizer=tokenizer, **kwargs)
        assert "\n" not in str(err.value)
    plain = AutoModelForCausalLM.from_config(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=97))
    for model in (plain, torch.nn.Linear(2, 2)):
        with pytest.raises(DLMError, match="not a diffusion model"):
            generate(model, ["hi"], tokenizer=tokenizer)
    with pytest.raises(DLMError, match="not a diffusion model"):
        ModelDenoiser(plain)
    with pytest.raises(DLMError, match="needs a model denoiser"):
        _decode(peaked(lambda s: 5), _canvas(), cache="prefix")
    with pytest.raises(DLMError, match="not aligned"):
        build_canvas([[3, 4], [5]], 2, MASK, PAD, 1, suffixes=[[1], [1, 2]]).target_span()
    from lightning_dlm.training.module import load_diffusion_lm

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(DLMError, match="not a lightning_dlm diffusion checkpoint"):
        load_diffusion_lm(str(foreign))


# --- dlm sample -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A lightning_dlm checkpoint of an untrained tiny model (written without a Trainer)."""
    import lightning

    from lightning_dlm.training.module import DiffusionLM

    module = DiffusionLM(backbone=BackboneConfig(config=dict(TINY_LLAMA, vocab_size=512, max_position_embeddings=96),
                                                 tokenizer=TINY_TOKENIZER))
    module.configure_model()
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save(checkpoint, path)
    return str(path)


def _jsonl(text):
    import json

    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_cli_prompts_file_strategies_and_jsonl_statistics(tiny_ckpt, tmp_path, capsys):
    from lightning_dlm.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat", "suffix": " end.", "id": 7}\n\n{"prompt": "hello world"}\n')
    common = ["sample", "--ckpt", tiny_ckpt, "--prompts_file", str(prompts), "--length", "6", "--steps", "3",
              "--num_samples", "2", "--strategy", "threshold", "--threshold", "0.5", "--confidence", "margin",
              "--block_size", "3", "--cache", "dual", "--format", "jsonl", "--temperature", "0.7"]
    main(common + ["--batch_size", "3"])
    captured = capsys.readouterr()
    records = _jsonl(captured.out)
    assert [(r["prompt"], r["sample"]) for r in records] == [("the cat", 0), ("the cat", 1), ("hello world", 0),
                                                             ("hello world", 1)]
    assert records[0]["id"] == 7 and records[0]["suffix"] == " end." and records[2].get("suffix") is None
    for r in records:
        assert len(r["token_ids"]) == 6 and sum(r["committed_per_step"]) == 6
        assert {"forward_passes", "tokens_per_s", "wall_time_s", "steps"} <= set(r["batch_stats"])
    assert "sampling (2 batches) 4/4 samples" in captured.err  # progress lines (stderr is not a terminal here)
    out_file = tmp_path / "one_batch.jsonl"
    main(common + ["--batch_size", "8", "--output", str(out_file)])
    assert capsys.readouterr().out == ""
    again = _jsonl(out_file.read_text())
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in records]  # batching does not matter


def test_cli_text_output_with_max_length(tiny_ckpt, capsys):
    from lightning_dlm.cli import main

    main(["sample", "--ckpt", tiny_ckpt, "--prompt", "[a, the dog]", "--max_length", "5", "--steps", "5",
          "--strategy", "confidence", "--temperature", "0", "--trajectory", "true"])
    out = capsys.readouterr().out
    assert "--- sample 1/2" in out and "\na\u27e6" in out and "the dog\u27e6" in out and "generated text between \u27e6 \u27e7" in out
    assert "forward passes" in out and "tokens/s" in out
    assert "  step   1: '" in out


@pytest.mark.parametrize("args,message", [
    (["--strategy", "beam"], "unknown sampling strategy 'beam'"),
    (["--strategy", "random", "--threshold", "0.9"], "takes no option"),
    (["--top_p", "0"], "top_p must be in"),
    (["--steps", "0"], "steps T must be >= 1"),
    (["--length", "0"], "target length must be >= 1"),
    (["--length", "200"], "above the model's limit of 96"),
    (["--prompts_file", "/nonexistent/prompts.jsonl"], "does not exist"),
])
def test_cli_bad_input_is_one_line(tiny_ckpt, capsys, args, message):
    from lightning_dlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--ckpt", tiny_ckpt, *args])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_prompts_file_errors(tmp_path):
    from lightning_dlm.commands.sample import read_prompts_file

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(DLMError, match="bad.jsonl:2 is not valid JSON"):
        read_prompts_file(str(bad))
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(DLMError, match="no \"prompt\" string"):
        read_prompts_file(str(bad))
    bad.write_text("\n")
    with pytest.raises(DLMError, match="holds no prompts"):
        read_prompts_file(str(bad))


def test_the_registry_refuses_a_second_strategy_under_a_taken_name():
    class Impostor(Strategy):
        name = "random"

        def select(self, ctx):  # pragma: no cover - never registered
            raise AssertionError

    before = dict(STRATEGIES)
    with pytest.raises(DLMError, match="a sampling strategy named 'random' is already registered .*RandomOrder.*: give "
                                       ".*Impostor another name"):
        register(Impostor)
    assert STRATEGIES == before
    assert register(STRATEGIES["random"]) is STRATEGIES["random"]  # re-registering the same class is harmless


def test_sample_output_into_a_missing_folder_is_refused_before_sampling(tmp_path, capsys):
    from lightning_dlm.cli import main

    target = tmp_path / "missing" / "out.txt"
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--ckpt", str(tmp_path / "nothing.ckpt"), "--prompt", "x", "--output", str(target)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output {target}: the folder {target.parent} does not exist: create it or write elsewhere"]
    assert not target.parent.exists()
