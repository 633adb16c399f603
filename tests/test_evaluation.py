"""Evaluation: protocols checked on numbers, on tiny models and files the tests write."""

import json
import math
import os

import lightning as L
import pytest
import torch
from torch import nn

from lightning_dlm.cli import main
from lightning_dlm.core.config import DiffusionConfig
from lightning_dlm.core.errors import DLMError
from lightning_dlm.data import CorpusSource, TextDataModule
from lightning_dlm.evaluation import CausalEvaluator, DiffusionEvaluator, build_task, table
from lightning_dlm.evaluation.choice import diffusion_choice_scores, encode_pair
from lightning_dlm.evaluation.formats import convert_records
from lightning_dlm.evaluation.likelihood import causal_perplexity, diffusion_nelbo
from lightning_dlm.evaluation.metrics import distinct_n, exact_match, proportion_se, token_f1, unigram_entropy
from lightning_dlm.model import BackboneConfig, MaskTokenConfig
from lightning_dlm.model.loading import load_tokenizer
from lightning_dlm.training.module import DiffusionLM
from tests.conftest import TINY_CORPUS, TINY_TOKENIZER

MODEL = dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)


def tiny_module(seed=0):
    torch.manual_seed(seed)
    module = DiffusionLM(backbone=BackboneConfig(config=dict(MODEL), tokenizer=TINY_TOKENIZER,
                                                 mask_token=MaskTokenConfig(mode="add")),
                         diffusion=DiffusionConfig(anneal_steps=0))
    module.configure_model()
    return module.eval()


@pytest.fixture(scope="module")
def module():
    return tiny_module()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_TOKENIZER)


@pytest.fixture(scope="module")
def ar_folder(tmp_path_factory, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**MODEL))
    folder = tmp_path_factory.mktemp("ar")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A real diffusion checkpoint written by a 2-step fit."""
    root = tmp_path_factory.mktemp("fit")
    module = DiffusionLM(backbone=BackboneConfig(config=dict(MODEL), tokenizer=TINY_TOKENIZER),
                         diffusion=DiffusionConfig(anneal_steps=0))
    src = CorpusSource(path=TINY_CORPUS, sample_by="paragraph")
    data = TextDataModule(train=[src], tokenizer=TINY_TOKENIZER, seq_len=32, batch_size=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, datamodule=data)
    path = str(root / "tiny.ckpt")
    trainer.save_checkpoint(path)
    return path


# --- hand-built models ---------------------------------------------------------------------------
class ForcedDenoiser(nn.Module):
    """A diffusion model (the DiffusionModel interface) whose every prediction puts probability ~1
    on ``favoured``."""

    shift = True

    def __init__(self, vocab, favoured, mask_token_id, tokenizer=None):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.vocab, self.favoured, self.mask_token_id, self.tokenizer = vocab, favoured, mask_token_id, tokenizer
        self.config = type("C", (), {"max_position_embeddings": 128})()

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favoured] = 12.0
        return logits

    def scored_logits(self, input_ids, rows, attention_mask=None, allowed=None, document_ids=None):
        return self(input_ids, attention_mask)[rows]


class ForcedCausalLM(nn.Module):
    """A causal LM that predicts ``favoured`` after every token."""

    def __init__(self, vocab, favoured):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.vocab, self.favoured = vocab, favoured
        self.config = type("C", (), {"max_position_embeddings": 128})()

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favoured] = 12.0
        return type("Out", (), {"logits": logits})()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


# --- multiple choice -----------------------------------------------------------------------------
@pytest.mark.parametrize("label", [0, 1, 2])
def test_choice_scorers_pick_the_option_the_model_is_forced_to_prefer(tmp_path, tokenizer, label):
    word = " the"
    favoured = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(favoured) == 1
    options = [" cat sat down", " on a big hill", " red blue green"]
    options[label] = word * 3
    path = write_jsonl(tmp_path / "mc.jsonl", [dict(context="Once upon a time", choices=options, label=label)])
    task = build_task(dict(task="multiple_choice", data=path, levels=4))

    diffusion = ForcedDenoiser(len(tokenizer) + 1, favoured[0], mask_token_id=len(tokenizer), tokenizer=tokenizer)
    ar = CausalEvaluator(ForcedCausalLM(len(tokenizer), favoured[0]), tokenizer)
    for evaluator in (DiffusionEvaluator(diffusion), ar):
        result = task.run(evaluator, lambda total, label: (lambda n: None))
        assert result["acc"] == 1.0 and result["items"] == 1
    # raw diffusion scores: the forced option's mean masked CE is log(1 + 512 e^-12) ~ 0.003, the others ~12
    rows = [[0] + tokenizer("Once upon a time" + o, add_special_tokens=False)["input_ids"] for o in options]
    starts = [1 + len(tokenizer("Once upon a time", add_special_tokens=False)["input_ids"])] * 3
    scores, greedy = diffusion_choice_scores(diffusion, rows, starts, pad_id=0, levels=4)
    assert scores[label] < 0.01 and min(s for i, s in enumerate(scores) if i != label) > 10
    assert greedy[label] and not any(g for i, g in enumerate(greedy) if i != label)


def test_choice_scores_do_not_depend_on_batching_or_order(module, tokenizer):
    ev = DiffusionEvaluator(module)
    contexts = ["Once upon a time", "The dog", "A cat sat on the"]
    conts = [" there was a king", " ran to the river", " mat"]
    alone = [ev.choice([c], [o], levels=5)["per_token"][0] for c, o in zip(contexts, conts)]
    together = ev.choice(contexts[::-1], conts[::-1], levels=5, batch_size=4)["per_token"][::-1]
    assert alone == pytest.approx(together, abs=1e-5)


def test_encode_pair_moves_trailing_space_to_the_continuation(tokenizer):
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx, cont = encode_pair(encode, "The dog ", "ran")
    assert ctx == encode("The dog") and cont == encode("The dog ran")[len(ctx):]


def test_task_formats_convert_public_records():
    hs = convert_records([dict(ctx_a="A man", ctx_b="is sitting", activity_label="Fishing",
                               endings=["a", "b", "c", "d"], label="2")], "hellaswag", "x", "choice")[0]
    assert hs.contexts[0] == "Fishing: A man Is sitting" and hs.continuations[2] == " c" and hs.label == 2
    wg = convert_records([dict(sentence="John gave _ the ball.", option1="Mary", option2="Bob", answer="2")],
                         "winogrande", "x", "choice")[0]
    assert wg.contexts == ["John gave Mary", "John gave Bob"] and wg.continuations == [" the ball."] * 2
    assert wg.label == 1
    si = convert_records([dict(context="C.", question="Q?", answerA="a", answerB="b", answerC="c", label="3")],
                         "siqa", "x", "choice")[0]
    assert si.label == 2 and si.contexts[0] == "Question: C. Q?\nAnswer:"
    pi = convert_records([dict(goal="G", sol1="x", sol2="y", label=1)], "piqa", "x", "choice")[0]
    assert pi.label == 1 and pi.continuations == [" x", " y"]
    lam = convert_records([dict(text="he said hello")], "lambada", "x", "answer")[0]
    assert lam.prompt == "he said" and lam.answers == ["hello"]
    tq = convert_records([dict(question="Q", answer=dict(value="Paris", aliases=["paris", "Paris"]))],
                         "triviaqa", "x", "answer")[0]
    assert tq.answers == ["paris", "Paris"]
    sq = convert_records([dict(context="C", question="Q", answers=dict(text=["A1", "A2"]))], "squad", "x", "answer")[0]
    assert sq.answers == ["A1", "A2"] and sq.prompt.endswith("Question: Q\nAnswer:")
    roc = convert_records([{f"sentence{i}": f"S{i}." for i in range(1, 6)}], "rocstories", "x", "answer")[0]
    assert (roc.prompt, roc.answers, roc.suffix) == ("S1. S2.", ["S3."], " S4. S5.")


# --- likelihood ----------------------------------------------------------------------------------
def test_elbo_estimate_is_reproducible_and_its_standard_error_shrinks(module):
    blocks = torch.randint(1, 500, (4, 24), generator=torch.Generator().manual_seed(0))
    kw = dict(shift=True, levels=4, batch_size=3, seed=5)
    a = diffusion_nelbo(module.net, blocks, draws=4, **kw)
    b = diffusion_nelbo(module.net, blocks, draws=4, **dict(kw, batch_size=4))
    assert diffusion_nelbo(module.net, blocks, draws=4, **kw) == a  # same seed: identical
    assert b["nll_per_token"] == pytest.approx(a["nll_per_token"], rel=1e-6)  # same draws in other batches
    assert b["se"] == pytest.approx(a["se"], rel=1e-5)
    many = diffusion_nelbo(module.net, blocks, draws=64, **kw)
    assert many["se"] < a["se"] / 2  # 1 / sqrt(16) expected
    assert abs(many["nll_per_token"] - a["nll_per_token"]) < 4 * a["se"]
    assert a["bound"] and a["tokens"] == 4 * 23 and a["ppl"] == pytest.approx(math.exp(a["nll_per_token"]))
    other = diffusion_nelbo(module.net, blocks, draws=4, **dict(kw, seed=6))
    assert other["nll_per_token"] != a["nll_per_token"]


def test_ar_perplexity_equals_exp_mean_nll_by_hand(ar_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ar_folder).eval()
    blocks = torch.randint(0, 512, (5, 16), generator=torch.Generator().manual_seed(3))
    result = causal_perplexity(model, blocks, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
    by_hand = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), blocks[:, 1:].reshape(-1))
    assert result["ppl"] == pytest.approx(math.exp(by_hand.item()), rel=1e-5)
    assert result["nll_per_token"] == pytest.approx(by_hand.item(), rel=1e-5)
    assert result["tokens"] == 5 * 15 and not result["bound"]


# --- generation metrics --------------------------------------------------------------------------
class ScriptedEvaluator:
    """Generates fixed strings: isolates the scoring of the generation tasks."""

    kind = "ar"

    def __init__(self, tokenizer, outputs):
        self.tokenizer, self.outputs = tokenizer, outputs

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts, length, suffixes=None, progress=lambda n: None, **_):
        progress(len(prompts))
        return [self.outputs[p] for p in prompts]


def test_rouge_of_infilling_matches_torchmetrics_and_rouge_score(tmp_path, tokenizer):
    from rouge_score import rouge_scorer

    stories = [{f"sentence{i}": f"Story {k} sentence {i}." for i in range(1, 6)} for k in range(2)]
    stories[0]["sentence3"], stories[1]["sentence3"] = "the cat sat on the mat", "a dog ran in the park"
    path = write_jsonl(tmp_path / "roc.jsonl", stories)
    outputs = {"Story 0 sentence 1. Story 0 sentence 2.": " the cat is on the mat",
               "Story 1 sentence 1. Story 1 sentence 2.": " dogs run in a park"}
    result = build_task(dict(task="infilling", data=path)).run(ScriptedEvaluator(tokenizer, outputs), lambda *a: (lambda n: None))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    refs = {k: [] for k in ("rouge1", "rouge2", "rougeL")}
    for pred, gold in [("the cat is on the mat", "the cat sat on the mat"), ("dogs run in a park", "a dog ran in the park")]:
        for k, s in scorer.score(gold, pred).items():
            refs[k].append(s.fmeasure)
    for k in refs:
        assert result[k] == pytest.approx(sum(refs[k]) / 2, abs=1e-6)
    # by hand: 5 of 6 unigrams shared (F 5/6); 3 shared of 5 predicted and 6 reference (F 6/11)
    assert result["rouge1"] == pytest.approx((5 / 6 + 6 / 11) / 2, abs=1e-6)
    # the standard error of the mean over the items: |a - b| / 2 for two items
    assert result["rouge1_se"] == pytest.approx(abs(5 / 6 - 6 / 11) / 2, abs=1e-6)
    assert proportion_se(0.5, 100) == pytest.approx(0.05) and proportion_se(1.0, 7) == 0.0


def test_exact_match_f1_and_diversity_metrics():
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0 and exact_match("Paris", ["London"]) == 0.0
    assert token_f1("the big red ball", ["red ball"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert distinct_n([1, 2, 1, 2], 2) == pytest.approx(2 / 3) and distinct_n([1], 2) == 0.0
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(2.0) and unigram_entropy([5, 5]) == 0.0


def test_lambada_and_short_answer_scoring(tmp_path, tokenizer):
    lam = write_jsonl(tmp_path / "lam.jsonl", [dict(text="he went to the river"), dict(text="she saw a cat")])
    outputs = {"he went to the": " river and", "she saw a": " dog"}
    res = build_task(dict(task="lambada", data=lam)).run(ScriptedEvaluator(tokenizer, outputs), lambda *a: (lambda n: None))
    assert res["acc"] == 0.5
    qa = write_jsonl(tmp_path / "qa.jsonl", [dict(question="Capital of France?", answer=dict(value="Paris", aliases=[]))])
    outputs = {"Question: Capital of France?\nAnswer:": " paris.\nQuestion: next"}
    res = build_task(dict(task="short_answer", data=qa)).run(ScriptedEvaluator(tokenizer, outputs), lambda *a: (lambda n: None))
    assert res["em"] == 1.0 and res["f1"] == 1.0


# --- real models end to end ----------------------------------------------------------------------
def test_generation_tasks_run_on_a_diffusion_model_and_keep_the_suffix(tmp_path, module):
    path = write_jsonl(tmp_path / "roc.jsonl", [{f"sentence{i}": f"The dog ran {i}." for i in range(1, 6)}])
    evaluator = DiffusionEvaluator(module)
    seen = []
    hook = evaluator.net.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"].tolist()), with_kwargs=True)
    try:
        res = build_task(dict(task="infilling", data=path, steps=4)).run(evaluator, lambda *a: (lambda n: None))
    finally:
        hook.remove()
    assert res["uses_suffix"] and 0.0 <= res["rouge1"] <= 1.0 and res["examples"][0]["suffix"] == " The dog ran 4. The dog ran 5."
    # the suffix reached the model: its tokens sit, in order, in the rows the model was given
    suffix = evaluator.encode(" The dog ran 4. The dog ran 5.")
    rows = [row for batch in seen for row in batch]
    assert seen and all(any(row[i:i + len(suffix)] == suffix for i in range(len(row))) for row in rows)


def test_dlm_eval_side_by_side_json_and_table(tmp_path, ckpt, ar_folder, capsys):
    mc = write_jsonl(tmp_path / "mc.jsonl", [dict(context="Once upon a time", choices=[" there was", " the dog"],
                                                  label=0)] * 3)
    config = tmp_path / "eval.yaml"
    config.write_text(f"""
models: [{ckpt}, {{path: {ar_folder}, name: base}}]
defaults: {{batch_size: 4}}
tasks:
  - {{task: likelihood, name: corpus, data: {TINY_CORPUS}, seq_len: 32, max_blocks: 3, levels: 2, draws: 2}}
  - {{task: multiple_choice, name: mc, data: {mc}, levels: 3}}
  - {{task: gen_ppl, name: samples, evaluator: {ar_folder}, num_samples: 2, length: 6, steps: 3}}
""")
    out = tmp_path / "results.json"
    main(["eval", "--config", str(config), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    diff, base = results["models"]["tiny.ckpt"], results["models"]["base"]
    assert diff["kind"] == "diffusion" and base["kind"] == "ar"
    assert diff["results"]["corpus"]["bound"] and not base["results"]["corpus"]["bound"]
    assert diff["results"]["corpus"]["tokens_sha1"] == base["results"]["corpus"]["tokens_sha1"]  # same tokens
    assert base["results"]["corpus"]["tokens"] == 3 * 31
    assert 0 <= diff["results"]["mc"]["acc"] <= 1 and diff["results"]["mc"]["items"] == 3
    assert diff["results"]["samples"]["samples"] == 2 and not diff["results"]["samples"]["retokenized"]
    assert "| corpus | ppl |" in printed and "(bound)" in printed and "(exact)" in printed
    assert printed.count("|") > 20 and "note:" not in printed


def _error(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_bad_evaluation_input_gives_one_line_errors(tmp_path, ckpt, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [dict(question="q", answer="a")])
    mc = write_jsonl(tmp_path / "mc.jsonl", [dict(context="a", choices=["b", "c"], label=0)])
    cases = [
        (["--task", "squish", "--data", mc], "unknown task 'squish'"),
        (["--task", "multiple_choice", "--data", str(empty)], "has no records"),
        (["--task", "multiple_choice", "--data", wrong, "--format", "hellaswag"], "lacks field(s)"),
        (["--task", "multiple_choice", "--data", mc, "--format", "lambada"], "is a answer format"),
        (["--task", "multiple_choice", "--data", mc, "--set", "levels=0"], "levels must be >= 1"),
        (["--task", "multiple_choice", "--data", mc, "--set", "lvls=3"], "has no option(s) ['lvls']"),
        (["--task", "multiple_choice", "--data", str(tmp_path / "nope.jsonl")], "does not exist"),
        (["--task", "likelihood", "--data", TINY_CORPUS, "--set", "seq_len=4096"], "above the model's position limit"),
    ]
    for extra, message in cases:
        line = _error(["eval", "--model", ckpt, "--no-progress", *extra], capsys)
        assert line.startswith("error: ") and message in line, (extra, line)
    assert _error(["eval", "--task", "likelihood", "--data", TINY_CORPUS], capsys).startswith("error: no model")


SHIPPED_EVAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "eval",
                            "shakespeare.yaml")


def test_dlm_eval_flags_override_the_config_and_help_lists_every_option(tmp_path, capsys):
    from lightning_dlm.commands.eval import config_from_args, parse_args

    base = config_from_args(parse_args(["--config", SHIPPED_EVAL]))
    out = str(tmp_path / "r.json")
    cfg = parse_args(["--config", SHIPPED_EVAL, "--model", "a.ckpt", "--model", "b", "--kind", "ar", "--set",
                      "levels=3", "--out", out, "--device", "cuda:1", "--threads", "2", "--no-progress",
                      "--trust-checkpoint"])
    config = config_from_args(cfg)
    assert [(m.path, m.kind, m.name) for m in config.models] == [("a.ckpt", "ar", None), ("b", "ar", None)]
    assert [t["name"] for t in config.tasks] == [t["name"] for t in base.tasks] == ["shakespeare_val", "next_line"]
    assert all(t["levels"] == 3 for t in config.tasks) and config.tasks[0]["draws"] == base.tasks[0]["draws"]
    assert (config.out, config.device, config.threads, config.trust_checkpoint) == (out, "cuda:1", 2, True)
    assert config.defaults == base.defaults == {"seed": 0} and cfg.progress is False
    assert [m.name for m in base.models] == ["adapted (diffusion)", "SmolLM2-135M-Instruct (AR)"] and base.out.endswith(".json")
    # --task (with --data, --format, --name, --set) replaces the config's tasks, and keeps its models
    one = config_from_args(parse_args(["--config", SHIPPED_EVAL, "--task", "lambada", "--data", "l.jsonl", "--name",
                                       "lam", "--format", "lambada", "--set", "steps=4"]))
    assert one.tasks == [dict(task="lambada", data="l.jsonl", name="lam", format="lambada", steps=4)]
    assert one.models == base.models
    # a config holds any option by its name; jsonargparse's own syntax works for the list keys
    extra = tmp_path / "flags.yaml"
    extra.write_text("models: [x, {path: y, kind: diffusion, name: Y}]\ntask: likelihood\ndata: corpus\n"
                     "set: [max_blocks=2]\nprogress: false\nthreads: 3\n")
    cfg = parse_args(["--config", str(extra), "--threads", "1"])
    config = config_from_args(cfg)
    assert [(m.path, m.kind, m.name) for m in config.models] == [("x", "auto", None), ("y", "diffusion", "Y")]
    assert config.tasks == [dict(task="likelihood", data="corpus", max_blocks=2)] and config.threads == 1
    assert not cfg.progress
    cfg = parse_args(["--tasks", "[{task: lambada, data: l.jsonl}]", "--tasks+", "{task: infilling, data: r.jsonl}",
                      "--defaults", "{seed: 3}"])
    config = config_from_args(cfg)
    assert [t["task"] for t in config.tasks] == ["lambada", "infilling"] and config.defaults == {"seed": 3}
    # --help lists every option, one help line each
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--models", "--model", "--kind", "--tasks", "--defaults", "--task", "--data", "--format",
                 "--name", "--set", "--out", "--device", "--dtype", "--threads", "--progress, --no-progress",
                 "--trust_checkpoint", "--print_config"):
        assert f"  {flag} " in text or f"  {flag}," in text or f"  {flag}\n" in text, flag
    assert ("tasks: gen_ppl, gsm8k, humaneval_infill, infilling, lambada, likelihood, multiple_choice, short_answer"
            in " ".join(text.split()))


def test_dlm_eval_command_line_errors_are_one_line(tmp_path, capsys):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("modles: [a]\n")
    cases = [
        (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["--config", str(tmp_path / "none.yaml")], "none.yaml' does not exist"),
        (["--config", str(bad_key)], "the config key 'modles' is no option of dlm eval"),
        (["--kind", "encoder"], "--kind:"),
        (["--threads", "two"], "--threads:"),
        (["--model", "a", "--data", "x.jsonl"], "add --task <kind>"),
        (["--model", "a", "--task", "lambada", "--set", "levels"], "is not key=value"),
        (["--models", "[{path: a, knd: ar}]", "--task", "likelihood"], "unknown key(s) ['knd']"),
        (["--models", "[{path: a, kind: encoder}]", "--task", "likelihood"], "has kind 'encoder'"),
        (["--model", "a", "--task", "likelihood", "--out", str(tmp_path)], "is a folder"),
        (["--model", "a"], "no task given"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (args, err)


def test_eval_decoding_defaults_are_the_samplers_or_the_declared_protocol():
    """Every sampler option of an evaluation task (and of the lm-eval adapter) defaults to
    SamplerConfig's value, or to the evaluation protocol's declared one: a default repeated with
    another value fails here."""
    import dataclasses
    import inspect

    from lightning_dlm.commands.eval import config_from_args, parse_args
    from lightning_dlm.evaluation.harness import DiffusionHarnessLM
    from lightning_dlm.evaluation.tasks import TASKS
    from lightning_dlm.evaluation.tasks.builtin import EVAL_DECODING
    from lightning_dlm.sampling.engine import sampler_defaults

    defaults = sampler_defaults()
    checked = set()
    for kind, cls in TASKS.items():
        protocol = getattr(cls, "decoding_protocol", {})
        assert set(protocol) <= set(defaults), kind
        cfg = config_from_args(parse_args(["--model", "m", "--task", kind]))  # what dlm eval resolves
        task = build_task(cfg.tasks[0], cfg.defaults)
        for f in dataclasses.fields(cls):
            if f.name in defaults:
                assert getattr(task, f.name) == protocol.get(f.name, defaults[f.name]), (kind, f.name)
                checked.add(f.name)
    assert {"steps", "strategy", "temperature", "top_p", "top_k", "block_size", "cache"} <= checked
    assert EVAL_DECODING == dict(steps=None, strategy="confidence", temperature=0.0, top_p=1.0)  # the README's words
    params = inspect.signature(DiffusionHarnessLM.__init__).parameters
    shared = [name for name in defaults if name in params]
    assert {"steps", "strategy", "temperature", "top_p", "block_size", "cache"} <= set(shared)
    for name in shared:
        assert params[name].default == EVAL_DECODING.get(name, defaults[name]), name


def word_level_tokenizer(folder):
    """A different tokenizer than the model's: word-level, trained here on the fixture corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([TINY_CORPUS], trainers.WordLevelTrainer(special_tokens=["<eos>", "<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def test_gen_ppl_with_a_prompt_per_sample_pools_the_per_prompt_scores(tmp_path, ar_folder):
    from lightning_dlm.evaluation.evaluators import load_evaluator
    from lightning_dlm.evaluation.genppl import score_samples

    judge = load_evaluator(ar_folder, kind="ar")
    prompts = ["Once upon a time", "The dog"]
    texts = [" there was a cat that sat", " ran to the park and back home"]
    pooled = score_samples(judge, prompts, texts, batch_size=2)
    alone = [score_samples(judge, p, [t]) for p, t in zip(prompts, texts)]
    # perplexity pools token NLLs: exp(sum_i n_i log ppl_i / sum_i n_i)
    nll = sum(a["tokens"] * math.log(a["gen_ppl"]) for a in alone) / sum(a["tokens"] for a in alone)
    assert pooled["tokens"] == sum(a["tokens"] for a in alone)
    assert pooled["gen_ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    with pytest.raises(ValueError, match="2 prompts for 1 samples"):
        score_samples(judge, prompts, texts[:1])
    # the task reads the prompts from a file: num_samples of each
    path = write_jsonl(tmp_path / "prompts.jsonl", [dict(prompt=p) for p in prompts])
    task = build_task(dict(task="gen_ppl", evaluator=ar_folder, data=path, num_samples=2))
    assert task.prompts() == [prompts[0], prompts[0], prompts[1], prompts[1]]
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(text="x")])
    with pytest.raises(DLMError, match="line 1 of .* has no text field 'prompt'"):
        build_task(dict(task="gen_ppl", evaluator=ar_folder, data=bad)).prompts()


def test_gen_ppl_with_another_tokenizer_retokenizes_and_says_so(tmp_path, module, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "judge"
    vocab = len(word_level_tokenizer(folder))
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, eos_token_id=0, bos_token_id=0)).save_pretrained(folder)
    task = build_task(dict(task="gen_ppl", evaluator=str(folder), num_samples=2, length=5, steps=2))
    res = task.run(DiffusionEvaluator(module), lambda *a: (lambda n: None))
    assert res["retokenized"] and res["gen_ppl"] > 1 and res["tokens"] > 0
    assert "re-tokenized from their text" in capsys.readouterr().err


# --- lm-evaluation-harness -----------------------------------------------------------------------
def test_lm_eval_adapter_answers_lm_evals_own_requests(module):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    import lightning_dlm.evaluation.harness  # noqa: F401  (registers the model)

    cls = get_model("lightning_dlm")
    ev = DiffusionEvaluator(module)
    lm = cls(evaluator=ev, levels=4, batch_size=8, max_gen_toks=6, steps=3)
    requests = [Instance("loglikelihood", {}, ("Once upon a time", " there was a king"), 0),
                Instance("loglikelihood", {}, ("The dog", " ran"), 1)]
    answers = lm.loglikelihood(requests, disable_tqdm=True)
    direct = ev.choice(["Once upon a time", "The dog"], [" there was a king", " ran"], levels=4)
    assert [a[0] for a in answers] == pytest.approx(direct["loglik"]) and all(a[0] < 0 for a in answers)
    assert all(isinstance(a[1], bool) for a in answers)

    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("The dog ran to the river.",), 0)],
                                       disable_tqdm=True)
    assert len(rolling) == 1 and rolling[0] < 0

    gen = lm.generate_until([Instance("generate_until", {}, ("Once upon a time", dict(until=["\n\n"], max_gen_toks=6)), 0),
                             Instance("generate_until", {}, ("The dog", dict(until=["the"], max_gen_toks=4)), 1)],
                            disable_tqdm=True)
    assert len(gen) == 2 and all(isinstance(g, str) for g in gen) and "the" not in gen[1]
    raw = ev.generate(["Once upon a time"], 6, stop_at_eos=True, steps=3, strategy="confidence", temperature=0.0,
                      top_p=1.0, block_size=None, cache="none", seed=0)[0]
    assert gen[0] == raw.split("\n\n")[0]


EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


@pytest.mark.parametrize("path", sorted(
    __import__("glob").glob(os.path.join(EXPERIMENTS, "eval", "*.yaml"))
    + __import__("glob").glob(os.path.join(EXPERIMENTS, "*", "eval.yaml"))
    + __import__("glob").glob(os.path.join(EXPERIMENTS, "*", "eval_*.yaml"))))
def test_shipped_eval_configs_parse_into_tasks(path):
    from lightning_dlm.commands.eval import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["--config", path]))
    assert config.models and config.tasks
    assert [build_task(t, config.defaults).kind for t in config.tasks]


def test_ar_generation_tasks_decode_the_requested_lengths_without_the_suffix(tmp_path, ar_folder):
    from lightning_dlm.evaluation import load_evaluator

    ev = load_evaluator(ar_folder)
    assert ev.kind == "ar"
    prompts = ["Once upon a time", "The dog ran to"]  # different lengths: left padding in one batch
    texts = ev.generate(prompts, 5, batch_size=2)
    alone = [ev.generate([p], 5)[0] for p in prompts]
    assert texts == alone  # greedy, and padding does not change a row
    ids = [ev.start_id] + ev.encode(prompts[1])  # greedy by hand: 5 argmax steps
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(ev.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert texts[1] == ev.decode(ids[-5:])
    roc = write_jsonl(tmp_path / "roc.jsonl", [{f"sentence{i}": f"The dog ran {i}." for i in range(1, 6)}])
    res = build_task(dict(task="infilling", data=roc)).run(ev, lambda *a: (lambda n: None))
    assert res["uses_suffix"] is False and 0.0 <= res["rouge1"] <= 1.0


def test_dlm_lm_eval_runs_lm_evals_own_cli_on_a_local_task(tmp_path, ckpt, capsys):
    data = write_jsonl(tmp_path / "mc.jsonl", [dict(context="Once upon a time", choices=[" there was", " the dog"],
                                                    label=i % 2) for i in range(2)])
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(f"""task: tiny_mc_dlm
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    main(["lm-eval", "--model", "lightning_dlm", "--model_args", f"ckpt={ckpt},levels=2,batch_size=8",
          "--tasks", "tiny_mc_dlm", "--include_path", str(tmp_path / "tasks")])
    out = capsys.readouterr()
    table = [line for line in out.out.splitlines() if line.startswith("|tiny_mc_dlm")]
    assert table and "acc" in table[0]
    acc = float(table[0].split("|")[7])
    assert acc in (0.0, 0.5, 1.0)  # 2 items
    assert "device cuda:0 is not available, evaluating on the cpu" in out.err


def test_dlm_eval_takes_an_exported_folder_with_the_checkpoints_numbers(tmp_path, ckpt, capsys):
    from lightning_dlm.commands.export import export

    folder = export(ckpt, str(tmp_path / "exported"))
    mc = write_jsonl(tmp_path / "mc.jsonl", [dict(context="Once upon a time", choices=[" there was", " the dog"],
                                                  label=0)])
    results = []
    for model in (ckpt, folder):
        out = tmp_path / f"r{len(results)}.json"
        main(["eval", "--model", model, "--task", "multiple_choice", "--data", mc, "--set", "levels=3", "--out",
              str(out), "--no-progress"])
        results.append(json.loads(out.read_text()))
    (a,), (b,) = results[0]["models"].values(), results[1]["models"].values()
    assert b["kind"] == "diffusion" and b["results"] == {**a["results"], "multiple_choice": {
        **a["results"]["multiple_choice"], "seconds": b["results"]["multiple_choice"]["seconds"]}}
    from lightning_dlm.evaluation import load_evaluator

    scores = [load_evaluator(m).choice(["Once upon a time"] * 2, [" there was", " the dog"], levels=3)["per_token"]
              for m in (ckpt, folder)]
    assert scores[0] == scores[1]  # the exported weights score exactly as the checkpoint's


def test_lm_eval_rolling_windows_fit_the_model_and_score_every_token_once(module, monkeypatch):
    from lm_eval.api.instance import Instance

    import lightning_dlm.evaluation.harness as harness

    lm = harness.DiffusionHarnessLM(evaluator=DiffusionEvaluator(module), levels=2, max_length=8)
    text = "Once upon a time there was a dog that ran to the river and back again."
    n = len(lm.evaluator.encode(text))
    assert n > 8  # several windows
    seen, original = [], harness.diffusion_choice_scores

    def spy(net, rows, starts, *args, **kwargs):
        seen.extend((len(r), len(r) - s) for r, s in zip(rows, starts))
        return original(net, rows, starts, *args, **kwargs)

    monkeypatch.setattr(harness, "diffusion_choice_scores", spy)
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert all(width <= 8 for width, _ in seen)  # every window fits max_length positions
    assert sum(targets for _, targets in seen) == n and total < 0  # each token scored exactly once


def test_table_warns_when_models_tokenize_the_corpus_differently():
    res = lambda sha: dict(results=dict(c=dict(nll_per_token=1.0, se=0.1, ppl=2.7, bound=True, tokens_sha1=sha)))  # noqa: E731
    results = dict(tasks=dict(c=dict(kind="likelihood")), models=dict(a=res("x1"), b=res("x1")))
    assert "note:" not in table(results)
    results["models"]["b"] = res("y2")
    assert "tokenize the 'c' corpus differently" in table(results)
