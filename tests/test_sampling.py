"""The first sampler: canvas layout, filtering, random-order decoding with prefix and suffix."""

import pytest
import torch

from lightning_dlm.core import get_schedule
from lightning_dlm.core.errors import DLMError
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig
from lightning_dlm.sampling import SamplerConfig, build_canvas, decode, filter_logits, slot_logits
from tests.conftest import TINY_LLAMA

MASK = 96


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    cfg = BackboneConfig(config=dict(TINY_LLAMA), mask_token=MaskTokenConfig(mode="reuse", id=MASK))
    return DiffusionModel.from_config(cfg).eval()


def _denoiser(net):
    return lambda ids, attn: net(ids, attention_mask=attn)


def random_order_sample(denoiser, canvas, schedule, steps=64, temperature=1.0, top_p=1.0, suppress_ids=(), seed=0):
    """The random-order strategy through the sampler engine; returns (ids, forward passes)."""
    config = SamplerConfig(steps=steps, temperature=temperature, top_p=top_p, strategy="random")
    out = decode(denoiser, canvas, config, schedule=schedule, seeds=[seed + i for i in range(canvas.batch_size)],
                 suppress_ids=suppress_ids)
    return out.ids, out.stats.forward_passes


def test_canvas_layout_left_pads_and_marks_targets():
    c = build_canvas([[5, 6, 7], [8]], 2, MASK, pad_id=0, start_id=1, suffixes=[[9], [10, 11]])
    assert c.ids.tolist() == [[5, 6, 7, MASK, MASK, 9], [0, 8, MASK, MASK, 10, 11]]
    assert c.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    assert c.target.tolist() == [[False, False, False, True, True, False], [False, False, True, True, False, False]]
    assert torch.equal(c.masked, c.target)
    empty = build_canvas([[]], 2, MASK, pad_id=0, start_id=1)
    assert empty.ids.tolist() == [[1, MASK, MASK]] and empty.attention_mask is None


def test_canvas_errors():
    with pytest.raises(DLMError, match="length must be >= 1"):
        build_canvas([[1]], 0, MASK, 0, 1)
    with pytest.raises(DLMError, match="above the model's limit of 8"):
        build_canvas([[1, 2, 3]], 4, MASK, 0, 1, suffixes=[[4, 5]], max_positions=8)
    with pytest.raises(DLMError, match="empty prompt"):
        build_canvas([[]], 2, MASK, 0, None)


def test_slot_logits_shift():
    logits = torch.arange(3).float().view(1, 3, 1)
    assert slot_logits(logits, True).view(-1).tolist() == [0.0, 0.0, 1.0]
    assert torch.equal(slot_logits(logits, False), logits)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False]]
    p = filter_logits(logits, top_p=0.75)  # 0.5 + 0.3 reaches 0.75: keep two
    assert torch.isfinite(p).tolist() == [[True, True, False, False]]
    p1 = filter_logits(logits, top_p=0.4)  # the top token alone
    assert torch.isfinite(p1).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])  # near-uniform (the candidates widen), typical, peaked
@pytest.mark.parametrize("top_p", [0.1, 0.9, 0.999])
def test_nucleus_from_topk_candidates_keeps_the_full_sorts_set(scale, top_p):
    """filter_logits finds the nucleus among the top-k candidates (widened until they hold top_p):
    the kept tokens and their logits are those of the plain full-vocabulary sort."""
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)) * scale
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.double(), dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p
    reference = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    ours = filter_logits(logits, top_p=top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(reference))
    assert torch.equal(ours[torch.isfinite(ours)], logits[torch.isfinite(ours)])
    if scale == 0.05 and top_p > 0.5:
        assert int(torch.isfinite(ours).sum(-1).min()) > 256  # the nucleus lies beyond the first candidates


@pytest.mark.parametrize("steps", [1, 4, 64])
def test_prefix_and_suffix_are_preserved_and_all_slots_decoded(net, steps):
    canvas = build_canvas([[3, 4, 5], [6]], 6, MASK, pad_id=0, start_id=1, suffixes=[[7, 8], [9]], align_targets=True)
    ids, passes = random_order_sample(_denoiser(net), canvas, get_schedule("linear"), steps=steps,
                                      suppress_ids=[MASK], seed=0)
    assert torch.equal(ids[~canvas.target], canvas.ids[~canvas.target])
    assert not (ids[canvas.target] == MASK).any()
    assert 1 <= passes <= steps
    if steps == 1:
        assert passes == 1


def test_sampling_is_deterministic_given_the_seed(net):
    canvas = build_canvas([[3, 4]], 8, MASK, 0, 1)
    run = lambda seed: random_order_sample(_denoiser(net), canvas, get_schedule("cosine"), steps=8,  # noqa: E731
                                           temperature=1.0, top_p=0.9, seed=seed)[0]
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_greedy_with_one_step_equals_argmax_of_one_forward(net):
    canvas = build_canvas([[3, 4]], 5, MASK, 0, 1)
    ids, _ = random_order_sample(_denoiser(net), canvas, get_schedule("linear"), steps=1, temperature=0.0)
    with torch.no_grad():
        expect = slot_logits(net(canvas.ids), True).argmax(-1)
    assert torch.equal(ids[canvas.target], expect[canvas.target])


def test_bad_sampling_arguments(net):
    canvas = build_canvas([[3]], 2, MASK, 0, 1)
    with pytest.raises(DLMError, match="steps T must be >= 1"):
        random_order_sample(_denoiser(net), canvas, get_schedule("linear"), steps=0)
    with pytest.raises(DLMError, match="top_p must be in"):
        random_order_sample(_denoiser(net), canvas, get_schedule("linear"), top_p=1.5)


# --- the sampler's defaults live in SamplerConfig only -------------------------------------------
def test_sampler_defaults_are_written_once_in_sampler_config(monkeypatch):
    """generate() and `dlm sample` resolve every sampler option they leave unset to SamplerConfig's
    default; a default repeated elsewhere with another value fails here."""
    import dataclasses
    import inspect

    from lightning_dlm.commands.sample import build_parser
    from lightning_dlm.model.loading import load_tokenizer
    from lightning_dlm.sampling import generate
    from lightning_dlm.sampling.engine import sampler_defaults
    from tests.conftest import TINY_TOKENIZER

    defaults = sampler_defaults()
    assert defaults == {f.name: getattr(SamplerConfig(), f.name) for f in dataclasses.fields(SamplerConfig)}
    # None means the default, so callers pass their options through
    assert SamplerConfig(**{name: None for name in defaults}) == SamplerConfig()
    assert SamplerConfig(steps=None, block_size=4, refresh_every=None).block_size == 4

    # dlm sample: what its parser (and --help) resolves
    parsed = build_parser().parse_args(["--ckpt", "x.ckpt"])
    shared = [name for name in defaults if name in parsed]
    assert {"steps", "temperature", "top_k", "top_p", "strategy", "block_size", "cache", "refresh_every"} <= set(shared)
    assert {name: parsed[name] for name in shared} == {name: defaults[name] for name in shared}

    # generate(): its signature leaves them unset, and the config it decodes with is SamplerConfig()'s
    params = inspect.signature(generate).parameters
    for name in defaults:
        if name in params and params[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            assert params[name].default in (None, defaults[name]), name
    seen = []

    def capture(config):
        seen.append(config)
        raise RuntimeError("captured")

    monkeypatch.setattr(SamplerConfig, "check", capture)
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    cfg = BackboneConfig(config=dict(TINY_LLAMA, vocab_size=len(tokenizer), max_position_embeddings=48))
    net = DiffusionModel.from_config(cfg, tokenizer).eval()
    with pytest.raises(RuntimeError, match="captured"):
        generate(net, ["hello"], tokenizer=tokenizer, length=4)
    resolved = dataclasses.asdict(seen[0])
    assert {name: resolved[name] for name in defaults} == defaults
