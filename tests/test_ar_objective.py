"""``model.objective: ar``: the plain causal LM objective through the same model, data and trainer
(the ablation's AR arm) equals Hugging Face's own causal LM loss, and its checkpoint evaluates
as a causal LM."""

import copy
import os

import lightning as L
import pytest
import torch

from lightning_dlm.core.errors import DLMError
from lightning_dlm.evaluation.evaluators import CausalEvaluator, load_evaluator
from lightning_dlm.model import DiffusionModel
from lightning_dlm.objectives.ar import causal_terms
from lightning_dlm.sampling import generate
from tests.test_training import make_data, make_module, make_trainer


def _hf_causal_loss(module, ids, attention_mask=None):
    """Transformers' own causal LM loss (mean over the shifted real targets) on a causal copy."""
    hf = copy.deepcopy(module.net.model).eval()
    hf.config.is_causal = True
    labels = ids if attention_mask is None else ids.masked_fill(attention_mask == 0, -100)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=attention_mask, labels=labels).loss


def test_ar_terms_equal_the_causal_lm_loss():
    module = make_module(objective="ar")
    module.configure_model()
    module.net.eval()
    ids = torch.randint(1, 512, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        terms, targets = causal_terms(module.net, ids)
    assert int(targets.sum()) == 3 * 16  # every token after the first of a row
    ours = terms.normalized("elbo")
    torch.testing.assert_close(ours, _hf_causal_loss(module, ids), rtol=1e-5, atol=1e-6)
    assert terms.normalized("masked") == ours  # every target is scored: the normalizations agree
    # the AR objective reads clean tokens under causal attention: a later token cannot change an
    # earlier prediction (the diffusion model's bidirectional forward would)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 512
    with torch.no_grad():
        a = module.net(ids, allowed=torch.ones(17, 17, dtype=torch.bool).tril())
        b = module.net(changed, allowed=torch.ones(17, 17, dtype=torch.bool).tril())
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    with torch.no_grad():
        full_a, full_b = module.net(ids), module.net(changed)
    assert not torch.allclose(full_a[:, :-1], full_b[:, :-1])


def test_ar_terms_with_left_padding_equal_the_causal_lm_loss():
    module = make_module(objective="ar")
    module.configure_model()
    module.net.eval()
    ids = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        terms, targets = causal_terms(module.net, ids, mask)
    assert int(targets.sum()) == (12 - 4 - 1) + (12 - 1)
    # Hugging Face scores the pad -> first-token pair too unless the label is ignored; compare per row
    hf = copy.deepcopy(module.net.model).eval()
    hf.config.is_causal = True
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="none").view(2, 11)
    keep = mask[:, 1:].bool() & mask[:, :-1].bool()
    torch.testing.assert_close(terms.weighted_sum, ce[keep].sum(), rtol=1e-5, atol=1e-5)


def test_ar_run_trains_validates_exactly_and_loads_as_a_causal_lm(tmp_path):
    L.seed_everything(0)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3)
    module = make_module(objective="ar")
    data = make_data()
    make_trainer(tmp_path, 3, [ckpt]).fit(module, data)
    trainer = L.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    val = trainer.validate(module, data, verbose=False)[0]
    # val/nelbo of an AR run is its exact NLL per token: the causal LM loss over the same blocks
    data.setup("validate")
    total, count = 0.0, 0
    for batch in data.val_dataloader():
        loss = _hf_causal_loss(module, batch["input_ids"], batch.get("attention_mask"))
        n = int(batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1))
        total, count = total + float(loss) * n, count + n
    assert val["val/nelbo"] == pytest.approx(total / count, rel=1e-5)

    path = os.path.join(tmp_path / "ck", os.listdir(tmp_path / "ck")[0])
    model = DiffusionModel.from_pretrained(path)
    assert model.objective == "ar"
    with pytest.raises(DLMError, match="ar objective"):
        generate(model, ["Once"], length=4, steps=4)
    evaluator = load_evaluator(path)
    assert isinstance(evaluator, CausalEvaluator)
    assert evaluator.model.config.is_causal is True


def test_unknown_objective_is_refused():
    with pytest.raises(DLMError, match="model.objective 'mlm'"):
        make_module(objective="mlm")
