"""FSDP2 (``fully_shard`` through Lightning's ModelParallelStrategy) on CPU processes over gloo.

Two ``torchrun --nproc_per_node 2`` launches of tests/fsdp2_worker.py and one with 1 process:

* the sharded model (one unit per decoder layer, activation checkpointing, clipping by the global
  norm) trains 3 steps with the losses, norms and weights of one unsharded process;
* ``FSDP2Strategy`` under Lightning: 4 steps with DCP checkpoints, 2 resumed from step 2 (exact);
  the step-4 folder read whole by one process (resharded 2 -> 1), and its resume by 1 rank refused;
* a pretrained folder (~38M parameters, 154 MB) loaded with each rank reading only its own rows:
  the same weights (the added mask token's row included) and logits as an unsharded load, and a
  rank's peak memory over the load below 0.6 of one full copy; then the same through Lightning.

Plus the in-process rules: the decoder-layer class resolver, the device checks, the global batch.
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_dlm.core.errors import DLMError
from lightning_dlm.model import BackboneConfig, DiffusionModel, MaskTokenConfig, load_tokenizer
from lightning_dlm.model.layers import decoder_layer_classes, decoder_layers
from lightning_dlm.model.sharded_loading import build_empty_causal_lm, materialize_empty
from lightning_dlm.training.distributed import check_devices
from lightning_dlm.training.fsdp2 import FSDP2Strategy, per_rank_batch
from tests.conftest import REPO, TINY_GPT2, TINY_LLAMA, TINY_TOKENIZER

# Many decoder layers that hold most of the weights, as in a 7B: ~35M of ~38M parameters (154 MB).
LAYERED_LLAMA = dict(vocab_size=4096, hidden_size=384, intermediate_size=1536, num_hidden_layers=16,
                     num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128,
                     bos_token_id=0, eos_token_id=0)
WORKER = os.path.join(REPO, "tests", "fsdp2_worker.py")


def launch(ranks, checks, out, *args, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                           WORKER, checks, str(out), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {check: [json.loads((out / f"{check}{r}.json").read_text()) for r in range(ranks)]
            for check in checks.split(",")}


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    results = launch(2, "equal,lightning", out)
    ck = out / "ck" / "step2.ckpt"
    before = digests(ck)
    results["shrunk"] = launch(1, "shrunk", out)["shrunk"][0]  # the 2-rank checkpoint resumed by 1 rank
    results["unchanged"] = digests(ck) == before
    results["out"] = out
    return results


def test_sharded_training_equals_one_process(two_ranks):
    for rank in two_ranks["equal"]:
        assert rank["classes"] == ["LlamaDecoderLayer"]  # from the model's _no_split_modules
        assert rank["local_elems"] < 0.55 * rank["full_elems"]  # this rank holds about half the weights
        assert rank["sharded"] == pytest.approx(rank["reference"], rel=1e-5)  # the same losses, step by step
        assert rank["norms"] == pytest.approx(rank["reference_norms"], rel=1e-5)  # the global norm, not a shard's
        assert all(norm > 0.05 for norm in rank["norms"])  # every step was clipped
        assert rank["worst_rel_diff"] < 1e-5  # the same weights after 3 clipped AdamW steps
        assert rank["zeroed"]


def test_lightning_fsdp2_resumes_exactly_from_dcp_checkpoints(two_ranks):
    folder = two_ranks["out"] / "ck" / "step2.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    for rank in two_ranks["lightning"]:
        straight = {int(k): v for k, v in rank["straight"].items()}
        resumed = {int(k): v for k, v in rank["resumed"].items()}
        assert sorted(straight) == [0, 1, 2, 3] and sorted(resumed) == [2, 3]
        assert all(resumed[step] == straight[step] for step in resumed)  # to the last bit
        assert rank["after"] == pytest.approx([0.05] * 4, rel=1e-4) and min(rank["before"]) > 0.05  # clipped by norm
        assert rank["per_rank_batch"] == 2  # global_batch_size 4 over 2 ranks
        # FLOPs counted under FSDP2; the checkpointed layers' forward runs again in the backward
        flops = rank["flops"]
        assert flops["forward"] > 0 and flops["backward"] > 2 * flops["forward"] - flops["recompute"]
        assert 0.3 * flops["forward"] < flops["recompute"] < flops["forward"]
    a, b = two_ranks["lightning"]
    assert a["straight"] != b["straight"]  # each rank its own data and noise
    assert a["before"] == b["before"]  # one global norm


def test_a_dcp_checkpoint_is_read_whole_by_one_process(two_ranks):
    out = two_ranks["out"]
    final = torch.load(out / "final.pt", weights_only=True)
    model = DiffusionModel.from_pretrained(str(out / "ck" / "step4.ckpt"))
    got = {f"net.{name}": p for name, p in model.named_parameters()}
    assert sorted(got) == sorted(final)
    for name, tensor in final.items():
        assert torch.equal(got[name], tensor), name


def test_resuming_with_another_world_size_is_refused_in_one_line(two_ranks):
    refused = two_ranks["shrunk"]["refused"]
    assert refused and refused.startswith("cannot resume the data stream exactly: world_size changed from 2")
    assert "world_size=2" in refused and "\n" not in refused  # names the fix
    assert two_ranks["unchanged"]  # the checkpoint was only read


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **LAYERED_LLAMA)).save_pretrained(folder)
    return folder


def test_each_rank_reads_only_its_own_shards(pretrained, tmp_path):
    # glibc keeps freed heap blocks resident; large blocks as mmaps are given back when freed, so the
    # peak measures what the load holds
    results = launch(2, "load,pretrained", tmp_path, pretrained, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    # under Lightning too: configure_model built it empty, each rank read its shards, and at the first
    # batch the whole weights equal an ordinary load
    assert results["pretrained"] == [{"equal": True, "exact_rows": True}] * 2
    for rank in results["load"]:
        assert rank["meta_after_build"] and rank["names_match"] and rank["mismatched"] == []
        assert rank["buffers_equal"] and rank["logits_diff"] < 1e-5  # rotary buffers kept, every weight right
        assert rank["mask_row_norm"] > 0 and rank["worst_mask_row"] < 1e-6  # the added row: the mean row + noise
        full = rank["full_bytes"]
        assert rank["shard_bytes"] == pytest.approx(full / 2, rel=0.02)
        # its half and a row block in flight; every rank reading the whole file would be over 1.0
        assert rank["shard_bytes"] <= rank["peak_bytes"] < 0.6 * full, rank


def test_empty_build_keeps_buffers_through_materialisation(pretrained):
    cfg = BackboneConfig(pretrained=str(pretrained), tokenizer=TINY_TOKENIZER, mask_token=MaskTokenConfig(mode="add"))
    model = build_empty_causal_lm(cfg)
    assert all(p.is_meta for p in model.parameters())
    real = dict(AutoModelForCausalLM.from_pretrained(pretrained).named_buffers())
    assert real and all(torch.equal(b, real[n]) for n, b in model.named_buffers())  # rotary inv_freq from the config
    materialize_empty(model, torch.device("cpu"))
    assert not any(p.is_meta for p in model.parameters())
    assert all(torch.equal(b, real[n]) for n, b in model.named_buffers())  # not wiped by to_empty
    net = DiffusionModel.from_config(cfg, load_tokenizer(TINY_TOKENIZER), empty=True)
    assert net.mask_token_id == 512 and net.model.get_input_embeddings().weight.is_meta


# --- in-process rules ---------------------------------------------------------------------------
@pytest.mark.parametrize("config, expected", [(TINY_LLAMA, "LlamaDecoderLayer"), (TINY_GPT2, "GPT2Block")])
def test_the_wrap_class_comes_from_the_model(config, expected):
    with torch.device("meta"):
        net = DiffusionModel.from_config(BackboneConfig(config=dict(config), mask_token=MaskTokenConfig(mode="reuse", id=3)))
    (cls,) = decoder_layer_classes(net)
    assert cls.__name__ == expected and len(decoder_layers(net, (cls,))) == 2
    assert decoder_layer_classes(net, [expected]) == (cls,)
    assert decoder_layer_classes(net, [f"{cls.__module__}.{cls.__qualname__}"]) == (cls,)  # a qualified name


def test_a_wrap_class_the_model_lacks_is_one_line():
    with torch.device("meta"):
        net = DiffusionModel.from_config(BackboneConfig(config=dict(TINY_GPT2), mask_token=MaskTokenConfig(mode="reuse", id=3)))
    with pytest.raises(DLMError) as err:
        decoder_layer_classes(net, ["LlamaDecoderLayer"], option="trainer.strategy.init_args.wrap_classes")
    message = str(err.value)
    assert "trainer.strategy.init_args.wrap_classes 'LlamaDecoderLayer' is not a module of the model GPT2LMHeadModel" in message
    assert "GPT2Block" in message and "leave" in message and "\n" not in message  # names the fix


def test_fsdp2_needs_cuda_unless_the_accelerator_is_cpu():
    for strategy in ("fsdp2", {"class_path": "lightning_dlm.training.fsdp2.FSDP2Strategy"}):
        for accelerator in ("auto", "gpu"):
            with pytest.raises(DLMError, match="^trainer.strategy fsdp2 needs CUDA GPUs and this machine has none"):
                check_devices({"strategy": strategy, "accelerator": accelerator}, cuda_available=False)
        check_devices({"strategy": strategy, "accelerator": "cpu"}, cuda_available=False)  # gloo, the tests' path
        check_devices({"strategy": strategy, "accelerator": "gpu"}, cuda_available=True)
    with pytest.raises(DLMError, match="^trainer.strategy FSDP needs CUDA"):  # FSDP1 as before
        check_devices({"strategy": "fsdp", "accelerator": "cpu"}, cuda_available=False)


def test_a_global_batch_the_world_size_does_not_divide_is_one_line():
    assert per_rank_batch(64, 8, 2) == 4
    with pytest.raises(DLMError) as err:
        per_rank_batch(60, 8)
    assert str(err.value).startswith("trainer.strategy.init_args.global_batch_size 60 does not divide over 8 rank(s)")
    assert "multiple of 8" in str(err.value)
    with pytest.raises(DLMError, match="not a dtype"):
        FSDP2Strategy(param_dtype="bf16")
