"""dlm chat: the chat template is applied, replies decode EOS-aware and live; driven through a pseudo-terminal."""

import os
import sys

import pytest
import torch

from lightning_dlm.commands.chat import MASK_GLYPH, ChatSession, render_reply
from lightning_dlm.core.errors import DLMError
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig, load_tokenizer
from tests.conftest import REPO, TINY_TOKENIZER

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_model(chat=True):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    cfg = BackboneConfig(config=dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=256, bos_token_id=0, eos_token_id=0),
                         tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig())
    return DiffusionModel.from_config(cfg, tokenizer).eval()


def test_session_applies_template_and_shows_denoising():
    model = tiny_model()
    session = ChatSession(model, system="Be brief.", max_length=6, steps=6, strategy="confidence", temperature=0.0)
    assert session.prompt_text("hi") == "<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>"
    shown = []
    reply = session.reply("hi", show=shown.append)
    assert shown[0] == MASK_GLYPH * 6  # every slot masked before the first step
    assert all(s.count(MASK_GLYPH) >= t.count(MASK_GLYPH) for s, t in zip(shown, shown[1:-1]))  # slots fill in
    assert shown[-1] == reply and session.messages[-1] == {"role": "assistant", "content": reply}
    assert "<|assistant|>" + reply in session.prompt_text("again")  # the history is in the next turn
    tok = model.tokenizer
    ids = tok("ab", add_special_tokens=False)["input_ids"]
    assert render_reply(ids + [model.mask_token_id, tok.eos_token_id, 5], tok, model.mask_token_id,
                        tok.eos_token_id) == "ab" + MASK_GLYPH


def test_tokenizer_without_chat_template_is_refused():
    with pytest.raises(DLMError, match="no chat template"):
        ChatSession(tiny_model(chat=False))


def test_chat_through_a_pseudo_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    folder = tiny_model().save_pretrained(str(tmp_path / "model"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    child = pexpect.spawn(sys.executable, ["-m", "lightning_dlm", "chat", "--ckpt", folder, "--max_length", "8",
                                           "--device", "cpu"], cwd=REPO, env=env, timeout=120, encoding="utf-8")
    child.expect("you> ")
    child.sendline("hello there")
    child.expect("dlm> ")
    child.expect("you> ")  # answered, ready for the next turn
    child.sendline("/exit")
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # end of input (Ctrl-D) also ends it cleanly
    child = pexpect.spawn(sys.executable, ["-m", "lightning_dlm", "chat", "--ckpt", folder, "--max_length", "4",
                                           "--no_live"], cwd=REPO, env=env, timeout=120, encoding="utf-8")
    child.expect("you> ")
    child.sendline("hi")
    child.expect("dlm> .*\n")
    child.expect("you> ")
    child.sendeof()
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
