"""Compiled decoder layers (backbone.compile), fused AdamW on CUDA, the Liger extra (backbone.kernels).

On the CPU: the compiled step's loss and gradients equal the eager step's within float tolerance
(inductor reorders fp32 reductions), the weights' names are the eager model's, resume stays exact
with compile on, and every refusal is one line. The Liger numerics (fused RMSNorm, SwiGLU, fused
linear cross-entropy on the scored rows against the plain path) are tests/test_cuda_kernels.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import lightning as L
import pytest
import torch

from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.model import BackboneConfig, MaskTokenConfig
from lightning_dlm.model import compiled as compiled_mod
from lightning_dlm.model.compiled import check_compile_support, compiled_layers
from lightning_dlm.model.fused_kernels import check_liger
from lightning_dlm.training.module import DiffusionLM
from lightning_dlm.training.optim import OptimConfig, build_optimizer, fused_adamw
from lightning_dlm.training.resume import compare_hparams
from tests.conftest import TINY_TOKENIZER
from tests.test_training import LossRecorder, StopAfter, make_data, make_trainer

MODEL = dict(
    model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
)
needs_compiler = pytest.mark.skipif(not compiled_mod.cpu_compiler(), reason="torch.compile needs a C++ compiler")


def module(compile=False, kernels="plain", anneal_steps=4):
    return DiffusionLM(
        backbone=BackboneConfig(config=dict(MODEL), tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig(mode="add"),
                                compile=compile, kernels=kernels),
        diffusion=DiffusionConfig(anneal_steps=anneal_steps),
        optim=OptimConfig(lr=3e-3, warmup_steps=1, lr_schedule="cosine"),
        val_t_levels=2,
    )


def step_grads(mod, batch, step):
    mod.configure_model()
    out = mod.objective_impl.train_terms(mod.net, batch, step=step, counter=step, rank=0)
    loss = out.terms.normalized("elbo")
    mod.net.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in mod.net.named_parameters() if p.grad is not None}


@needs_compiler
def test_compiled_layers_give_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    eager = module()
    eager.configure_model()
    compiled = module(compile=True)
    compiled.configure_model()
    compiled.net.load_state_dict(eager.net.state_dict())
    layers = compiled_layers(compiled.net.model)
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
    assert list(compiled.net.state_dict()) == list(eager.net.state_dict())  # the eager names: checkpoints unchanged
    ids = torch.randint(1, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    for step in (0, 5):  # annealing (a dense mask) and after it (bidirectional)
        batch = {"input_ids": ids}
        loss_e, grads_e = step_grads(eager, batch, step)
        loss_c, grads_c = step_grads(compiled, batch, step)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        assert grads_c.keys() == grads_e.keys() and len(grads_e) == len(list(eager.net.parameters()))
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_compiler
def test_resume_is_exact_with_compile_on(tmp_path):
    L.seed_everything(0)
    full = LossRecorder()
    make_trainer(tmp_path / "full", 6, [full]).fit(module(compile=True), make_data())
    L.seed_everything(0)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    first = LossRecorder()
    make_trainer(tmp_path / "a", 6, [first, ckpt, StopAfter(3)]).fit(module(compile=True), make_data())
    resumed = LossRecorder()
    L.seed_everything(99)
    make_trainer(tmp_path / "b", 6, [resumed]).fit(module(compile=True), make_data(),
                                                   ckpt_path=str(tmp_path / "ck" / "epoch=0-step=3.ckpt"))
    assert sorted(resumed.losses) == [3, 4, 5]
    for step in range(3):
        assert first.losses[step] == full.losses[step]
    for step in range(3, 6):
        assert resumed.losses[step] == full.losses[step], step
    saved = torch.load(tmp_path / "ck" / "epoch=0-step=3.ckpt", map_location="cpu", weights_only=True)
    assert saved["lightning_dlm"]["backbone"]["compile"] is False  # a reader of the weights runs them eager
    assert saved["hyper_parameters"]["backbone"]["compile"] is True


def test_compile_without_a_cpu_compiler_is_one_line(monkeypatch):
    monkeypatch.setattr(compiled_mod, "cpu_compiler", lambda: "")
    with pytest.raises(DLMError, match=r"^backbone.compile: true needs a C\+\+ compiler for torch.compile on the CPU "
                                       r"\(none found: install g\+\+ or clang\+\+, or set CXX\), or set "
                                       r"backbone.compile: false$"):
        module(compile=True).configure_model()
    with pytest.raises(DLMError, match="tested on cpu and cuda only, not mps"):
        check_compile_support(torch.device("mps"))


def test_liger_without_cuda_or_without_the_package_is_one_line():
    with pytest.raises(DLMError, match=r"^backbone.kernels: liger runs on CUDA only \(this run is on cpu\): set "
                                       r"backbone.kernels: plain, or train on a GPU$"):
        module(kernels="liger").configure_model()
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(DLMError, match=r"needs the liger-kernel package \(not installed\): pip install "
                                           r"'lightning_dlm\[liger\]', or set backbone.kernels: plain$"):
            check_liger(torch.device("cuda"))
    with pytest.raises(DLMError, match="unknown backbone.kernels 'triton'"):
        module(kernels="triton").configure_model()


def test_fused_adamw_on_cuda_parameters_only():
    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert fused_adamw(cpu) is None and fused_adamw([]) is None
    assert fused_adamw([torch.zeros(2, device="meta")]) is None
    optimizer, _ = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(lr_schedule="constant"), None)
    assert not optimizer.defaults["fused"]  # the CPU update every CPU run has always made


def test_checkpoints_from_before_compile_resume_without_a_change():
    saved = {"backbone": {k: v for k, v in dataclasses.asdict(BackboneConfig()).items()
                          if k not in ("compile", "kernels")}}
    assert compare_hparams(saved, {"backbone": dataclasses.asdict(BackboneConfig())}) == ([], [])
    allowed, refused = compare_hparams(saved, {"backbone": dataclasses.asdict(BackboneConfig(compile=True))})
    assert allowed == [("backbone.compile", False, True)] and refused == []
