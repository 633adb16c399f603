"""README's "Adapt your own model" table: parameters, FLOPs, memory per GPU under FSDP2 and tokens/s
by family, for the configs of experiments/families/.

    python benchmarks/family_table.py                          # the README's table (markdown)
    python benchmarks/family_table.py --batch 8 --seq-len 4096 --gpus 16

Nothing is downloaded: each family's architecture is its published ``config.json``'s shape, written
in :data:`FAMILIES` (the parameter counts printed equal the published ones; tests/test_families.py
checks them), and the model is built on the meta device (no memory, no weights).

* **FLOPs per token** are counted by the project's FLOP counter (the ``FlopCounter`` the
  ``TrainingThroughput`` callback counts a training micro-batch with) over one forward and backward
  of the diffusion step on the meta device: the decoder (bidirectional, SDPA) on every position, the
  LM head and the cross-entropy on the scored rows only, whose expected share is the expected masked
  fraction of the linear schedule, (1 + eps) / 2. No activation checkpointing (model FLOPs, as MFU
  counts them).
* **tokens/s per GPU** = bf16 dense peak x MFU / FLOPs per token, with the peak of the H100 SXM /
  H200 (989.4 TFLOP/s, the throughput callback's table) and the MFU the GPU suite measured on its
  ~1.1B LLaMA after annealing on one H200 (33.0 %, benchmarks/RESULTS.md). FSDP's all-gathers and
  reduce-scatters are assumed hidden behind compute (they overlap it at best); activation
  checkpointing runs each layer's forward twice, about 3/4 of these tokens/s.
* **memory per GPU** under FSDP2 (``lightning_dlm.training.fsdp2.FSDP2Strategy``, bf16 parameters in
  compute, float32 master weights) on ``--gpus`` GPUs at ``--batch`` x ``--seq-len`` tokens per GPU,
  an estimate, not a measurement: float32 weights, gradients and AdamW moments sharded (16 bytes per
  parameter / GPUs); the root unit (embeddings, LM head) gathered in bf16 from the forward to the
  backward with its bf16 gradient, two decoder layers gathered at a time and one layer's unsharded
  gradient; the activations the backward keeps (per token and layer, in bytes, with SDPA's flash
  kernels, which keep no L x L matrix: 6 h per RMSNorm or LayerNorm, 6 (q + 2 kv) for the attention
  (q, k, v, the output and the output projection's input), 8 I for a gated MLP, 4 I for GPT-2's),
  all layers' without checkpointing, with it each layer's bf16 input plus one layer recomputed; and
  the scored rows' logits (12 bytes per row and vocabulary entry at the backward's peak: bf16
  logits, their float32 log-softmax and its gradient). Allocator slack and the optimiser step's
  temporaries are not counted: leave ~10-15 % of the GPU free.

Where the GPU suite measured a figure (the ~1.1B LLaMA, 8 x 2048 on one H200, no FSDP), the table
quotes the measurement instead (:data:`MEASURED`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PEAK_BF16 = 989.4e12  # dense bf16 FLOP/s of the H100 SXM / H200 (lightning_dlm.training.callbacks.throughput)
MEASURED_MFU = 0.330  # benchmarks/RESULTS.md: the ~1.1B LLaMA, diffusion after annealing, SDPA, one H200
EPS = 1.0e-3  # the families' diffusion.eps: E[masked fraction] = (1 + eps) / 2 under the linear schedule
GIB = 2**30


@dataclass
class Family:
    """One row: the hub model, its published architecture (``config.json``'s shape), and what the
    mask-token rule does with its tokenizer."""

    name: str
    hub: str
    config: Dict
    gated: bool
    mask: str
    yaml: Optional[str]  # experiments/families/<yaml>
    published_params: Optional[int] = None
    norms_per_layer: int = 2
    qk_norm: bool = False
    gated_mlp: bool = True
    extra: Dict = field(default_factory=dict)


FAMILIES: List[Family] = [
    Family("GPT-2 (124M)", "openai-community/gpt2",
           dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
           False, "added `<|mask|>` (id 50257, one new row)", "gpt2.yaml", 124_439_808, gated_mlp=False),
    Family("Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B",
           dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
           False, "added `<|mask|>` (id 151665, a spare row)", "qwen2.5_0.5b.yaml", 494_032_768),
    Family("Qwen3-0.6B", "Qwen/Qwen3-0.6B-Base",
           dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
           False, "added `<|mask|>` (id 151669, a spare row)", "qwen3_0.6b.yaml", 596_049_920, qk_norm=True),
    Family("Gemma-3-1B", "google/gemma-3-1b-pt",
           dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                tie_word_embeddings=True),
           True, "reused `<mask>` (id 4)", "gemma3_1b.yaml", 999_885_952, norms_per_layer=4, qk_norm=True),
    Family("Llama-3.2-1B", "meta-llama/Llama-3.2-1B",
           dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
           True, "reused `<|reserved_special_token_0|>` (id 128002)", "llama3.2_1b.yaml", 1_235_814_400),
    Family("Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B",
           dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
           False, "added `<|mask|>` (id 151665, a spare row)", "qwen2.5_1.5b.yaml", 1_543_714_304),
    Family("Qwen2.5-7B", "Qwen/Qwen2.5-7B",
           dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
           False, "added `<|mask|>` (id 151665, a spare row)", "qwen2.5_7b.yaml", 7_615_616_512),
    Family("Llama-3.1-8B", "meta-llama/Llama-3.1-8B",
           dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
           True, "reused `<|reserved_special_token_0|>` (id 128002)", "llama3.1_8b.yaml", 8_030_261_248),
    Family("Qwen3-8B", "Qwen/Qwen3-8B-Base",
           dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
           False, "added `<|mask|>` (id 151669, a spare row)", "qwen3_8b.yaml", 8_190_735_360, qk_norm=True),
]

#: The GPU suite's measured shape (benchmarks/train_step.py ``llama-1b``), quoted from benchmarks/RESULTS.md.
MEASURED_SHAPE = Family("LLaMA ~1.1B (GPU suite)", "(benchmarks/train_step.py --shape llama-1b)",
                        dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                             num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                             tie_word_embeddings=False),
                        False, "-", None)
MEASURED = {"tokens_per_s": 44_595, "peak_gib": 70.0, "mfu": 0.330, "batch": "8 x 2048",
            "where": "one H200, no FSDP, diffusion after annealing (SDPA), bf16 autocast"}


@dataclass
class Shape:
    params: int
    layers: int
    hidden: int
    vocab: int
    q_dim: int
    kv_dim: int
    intermediate: int
    root_params: int  # embeddings, LM head (when untied), final norm: FSDP's root unit
    layer_params: int


def build_meta(family: Family):
    """The family's causal LM on the meta device (no weights, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**family.config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def shape_of(model) -> Shape:
    cfg = model.config
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    intermediate = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    layers = model.get_decoder().layers if hasattr(model.get_decoder(), "layers") else model.get_decoder().h
    layer_params = sum(p.numel() for p in layers[0].parameters())
    return Shape(params=params, layers=len(layers), hidden=hidden, vocab=model.get_input_embeddings().weight.shape[0],
                 q_dim=heads * head_dim, kv_dim=kv_heads * head_dim, intermediate=intermediate,
                 root_params=params - len(layers) * layer_params, layer_params=layer_params)


def flops_per_token(model, seq_len: int) -> float:
    """FLOPs of one training token (forward + backward), counted by the throughput callback's counter
    on the meta device: the decoder on every position, the LM head and loss on the expected share of
    scored rows (the first rows of the sequence stand for them: FLOPs depend on their number only)."""
    from lightning_dlm.model import DiffusionModel
    from lightning_dlm.training.callbacks.throughput import FlopCounter

    net = DiffusionModel(model, 0, False, attn_implementation="sdpa")
    scored = max(1, round(seq_len * (1 + EPS) / 2))
    x0 = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    with FlopCounter() as counter:
        hidden = net.hidden_states(x0)
        logits = net.lm_head(hidden[:, :scored])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x0[:, :scored].flatten())
        loss.backward()
    return counter.total / seq_len


def activation_bytes_per_token_layer(family: Family, shape: Shape) -> int:
    """Bytes the backward keeps per token and decoder layer (bf16 compute, flash SDPA; see the module docstring)."""
    norms = family.norms_per_layer * 6 * shape.hidden
    qk = 6 * (shape.q_dim + shape.kv_dim) if family.qk_norm else 0
    attention = 6 * (shape.q_dim + 2 * shape.kv_dim)
    mlp = (8 if family.gated_mlp else 4) * shape.intermediate
    return norms + qk + attention + mlp


def memory_per_gpu(family: Family, shape: Shape, batch: int, seq_len: int, gpus: int, checkpointing: bool) -> float:
    """Bytes per GPU under FSDP2 on ``gpus`` GPUs (the module docstring's estimate)."""
    tokens = batch * seq_len
    states = 16 * shape.params / gpus
    gathered = 2 * 2 * shape.root_params + 3 * 2 * shape.layer_params
    per_layer = activation_bytes_per_token_layer(family, shape) * tokens
    kept = tokens * 2 * shape.hidden * shape.layers + per_layer if checkpointing else per_layer * shape.layers
    logits = 12 * shape.vocab * tokens * (1 + EPS) / 2
    return states + gathered + kept + logits


@dataclass
class Row:
    family: Family
    shape: Shape
    flops: float
    memory_ckpt: float
    memory_plain: float
    tokens_per_s: float
    seq_len: int


def compute(families: List[Family], batch: int, seq_len: int, gpus: int) -> List[Row]:
    """A row per family. A model whose context is shorter than ``seq_len`` (GPT-2: 1024) takes the
    same tokens per GPU in more, shorter rows."""
    from lightning_dlm.model.loading import max_positions

    rows = []
    for family in families:
        model = build_meta(family)
        shape = shape_of(model)
        length = min(seq_len, max_positions(model.config) or seq_len)
        rows_per_gpu = max(1, batch * seq_len // length)
        flops = flops_per_token(model, length)
        rows.append(Row(family, shape, flops,
                        memory_per_gpu(family, shape, rows_per_gpu, length, gpus, True),
                        memory_per_gpu(family, shape, rows_per_gpu, length, gpus, False),
                        PEAK_BF16 * MEASURED_MFU / flops, length))
    return rows


def render(rows: List[Row], measured: Optional[Row], batch: int, seq_len: int, gpus: int) -> str:
    head = (f"| model | params | layers x hidden | vocab | gated | mask token (the rule) | GFLOP/token | "
            f"GiB/GPU, FSDP2 x{gpus}, {batch}x{seq_len}, checkpointing | same, no checkpointing | tokens/s per H200 |")
    lines = [head, "|---|---:|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        f, s = r.family, r.shape
        name = f.name if r.seq_len == seq_len else f"{f.name} (rows of {r.seq_len}, its context)"
        mask = f.mask.replace("|", "\\|")  # a | inside a markdown table cell
        rate = float(f"{r.tokens_per_s:.3g}")  # an estimate: 3 figures
        lines.append(f"| {name} | {s.params / 1e9:.2f}B | {s.layers} x {s.hidden} | {s.vocab:,} | "
                     f"{'yes' if f.gated else 'no'} | {mask} | {r.flops / 1e9:.2f} | {r.memory_ckpt / GIB:.1f} | "
                     f"{r.memory_plain / GIB:.1f} | ~{rate:,.0f} |")
    if measured is not None:
        s = measured.shape
        lines.append(f"| {measured.family.name} | {s.params / 1e9:.2f}B | {s.layers} x {s.hidden} | {s.vocab:,} | no | - | "
                     f"{measured.flops / 1e9:.2f} | - | {MEASURED['peak_gib']:.1f} measured ({MEASURED['batch']}, no FSDP) | "
                     f"{MEASURED['tokens_per_s']:,} measured |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences per GPU (micro-batch)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs FSDP2 shards over")
    args = parser.parse_args(argv)
    rows = compute(FAMILIES, args.batch, args.seq_len, args.gpus)
    measured = compute([MEASURED_SHAPE], args.batch, args.seq_len, args.gpus)[0]
    table = render(rows, measured, args.batch, args.seq_len, args.gpus)
    implied = PEAK_BF16 * MEASURED["mfu"] / MEASURED["tokens_per_s"]
    note = (f"\nFLOPs check: the measured row's counted {measured.flops / 1e9:.2f} GFLOP/token against "
            f"{implied / 1e9:.2f} implied by its measured tokens/s and MFU (at 2048 tokens).")
    print(table + note)
    return table


if __name__ == "__main__":
    main()
