"""Released diffusion LMs (lightning_dlm.io.releases): tiny checkpoints in each release's published
layout (config keys with model_type / architectures / auto_map, weight names, tokenizer files with
its mask token), random weights, in tmp_path. The loader's logits must equal a forward written
here from the release's equations over the state dict; the recorded conventions must be the
release's; dlm sample / eval / sft fit run on them; bad folders get one line and nothing is written.
"""

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from lightning_dlm.core.errors import DLMError
from lightning_dlm.model import DiffusionModel
from tests.conftest import REPO, TINY_TOKENIZER

BASE = json.load(open(os.path.join(TINY_TOKENIZER, "tokenizer.json"), encoding="utf-8"))
N_BASE = len(BASE["model"]["vocab"]) + 0  # 512 entries, <|endoftext|> (id 0) among them
D, LAYERS, HEADS, KV, FF = 32, 2, 4, 2, 48
IDS = torch.tensor([[1, 17, 300, 45, 2, 99, 7, 260], [5, 6, 7, 8, 9, 10, 11, 12]])


# --- writing the published files ------------------------------------------------------------------
def special(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_bpe_tokenizer(folder, added, config):
    """vocab.json + merges.txt (a byte-level BPE: GPT-2 / Qwen2 layout) and tokenizer_config.json
    with ``added`` ({id: token}) as added tokens."""
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(BASE["model"]["vocab"], fh)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in BASE["model"]["merges"]) + "\n")
    config = dict(config, added_tokens_decoder={str(i): special(t) for i, t in added.items()})
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh)


def write_fast_tokenizer(folder, added, config):
    """tokenizer.json (with ``added`` {id: token}) and tokenizer_config.json."""
    data = json.loads(json.dumps(BASE))
    data["added_tokens"] += [dict(special(t), id=i) for i, t in added.items()]
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(dict(config, added_tokens_decoder={str(i): special(t) for i, t in added.items()}), fh)


def write_json(folder, name, data):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as fh:
        json.dump(data, fh)


def rand(*shape, gen):
    return torch.randn(*shape, generator=gen) * 0.2


def llama_like_state(vocab, names, gen, qkv_bias=False, qk_norm=False, head_dim=None, tied=False):
    """Random weights of a LLaMA-style decoder under ``names`` (a function: part, layer -> name)."""
    hd = head_dim or D // HEADS
    state = {names("embed", None): rand(vocab, D, gen=gen), names("norm", None): 1 + rand(D, gen=gen)}
    if not tied:
        state[names("head", None)] = rand(vocab, D, gen=gen)
    for i in range(LAYERS):
        shapes = {"attn_norm": (D,), "q": (HEADS * hd, D), "k": (KV * hd, D), "v": (KV * hd, D), "o": (D, HEADS * hd),
                  "mlp_norm": (D,), "gate": (FF, D), "up": (FF, D), "down": (D, FF)}
        for part, shape in shapes.items():
            state[names(part, i)] = (1 + rand(*shape, gen=gen)) if part.endswith("norm") else rand(*shape, gen=gen)
        if qkv_bias:
            for part, size in (("q", HEADS * hd), ("k", KV * hd), ("v", KV * hd)):
                state[names(part, i).replace(".weight", ".bias")] = rand(size, gen=gen)
        if qk_norm:
            state[names("q_norm", i)] = 1 + rand(hd, gen=gen)
            state[names("k_norm", i)] = 1 + rand(hd, gen=gen)
    return state


def hf_names(part, i):
    """The LLaMA / Qwen2 / Qwen3 names of transformers (Dream, Fast-dLLM v2, DiffuLLaMA, Tiny-A2D)."""
    top = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight"}
    if part in top:
        return top[part]
    layer = {"attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm", "gate": "mlp.gate_proj",
             "up": "mlp.up_proj", "down": "mlp.down_proj", "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
    return f"model.layers.{i}.{layer[part]}.weight"


def llada_names(part, i):
    """LLaDA's published names (modeling_llada.py)."""
    top = {"embed": "model.transformer.wte.weight", "norm": "model.transformer.ln_f.weight",
           "head": "model.transformer.ff_out.weight"}
    if part in top:
        return top[part]
    layer = {"attn_norm": "attn_norm", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out",
             "mlp_norm": "ff_norm", "gate": "ff_proj", "up": "up_proj", "down": "ff_out"}
    return f"model.transformer.blocks.{i}.{layer[part]}.weight"


# --- the releases' equations, written independently of any model class -----------------------------
def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotary(x, theta):
    """RoPE over the last dim of (B, H, L, hd): pairs (j, j + hd/2) rotated by pos * theta^(-2j/hd)."""
    hd, length = x.shape[-1], x.shape[-2]
    freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(length, dtype=torch.float64)[:, None] * freq[None]
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def attend(q, k, v, allowed=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def llama_like_forward(state, names, ids, eps, theta, qk_norm=False, head_dim=None, tied=False, allowed=None):
    """Logits of a LLaMA-style decoder (RMSNorm, RoPE, GQA, SwiGLU; biases where the state has them),
    in float64, attending both ways (or as ``allowed`` (L, L) says)."""
    s = {k: v.double() for k, v in state.items()}
    hd = head_dim or D // HEADS
    x = s[names("embed", None)][ids]
    batch, length, _ = x.shape

    def proj(h, part, i, heads):
        w = s[names(part, i)]
        b = s.get(names(part, i).replace(".weight", ".bias"))
        out = h @ w.T + (b if b is not None else 0)
        return out.view(batch, length, heads, hd).transpose(1, 2)

    for i in range(LAYERS):
        h = rms(x, s[names("attn_norm", i)], eps)
        q, k, v = proj(h, "q", i, HEADS), proj(h, "k", i, KV), proj(h, "v", i, KV)
        if qk_norm:
            q, k = rms(q, s[names("q_norm", i)], eps), rms(k, s[names("k_norm", i)], eps)
        q, k = rotary(q, theta), rotary(k, theta)
        k, v = k.repeat_interleave(HEADS // KV, dim=1), v.repeat_interleave(HEADS // KV, dim=1)
        att = attend(q, k, v, allowed).transpose(1, 2).reshape(batch, length, HEADS * hd)
        x = x + att @ s[names("o", i)].T
        h = rms(x, s[names("mlp_norm", i)], eps)
        gate = h @ s[names("gate", i)].T
        x = x + (gate * torch.sigmoid(gate) * (h @ s[names("up", i)].T)) @ s[names("down", i)].T
    x = rms(x, s[names("norm", None)], eps)
    head = s[names("embed", None)] if tied else s[names("head", None)]
    return x @ head.T


def gpt2_forward(state, ids, eps=1e-5):
    """DiffuGPT's GPT-2 (Conv1D weights stored (in, out), gelu_new, learned positions), both ways."""
    s = {k: v.double() for k, v in state.items()}
    wte = s["embed_tokens.weight"]
    x = wte[ids] + s["denoise_model.wpe.weight"][: ids.shape[1]]
    batch, length, _ = x.shape

    def ln(h, name):
        mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        return (h - mean) / torch.sqrt(var + eps) * s[name + ".weight"] + s[name + ".bias"]

    def conv(h, name):
        return h @ s[name + ".weight"] + s[name + ".bias"]

    for i in range(LAYERS):
        p = f"denoise_model.h.{i}."
        q, k, v = conv(ln(x, p + "ln_1"), p + "attn.c_attn").split(D, dim=-1)
        q, k, v = (t.view(batch, length, HEADS, D // HEADS).transpose(1, 2) for t in (q, k, v))
        x = x + conv(attend(q, k, v).transpose(1, 2).reshape(batch, length, D), p + "attn.c_proj")
        h = conv(ln(x, p + "ln_2"), p + "mlp.c_fc")
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h.pow(3))))
        x = x + conv(h, p + "mlp.c_proj")
    return ln(x, "denoise_model.ln_f") @ wte.T


# --- the releases, tiny, in their published layouts ---------------------------------------------------
def qwen2_keys(**extra):
    return dict(attention_dropout=0.0, hidden_act="silu", hidden_size=D, initializer_range=0.02, intermediate_size=FF,
                max_position_embeddings=64, max_window_layers=LAYERS, num_attention_heads=HEADS,
                num_hidden_layers=LAYERS, num_key_value_heads=KV, rms_norm_eps=1e-6, rope_scaling=None,
                rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16",
                use_cache=True, use_sliding_window=False, **extra)


def build_dream(folder, gen, mask=True):
    vocab = 520
    config = dict(architectures=["DreamModel"], auto_map={"AutoConfig": "configuration_dream.DreamConfig",
                                                          "AutoModel": "modeling_dream.DreamModel"},
                  bos_token_id=0, eos_token_id=0, pad_token_id=0, mask_token_id=513, model_type="Dream",
                  transformers_version="4.46.2", vocab_size=vocab, **qwen2_keys())
    write_json(folder, "config.json", config)
    added = {512: "<|beginoftext|>", **({513: "<|mask|>"} if mask else {})}
    write_bpe_tokenizer(folder, added, dict(tokenizer_class="DreamTokenizer", auto_map={"AutoTokenizer": [
        "tokenization_dream.DreamTokenizer", None]}, bos_token="<|beginoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", **({"mask_token": "<|mask|>"} if mask else {}), errors="replace",
        model_max_length=64, padding_side="left", split_special_tokens=False))
    open(os.path.join(folder, "tokenization_dream.py"), "w").write("raise SystemExit('remote code ran')\n")
    state = llama_like_state(vocab, hf_names, gen, qkv_bias=True)
    return state, dict(names=hf_names, eps=1e-6, theta=1e6)


def build_fast_dllm_v2(folder, gen):
    vocab = 520
    config = dict(architectures=["Fast_dLLM_QwenForCausalLM"], auto_map={
        "AutoConfig": "configuration.Fast_dLLM_QwenConfig", "AutoModel": "modeling.Fast_dLLM_QwenModel",
        "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"}, bd_size=4, bos_token_id=0,
        conplemenrary_mask=True, eos_token_id=512, layer_types=["full_attention"] * LAYERS,
        model_type="Fast_dLLM_Qwen", pad_token_id=512, transformers_version="4.53.1", vocab_size=vocab, **qwen2_keys())
    write_json(folder, "config.json", config)
    added = {512: "<|im_end|>", 513: "<|im_start|>", 515: "|<MASK>|", 514: "<|endoftext_|>"}
    write_bpe_tokenizer(folder, added, dict(add_bos_token=False, additional_special_tokens=["|<MASK>|"], bos_token=None,
                                            eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                            tokenizer_class="Qwen2Tokenizer", errors="replace", model_max_length=64))
    write_json(folder, "added_tokens.json", {t: i for i, t in added.items()})
    write_json(folder, "special_tokens_map.json", {"additional_special_tokens": [special("|<MASK>|")],
                                                   "eos_token": special("<|im_end|>"), "pad_token": special("<|endoftext|>")})
    state = llama_like_state(vocab, hf_names, gen, qkv_bias=True)
    return state, dict(names=hf_names, eps=1e-6, theta=1e6)


def build_llada(folder, gen, mask=True):
    vocab = 520
    config = {"activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
              "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
              "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                           "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM", "AutoModel": "modeling_llada.LLaDAModelLM"},
              "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": D,
              "embedding_dropout": 0.0, "embedding_size": vocab, "eos_token_id": 0, "flash_attention": False,
              "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
              "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
              "layer_norm_with_affine": True, "mask_token_id": 514, "max_sequence_length": 64, "mlp_hidden_size": FF,
              "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": HEADS, "n_kv_heads": KV,
              "n_layers": LAYERS, "pad_token_id": 0, "precision": "amp_bf16", "residual_dropout": 0.0,
              "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
              "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False, "vocab_size": vocab,
              "weight_tying": False}
    write_json(folder, "config.json", config)
    added = {512: "<|startoftext|>", 513: "<|eot_id|>", **({514: "<|mdm_mask|>"} if mask else {})}
    write_fast_tokenizer(folder, added, dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<|startoftext|>",
                                             eos_token="<|endoftext|>", model_max_length=64,
                                             auto_map={"AutoTokenizer": ["tokenization_llada.Tok", None]}))
    state = llama_like_state(vocab, llada_names, gen)
    return state, dict(names=llada_names, eps=1e-5, theta=500000.0)


def build_tiny_a2d(folder, gen):
    vocab = 520
    config = dict(architectures=["A2DQwen3LMHeadModel"], auto_map={
        "AutoConfig": "modeling_qwen3.A2DQwen3Config", "AutoModel": "modeling_qwen3.A2DQwen3Model",
        "AutoModelForMaskedLM": "modeling_qwen3.A2DQwen3LMHeadModel"}, attention_bias=False, bos_token_id=0, eos_token_id=512,
                  head_dim=16, model_type="a2d-qwen3", transformers_version="4.57.1", vocab_size=vocab,
                  **dict(qwen2_keys(), tie_word_embeddings=True))
    write_json(folder, "config.json", config)
    added = {512: "<|im_end|>", 513: "<|im_start|>", 514: "<|mask|>"}
    write_bpe_tokenizer(folder, added, dict(tokenizer_class="Qwen2Tokenizer", eos_token="<|im_end|>",
                                            pad_token="<|endoftext|>", mask_token="<|mask|>", errors="replace",
                                            model_max_length=64))
    state = llama_like_state(vocab, hf_names, gen, qk_norm=True, head_dim=16, tied=True)
    return state, dict(names=hf_names, eps=1e-6, theta=1e6, qk_norm=True, head_dim=16, tied=True)


def build_diffullama(folder, gen):
    vocab = 520
    config = dict(architectures=["LlamaForCausalLM"], attention_bias=False, bos_token_id=512, eos_token_id=0,
                  hidden_act="silu", hidden_size=D, initializer_range=0.02, intermediate_size=FF,
                  max_position_embeddings=64, model_type="llama", num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                  num_key_value_heads=KV, pretraining_tp=1, rms_norm_eps=1e-5, rope_scaling=None, rope_theta=10000.0,
                  tie_word_embeddings=False, torch_dtype="float32", transformers_version="4.44.2", use_cache=True,
                  vocab_size=vocab)
    write_json(folder, "config.json", config)
    write_fast_tokenizer(folder, {512: "<s>"}, dict(tokenizer_class="LlamaTokenizer", bos_token="<s>",
                                                    eos_token="<|endoftext|>", mask_token="Ġthe", model_max_length=64))
    write_json(folder, "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "<|endoftext|>", "mask_token": "Ġthe"})
    state = llama_like_state(vocab, hf_names, gen)
    return state, dict(names=hf_names, eps=1e-5, theta=10000.0)


def build_diffugpt(folder, gen, medium=False):
    """DiffuGPT-S reuses an existing token as the mask; DiffuGPT-M adds [¨M¨] and resizes to 514 rows."""
    config = dict(activation_function="gelu_new", architectures=["GPT2LMHeadModel"], attn_pdrop=0.1, bos_token_id=0,
                  embd_pdrop=0.1, eos_token_id=0, initializer_range=0.02, layer_norm_epsilon=1e-05, model_type="gpt2",
                  n_ctx=64, n_embd=D, n_head=HEADS, n_inner=None, n_layer=LAYERS, n_positions=64, resid_pdrop=0.1,
                  scale_attn_weights=True, summary_activation=None, summary_first_dropout=0.1,
                  summary_proj_to_labels=True, summary_type="cls_index", summary_use_proj=True,
                  task_specific_params={"text-generation": {"do_sample": True, "max_length": 64}}, vocab_size=N_BASE)
    write_json(folder, "config.json", config)
    added = {512: "[¨M¨]"} if medium else {}
    mask = "[¨M¨]" if medium else "Ġthe"
    write_bpe_tokenizer(folder, added, dict(tokenizer_class="GPT2Tokenizer", bos_token="<|endoftext|>",
                                            eos_token="<|endoftext|>", unk_token="<|endoftext|>", mask_token=mask,
                                            model_max_length=64))
    rows = 514 if medium else N_BASE
    state = {"embed_tokens.weight": rand(rows, D, gen=gen), "denoise_model.wpe.weight": rand(64, D, gen=gen),
             "denoise_model.ln_f.weight": 1 + rand(D, gen=gen), "denoise_model.ln_f.bias": rand(D, gen=gen)}
    for i in range(LAYERS):
        p = f"denoise_model.h.{i}."
        for name, shape in (("ln_1.weight", (D,)), ("ln_1.bias", (D,)), ("attn.c_attn.weight", (D, 3 * D)),
                            ("attn.c_attn.bias", (3 * D,)), ("attn.c_proj.weight", (D, D)), ("attn.c_proj.bias", (D,)),
                            ("ln_2.weight", (D,)), ("ln_2.bias", (D,)), ("mlp.c_fc.weight", (D, 4 * D)),
                            ("mlp.c_fc.bias", (4 * D,)), ("mlp.c_proj.weight", (4 * D, D)), ("mlp.c_proj.bias", (D,))):
            state[p + name] = (1 + rand(*shape, gen=gen)) if name.startswith("ln") and name.endswith("weight") \
                else rand(*shape, gen=gen)
    return state, None


#: release -> (builder, folder name, expected conventions)
RELEASES = {
    "dream": (build_dream, "Dream-v0-Base-7B", dict(shift=True, attention="bidirectional", mask=513, eos=0)),
    "llada": (build_llada, "LLaDA-8B-Instruct", dict(shift=False, attention="bidirectional", mask=514, eos=0)),
    "fast_dllm_v2": (build_fast_dllm_v2, "Fast_dLLM_v2_1.5B", dict(shift=True, attention="block", block_size=4,
                                                                   complementary_masks=True, mask=515, eos=512)),
    "tiny_a2d_mdlm": (build_tiny_a2d, "Qwen3-0.6B-diffusion-mdlm-v0.1", dict(shift=False, attention="bidirectional",
                                                                            mask=514, eos=512)),
    "tiny_a2d_bd3lm": (build_tiny_a2d, "Qwen3-0.6B-diffusion-bd3lm-v0.1", dict(shift=False, attention="block",
                                                                              block_size=32, mask=514, eos=512)),
    "diffullama": (build_diffullama, "diffullama", dict(shift=True, attention="bidirectional", mask=266, eos=0)),
    "diffugpt": (build_diffugpt, "diffugpt-s", dict(shift=True, attention="bidirectional", mask=266, eos=0)),
}


def make_release(tmp_path, name, **kwargs):
    builder, folder_name, expected = RELEASES[name]
    folder = tmp_path / folder_name
    folder.mkdir()
    state, ref = builder(str(folder), torch.Generator().manual_seed(0), **kwargs)
    save_file({k: v.to(torch.bfloat16) if name == "dream" else v for k, v in state.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    if name == "dream":  # the published bfloat16, read back exactly as stored
        state = {k: v.to(torch.bfloat16).float() for k, v in state.items()}
    return str(folder), state, ref, expected


def reference_logits(name, state, ref, ids, allowed=None):
    if name == "diffugpt":
        return gpt2_forward(state, ids)
    return llama_like_forward(state, ids=ids, allowed=allowed, **ref)


# --- the loaders -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RELEASES))
def test_release_logits_equal_its_equations_and_conventions_are_recorded(tmp_path, name):
    folder, state, ref, expected = make_release(tmp_path, name)
    model = DiffusionModel.from_pretrained(folder)
    assert model.info["release"] == name
    model = model.float()
    with torch.no_grad():
        got = model(IDS).double()
    want = reference_logits(name, state, ref, IDS)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert model.shift is expected["shift"]
    assert model.diffusion.attention == expected["attention"]
    if "block_size" in expected:
        assert model.diffusion.block_size == expected["block_size"]
    assert model.diffusion.complementary_masks is expected.get("complementary_masks", False)
    assert model.mask_token_id == expected["mask"] and model.tokenizer.mask_token_id == expected["mask"]
    assert not model.mask_token_added
    assert model.tokenizer.eos_token_id == expected["eos"] == model.info["eos_token_id"]


@pytest.mark.parametrize("name", ["fast_dllm_v2", "tiny_a2d_bd3lm"])
def test_block_releases_attend_within_blocks_and_causally_across(tmp_path, name):
    folder, state, ref, expected = make_release(tmp_path, name)
    model = DiffusionModel.from_pretrained(folder).float()
    block = 4
    pos = torch.arange(IDS.shape[1])
    allowed = (pos[None, :] // block) <= (pos[:, None] // block)  # block-causal: blocks see themselves and the past
    with torch.no_grad():
        got = model(IDS, allowed=allowed).double()
    torch.testing.assert_close(got, reference_logits(name, state, ref, IDS, allowed=allowed), rtol=1e-4, atol=1e-4)


def test_diffugpt_medium_adds_its_mask_and_resized_rows(tmp_path):
    folder, state, ref, _ = make_release(tmp_path, "diffugpt", medium=True)
    model = DiffusionModel.from_pretrained(folder)
    assert model.vocab_size == 514 and model.mask_token_id == 512
    assert model.tokenizer.convert_ids_to_tokens(512) == "[¨M¨]"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).double(), gpt2_forward(state, IDS), rtol=1e-4, atol=1e-4)


def test_no_remote_code_runs(tmp_path):
    """The Dream folder names its tokenizer code (auto_map) and that file exits the process if run."""
    folder, *_ = make_release(tmp_path, "dream")
    model = DiffusionModel.from_pretrained(folder)
    assert type(model.model).__name__ == "Qwen2ForCausalLM"
    assert type(model.tokenizer).__name__ == "Qwen2Tokenizer"


def test_a_hub_name_is_downloaded_then_read_by_its_release_loader(tmp_path, monkeypatch):
    import huggingface_hub

    folder, state, ref, _ = make_release(tmp_path, "fast_dllm_v2")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: asked.append(repo_id) or folder)
    model = DiffusionModel.from_pretrained("Efficient-Large-Model/Fast_dLLM_v2_1.5B")
    assert asked == ["Efficient-Large-Model/Fast_dLLM_v2_1.5B"] and model.info["release"] == "fast_dllm_v2"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).double(), reference_logits("fast_dllm_v2", state, ref, IDS),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llada", "fast_dllm_v2"])
def test_dlm_export_of_a_release_keeps_its_logits_and_conventions(tmp_path, name):
    from lightning_dlm.cli import main

    folder, _, _, expected = make_release(tmp_path, name)
    main(["export", "--ckpt", folder, "--out", str(tmp_path / "exported")])
    release, exported = DiffusionModel.from_pretrained(folder), DiffusionModel.from_pretrained(str(tmp_path / "exported"))
    with torch.no_grad():
        assert torch.equal(release(IDS), exported(IDS))
    assert exported.mask_token_id == expected["mask"] and exported.shift is expected["shift"]
    assert exported.diffusion.attention == expected["attention"]


# --- bad input ----------------------------------------------------------------------------------
def listing(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


def test_unknown_folder_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "mystery"
    folder.mkdir()
    write_json(str(folder), "config.json", {"model_type": "mystery", "architectures": ["MysteryModel"],
                                            "auto_map": {"AutoModel": "modeling_mystery.MysteryModel"}})
    before = listing(tmp_path)
    with pytest.raises(DLMError) as err:
        DiffusionModel.from_pretrained(str(folder))
    line = str(err.value)
    assert "\n" not in line and str(folder) in line and "none of the released diffusion LMs" in line
    assert "dlm export" in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("name", ["dream", "llada"])
def test_release_without_its_mask_token_is_refused(tmp_path, name):
    folder, *_ = make_release(tmp_path, name, mask=False)
    before = listing(tmp_path)
    with pytest.raises(DLMError) as err:
        DiffusionModel.from_pretrained(folder)
    line = str(err.value)
    token = "<|mask|>" if name == "dream" else "<|mdm_mask|>"
    assert "\n" not in line and folder in line and f"lacks the mask token {token!r}" in line and "download" in line
    assert listing(tmp_path) == before


def test_trust_remote_code_requests_are_refused(tmp_path):
    folder, *_ = make_release(tmp_path, "llada")
    with pytest.raises(DLMError, match=r"trust_remote_code is refused.*never runs.*lightning_dlm\.io\.releases") as err:
        DiffusionModel.from_pretrained(folder, trust_remote_code=True)
    assert "\n" not in str(err.value) and folder in str(err.value)


def test_trust_remote_code_in_a_config_is_refused_before_anything_is_written(tmp_path, capsys):
    debug = os.path.join(REPO, "experiments", "debug.yaml")
    run = tmp_path / "run"
    err = cli_error(["fit", "--config", debug, "--trainer.default_root_dir", str(run), "--checkpoint.dirpath",
                     str(run / "ck"), "--model.backbone.trust_remote_code", "true"], capsys)
    assert err.startswith("error: model.backbone.trust_remote_code: true: trust_remote_code is refused")
    assert "\n" not in err and "drop it" in err
    assert listing(run) == []


def test_a_hub_name_offline_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DLMError, match=r"could not fetch 'GSAI-ML/LLaDA-8B-Base' from the Hugging Face hub") as err:
        DiffusionModel.from_pretrained("GSAI-ML/LLaDA-8B-Base")
    assert "\n" not in str(err.value)


# --- the commands on the tiny releases --------------------------------------------------------------
def cli_error(args, capsys):
    from lightning_dlm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_dlm_sample_runs_on_the_release(tmp_path, name, capsys):
    from lightning_dlm.cli import main

    folder, *_ = make_release(tmp_path, name)
    main(["sample", "--ckpt", folder, "--prompt", "Once upon a time", "--length", "8", "--steps", "8", "--seed", "0"])
    out = capsys.readouterr().out
    assert "Once upon a time\u27e6" in out and "8 tokens" in out


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_dlm_eval_scores_the_release(tmp_path, name, capsys):
    from lightning_dlm.cli import main

    folder, *_ = make_release(tmp_path, name)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps(dict(context="Once upon a time", choices=[" there was", " the dog"], label=0)) + "\n")
    out = tmp_path / "r.json"
    main(["eval", "--model", folder, "--task", "multiple_choice", "--data", str(mc), "--set", "levels=3", "--out",
          str(out), "--no-progress"])
    (result,) = json.loads(out.read_text())["models"].values()
    assert result["kind"] == "diffusion" and result["results"]["multiple_choice"]["items"] == 1


def sft_config(tmp_path, folder, diffusion):
    import yaml

    from tests.test_sft import RECORDS, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", RECORDS[:6])
    config = {"seed_everything": 0,
              "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 1,
                          "val_check_interval": 2, "check_val_every_n_epoch": None,
                          "default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False,
                          "enable_model_summary": False, "log_every_n_steps": 1},
              "checkpoint": {"every_n_train_steps": 2},
              "model": {"val_t_levels": 2, "backbone": {"pretrained": folder}, "diffusion": diffusion,
                        "optim": {"lr": 1e-3}},
              "data": {"train": [{"path": data}], "val": [{"path": data}], "seq_len": 32, "batch_size": 2,
                       "padding": "fixed", "too_long": "cut", "template": "plain"}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_dlm_sft_fit_starts_from_the_release(tmp_path, name):
    from lightning_dlm.cli import main

    folder, state, ref, expected = make_release(tmp_path, name)
    diffusion = {"anneal_steps": 0, "shift": expected["shift"], "attention": expected["attention"],
                 **({"block_size": expected["block_size"]} if "block_size" in expected else {})}
    main(["sft", "fit", "--config", sft_config(tmp_path, folder, diffusion)])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    model = DiffusionModel.from_pretrained(str(ckpt))
    assert model.mask_token_id == expected["mask"] and not model.mask_token_added  # the release's mask, reused
    assert model.shift is expected["shift"] and model.diffusion.attention == expected["attention"]
    assert model.vocab_size == state[RELEASE_EMBEDDING[name]].shape[0]  # no row added


RELEASE_EMBEDDING = dict({name: "model.embed_tokens.weight" for name in RELEASES}, diffugpt="embed_tokens.weight",
                        llada="model.transformer.wte.weight")


def test_sft_fit_under_another_convention_than_the_release_is_refused(tmp_path, capsys):
    folder, *_ = make_release(tmp_path, "llada")
    err = cli_error(["sft", "fit", "--config", sft_config(tmp_path, folder, {"anneal_steps": 0, "shift": True})], capsys)
    assert "is the LLaDA release, trained with shift: false" in err and "--model.diffusion.shift false" in err
    assert "\n" not in err and listing(tmp_path / "run") == []
