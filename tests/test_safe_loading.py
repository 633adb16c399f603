"""Loading runs no code: `dlm sample`, `dlm eval` and `dlm export` read checkpoints with
torch.load(weights_only=True) (a sharded folder's index with a restricted unpickler), refuse a crafted
pickle in one line without running it or writing anything, check the file names a checkpoint stores,
and unpickle in full only with --trust_checkpoint, loudly."""

import argparse
import base64
import glob
import json
import os
import pickle
import shlex
import tempfile
import uuid
import zipfile

import pytest
import torch

from lightning_dlm.cli import main
from lightning_dlm.core.errors import DLMError
from lightning_dlm.io.safe_read import is_diffusion_checkpoint, load_checkpoint_file
from lightning_dlm.io.tokenizer_files import tokenizer_from_files
from lightning_dlm.training.module import CHECKPOINT_KEY, DiffusionLM, load_diffusion_lm
from tests.conftest import REPO, TINY_CORPUS
from tests.test_export import write_sharded

TRUST_WARNING = "warning: --trust_checkpoint: unpickling"


class Payload:
    """What a crafted checkpoint hides: unpickling it runs a shell command (here: create ``marker``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture(scope="module")
def debug_ckpt(tmp_path_factory):
    """The last.ckpt of a 2-step `dlm fit --config experiments/debug.yaml`."""
    root = tmp_path_factory.mktemp("debug")
    main(["fit", "--config", os.path.join(REPO, "experiments", "debug.yaml"), "--trainer.max_steps", "2",
          "--trainer.default_root_dir", str(root), "--checkpoint.dirpath", str(root / "ck"),
          "--trainer.enable_progress_bar", "false"])
    return root / "ck" / "last.ckpt"


def raw(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def crafted_files(ckpt, folder):
    """{kind: path} of files whose unpickling would create ``folder / 'MARKER'``."""
    marker = folder / "MARKER"
    doctored = raw(ckpt)
    doctored[CHECKPOINT_KEY]["note"] = Payload(marker)  # a real checkpoint with one object slipped in
    torch.save(doctored, folder / "doctored.ckpt")
    torch.save(Payload(marker), folder / "bare.ckpt")
    with open(folder / "plain.pkl", "wb") as fh:  # not even torch.save's format
        pickle.dump(Payload(marker), fh)
    return {"doctored": folder / "doctored.ckpt", "bare": folder / "bare.ckpt", "plain": folder / "plain.pkl"}


def counterpart(ckpt, path):
    """The doctored checkpoint's legitimate counterpart: an object outside weights_only's types that
    runs no code (an old-style argparse Namespace of CLI arguments) where the payload was."""
    checkpoint = raw(ckpt)
    checkpoint[CHECKPOINT_KEY]["note"] = argparse.Namespace(lr=1e-3, note="harmless")
    torch.save(checkpoint, path)
    return path


def commands(ckpt, folder):
    """Each command on ``ckpt``, with the file or folder it would write."""
    return {
        "sample": (["sample", "--ckpt", str(ckpt), "--prompt", "Once", "--length", "4", "--steps", "2",
                    "--output", str(folder / "samples.txt"), "--progress", "false"], folder / "samples.txt"),
        "eval": (["eval", "--model", str(ckpt), "--task", "likelihood", "--data", TINY_CORPUS, "--set", "seq_len=32",
                  "--set", "max_blocks=2", "--set", "levels=1", "--set", "draws=1", "--no-progress",
                  "--out", str(folder / "results.json")], folder / "results.json"),
        "export": (["export", "--ckpt", str(ckpt), "--out", str(folder / "exported")], folder / "exported"),
    }


def error_line(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


# --- what dlm fit writes loads safely --------------------------------------------------------------------
def test_dlm_fit_checkpoints_hold_only_weights_only_types(debug_ckpt, tmp_path):
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(debug_ckpt)) == []
    checkpoint = load_checkpoint_file(str(debug_ckpt))
    assert checkpoint["global_step"] == 2 and "backbone" in checkpoint[CHECKPOINT_KEY]
    sharded = write_sharded(debug_ckpt, tmp_path / "sharded")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(sharded / "meta.pt")) == []
    with torch.no_grad():  # the index is read by the restricted unpickler, the weights as before
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
        assert torch.equal(load_diffusion_lm(str(sharded))(ids), load_diffusion_lm(str(debug_ckpt))(ids))


def test_weights_only_false_has_one_place():
    hits = []
    for path in glob.glob(os.path.join(REPO, "lightning_dlm", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as fh:
            hits += [(os.path.relpath(path, REPO), n) for n, line in enumerate(fh, 1) if "weights_only=False" in line]
    assert [name for name, _ in hits] == [os.path.join("lightning_dlm", "io", "safe_read.py")], hits


@pytest.mark.parametrize("command", ["sample", "eval", "export"])
def test_real_checkpoint_loads_in_every_command(debug_ckpt, tmp_path, capsys, command):
    args, written = commands(debug_ckpt, tmp_path)[command]
    main(args)
    assert written.exists() and TRUST_WARNING not in capsys.readouterr().err
    if command == "eval":
        assert json.loads(written.read_text())["models"]["last.ckpt"]["kind"] == "diffusion"


# --- crafted pickles are refused -------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["sample", "eval", "export"])
def test_crafted_pickle_is_refused_without_running_it(debug_ckpt, tmp_path, capsys, command):
    for kind, path in crafted_files(debug_ckpt, tmp_path).items():
        before = sorted(os.listdir(tmp_path))
        args, written = commands(path, tmp_path)[command]
        line = error_line(args, capsys)
        if kind == "plain":
            assert "is not a PyTorch checkpoint" in line, line
        else:
            assert f"refusing to load checkpoint '{path}'" in line and "system" in line, line
            assert "could run code" in line and "--trust_checkpoint" in line, line
        assert not (tmp_path / "MARKER").exists()  # the payload never ran
        assert not written.exists() and sorted(os.listdir(tmp_path)) == before  # nothing was written


def test_type_detection_unpickles_nothing(debug_ckpt, tmp_path, monkeypatch):
    from lightning_dlm.io import safe_read as checkpoints

    files = crafted_files(debug_ckpt, tmp_path)
    sharded = write_sharded(debug_ckpt, tmp_path / "sharded")

    def forbidden(*args, **kwargs):
        raise AssertionError("type detection unpickled a file")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (checkpoints, "_torch_load"), (checkpoints, "_IndexUnpickler")):
        monkeypatch.setattr(target, name, forbidden)
    assert is_diffusion_checkpoint(str(debug_ckpt)) and is_diffusion_checkpoint(str(sharded))
    assert is_diffusion_checkpoint(str(files["doctored"]))  # it claims to be one: the loader refuses it
    assert not is_diffusion_checkpoint(str(files["bare"])) and not is_diffusion_checkpoint(str(files["plain"]))
    assert not (tmp_path / "MARKER").exists()


def test_crafted_sharded_folders_are_refused(debug_ckpt, tmp_path, capsys):
    from torch.distributed.checkpoint import FileSystemWriter, save

    marker = tmp_path / "MARKER"
    # meta.pt with the payload
    meta_case = write_sharded(debug_ckpt, tmp_path / "meta_case")
    meta = raw(meta_case / "meta.pt")
    meta[CHECKPOINT_KEY]["note"] = Payload(marker)
    torch.save(meta, meta_case / "meta.pt")
    # the index (a plain pickle that torch reads with pickle.load) with the payload
    index_case = write_sharded(debug_ckpt, tmp_path / "index_case")
    with open(index_case / ".metadata", "rb") as fh:
        index = pickle.load(fh)  # written by this test: trusted
    index.storage_meta.modules = [Payload(marker)]
    with open(index_case / ".metadata", "wb") as fh:
        pickle.dump(index, fh)
    # a pickled (non-tensor) entry of the model, which torch's load planner unpickles in full
    bytes_case = tmp_path / "bytes_case"
    checkpoint = torch.load(debug_ckpt, weights_only=False)
    state = {"model": {**checkpoint.pop("state_dict"), "net.note": Payload(marker)}}
    save(state, storage_writer=FileSystemWriter(bytes_case), no_dist=True)
    checkpoint.pop("optimizer_states")
    torch.save(checkpoint, bytes_case / "meta.pt")
    assert not marker.exists()

    for folder, names in ((meta_case, "meta.pt"), (index_case, ".metadata"), (bytes_case, "net.note")):
        for command in ("sample", "export"):
            args, written = commands(folder, tmp_path)[command]
            line = error_line(args, capsys)
            assert "refusing to load" in line and names in line and "system" in line, line
            assert "--trust_checkpoint" in line and not written.exists() and not marker.exists(), line


def test_shard_file_names_must_be_plain(debug_ckpt, tmp_path):
    import dataclasses

    folder = write_sharded(debug_ckpt, tmp_path / "sharded")
    with open(folder / ".metadata", "rb") as fh:
        index = pickle.load(fh)
    index.storage_data = {k: dataclasses.replace(v, relative_path="../__0_0.distcp") for k, v in index.storage_data.items()}
    with open(folder / ".metadata", "wb") as fh:
        pickle.dump(index, fh)
    with pytest.raises(DLMError, match=r"shard file name '\.\./__0_0\.distcp' .* is refused"):
        load_diffusion_lm(str(folder))


# --- --trust_checkpoint ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["sample", "eval", "export"])
def test_trust_checkpoint_loads_the_legitimate_counterpart_loudly(debug_ckpt, tmp_path, capsys, command):
    path = counterpart(debug_ckpt, tmp_path / "counterpart.ckpt")
    args, written = commands(path, tmp_path)[command]
    line = error_line(args, capsys)
    assert "argparse.Namespace" in line and "--trust_checkpoint" in line and not written.exists()
    main([*args, "--trust_checkpoint"])
    err = capsys.readouterr().err
    assert f"{TRUST_WARNING} '{path}' in full: code in the file can run" in err
    assert written.exists()


def test_trust_really_unpickles_so_the_refusal_is_what_kept_the_marker_away(debug_ckpt, tmp_path, capsys):
    doctored = crafted_files(debug_ckpt, tmp_path)["doctored"]
    with pytest.raises(DLMError, match="--trust_checkpoint"):
        load_checkpoint_file(str(doctored))
    assert not (tmp_path / "MARKER").exists()
    load_checkpoint_file(str(doctored), trust=True)  # the payload runs: a real one would have, too
    assert (tmp_path / "MARKER").exists() and TRUST_WARNING in capsys.readouterr().err


def test_load_from_checkpoint_is_safe(debug_ckpt, tmp_path):
    module = DiffusionLM.load_from_checkpoint(str(debug_ckpt))
    assert module.tokenizer is not None and module.mask_token_id == raw(debug_ckpt)[CHECKPOINT_KEY]["mask_token_id"]
    files = crafted_files(debug_ckpt, tmp_path)
    with pytest.raises(DLMError, match="refusing to load checkpoint .*--trust_checkpoint"):
        DiffusionLM.load_from_checkpoint(str(files["doctored"]))
    assert not (tmp_path / "MARKER").exists()
    path = counterpart(debug_ckpt, tmp_path / "counterpart.ckpt")
    with pytest.raises(DLMError, match="argparse.Namespace"):
        DiffusionLM.load_from_checkpoint(str(path))
    assert DiffusionLM.load_from_checkpoint(str(path), weights_only=False).tokenizer is not None


def test_stored_trust_remote_code_needs_trust(debug_ckpt, tmp_path):
    checkpoint = raw(debug_ckpt)
    checkpoint[CHECKPOINT_KEY]["backbone"]["trust_remote_code"] = True
    torch.save(checkpoint, tmp_path / "remote.ckpt")
    with pytest.raises(DLMError, match="needs trust_remote_code.*--trust_checkpoint"):
        load_diffusion_lm(str(tmp_path / "remote.ckpt"))


# --- file names stored in a checkpoint ---------------------------------------------------------------------
def test_bad_tokenizer_file_names_are_refused_before_anything_is_written(debug_ckpt, tmp_path, capsys):
    escaped = f"lightning_dlm_evil_{uuid.uuid4().hex}"
    outside = tmp_path / "outside"
    names = [f"../{escaped}", str(outside / "x"), "..", ".", "sub/x", "a\\b", "nul\0byte", ""]
    content = base64.b64encode(b"written where it should not be").decode("ascii")
    for name in names:
        checkpoint = raw(debug_ckpt)
        files = checkpoint[CHECKPOINT_KEY]["tokenizer_files"]
        files[name] = content
        path = tmp_path / "bad.ckpt"
        torch.save(checkpoint, path)
        with pytest.raises(DLMError, match=f"tokenizer file name {repr(name).replace(chr(92), chr(92) * 2)}"):
            load_diffusion_lm(str(path))
        with pytest.raises(DLMError, match="is refused"):  # also the path Lightning takes (on_load_checkpoint)
            tokenizer_from_files(files)
        for command in ("sample", "export"):
            args, written = commands(path, tmp_path)[command]
            line = error_line(args, capsys)
            assert "tokenizer file name" in line and repr(name) in line and "nothing was written" in line, line
            assert not written.exists()
        assert not os.path.exists(os.path.join(tempfile.gettempdir(), escaped)) and not outside.exists()
        assert not os.path.exists(os.path.join(str(tmp_path), escaped))


def test_tokenizer_files_round_trip_still_works(debug_ckpt):
    files = raw(debug_ckpt)[CHECKPOINT_KEY]["tokenizer_files"]
    assert "tokenizer.json" in files
    assert len(tokenizer_from_files(files)) > 0
    with pytest.raises(DLMError, match="is not base64"):
        tokenizer_from_files({**files, "tokenizer.json": "not base64!"})


# --- damaged and foreign files -----------------------------------------------------------------------------
def test_damaged_missing_and_foreign_files_get_one_line_errors(debug_ckpt, tmp_path, capsys):
    data = debug_ckpt.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    (tmp_path / "random.ckpt").write_bytes(os.urandom(4096))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    torch.save([1, 2, 3], tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    cases = {
        "missing.ckpt": "does not exist",
        "truncated.ckpt": "damaged or truncated",
        "empty.ckpt": "is empty",
        "text.ckpt": "is not a PyTorch checkpoint",
        "random.ckpt": "is not a PyTorch checkpoint",
        "other.zip": "a zip file but not a PyTorch checkpoint",
        "foreign.ckpt": "not a lightning_dlm diffusion checkpoint",
        "legacy.ckpt": "not a lightning_dlm diffusion checkpoint",
    }
    for name, message in cases.items():
        for command in ("sample", "eval", "export"):
            args, written = commands(tmp_path / name, tmp_path)[command]
            line = error_line(args, capsys)
            assert message in line, (name, command, line)
            assert not written.exists()
