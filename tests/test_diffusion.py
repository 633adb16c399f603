"""The pure-torch diffusion math (schedules, t sampling, corruption, loss terms, annealing masks),
and the training objective checked against a hand-computed NELBO: explicit loops over positions,
w(t) from the closed-form schedules, compared with what ``DiffusionLM.training_step`` returns."""

import math

import pytest
import torch

from lightning_dlm.core import (
    ANNEAL_MASKS,
    SCHEDULES,
    RandomAnnealMask,
    RightContextAnnealMask,
    additive_attention_mask,
    anneal_ratio,
    annealing_allowed,
    annealing_mask,
    attention_allowed,
    corrupt,
    get_schedule,
    loss_terms_from_rows,
    maskable_positions,
    sample_t,
    scored_rows,
    t_grid,
)
from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.core.loss import LossTerms
from lightning_dlm.core.seeding import derive_seed, make_generator

SCHEDULE_CASES = [("linear", {}), ("cosine", {}), ("polynomial", {"power": 2.0}), ("polynomial", {"power": 0.5}),
                  ("loglinear", {"eps": 1e-3})]


@pytest.mark.parametrize("name,kwargs", SCHEDULE_CASES)
def test_schedule_weight_matches_autograd_derivative(name, kwargs):
    schedule = get_schedule(name, **kwargs)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    alpha = schedule.alpha(t)
    (d_alpha,) = torch.autograd.grad(alpha.sum(), t)
    expected = -d_alpha / (1 - alpha)
    torch.testing.assert_close(schedule.alpha_prime(t.detach()), d_alpha, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(schedule.weight(t.detach()), expected.detach(), rtol=1e-10, atol=1e-10)


# Closed-form alpha(t) of each registered schedule, written out independently of the library.
REFERENCE_ALPHA = {
    "linear": lambda t: 1 - t,
    "cosine": lambda t: torch.cos(0.5 * math.pi * t),
    "polynomial": lambda t, power: 1 - t**power,
    "loglinear": lambda t, eps: 1 - (1 - eps) * t,
}


def _float64_reference(name, kwargs, t):
    """(mask probability, weight) from the closed-form alpha and its autograd derivative, in float64."""
    t = t.double().requires_grad_(True)
    alpha = REFERENCE_ALPHA[name](t, **kwargs)
    (d_alpha,) = torch.autograd.grad(alpha.sum(), t)
    alpha = alpha.detach()
    return 1 - alpha, -d_alpha / (1 - alpha)


@pytest.mark.parametrize("eps", [DiffusionConfig().eps, 1e-4])
@pytest.mark.parametrize("name,kwargs", SCHEDULE_CASES)
def test_schedule_float32_mask_prob_and_weight_match_float64(name, kwargs, eps):
    """In float32, down to t = eps, both stay within 1e-5 (relative) of the float64 closed form."""
    assert {case[0] for case in SCHEDULE_CASES} == set(SCHEDULES) == set(REFERENCE_ALPHA)
    grid = torch.cat([torch.logspace(math.log10(eps), 0, 200, dtype=torch.float64), torch.linspace(eps, 1, 200)])
    t = grid.float()
    schedule = get_schedule(name, **kwargs)
    mask_prob, weight = _float64_reference(name, kwargs, t)
    assert schedule.mask_prob(t).dtype == schedule.weight(t).dtype == torch.float32
    torch.testing.assert_close(schedule.mask_prob(t).double(), mask_prob, rtol=1e-5, atol=0)
    torch.testing.assert_close(schedule.weight(t).double(), weight, rtol=1e-5, atol=0)


def test_schedule_endpoints_and_closed_forms():
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    torch.testing.assert_close(get_schedule("linear").weight(t), 1 / t)
    torch.testing.assert_close(get_schedule("polynomial", power=3).weight(t), 3 / t)
    torch.testing.assert_close(get_schedule("loglinear").weight(t), 1 / t)
    assert get_schedule("cosine").alpha(torch.tensor(0.0)).item() == 1.0
    assert abs(get_schedule("cosine").alpha(torch.tensor(1.0)).item()) < 1e-7
    assert set(SCHEDULES) == {"linear", "cosine", "polynomial", "loglinear"}


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(DLMError, match="unknown noise schedule 'nope'"):
        get_schedule("nope")


@pytest.mark.parametrize("method", ["uniform", "antithetic", "stratified"])
def test_sample_t_range_and_determinism(method):
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = sample_t(1000, 1e-3, method, g1), sample_t(1000, 1e-3, method, g2)
    assert torch.equal(a, b)
    assert a.min() >= 1e-3 and a.max() < 1.0
    assert abs(a.mean().item() - 0.5005) < 0.03


def test_antithetic_pairs_and_stratified_strata():
    t = sample_t(6, 0.0, "antithetic", torch.Generator().manual_seed(0))
    torch.testing.assert_close(t[:3] + t[3:], torch.ones(3))
    s = sample_t(8, 0.0, "stratified", torch.Generator().manual_seed(0))
    assert torch.equal(torch.floor(s * 8), torch.arange(8, dtype=s.dtype))


def test_t_grid_midpoints():
    torch.testing.assert_close(t_grid(4, 0.0), torch.tensor([0.125, 0.375, 0.625, 0.875]))


def test_corrupt_respects_maskable_and_rate():
    x0 = torch.arange(4000).view(4, 1000) % 50 + 1
    t = torch.tensor([0.1, 0.5, 0.9, 1.0])
    maskable = maskable_positions(x0.shape, shift=True)
    xt, masked = corrupt(x0, t, 0, get_schedule("linear"), maskable, torch.Generator().manual_seed(0))
    assert not masked[:, 0].any()  # position 0 is never a target with the shift
    assert torch.equal(xt[masked], torch.zeros(int(masked.sum()), dtype=x0.dtype))
    assert torch.equal(xt[~masked], x0[~masked])
    rates = masked[:, 1:].float().mean(1)
    torch.testing.assert_close(rates, t, atol=0.05, rtol=0)


def test_maskable_excludes_padding_and_protected():
    attn = torch.tensor([[0, 1, 1, 1]])
    protected = torch.tensor([[False, True, False, False]])
    m = maskable_positions((1, 4), shift=False, attention_mask=attn, protected=protected)
    assert m.tolist() == [[False, False, True, True]]


def _hand_loss_inputs():
    # B=2, L=3, V=3; logits chosen by hand.
    logits = torch.tensor(
        [
            [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]],
            [[0.0, 0.0, 3.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]],
        ]
    )
    x0 = torch.tensor([[0, 1, 2], [2, 0, 1]])
    masked = torch.tensor([[False, True, True], [True, False, True]])
    t = torch.tensor([0.5, 0.25])
    return logits, x0, masked, t


def _nll(row, target):
    top = max(row)
    return -(row[target] - top - math.log(sum(math.exp(v - top) for v in row)))


def _rows_terms(logits, x0, masked, t, schedule, shift, num_targets):
    """The loss terms the objectives compute: scored rows, their logits, w(t) of their row."""
    sources, targets = scored_rows(x0, masked, shift)
    weights = get_schedule(schedule).weight(t.float())[:, None].expand_as(sources)[sources]
    return loss_terms_from_rows(logits[sources], targets, weights, num_targets)


def test_loss_hand_computed_shift_on():
    logits, x0, masked, t = _hand_loss_inputs()
    L = logits.tolist()
    # shift: logits[:, i-1] vs x0[:, i] where masked[:, i], i >= 1
    # b=0: i=1 (logits[0][0] vs 1), i=2 (logits[0][1] vs 2), w = 1/0.5 = 2
    # b=1: i=2 (logits[1][1] vs 1), w = 1/0.25 = 4   (i=0 masked but never a target: not maskable)
    total = 2 * (_nll(L[0][0], 1) + _nll(L[0][1], 2)) + 4 * _nll(L[1][1], 1)
    terms = _rows_terms(logits, x0, masked, t, "linear", True, 2 * 2)
    assert terms.normalized("elbo").item() == pytest.approx(total / (2 * 2), rel=1e-6)
    assert terms.normalized("masked").item() == pytest.approx(total / 3, rel=1e-6)


def test_loss_hand_computed_shift_off():
    logits, x0, masked, t = _hand_loss_inputs()
    L = logits.tolist()
    # no shift: logits[:, i] vs x0[:, i] where masked
    total = 2 * (_nll(L[0][1], 1) + _nll(L[0][2], 2)) + 4 * (_nll(L[1][0], 2) + _nll(L[1][2], 1))
    terms = _rows_terms(logits, x0, masked, t, "linear", False, 2 * 3)
    assert terms.normalized("elbo").item() == pytest.approx(total / (2 * 3), rel=1e-6)
    assert terms.normalized("masked").item() == pytest.approx(total / 4, rel=1e-6)


def test_reused_mask_id_real_occurrences_are_not_scored():
    # The mask id 3 also occurs as a real token: what is scored comes from `masked`, not from x_t == 3.
    module = _tiny_module()
    x0 = torch.tensor([[1, 3, 3, 20, 3, 30, 40, 3]])
    protected = torch.tensor([[False, True, False, False, False, False, False, True]])
    terms, masked, maskable = module.objective_impl.diffusion_terms(module.net, x0, None, torch.ones(1), None,
                                                                    torch.Generator().manual_seed(0), protected=protected)
    assert masked.tolist() == maskable.tolist()  # linear schedule, t = 1: every maskable position masked
    assert int(terms.num_scored) == int(masked.sum()) == 5
    xt = torch.where(masked, torch.full_like(x0, 3), x0)
    assert int((xt == 3).sum()) == 7  # the two protected real 3s look like masks in x_t, and are not scored
    nothing, _, _ = module.objective_impl.diffusion_terms(module.net, x0, None, torch.ones(1), None,
                                                          torch.Generator().manual_seed(0),
                                                          protected=torch.ones_like(protected))
    assert nothing.normalized("elbo").item() == 0.0 and int(nothing.num_scored) == 0


def test_loss_is_float32_for_bf16_logits_and_has_gradients():
    logits, x0, masked, t = _hand_loss_inputs()
    lb = logits.bfloat16().requires_grad_()
    loss = _rows_terms(lb, x0, masked, t, "cosine", True, 4).normalized("elbo")
    assert loss.dtype == torch.float32
    loss.backward()
    assert lb.grad is not None and lb.grad.abs().sum() > 0


def test_loss_rejects_bad_normalization():
    terms = LossTerms(torch.ones(()), torch.ones(()), torch.tensor(1), 1)
    with pytest.raises(DLMError, match="normalization"):
        terms.normalized("mean")


def test_anneal_ratio():
    assert anneal_ratio(0, 10) == pytest.approx(0.1)
    assert anneal_ratio(4, 10) == pytest.approx(0.5)
    assert anneal_ratio(9, 10) == 1.0
    assert anneal_ratio(100, 10) == 1.0
    assert anneal_ratio(0, 0) == 1.0


@pytest.mark.parametrize("kind", ["random", "right_context"])
def test_annealing_masks(kind):
    L = 64
    g = torch.Generator().manual_seed(0)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    zero = annealing_allowed(L, 0.0, kind, g)
    assert torch.equal(zero, causal)
    half = annealing_allowed(L, 0.5, kind, g)
    assert torch.equal(half & causal, causal)  # the past is always visible
    future = half.triu(1).sum().item() / (L * (L - 1) / 2)
    assert 0.4 < future < 0.6
    assert annealing_allowed(L, 1.0, kind, g) is None  # no dense mask once annealed
    if kind == "right_context":  # contiguous: each row is a prefix of keys
        for row in half:
            n = int(row.sum())
            assert row[:n].all() and not row[n:].any()


def test_hash_mask_is_a_pure_function_of_ratio_and_seed():
    L = 48
    for cls in ANNEAL_MASKS.values():
        a, b = cls(0.5, 123).dense(L), cls(0.5, 123).dense(L)
        assert torch.equal(a, b)  # no generator state: the same (ratio, seed) is the same mask
        assert not torch.equal(a, cls(0.5, 124).dense(L))
        assert not torch.equal(a, cls(0.5, 123 + (1 << 40)).dense(L))  # the high bits of the seed count
        assert torch.equal(cls(0.0, 123).dense(L), torch.ones(L, L, dtype=torch.bool).tril())
        assert torch.equal(cls(1.0, 123).dense(L), torch.ones(L, L, dtype=torch.bool))
    rand = RandomAnnealMask(0.5, 123)
    assert torch.equal(rand.dense(L)[:20, :20], rand.dense(20))  # a pair's draw does not depend on L
    # larger ratios only open more pairs (one uniform hash per pair, compared with the ratio)
    assert torch.equal(RandomAnnealMask(0.3, 9).dense(L) & RandomAnnealMask(0.6, 9).dense(L), RandomAnnealMask(0.3, 9).dense(L))
    assert annealing_mask("random", 1.0, 5) is None and annealing_mask("right_context", 0.999, 5) is not None
    with pytest.raises(DLMError, match="unknown annealing mask"):
        annealing_mask("blocky", 0.5, 0)
    with pytest.raises(DLMError, match="ratio"):
        RandomAnnealMask(1.5, 0)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_random_hash_mask_opens_each_future_pair_independently_at_the_ratio(ratio):
    L = 256
    opened = RandomAnnealMask(ratio, 2024).dense(L).float()
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    n = int(future.sum())
    sigma = math.sqrt(ratio * (1 - ratio) / n)
    assert abs(opened[future].mean().item() - ratio) < 5 * sigma
    # neighbouring pairs (same query, next key; next query, same key) are open together at ratio**2
    for both in (opened[:, :-1] * opened[:, 1:], opened[:-1] * opened[1:]):
        pairs = future[:-1, :-1].triu(1)
        rate = both[: L - 1, : L - 1][pairs].mean().item()
        assert abs(rate - ratio**2) < 5 * math.sqrt(ratio**2 * (1 - ratio**2) / int(pairs.sum()))
    # per-query counts of opened future keys are Binomial(L - 1 - i, ratio): their standardised spread is ~1
    counts = opened.triu(1).sum(1)[: L - 32]
    trials = (L - 1 - torch.arange(L - 32)).float()
    z = (counts - ratio * trials) / torch.sqrt(ratio * (1 - ratio) * trials)
    assert abs(z.mean().item()) < 0.35 and 0.75 < z.std().item() < 1.25


def test_right_context_reach_is_the_random_masks_count_made_contiguous():
    L = 96
    for ratio, seed in [(0.25, 1), (0.5, 77), (0.8, 3)]:
        rand, right = RandomAnnealMask(ratio, seed).dense(L), RightContextAnnealMask(ratio, seed).dense(L)
        assert torch.equal(right.triu(1).sum(1), rand.triu(1).sum(1))  # same number of future keys, row by row
        reach = RightContextAnnealMask(ratio, seed).reach(L)
        assert torch.equal(right, torch.arange(L)[None, :] <= reach[:, None])  # a prefix of the keys per query


def test_attention_allowed_padding_documents_and_diagonal():
    allowed = RandomAnnealMask(0.5, 4).dense(6)
    pad = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 2, 2]])
    full = attention_allowed(allowed, pad, docs)
    q, k = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    for b in range(2):
        expected = (allowed & pad[b].bool()[None, :] & (docs[b][:, None] == docs[b][None, :])) | (q == k)
        assert torch.equal(full[b], expected)
    assert torch.equal(attention_allowed(None, None, None, length=3), torch.ones(1, 3, 3, dtype=torch.bool))


def test_additive_mask_values_and_padding():
    allowed = torch.ones(3, 3, dtype=torch.bool).tril()
    pad = torch.tensor([[0, 1, 1]])
    mask = additive_attention_mask(allowed, pad, torch.float32)
    assert mask.shape == (1, 1, 3, 3)
    minv = torch.finfo(torch.float32).min
    expected = torch.tensor([[0, minv, minv], [minv, 0, minv], [minv, 0, 0]])
    assert torch.equal(mask[0, 0], expected)
    assert mask.dtype == torch.float32 and additive_attention_mask(allowed, None, torch.bfloat16).dtype == torch.bfloat16


# --- the hand-computed NELBO ------------------------------------------------------------------------
def hand_weight(schedule: str, t: float) -> float:
    """w(t) = -alpha'(t) / (1 - alpha(t)) from the closed forms (linear: alpha = 1 - t; cosine: cos(pi t / 2))."""
    if schedule == "linear":
        return 1.0 / t
    if schedule == "cosine":
        return 0.5 * math.pi * math.sin(0.5 * math.pi * t) / (1.0 - math.cos(0.5 * math.pi * t))
    raise ValueError(schedule)


def hand_mask_prob(schedule: str, t: float) -> float:
    """1 - alpha(t), the probability that a maskable token is masked at time t."""
    return {"linear": t, "cosine": 1.0 - math.cos(0.5 * math.pi * t)}[schedule]


def hand_maskable(attention_mask, protected, shift):
    """Position i of row b is a target iff it is a real token, not protected, and (with the shift)
    it has a real token before it to be predicted from. Nested lists, by explicit loops."""
    rows, length = len(attention_mask), len(attention_mask[0])
    out = [[False] * length for _ in range(rows)]
    for b in range(rows):
        for i in range(length):
            real = bool(attention_mask[b][i]) and not bool(protected[b][i])
            has_source = i >= 1 and bool(attention_mask[b][i - 1]) if shift else True
            out[b][i] = real and has_source
    return out


def hand_nelbo(logits, x0, masked, weights, shift):
    """(sum of w(t_b) * CE, sum of CE, number scored) over the masked positions i, each predicted
    from logits[b][i - 1] with the shift (logits[b][i] without). Nested lists, explicit loops, float64."""
    total = ce_total = 0.0
    scored = 0
    for b in range(len(x0)):
        for i in range(len(x0[b])):
            if not masked[b][i]:
                continue
            source = i - 1 if shift else i
            assert source >= 0, "position 0 is never a target with the shift"
            ce = _nll(logits[b][source], x0[b][i])
            total += weights[b] * ce
            ce_total += ce
            scored += 1
    return total, ce_total, scored


@pytest.mark.parametrize("shift", [True, False])
def test_rows_terms_equal_the_hand_computed_sum(shift):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 11, generator=g)
    x0 = torch.randint(0, 11, (3, 9), generator=g)
    masked = (torch.rand(3, 9, generator=g) < 0.5) & torch.tensor(hand_maskable([[1] * 9] * 3, [[0] * 9] * 3, shift))
    t = torch.tensor([0.2, 0.5, 0.9])
    rows = _rows_terms(logits, x0, masked, t, "cosine", shift, 27)
    total, ce_total, scored = hand_nelbo(logits.double().tolist(), x0.tolist(), masked.tolist(),
                                         [hand_weight("cosine", v) for v in t.tolist()], shift)
    assert rows.weighted_sum.item() == pytest.approx(total, rel=1e-5)
    assert rows.ce_sum.item() == pytest.approx(ce_total, rel=1e-5)
    assert int(rows.num_scored) == scored > 0


SEED, COUNTER = 5, 11


def hand_batch():
    """Three rows of 12: row 1 left-padded by 3, row 2 with a 4-token prompt; ``index`` is the batch counter."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(4, 97, (3, 12), generator=g)
    attention_mask = torch.ones_like(x0)
    attention_mask[1, :3] = 0
    x0[1, :3] = 0
    prompt = torch.zeros_like(x0, dtype=torch.bool)
    prompt[2, :4] = True
    return {"input_ids": x0, "attention_mask": attention_mask, "prompt_mask": prompt, "index": COUNTER}


def hand_training_nelbo(module, batch, schedule, shift, anneal_ratio_=1.0):
    """The NELBO of ``batch`` by hand: the noise recomputed from the documented generator
    (``make_generator(seed, counter, rank)``: t first, then one uniform per position; the annealing
    mask a hash of ``derive_seed(seed, counter, rank, 2)``), the model run on the full sequence,
    then explicit loops. Returns (elbo, masked-normalised, masked positions, scored, targets)."""
    x0, pad, prompt = batch["input_ids"], batch.get("attention_mask"), batch.get("prompt_mask")
    pad = torch.ones_like(x0) if pad is None else pad
    prompt = torch.zeros_like(x0, dtype=torch.bool) if prompt is None else prompt
    cfg = module.diffusion_cfg
    g = make_generator(module.seed, int(batch["index"]), 0)
    t = sample_t(x0.shape[0], cfg.eps, cfg.t_sampling, g).tolist()
    u = torch.rand(x0.shape, generator=g).tolist()
    maskable = hand_maskable(pad.tolist(), prompt.tolist(), shift)
    masked = [[maskable[b][i] and u[b][i] < hand_mask_prob(schedule, t[b]) for i in range(x0.shape[1])]
              for b in range(x0.shape[0])]
    xt = torch.where(torch.tensor(masked), torch.full_like(x0, module.mask_token_id), x0)
    allowed = None
    if anneal_ratio_ < 1.0:
        allowed = RandomAnnealMask(anneal_ratio_, derive_seed(module.seed, int(batch["index"]), 0, 2)).dense(x0.shape[1])
    with torch.no_grad():
        logits = module.net(xt, attention_mask=batch.get("attention_mask"), allowed=allowed).double()
    if cfg.subs_on(module.net.mask_token_added):  # SUBS: the added mask token is no candidate of any target
        logits[..., module.mask_token_id] = float("-inf")
    logits = logits.tolist()
    total, _, scored = hand_nelbo(logits, x0.tolist(), masked, [hand_weight(schedule, v) for v in t], shift)
    targets = sum(map(sum, maskable))
    assert 0 < scored < targets  # some targets masked, some not: the normalizations and selections differ
    return total / targets, total / scored, torch.tensor(masked), scored, targets


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("schedule,shift,anneal_steps", [("linear", True, 0), ("linear", False, 0), ("cosine", True, 0),
                                                         ("linear", True, 4)])
def test_training_step_is_the_hand_computed_nelbo(schedule, shift, anneal_steps):
    """``DiffusionLM.training_step`` on a padded batch with a prompt returns the NELBO computed by
    hand: w(t) * CE of every masked target, shifted, divided by the real targets (``elbo``) or by
    the scored positions (``masked``); padding and the prompt never scored."""
    batch = hand_batch()
    losses = {}
    for normalization in ("elbo", "masked"):
        module = _tiny_module(shift, seed=SEED, schedule=schedule, normalization=normalization, anneal_steps=anneal_steps)
        losses[normalization] = module.training_step(batch, 0)
    elbo, masked_norm, masked, scored, targets = hand_training_nelbo(module, batch, schedule, shift,
                                                                     anneal_ratio(0, anneal_steps))
    out = module.objective_impl.train_terms(module.net, batch, step=0, counter=COUNTER, rank=0)
    assert torch.equal(out.masked, masked)  # the objective drew the documented masks
    assert not (out.masked & ~batch["attention_mask"].bool()).any() and not (out.masked & batch["prompt_mask"]).any()
    assert int(out.terms.num_scored) == scored and int(out.terms.num_targets) == targets
    assert losses["elbo"].item() == pytest.approx(elbo, rel=1e-5)
    assert losses["masked"].item() == pytest.approx(masked_norm, rel=1e-5)


def test_maskable_with_shift_skips_the_first_real_token_of_a_left_padded_row():
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    m = maskable_positions((2, 5), shift=True, attention_mask=attn)
    assert m.tolist() == [[False, False, False, True, True], [False, True, True, False, False]]


def _tiny_module(shift=True, full_logits=False, seed=0, **diffusion):
    """A tiny llama DiffusionLM in eval mode; ``full_logits`` forces the full-logits loss path."""
    from lightning_dlm.model import BackboneConfig, MaskTokenConfig
    from lightning_dlm.training.module import DiffusionLM
    from tests.conftest import TINY_LLAMA

    torch.manual_seed(0)
    module = DiffusionLM(
        backbone=BackboneConfig(config=dict(TINY_LLAMA), mask_token=MaskTokenConfig(mode="reuse", id=3)),
        diffusion=DiffusionConfig(shift=shift, **diffusion), seed=seed,
    )
    module.configure_model()
    module.eval()
    assert module.net.row_logits_exact  # checked numerically: the LM head alone gives the logits
    if full_logits:  # force the full-logits loss path
        module.net.row_logits_exact = False
    return module


@pytest.mark.parametrize("full_logits", [False, True])
@pytest.mark.parametrize("shift", [True, False])
def test_elbo_normalization_without_padding_is_unchanged(shift, full_logits):
    """Without padding the per-token NELBO is still weighted_sum / (B * targets per row), bit for bit."""
    module = _tiny_module(shift, full_logits)
    x0 = torch.randint(4, 97, (3, 12), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.5, 0.9])
    per_row = 11 if shift else 12
    for attention_mask in (None, torch.ones_like(x0)):
        terms, _, _ = module.objective_impl.diffusion_terms(module.net, x0, attention_mask, t, None,
                                                            torch.Generator().manual_seed(2))
        assert int(terms.num_targets) == 3 * per_row
        assert torch.equal(terms.normalized("elbo"), terms.weighted_sum / (3 * per_row))


@pytest.mark.parametrize("full_logits", [False, True])
@pytest.mark.parametrize("shift", [True, False])
def test_elbo_per_token_of_a_left_padded_row_equals_the_row_alone(shift, full_logits):
    """The elbo normalization divides by the real target positions, not B * (L - 1)."""
    module = _tiny_module(shift, full_logits)
    g = torch.Generator().manual_seed(1)
    short, full = torch.randint(4, 97, (1, 9), generator=g), torch.randint(4, 97, (1, 14), generator=g)
    padded = torch.cat([torch.zeros(1, 5, dtype=short.dtype), short], 1)
    attention_mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    t = torch.ones(1)  # the linear schedule masks every real target at t = 1: the same masks padded or not

    def terms(x0, mask):
        return module.objective_impl.diffusion_terms(module.net, x0, mask, t.expand(x0.shape[0]), None,
                                                     torch.Generator().manual_seed(2))[0]

    alone, padded_terms = terms(short, None), terms(padded, attention_mask)
    assert int(padded_terms.num_targets) == int(alone.num_targets) == int(padded_terms.num_scored) == 9 - shift
    torch.testing.assert_close(padded_terms.normalized("elbo"), alone.normalized("elbo"), rtol=1e-5, atol=1e-6)
    # In a batch with a full row, the per-token NELBO pools the real targets of both rows.
    mixed = terms(torch.cat([padded, full]), torch.cat([attention_mask, torch.ones_like(full)]))
    full_alone = terms(full, None)
    expected = (alone.weighted_sum + full_alone.weighted_sum) / (9 + 14 - 2 * shift)
    assert int(mixed.num_targets) == 9 + 14 - 2 * shift
    torch.testing.assert_close(mixed.normalized("elbo"), expected, rtol=1e-5, atol=1e-6)
