"""lightning_dlm.research.analysis: the numbers behind the notebooks, checked against the hand-computed loss."""

import math
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_dlm.core import t_grid
from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.evaluation.likelihood import diffusion_nelbo
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig, load_tokenizer
from lightning_dlm.research import analysis
from lightning_dlm.sampling import generate, slot_logits, suppressed_ids
from tests.conftest import REPO, TINY_TOKENIZER
from tests.test_diffusion import hand_nelbo, hand_weight

MODEL = dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
TINY_VAL = os.path.join(REPO, "data", "fixtures", "tiny_corpus_val.txt")


def tiny_model(schedule="linear", shift=True, seed=0):
    torch.manual_seed(seed)
    cfg = BackboneConfig(config=dict(MODEL), mask_token=MaskTokenConfig(mode="add"))
    diffusion = DiffusionConfig(schedule=schedule, shift=shift)
    return DiffusionModel.from_config(cfg, load_tokenizer(TINY_TOKENIZER), diffusion=diffusion).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def random_blocks(n=3, length=16, seed=1):
    return torch.randint(1, 512, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("schedule,shift", [("linear", True), ("cosine", True), ("linear", False)])
def test_by_t_is_the_hand_computed_loss_on_the_same_masks(schedule, shift):
    net = tiny_model(schedule, shift)
    blocks = random_blocks()
    grid = analysis.noise_grid(net, blocks, levels=4, draws=2, batch_size=2)
    by_t = grid.by_t()
    assert torch.equal(by_t["t"], t_grid(4, eps=net.diffusion.eps).double())
    assert not grid.masked[..., 0].any() if shift else grid.masked[..., 0].any()
    assert not (grid.masked & ~grid.targets).any()
    targets = blocks.shape[0] * (blocks.shape[1] - shift)  # no padding: every position after the first (or every one)
    for j in range(4):
        weight = hand_weight(schedule, float(by_t["t"][j]))
        assert float(grid.weight[j]) == pytest.approx(weight, rel=1e-5)
        losses, ce_sum, scored = [], 0.0, 0
        for r in range(2):
            masked = grid.masked[j, r]
            xt = torch.where(masked, torch.full_like(blocks, net.mask_token_id), blocks)
            with torch.no_grad():
                logits = net(xt).double().tolist()
            total, ce, n = hand_nelbo(logits, blocks.tolist(), masked.tolist(), [weight] * blocks.shape[0], shift)
            losses.append(total / targets)
            ce_sum, scored = ce_sum + ce, scored + n
        assert float(by_t["nelbo"][j]) == pytest.approx(sum(losses) / 2, rel=1e-5)
        assert float(by_t["masked_ce"][j]) == pytest.approx(ce_sum / scored, rel=1e-5)
    # the masked fraction follows the schedule: 1 - alpha(t) (a loose check: 2 x 3 x 15 draws a level)
    expected = net.schedule.mask_prob(by_t["t"])
    assert (by_t["masked_fraction"] - expected).abs().max() < 0.25


def test_draws_do_not_depend_on_the_batch_size(model):
    blocks = random_blocks(n=5)
    one = analysis.noise_grid(model, blocks, levels=3, draws=1, batch_size=1)
    all_ = analysis.noise_grid(model, blocks, levels=3, draws=1, batch_size=8)
    assert torch.equal(one.masked, all_.masked)
    assert torch.allclose(one.ce, all_.ce, atol=1e-5)
    other = analysis.noise_grid(model, blocks, levels=3, draws=1, seed=1)
    assert not torch.equal(one.masked, other.masked)


def test_the_three_views_integrate_to_the_same_nelbo(model):
    blocks = random_blocks(n=4, length=12)
    grid = analysis.noise_grid(model, blocks, levels=5, draws=3)
    by_position, by_token = grid.by_position(), grid.by_token()
    assert math.isnan(float(by_position[0])) and torch.isnan(by_token[:, 0]).all()
    assert float(by_position[1:].mean()) == pytest.approx(grid.nelbo, rel=1e-12)
    assert float(by_token[:, 1:].mean()) == pytest.approx(grid.nelbo, rel=1e-12)
    bound = analysis.diffusion_token_bound(model, blocks, levels=5, draws=3)
    assert bound.shape == (4, 11) and torch.equal(bound, by_token[:, 1:])
    torch.testing.assert_close(analysis.loss_by_position(model, blocks, levels=5, draws=3), by_position, rtol=0, atol=0,
                               equal_nan=True)
    assert torch.equal(analysis.nelbo_by_t(model, blocks, levels=5, draws=3)["nelbo"], grid.by_t()["nelbo"])


def test_a_uniform_model_gives_log_v_per_masked_token():
    net = tiny_model()
    with torch.no_grad():
        net.model.get_output_embeddings().weight.zero_()
    grid = analysis.noise_grid(net, random_blocks(), levels=6, draws=2)
    by_t = grid.by_t()
    log_v = math.log(net.vocab_size - 0)  # every id, the mask's included, has logit 0
    assert torch.allclose(by_t["masked_ce"], torch.full((6,), log_v, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(by_t["nelbo"], grid.weight * log_v * by_t["masked_fraction"], rtol=1e-6)


def test_the_grid_agrees_with_the_evaluation_nelbo(model):
    # two unbiased estimators of the same bound (the t-form on a grid here, the k-form in evaluation):
    # equal within their standard errors (seeded: the check is deterministic)
    blocks = random_blocks(n=4, length=24)
    grid = analysis.noise_grid(model, blocks, levels=16, draws=8)
    reference = diffusion_nelbo(model, blocks, shift=True, levels=8, draws=4)
    assert 0 < grid.nelbo_se < 0.05 * grid.nelbo
    assert abs(grid.nelbo - reference["nll_per_token"]) < 3 * math.hypot(grid.nelbo_se, reference["se"])
    per_draw = grid.weighted.sum(dim=(2, 3)).mean(dim=0) / grid.targets.sum()
    assert grid.nelbo_se == pytest.approx(float(per_draw.std() / math.sqrt(8)), rel=1e-12)


def test_ar_token_nll_sums_to_the_causal_loss():
    torch.manual_seed(0)
    config = dict(MODEL)
    causal = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).eval()
    ids = random_blocks(n=3, length=12)
    nll = analysis.ar_token_nll(causal, ids, batch_size=2)
    assert nll.shape == (3, 11)
    with torch.no_grad():
        loss = causal(input_ids=ids, labels=ids).loss
    assert float(nll.sum()) == pytest.approx(float(loss) * 3 * 11, rel=1e-5)
    assert torch.allclose(nll, analysis.ar_token_nll(causal, ids, batch_size=8))
    with pytest.raises(DLMError, match="original causal LM"):
        analysis.ar_token_nll(tiny_model(), ids)


def test_trajectory_commits_every_slot_once(model):
    traj = analysis.denoising_trajectory(model, "Once upon", length=10, strategy="random", steps=7, seed=3)
    gen = generate(model, ["Once upon"], length=10, strategy="random", steps=7, seed=3)
    assert traj.token_ids == gen.token_ids[0] and traj.text == gen.texts[0]
    assert traj.steps == 7 == len(traj.committed_per_step)
    assert torch.bincount(traj.committed_at, minlength=traj.steps).tolist() == traj.committed_per_step
    assert sum(traj.committed_per_step) == 10
    a, b = traj.target_span
    region = traj.states[:, a:b]
    for k in range(10):  # masked up to its step, then its final token for good
        s = int(traj.committed_at[k])
        assert (region[: s + 1, k] == model.mask_token_id).all()
        assert (region[s + 1:, k] == traj.token_ids[k]).all()
    assert ((traj.probability > 0) & (traj.probability <= 1)).all()
    assert len(traj.tokens) == 10 and "".join(traj.tokens) == traj.text


def test_confidence_trajectory_commits_the_most_probable_slots(model):
    traj = analysis.denoising_trajectory(model, "The", length=8, strategy="confidence", steps=4, temperature=0)
    assert traj.committed_per_step == [2, 2, 2, 2]
    a, b = traj.target_span
    suppress = suppressed_ids(model, model.tokenizer)
    for s in range(traj.steps):
        with torch.no_grad():
            logits = slot_logits(model(traj.states[s: s + 1]).float(), True)[0, a:b]
        logits[:, suppress] = float("-inf")
        best, argmax = torch.softmax(logits, -1).max(-1)
        now = (traj.committed_at == s).nonzero().flatten()
        later = (traj.committed_at > s).nonzero().flatten()
        assert torch.equal(argmax[now], torch.tensor(traj.token_ids)[now])
        assert torch.allclose(traj.probability[now], best[now].double(), atol=1e-6)
        if len(later):
            assert float(traj.probability[now].min()) >= float(best[later].max()) - 1e-6


def tiny_original(folder):
    torch.manual_seed(0)
    config = dict(MODEL)
    causal = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    causal.save_pretrained(folder)
    load_tokenizer(TINY_TOKENIZER).save_pretrained(folder)
    return causal.eval()


def test_the_original_model_as_a_diffusion_model(tmp_path):
    causal = tiny_original(tmp_path / "orig")
    cfg = BackboneConfig(pretrained=str(tmp_path / "orig"), mask_token=MaskTokenConfig(mode="add"))
    adapted = DiffusionModel.from_config(cfg, load_tokenizer(str(tmp_path / "orig")),
                                         diffusion=DiffusionConfig(schedule="cosine")).eval()
    base = analysis.original_as_diffusion(str(tmp_path / "orig"), like=adapted)
    assert base.mask_token_id == adapted.mask_token_id == 512 and base.diffusion.schedule == "cosine"
    assert not base.training and base.config.is_causal is False
    blocks = random_blocks()
    assert torch.equal(analysis.noise_grid(base, blocks, levels=2, draws=1).ce,
                       analysis.noise_grid(adapted, blocks, levels=2, draws=1).ce)  # same weights, same objective
    original = analysis.load_original(str(tmp_path / "orig"))
    assert getattr(original.config, "is_causal", True) is not False
    assert torch.allclose(analysis.ar_token_nll(original, blocks), analysis.ar_token_nll(causal, blocks))


def test_missing_inputs_are_one_line_errors(tmp_path):
    for call, words in [(lambda: analysis.load_diffusion_model(str(tmp_path / "missing.ckpt")), "make demo"),
                        (lambda: analysis.load_original(str(tmp_path / "nope")), "make assets"),
                        (lambda: analysis.original_as_diffusion("./nope", like=None), "original_model"),
                        (lambda: analysis.text_blocks(str(tmp_path / "val"), None), "`text` parameter")]:
        with pytest.raises(DLMError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and words in message and "does not exist" in message


def test_text_blocks_and_result_files(tmp_path):
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    blocks = analysis.text_blocks(TINY_VAL, tokenizer, seq_len=32, max_blocks=3)
    assert blocks.shape == (3, 32)
    with open(TINY_VAL, encoding="utf-8") as fh:
        assert tokenizer.decode(blocks[0]) == fh.read()[: len(tokenizer.decode(blocks[0]))]
    for arm in ("b", "a", "c"):
        (tmp_path / "runs" / arm / "lightning_logs" / "version_0").mkdir(parents=True)
    for arm in ("a", "b"):
        (tmp_path / "runs" / arm / "lightning_logs" / "version_0" / "events.out.tfevents.1.host").write_bytes(b"")
    (tmp_path / "runs" / "notes.txt").write_text("x")
    runs = [str(tmp_path / "runs" / arm) for arm in ("a", "b", "c")]
    assert analysis.run_folders(str(tmp_path / "runs" / "*")) == (runs[:2], runs[2:])
    assert analysis.run_folders(str(tmp_path / "none" / "*")) == ([], [])
    (tmp_path / "plot.png").write_bytes(b"png")
    (tmp_path / "RESULTS.md").write_text("# R\n\n| a |\n\n![plot](plot.png)\n![gone](gone.png)\n")
    text, images = analysis.read_results(str(tmp_path / "RESULTS.md"))
    assert text == "# R\n\n| a |\n\n\n\n" and images == [str(tmp_path / "plot.png")]
    assert analysis.read_results(str(tmp_path / "missing.md")) is None


def test_plots_draw_the_numbers_they_are_given(model):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_dlm.research import plots
    from lightning_dlm.research.compare import RunSummary

    blocks = random_blocks(n=2, length=10)
    grids = {"a": analysis.noise_grid(model, blocks, levels=3, draws=2),
             "b": analysis.noise_grid(tiny_model(seed=1), blocks, levels=3, draws=2)}
    fig = plots.plot_nelbo_by_t(grids)
    left, right = fig.axes[:2]
    assert [line.get_ydata().tolist() for line in left.lines] == [g.by_t()["nelbo"].tolist() for g in grids.values()]
    assert [line.get_ydata().tolist() for line in right.lines] == [g.by_t()["masked_ce"].tolist() for g in grids.values()]
    assert f"a: NELBO {grids['a'].nelbo:.3f}" in left.get_legend().get_texts()[0].get_text()
    fig = plots.plot_loss_by_position({"a": grids["a"].by_position()})
    line = fig.axes[0].lines[0]
    assert line.get_xdata().tolist() == list(range(1, 10))
    assert line.get_ydata().tolist() == grids["a"].by_position()[1:].tolist()
    traj = analysis.denoising_trajectory(model, "The", length=6, strategy="confidence", steps=3, temperature=0)
    fig = plots.plot_trajectories([traj])
    committed = fig.axes[0].images[1].get_array()  # (steps, slots): the probability where committed, else masked
    assert committed.shape == (3, 6) and int(committed.count()) == 6
    assert [float(committed[s, k]) for k, s in enumerate(traj.committed_at.tolist())] == traj.probability.tolist()
    ar, bound = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.5, 1.0, 4.0])
    fig = plots.plot_token_nll(["a", " b", "\n"], ar, bound)
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert heights == ar.tolist() + bound.tolist()
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "\u2423b", "\\n"]
    rows = [RunSummary("x", 5.0, 0.1, math.exp(5.0), 100.0, 4, 1.0, "x"), RunSummary("y", None, None, None, None, 2, 1.0, "y")]
    fig = plots.plot_arms(rows)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["x"]
    fig = plots.plot_arms(rows[1:])
    assert fig.axes[0].texts[0].get_text() == "no arm has a validation yet"
    plt.close("all")
