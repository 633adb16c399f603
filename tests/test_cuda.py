"""CUDA checks (``pytest -m cuda``; skipped without a GPU): FlexAttention against the dense-mask SDPA path.

On a GPU, transformers runs FlexAttention compiled (Triton kernels, forward and backward); these
tests compare it with the SDPA path fed the same pattern as a dense additive mask, on a small
LLaMA built from config (head dim 32, two rows, one left-padded, the other packed with three
documents, length 200 so the 128-blocks of the BlockMask are partly full):

* fp32 (TF32 off): logits and every weight gradient equal to float tolerance;
* bf16 autocast (the ``bf16-mixed`` training path): flex's error against an fp32 SDPA reference
  is no larger than what SDPA's own bf16 run makes (within bf16 tolerance, measured, not assumed).

They run at annealing ratios 0 (causal), 0.5 and 1 (bidirectional: no annealing mask), for both
annealing-mask kinds. ``benchmarks/gpu_suite.py`` runs them as its first part.
"""

import contextlib

import pytest
import torch

from lightning_dlm.core import ANNEAL_MASKS, annealing_mask
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.usefixtures("exact_fp32"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_suite.py)"),
]

RATIOS = [0.0, 0.5, 1.0]
KINDS = sorted(ANNEAL_MASKS)
LENGTH = 200
# Small, but with a head dim FlexAttention's GPU kernels take (>= 16).
CUDA_LLAMA = dict(
    model_type="llama", vocab_size=97, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)


def _backbone(impl):
    bc = BackboneConfig(config=dict(CUDA_LLAMA), attn_implementation=impl,
                        mask_token=MaskTokenConfig(mode="reuse", id=5))
    torch.manual_seed(0)
    return DiffusionModel.from_config(bc, None).cuda().train()


def _pair():
    sdpa, flexed = _backbone("sdpa"), _backbone("flex_attention")
    flexed.load_state_dict(sdpa.state_dict())
    return sdpa, flexed


def _batch():
    g = torch.Generator().manual_seed(11)
    x = torch.randint(6, 97, (2, LENGTH), generator=g)
    attn = torch.ones(2, LENGTH, dtype=torch.long)
    attn[0, :13] = 0
    x[0, :13] = 0
    docs = torch.zeros(2, LENGTH, dtype=torch.long)
    docs[1, 70:] = 1
    docs[1, 150:] = 2
    return x.cuda(), attn.cuda(), docs.cuda()


def _run(net, x, attn, docs, allowed, bf16: bool):
    """Logits (fp32) of the real positions and the gradient of every weight."""
    net.zero_grad(set_to_none=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        logits = net(x, attention_mask=attn, allowed=allowed, document_ids=docs)
    real = attn.bool()
    loss = (logits.float().logsumexp(-1) * attn).sum() / attn.sum()
    loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in net.named_parameters()}
    return logits.detach().float()[real], grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_flex_forward_and_backward_equal_sdpa_fp32(kind, ratio):
    sdpa, flexed = _pair()
    x, attn, docs = _batch()
    allowed = annealing_mask(kind, ratio, 77)
    dense_logits, dense_grads = _run(sdpa, x, attn, docs, allowed, bf16=False)
    flex_logits, flex_grads = _run(flexed, x, attn, docs, allowed, bf16=False)
    torch.testing.assert_close(flex_logits, dense_logits, rtol=1e-4, atol=1e-4)
    for name, grad in dense_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(flex_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_flex_forward_and_backward_within_bf16_tolerance(kind, ratio):
    sdpa, flexed = _pair()
    x, attn, docs = _batch()
    allowed = annealing_mask(kind, ratio, 78)
    ref_logits, ref_grads = _run(sdpa, x, attn, docs, allowed, bf16=False)
    dense_logits, dense_grads = _run(sdpa, x, attn, docs, allowed, bf16=True)
    flex_logits, flex_grads = _run(flexed, x, attn, docs, allowed, bf16=True)
    # flex's bf16 error against the fp32 reference, bounded by SDPA's own bf16 error (x2, floor 1e-3)
    # and absolutely by 3e-2 (relative Frobenius norm).
    pairs = [("logits", flex_logits, dense_logits, ref_logits)]
    pairs += [(name, flex_grads[name], dense_grads[name], ref) for name, ref in ref_grads.items()]
    for name, flex_value, dense_value, ref in pairs:
        flex_err, dense_err = _rel(flex_value, ref), _rel(dense_value, ref)
        assert flex_err <= max(2.0 * dense_err, 1e-3), f"{name}: flex bf16 error {flex_err:.2e} vs sdpa {dense_err:.2e}"
        assert flex_err <= 3e-2, f"{name}: flex bf16 error {flex_err:.2e}"


def test_flex_annealing_mask_changes_the_output():
    """Guard: the parity above is not two paths ignoring the mask. Ratio 0 (causal) and ratio 1
    (bidirectional) give different logits on the flex path, and causal logits do not see the future."""
    _, flexed = _pair()
    x, attn, docs = _batch()
    with torch.no_grad():
        causal = flexed(x, attention_mask=attn, allowed=annealing_mask("random", 0.0, 1))
        both = flexed(x, attention_mask=attn, allowed=None)
        y = x.clone()
        y[:, -1] = (x[:, -1] + 1) % 97
        causal_changed = flexed(y, attention_mask=attn, allowed=annealing_mask("random", 0.0, 1))
    assert not torch.allclose(causal, both, atol=1e-3)
    torch.testing.assert_close(causal_changed[:, :-1], causal[:, :-1], rtol=1e-5, atol=1e-5)
