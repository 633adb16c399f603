"""FlexAttention backend: the BlockMask equals the dense mask, and flex_attention equals sdpa with it.

On the CPU PyTorch's FlexAttention is forward-only, and transformers compiles it on first use
(tens of seconds); these tests run it eagerly (``torch.compiler.set_stance("force_eager")``, the
unfused reference implementation). Gradients: the CUDA backward is compared with sdpa's in tests/test_cuda.py;
on the CPU, central differences of the flex forward (float64) along a random direction of all
weights are compared with sdpa's autograd gradient on that direction.
"""

import pytest
import torch

from lightning_dlm.core import ANNEAL_MASKS, RandomAnnealMask, RightContextAnnealMask, annealing_mask, attention_allowed
from lightning_dlm.core.errors import DLMError
from lightning_dlm.data.packing import pack_blocks
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig
from lightning_dlm.model.flex_masks import flex_block_mask, flex_mask_mod
from tests.conftest import TINY_GPT2, TINY_LLAMA

flex = pytest.importorskip("torch.nn.attention.flex_attention")
# the eager (unfused) FlexAttention says it is not compiled: that is the point here
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

RATIOS = [0.0, 0.5, 1.0]
KINDS = sorted(ANNEAL_MASKS)


def _backbone(impl, config=TINY_LLAMA, device="cpu"):
    bc = BackboneConfig(config=dict(config), attn_implementation=impl, mask_token=MaskTokenConfig(mode="reuse", id=5))
    torch.manual_seed(0)
    return DiffusionModel.from_config(bc, None).to(device)


def _pair(device="cpu"):
    """sdpa and flex_attention backbones with identical weights."""
    sdpa, flexed = _backbone("sdpa", device=device), _backbone("flex_attention", device=device)
    flexed.load_state_dict(sdpa.state_dict())
    assert flexed.attn_implementation == "flex_attention" and sdpa.attn_implementation == "sdpa"
    return sdpa, flexed


def _batch(length=21, device="cpu"):
    """Two rows, the first left-padded by 4, and document ids of packed rows."""
    g = torch.Generator().manual_seed(11)
    x = torch.randint(6, 97, (2, length), generator=g)
    attn = torch.ones(2, length, dtype=torch.long)
    attn[0, :4] = 0
    x[0, :4] = 0
    docs = torch.zeros(2, length, dtype=torch.long)
    docs[1, 9:] = 1
    docs[1, 15:] = 2
    return x.to(device), attn.to(device), docs.to(device)


def _grid(mask_mod, batch, length):
    return flex.create_mask(mask_mod, batch, 1, length, length, device="cpu")[:, 0]


# --- the mask -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ratio", [0.0, 0.37, 0.5, 0.9])
def test_anneal_mask_mod_equals_dense_mask_on_the_grid(kind, ratio):
    mask = ANNEAL_MASKS[kind](ratio, 31337)
    L = 77
    assert torch.equal(_grid(mask.mask_mod(L), 1, L)[0], mask.dense(L))


@pytest.mark.parametrize("kind", KINDS)
def test_flex_mask_mod_equals_the_dense_paths_pattern(kind):
    """Annealing AND key padding AND same document, OR the diagonal: as attention_allowed builds it."""
    x, attn, docs = _batch(length=33)
    anneal = annealing_mask(kind, 0.5, 8)
    for allowed, pad, ids in [(anneal, attn, docs), (anneal, attn, None), (anneal, None, docs), (None, attn, docs),
                              (None, None, None), (torch.ones(33, 33, dtype=torch.bool).tril(), attn, None)]:
        dense = anneal.dense(33) if allowed is anneal else allowed
        expected = attention_allowed(dense, pad, ids, length=33).expand(2, 33, 33)
        assert torch.equal(_grid(flex_mask_mod(33, allowed, pad, ids), 2, 33), expected)


def test_block_mask_is_block_sparse_and_broadcast_when_nothing_depends_on_the_row():
    L, block = 128, 16
    bm = flex_block_mask(3, L, RightContextAnnealMask(0.0, 0), block_size=block)  # ratio 0: causal
    assert bm.shape[0] == 1  # one mask for every row
    n = L // block
    occupied = bm.to_dense()[0, 0].bool()
    assert torch.equal(occupied, torch.ones(n, n, dtype=torch.bool).tril())  # blocks above the diagonal are skipped
    x, attn, docs = _batch(length=L)
    per_row = flex_block_mask(2, L, RandomAnnealMask(0.1, 1), attn, block_size=block)
    assert per_row.shape[0] == 2
    dense = attention_allowed(RandomAnnealMask(0.1, 1).dense(L), attn)
    blocks = dense.view(2, n, block, n, block).any(dim=(2, 4))
    assert torch.equal(per_row.to_dense()[:, 0].bool(), blocks)


# --- parity with the dense-mask sdpa path ------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_flex_forward_equals_sdpa_dense_mask(kind, ratio):
    sdpa, flexed = _pair()
    x, attn, docs = _batch()
    allowed = annealing_mask(kind, ratio, 2025)
    assert (allowed is None) == (ratio >= 1.0)  # ratio 1: no mask, sdpa takes its bidirectional path
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        dense = sdpa(x, attention_mask=attn, allowed=allowed)
        kernel = flexed(x, attention_mask=attn, allowed=allowed)
        dense_docs = sdpa(x, attention_mask=attn, allowed=allowed, document_ids=docs)
        kernel_docs = flexed(x, attention_mask=attn, allowed=allowed, document_ids=docs)
    # Padding positions are never scored; at ratio 1 transformers' own bidirectional sdpa mask
    # does not open their diagonal as ours does, so compare the real positions.
    real = attn.bool()
    torch.testing.assert_close(kernel[real], dense[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel_docs[real], dense_docs[real], rtol=1e-5, atol=1e-5)
    if allowed is not None:  # the same 4-D pattern on both paths: every position agrees
        torch.testing.assert_close(kernel, dense, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dense_docs[1], dense[1], atol=1e-3)  # the documents did cut attention
    # the left-padded row's real tokens see what they see alone with the same (sub-square) pattern
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        alone = flexed(x[:1, 4:], allowed=None if allowed is None else allowed.dense(x.shape[1])[4:, 4:])
    torch.testing.assert_close(kernel[:1, 4:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_flex_directional_derivative_equals_sdpa_gradient_on_cpu(kind, ratio):
    """Gradient parity on the CPU, where FlexAttention has no backward: along a random direction
    of all weights, the central difference of the flex loss (float64, forward passes only) equals
    sdpa's, and both equal the dense-mask sdpa autograd gradient on that direction (to 1e-4:
    LLaMA's RMSNorm computes in float32 even in a float64 model, which limits the differences)."""
    sdpa, flexed = _pair()
    sdpa.double(), flexed.double()
    x, attn, docs = _batch()
    allowed = annealing_mask(kind, ratio, 77)

    def loss(net):
        return (net(x, attention_mask=attn, allowed=allowed, document_ids=docs).logsumexp(-1) * attn).sum()

    loss(sdpa).backward()
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in sdpa.parameters()]
    analytic = sum((p.grad * d).sum() for p, d in zip(sdpa.parameters(), direction))

    def central_difference(net, eps=1e-4):
        values = []
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            for sign in (1, -1):
                for p, d in zip(net.parameters(), direction):
                    p.add_(sign * eps * d)
                values.append(loss(net))
                for p, d in zip(net.parameters(), direction):
                    p.sub_(sign * eps * d)
        return (values[0] - values[1]) / (2 * eps)

    numeric_flex, numeric_sdpa = central_difference(flexed), central_difference(sdpa)
    assert abs(analytic) > 1e-3  # a direction the loss moves along
    torch.testing.assert_close(numeric_flex, numeric_sdpa, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(numeric_flex, analytic, rtol=1e-4, atol=1e-6)


# --- errors ---------------------------------------------------------------------------------------

def test_flex_training_on_cpu_is_a_one_line_error():
    _, flexed = _pair()
    x, attn, _ = _batch()
    with pytest.raises(DLMError, match="no backward pass on the CPU"):
        flexed(x, attention_mask=attn, allowed=RandomAnnealMask(0.5, 0))


def test_flex_refuses_attention_dropout_in_training_and_unsupported_models():
    net = _backbone("flex_attention", dict(TINY_LLAMA, attention_dropout=0.1)).train()
    x, attn, _ = _batch()
    with torch.no_grad(), pytest.raises(DLMError, match="attention_dropout"):
        net(x, attention_mask=attn)
    with pytest.raises(DLMError, match="GPT2LMHeadModel .*no FlexAttention support.*use attn_implementation: sdpa"):
        _backbone("flex_attention", TINY_GPT2)


# --- packed documents -----------------------------------------------------------------------------

def test_pack_blocks_emits_document_ids_only_when_asked():
    docs = [[1, 2, 3], [], [4, 5], [6, 7, 8, 9, 10], [11]]
    plain = list(pack_blocks(docs, 4))
    assert [b.tolist() for b in plain] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    pairs = list(pack_blocks(docs, 4, document_ids=True))
    assert [b.tolist() for b, _ in pairs] == [b.tolist() for b in plain]
    assert [ids.tolist() for _, ids in pairs] == [[0, 0, 0, 1], [0, 1, 1, 1]]
    assert [ids.tolist() for _, ids in pack_blocks([[1, 2, 3, 4, 5, 6, 7, 8, 9]], 3, document_ids=True)] == [[0] * 3] * 3


# --- the compiled path transformers runs by default ------------------------------------------------

@pytest.mark.slow
def test_compiled_flex_forward_equals_sdpa_on_cpu():
    """transformers' own compiled flex_attention (what runs on CUDA), here on the CPU: ~30 s of compiling."""
    sdpa, flexed = _pair()
    x, attn, _ = _batch()
    for seed in (1, 2):  # a second seed is new tensor data for the compiled kernel, not a recompile
        allowed = RandomAnnealMask(0.5, seed)
        with torch.no_grad():
            torch.testing.assert_close(flexed(x, attention_mask=attn, allowed=allowed),
                                       sdpa(x, attention_mask=attn, allowed=allowed), rtol=1e-5, atol=1e-5)
