"""Shared fixtures: tiny models built from config, on the CPU, no network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

TINY_LLAMA = dict(
    model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)
TINY_GPT2 = dict(
    model_type="gpt2", vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
)
FAMILIES = {"llama": TINY_LLAMA, "gpt2": TINY_GPT2}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(REPO, "data", "fixtures", "tiny_tokenizer")
TINY_CORPUS = os.path.join(REPO, "data", "fixtures", "tiny_corpus.txt")


@pytest.fixture(params=sorted(FAMILIES))
def family_config(request):
    return dict(FAMILIES[request.param])


@pytest.fixture
def exact_fp32():
    """fp32 means fp32: no TF32 in the reference matmuls (the CUDA parity tests use it)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
