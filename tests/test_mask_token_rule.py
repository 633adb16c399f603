"""The mask-token rule (``mask_token.mode: auto``, the default): reuse the tokenizer's own unused mask
or reserved token, add one otherwise; tried on tiny tokenizers built here in the layouts of the
families (Llama-3's reserved specials, Gemma's ``<mask>`` / ``<unusedN>``, Qwen's spare embedding
rows, GPT-2 with nothing reserved)."""

import os

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lightning_dlm.cli import main
from lightning_dlm.core.errors import DLMError
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig
from lightning_dlm.model.mask_token import reserved_mask_token
from tests.conftest import REPO, TINY_LLAMA

WORDS = ["the", "cat", "sat", "on", "mat", "and", "dog", "a", "b", "c"]


def word_tokenizer(added, special=True, **named) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ``[UNK]`` (id 0) and WORDS, then ``added`` as added tokens."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if special:
        tok.add_special_tokens([AddedToken(t, special=True) for t in added])
    else:
        tok.add_tokens([AddedToken(t, special=False) for t in added])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **named)


def llama3_like(**named):
    """Llama-3's layout: bos, eos, reserved specials (with the renamed pad between them)."""
    added = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>"]
    return word_tokenizer(added, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", **named)


def test_llama3_reuses_its_first_reserved_special_token():
    tok = llama3_like()
    first = tok.convert_tokens_to_ids("<|reserved_special_token_0|>")
    assert first == 13 and reserved_mask_token(tok) == (13, "<|reserved_special_token_0|>")
    net = DiffusionModel.from_config(BackboneConfig(config=dict(TINY_LLAMA)), tok)  # the default: auto
    assert net.mask_token_id == 13 and not net.mask_token_added
    assert net.vocab_size == TINY_LLAMA["vocab_size"] and len(tok) == 17  # nothing added, nothing resized


def test_a_reserved_token_the_tokenizer_uses_is_skipped():
    # the pad token and a token the chat template writes are in use: the next reserved one is taken
    tok = llama3_like(pad_token="<|reserved_special_token_0|>")
    assert reserved_mask_token(tok) == (14, "<|reserved_special_token_1|>")
    tok.chat_template = "{% for m in messages %}<|reserved_special_token_1|>{{ m.content }}{% endfor %}"
    assert reserved_mask_token(tok) == (16, "<|reserved_special_token_2|>")
    assert reserved_mask_token(tok, rows=16) is None  # past the embedding matrix: not usable


def test_gemma_reuses_its_mask_before_its_unused_tokens():
    # Gemma's tokenizer.json lists <mask> and <unusedN> as added tokens that are not special
    tok = word_tokenizer(["<pad>", "<eos>", "<bos>", "<unused0>", "<unused1>", "<mask>"], special=False,
                         pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    assert reserved_mask_token(tok) == (16, "<mask>")
    tok = word_tokenizer(["<pad>", "<unused1>", "<unused0>"], special=False, pad_token="<pad>")
    assert reserved_mask_token(tok) == (12, "<unused1>")  # the lowest id, whatever the number in the name
    tok = word_tokenizer(["[PAD]", "[MASK]"], mask_token="[MASK]", pad_token="[PAD]")
    assert reserved_mask_token(tok) == (12, "[MASK]")  # a declared mask token


def test_a_reserved_looking_token_that_ordinary_text_produces_is_not_chosen():
    """A BPE vocabulary learned from text that writes '<unused0>': the model's own pieces produce it
    from ordinary text, so it had training data; the added '<unused1>' is chosen."""
    corpus = ["the cat sat on the mat <unused0> and the dog", "a <unused0> b <unused0> c"] * 20
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"], show_progress=False))
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.to_str()), unk_token="[UNK]")
    ordinary = plain.get_vocab()["<unused0>"]
    assert ordinary in plain("the cat <unused0> sat")["input_ids"]  # it occurs in ordinary text
    assert reserved_mask_token(plain) is None
    bpe.add_special_tokens([AddedToken("<unused1>", special=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]")
    assert reserved_mask_token(tok) == (tok.convert_tokens_to_ids("<unused1>"), "<unused1>")


def test_without_a_reserved_token_the_mask_is_added():
    # GPT-2 / SmolLM2: the embedding matrix has a row per token; the mask gets a new row
    tok = word_tokenizer(["<|endoftext|>"], eos_token="<|endoftext|>")
    assert reserved_mask_token(tok) is None
    config = dict(TINY_LLAMA, vocab_size=len(tok))
    net = DiffusionModel.from_config(BackboneConfig(config=config), tok)
    assert net.mask_token_added and net.mask_token_id == 12 and net.vocab_size == 13
    assert tok.mask_token == "<|mask|>" and tok.convert_tokens_to_ids("<|mask|>") == 12
    # Qwen: spare rows past the tokenizer; the added mask takes the first, nothing is resized
    tok = word_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|endoftext|>")
    net = DiffusionModel.from_config(BackboneConfig(config=dict(TINY_LLAMA)), tok)
    assert net.mask_token_added and net.mask_token_id == 14 and net.vocab_size == TINY_LLAMA["vocab_size"]
    weight = net.model.get_input_embeddings().weight
    torch.testing.assert_close(weight[14], weight[:14].mean(0))  # the new token's row at the mean


def test_an_explicit_id_or_a_held_token_wins_over_the_rule():
    tok = llama3_like()
    net = DiffusionModel.from_config(BackboneConfig(config=dict(TINY_LLAMA), mask_token=MaskTokenConfig(id=5)), tok)
    assert net.mask_token_id == 5 and not net.mask_token_added
    chosen = MaskTokenConfig(token="<|reserved_special_token_2|>")
    net = DiffusionModel.from_config(BackboneConfig(config=dict(TINY_LLAMA), mask_token=chosen), tok)
    assert net.mask_token_id == 16 and not net.mask_token_added


def test_a_requested_mask_token_the_tokenizer_lacks_is_one_line(tmp_path, capsys):
    tok = llama3_like()
    with pytest.raises(DLMError, match=r"mask token '<\|mdm_mask\|>' is not in the vocabulary"):
        DiffusionModel.from_config(BackboneConfig(config=dict(TINY_LLAMA),
                                                  mask_token=MaskTokenConfig(mode="reuse", token="<|mdm_mask|>")), tok)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", os.path.join(REPO, "experiments", "debug.yaml"), "--trainer.max_steps", "1",
              "--model.backbone.mask_token.mode", "reuse", "--model.backbone.mask_token.token", "<|mdm_mask|>",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "mask token '<|mdm_mask|>' is not in the vocabulary of the tokenizer" in errors[0]
    assert "data/fixtures/tiny_tokenizer" in errors[0] and "mask_token.mode: add" in errors[0]
    assert not (run / "checkpoints").exists()
