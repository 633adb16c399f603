"""The objective against its references (BD3-LM, MDLM, Fast-dLLM v2): the complementary copy's
time floor, SUBS, the unweighted normalization, and the block decoder's greedy first slot."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_dlm.core import get_schedule
from lightning_dlm.core.blocks import block_sources, complement, corrupt_positions
from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.corruption import corrupt, maskable_positions
from lightning_dlm.core.errors import DLMError
from lightning_dlm.core.loss import drop_logit, scored_rows
from lightning_dlm.model import DiffusionModel
from lightning_dlm.objectives import build_objective
from lightning_dlm.objectives.block import BlockObjective

VOCAB, L_SEQ = 53, 16


def tiny_net(added: bool, seed: int = 0, **diffusion) -> DiffusionModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="eager")
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make the mask column matter: a large mask logit everywhere
        hf.lm_head.weight[VOCAB - 1] *= 20.0
    return DiffusionModel(hf, VOCAB - 1, added, attn_implementation="eager",
                          diffusion=DiffusionConfig(**diffusion).check())


def batch_ids(batch=3, seed=1):
    return torch.randint(0, VOCAB - 1, (batch, L_SEQ), generator=torch.Generator().manual_seed(seed))


def ce_without_column(logits, targets, column):
    """The formula: log-softmax over every column except ``column``, the target re-indexed."""
    keep = [v for v in range(logits.shape[-1]) if v != column]
    remap = torch.full((logits.shape[-1],), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    return -logits[:, keep].float().log_softmax(-1).gather(1, remap[targets][:, None]).squeeze(1)


# --- 1. the complementary copy's time is floored at eps ------------------------------------------
@pytest.mark.parametrize("block_t", ["sequence", "block"])
def test_complementary_weight_is_at_most_one_over_eps(block_t):
    cfg = DiffusionConfig(attention="block", block_size=1, complementary_masks=True, block_t=block_t).check()
    objective = BlockObjective(cfg)
    gen = torch.Generator().manual_seed(0)
    n = 1_000_000  # draws of t (rows x blocks)
    t_pos = objective.train_times(n // 4, 4, 1, gen) if block_t == "block" else objective.train_times(n, 1, 1, gen)
    x0 = torch.zeros(t_pos.shape, dtype=torch.long)
    maskable = torch.ones_like(x0, dtype=torch.bool)
    _, masked, _ = corrupt_positions(x0, t_pos, 9, objective.schedule, maskable, gen)
    _, _, t2 = complement(x0, masked, maskable, t_pos, 9)
    w1, w2 = objective.schedule.weight(t_pos.float()), objective.schedule.weight(t2.float())
    bound = (1.0 / cfg.eps) * (1 + 1e-4)
    assert float(w1.max()) <= bound and float(w2.max()) <= bound
    assert float(t_pos.min()) >= cfg.eps and float(t2.min()) >= cfg.eps * (1 - 1e-4)
    assert float(w2.max()) > 0.5 / cfg.eps  # the floor is reached, not a much smaller range
    # without the complementary masks the primary copy keeps the full range [eps, 1)
    plain = BlockObjective(DiffusionConfig(attention="block", block_size=1).check())
    assert float(plain.train_times(n, 1, 1, torch.Generator().manual_seed(0)).max()) > 1 - cfg.eps


def test_complementary_needs_eps_below_half():
    with pytest.raises(DLMError, match="eps must be < 0.5"):
        DiffusionConfig(attention="block", complementary_masks=True, eps=0.6).check()


# --- 2. SUBS ---------------------------------------------------------------------------------------
def _diffusion_terms(net, cfg, x0, t):
    objective = build_objective("diffusion", cfg)
    return objective.diffusion_terms(net, x0, None, t, None, torch.Generator().manual_seed(5))[0]


def _hand_diffusion(net, x0, t, drop):
    schedule = get_schedule("linear")
    maskable = maskable_positions(x0.shape, True, None, device=x0.device)
    xt, masked = corrupt(x0, t, net.mask_token_id, schedule, maskable, torch.Generator().manual_seed(5))
    sources, targets = scored_rows(x0, masked, True)
    with torch.no_grad():
        logits = net(xt)[sources]
    ce = ce_without_column(logits, targets, net.mask_token_id) if drop else F.cross_entropy(logits.float(), targets,
                                                                                           reduction="none")
    w = schedule.weight(t)[:, None].expand_as(sources)[sources]
    return ce, w, maskable.sum()


@torch.no_grad()
def test_subs_equals_the_formula_and_is_on_for_an_added_mask_token():
    x0, t = batch_ids(), torch.tensor([0.3, 0.6, 0.9])
    net = tiny_net(added=True)
    assert net.diffusion.subs is None and net.diffusion.subs_on(True)
    terms = _diffusion_terms(net, net.diffusion, x0, t)
    ce, w, n = _hand_diffusion(net, x0, t, drop=True)
    torch.testing.assert_close(terms.ce_sum, ce.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.normalized("elbo"), (w * ce).sum() / n, rtol=1e-5, atol=1e-5)
    # subs off: the plain cross-entropy, which is larger (the mask column takes probability mass)
    off = _diffusion_terms(net, DiffusionConfig(subs=False), x0, t)
    plain, _, _ = _hand_diffusion(net, x0, t, drop=False)
    torch.testing.assert_close(off.ce_sum, plain.sum(), rtol=1e-5, atol=1e-5)
    assert float(off.ce_sum - terms.ce_sum) > 0.1
    # the fused row cross-entropy path (liger) gives the same SUBS loss without the logits
    net.fused_row_ce = lambda hidden, head, targets: F.cross_entropy(head(hidden).float(), targets, reduction="none")
    fused = _diffusion_terms(net, net.diffusion, x0, t)
    torch.testing.assert_close(fused.ce_sum, terms.ce_sum, rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_subs_is_off_for_a_reused_mask_token_and_refused_when_asked():
    x0, t = batch_ids(), torch.tensor([0.3, 0.6, 0.9])
    net = tiny_net(added=False)
    terms = _diffusion_terms(net, net.diffusion, x0, t)
    plain, _, _ = _hand_diffusion(net, x0, t, drop=False)
    torch.testing.assert_close(terms.ce_sum, plain.sum(), rtol=1e-5, atol=1e-5)
    with pytest.raises(DLMError, match="subs: true needs an added mask token"):
        tiny_net(added=False, subs=True)
    with pytest.raises(DLMError, match="subs"):
        DiffusionConfig(subs="yes").check()


@torch.no_grad()
def test_block_objective_and_validation_use_subs():
    net = tiny_net(added=True, attention="block", block_size=4)
    x0 = batch_ids()
    objective = build_objective("diffusion", net.diffusion)
    t = torch.full((3,), 0.5)
    terms = objective.level_terms(net, x0, t, None, torch.Generator().manual_seed(3), None, None)
    maskable = maskable_positions(x0.shape, True, None, device=x0.device)
    _, masked, _ = corrupt_positions(x0, t[:, None].expand(x0.shape), net.mask_token_id, objective.schedule,
                                     maskable, torch.Generator().manual_seed(3))
    xt = torch.where(masked, torch.full_like(x0, net.mask_token_id), x0)
    sources, slots = block_sources(masked, 4, True)
    logits = net.block_scored_logits(x0, xt, sources, 4)
    targets = x0[sources.nonzero()[:, 0], slots]
    torch.testing.assert_close(terms.ce_sum, ce_without_column(logits, targets, net.mask_token_id).sum(),
                               rtol=1e-5, atol=1e-5)
    # the validation NELBO (eval_nll) is lower with SUBS than without, on the same weights
    with_subs = objective.eval_nll(net, x0, levels=2)[0]
    net_off = tiny_net(added=True, attention="block", block_size=4, subs=False)
    without = build_objective("diffusion", net_off.diffusion).eval_nll(net_off, x0, levels=2)[0]
    assert float(without - with_subs) > 0.01


def test_drop_logit_only_touches_that_column():
    logits = torch.randn(4, 7)
    out = drop_logit(logits, 3)
    assert torch.isinf(out[:, 3]).all() and torch.equal(out[:, [0, 1, 2, 4, 5, 6]], logits[:, [0, 1, 2, 4, 5, 6]])


# --- 4. the unweighted normalization (Fast-dLLM v2) ----------------------------------------------
@torch.no_grad()
def test_unweighted_normalization_is_the_plain_mean_masked_ce_and_validation_stays_the_nelbo():
    x0, t = batch_ids(), torch.tensor([0.2, 0.5, 0.8])
    net = tiny_net(added=False)
    terms = _diffusion_terms(net, DiffusionConfig(normalization="unweighted").check(), x0, t)
    ce, w, n = _hand_diffusion(net, x0, t, drop=False)
    torch.testing.assert_close(terms.normalized("unweighted"), ce.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.normalized("masked"), (w * ce).mean(), rtol=1e-5, atol=1e-6)
    assert abs(float(terms.normalized("unweighted") - terms.normalized("masked"))) > 1e-2
    # validation reports the NELBO whatever the training normalization
    nelbo = {norm: build_objective("diffusion", DiffusionConfig(normalization=norm).check()).eval_nll(net, x0, levels=3)[0]
             for norm in ("elbo", "masked", "unweighted")}
    assert float(nelbo["elbo"]) == float(nelbo["masked"]) == float(nelbo["unweighted"])
    with pytest.raises(DLMError, match="normalization must be one of elbo, masked, unweighted"):
        DiffusionConfig(normalization="mean").check()


# --- 5. the block decoder's first slot -----------------------------------------------------------
PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10]]
#: the tokens the decoder gave before ``first_slot`` existed (recorded from that code, same call)
RECORDED = [[0, 0, 1, 2, 3, 4, 34, 9, 3, 33, 30, 39, 50, 20, 26, 44, 6, 42],
            [5, 6, 7, 8, 9, 10, 13, 6, 9, 23, 21, 4, 39, 3, 2, 11, 46, 8]]


def _decode(net, **options):
    from lightning_dlm.sampling.block_decode import block_decode
    from lightning_dlm.sampling.engine import SamplerConfig

    cfg = SamplerConfig(steps=2, temperature=0.9, top_p=1.0, strategy="confidence")
    return block_decode(net, PROMPTS, 12, cfg, block_size=4, schedule=get_schedule("linear"), seeds=[3, 4],
                        suppress_ids=[net.mask_token_id], **options)


@torch.no_grad()
@pytest.mark.parametrize("kv_cache", [True, False])
def test_default_first_slot_keeps_the_recorded_tokens(kv_cache):
    net = tiny_net(added=False, attention="block", block_size=4)
    assert _decode(net, kv_cache=kv_cache).ids.tolist() == RECORDED
    assert _decode(net, kv_cache=kv_cache, first_slot="strategy").ids.tolist() == RECORDED
    with pytest.raises(DLMError, match="first_slot must be strategy or greedy"):
        _decode(net, first_slot="argmax")


@torch.no_grad()
@pytest.mark.parametrize("kv_cache", [True, False])
def test_greedy_first_slot_is_the_argmax_of_the_first_prediction(kv_cache):
    net = tiny_net(added=False, attention="block", block_size=4)
    out = _decode(net, kv_cache=kv_cache, first_slot="greedy")
    width, (lo, hi) = out.ids.shape[1], out.target_span
    checked = 0
    for r, prompt in enumerate(PROMPTS):
        tokens = out.ids[r, width - len(prompt) - (hi - lo):].tolist()  # the row without its left padding
        p, first = len(prompt), []
        for s in range(p, p + hi - lo):  # every block's first undecided slot: the prompt's end, then block starts
            if s == p or s % 4 == 0:
                first.append(s)
        for s in first:  # the block as the first pass saw it: decided tokens before s, masks from s to its end
            end = (s // 4 + 1) * 4
            ids = torch.tensor([tokens[:s] + [net.mask_token_id] * (end - s)])
            block = torch.arange(end) // 4
            logits = net(ids, allowed=block[None, :] <= block[:, None])[0, s - 1].float()
            logits[net.mask_token_id] = float("-inf")
            assert tokens[s] == int(logits.argmax()), (r, s)
            checked += 1
    assert checked == 7  # row 0: blocks at 4, 8, 12; row 1: slot 6 (mid-block), then 8, 12, 16
    assert out.ids.tolist() != RECORDED  # the option changes what is decoded
