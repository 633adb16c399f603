"""Nothing lost, nothing run: the poor cases of bad input and Ctrl-C each give one clear line and a
non-zero exit (or end cleanly), run no code from the files, and print no traceback."""

import json
import os
import sys
import time

import pytest
import yaml

from lightning_dlm.cli import main
from tests.conftest import REPO, TINY_TOKENIZER, default_sigint
from tests.test_safe_loading import crafted_files, debug_ckpt  # noqa: F401 - debug_ckpt: the module's fixture

DEBUG = os.path.join(REPO, "experiments", "debug.yaml")


def one_error_line(args, capsys, code=2):
    """stderr of ``dlm <args>``: it exits ``code`` with one ``error: ...`` line and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def child_env(**extra):
    """The environment of a `dlm` child as a person's shell has it: outside pytest (so dlm's quiet mode
    applies), offline, one thread."""
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_CURRENT_TEST"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **extra)
    return env


# --- 1, 2. --ckpt_path of validate / test / fit: a crafted pickle, a truncated or missing file -------------
@pytest.fixture(scope="module")
def bad_ckpts(debug_ckpt, tmp_path_factory):  # noqa: F811 - the fixture imported above
    folder = tmp_path_factory.mktemp("bad_ckpts")
    files = crafted_files(debug_ckpt, folder)
    data = debug_ckpt.read_bytes()
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    return folder, {
        "doctored": (files["doctored"], "refusing to load checkpoint"),
        "bare": (files["bare"], "refusing to load checkpoint"),
        "truncated": (folder / "truncated.ckpt", "damaged or truncated"),
        "missing": (folder / "missing.ckpt", "does not exist"),
    }


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_check_ckpt_path_before_lightning_reads_it(bad_ckpts, tmp_path, capsys, subcommand):
    folder, cases = bad_ckpts
    for name, (path, message) in cases.items():
        line = one_error_line([subcommand, "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path / "run"),
                               "--ckpt_path", str(path), "--trainer.enable_progress_bar", "false"], capsys)
        assert message in line, (name, line)
        if message.startswith("refusing"):  # it says why, and the fix that exists for these subcommands
            assert "could run code in the file" in line and "have no --trust_checkpoint" in line, line
    assert not (folder / "MARKER").exists()
    assert not (tmp_path / "run").exists()  # nothing written


def test_fit_resume_from_a_crafted_pickle_says_it_holds_code(bad_ckpts, tmp_path, capsys):
    folder, cases = bad_ckpts
    for name in ("doctored", "bare"):
        path = cases[name][0]
        line = one_error_line(["fit", "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path / "run"),
                               "--ckpt_path", str(path)], capsys)
        assert line.startswith(f"error: refusing to load checkpoint '{path}': it references "), line
        assert "could run code in the file" in line and "may be truncated" not in line, line
    assert not (folder / "MARKER").exists() and not (tmp_path / "run").exists()


# --- 3. Ctrl-C ---------------------------------------------------------------------------------------------
def test_ctrl_c_anywhere_in_dlm_is_one_line_and_exit_130(monkeypatch, capsys):
    import lightning_dlm.commands.compare as compare_command

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_command, "compare", interrupted)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", "runs/x"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped dlm's main")
    assert exit_info.value.code == 130
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == ["interrupted"] and "Traceback" not in captured.err


# A chat whose every denoising step takes a while and warns (the way a library would), so that
# Ctrl-C lands mid-reply and a warning would show up inside the live display.
SLOW_CHAT = (
    "import sys, time, warnings\n"
    "from lightning_dlm.sampling.denoisers import ModelDenoiser\n"
    "logits = ModelDenoiser.logits\n"
    "def slow(self, *args):\n"
    "    warnings.warn('dlm-test-warning: a library speaks', UserWarning)\n"
    "    time.sleep(0.4)\n"
    "    return logits(self, *args)\n"
    "ModelDenoiser.logits = slow\n"
    "from lightning_dlm.cli import main\n"
    "main()\n"
)


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    from tests.test_chat import tiny_model

    return tiny_model().save_pretrained(str(tmp_path_factory.mktemp("chat") / "model"))


def spawn_chat(pexpect, folder, *extra):
    return pexpect.spawn(sys.executable, ["-c", SLOW_CHAT, "chat", "--ckpt", folder, "--max_length", "4", "--device",
                                          "cpu", *extra], cwd=REPO, env=child_env(), timeout=120, encoding="utf-8",
                         preexec_fn=default_sigint)


def test_ctrl_c_in_chat_mid_reply_and_at_the_prompt(chat_folder):
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(pexpect, chat_folder)
    child.expect("you> ")
    child.sendline("hello there")
    child.expect("░")  # the live display is up: the model is inside its first step
    child.send("\x03")  # Ctrl-C mid-reply: the reply stops, the prompt comes back
    child.expect(r"dlm> \(interrupted\)")
    child.expect("you> ")
    transcript = child.before
    child.sendline("again")  # the chat goes on: a whole reply
    child.expect("you> ")
    transcript += child.before
    child.send("\x03")  # Ctrl-C at the prompt: the chat ends
    child.expect("bye")
    child.expect(pexpect.EOF)
    transcript += child.before
    child.close()
    assert child.exitstatus == 0, transcript
    assert "Traceback" not in transcript and "KeyboardInterrupt" not in transcript, transcript
    assert "dlm-test-warning" not in transcript  # dlm's quiet mode: no library warnings


def test_chat_prints_warnings_after_the_reply_not_inside_it(chat_folder):
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(pexpect, chat_folder, "--verbose")  # the libraries' warnings wanted
    child.expect("you> ")
    child.sendline("hello there")
    child.expect("you> ")
    reply = child.before
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "░" in reply and "dlm-test-warning" in reply, reply
    assert reply.rindex("░") < reply.index("dlm-test-warning"), reply  # after the live display is done


# --- 4. dlm compare on damaged TensorBoard logs ----------------------------------------------------------------
def write_events(folder, steps=20):
    """A real event file (TensorBoard's own writer) with the tags a dlm fit logs."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    os.makedirs(folder, exist_ok=True)
    writer = EventFileWriter(str(folder))
    for step in range(steps):
        values = [Summary.Value(tag="train/loss", simple_value=5.0 - 0.1 * step),
                  Summary.Value(tag="train/tokens_seen", simple_value=512.0 * (step + 1))]
        if step % 5 == 4:
            values.append(Summary.Value(tag="val/nelbo", simple_value=4.0 - 0.05 * step))
        writer.add_event(Event(wall_time=1000.0 + step, step=step, summary=Summary(value=values)))
    writer.close()
    (path,) = [os.path.join(folder, name) for name in os.listdir(folder) if name.startswith("events.out.tfevents.")]
    return path


def age(path, seconds=3600):
    """Not a log a running fit is still writing (see STILL_WRITING_S)."""
    os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_compare_names_a_cut_short_or_random_event_file(tmp_path, capsys):
    cut = write_events(tmp_path / "cut" / "version_0")
    data = open(cut, "rb").read()
    with open(cut, "wb") as fh:
        fh.write(data[: len(data) - 7])  # the last record cut short
    age(cut)
    line = one_error_line(["compare", str(tmp_path / "cut")], capsys)
    assert line.startswith(f"error: the TensorBoard log '{cut}' is damaged or cut short (it ends inside record "), line
    garbage = tmp_path / "random" / "events.out.tfevents.0.host.1.0"
    garbage.parent.mkdir()
    garbage.write_bytes(os.urandom(4096))
    line = one_error_line(["compare", str(tmp_path / "random")], capsys)
    assert line.startswith(f"error: the TensorBoard log '{garbage}' is damaged or cut short (the length of record 1"), line
    assert "logged nothing yet" not in line
    write_events(tmp_path / "good" / "version_0")  # the same log, whole
    main(["compare", str(tmp_path / "good")])
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.splitlines()[2].startswith("| good | 3.0500 |"), captured


def test_compare_warns_for_a_damaged_log_beside_good_ones_and_marks_the_row(tmp_path, capsys):
    run = tmp_path / "resumed"
    write_events(run / "version_0")
    second = write_events(run / "version_1", steps=3)
    data = open(second, "rb").read()
    with open(second, "wb") as fh:
        fh.write(data[:-3])
    age(second)
    main(["compare", str(run)])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: the TensorBoard log '{second}' is damaged or cut short ("), err
    assert "resumed" in err[0]
    assert captured.out.splitlines()[2].startswith("| resumed (damaged log) | "), captured.out
    main(["compare", str(run), "--format", "json"])
    (row,) = json.loads(capsys.readouterr().out)
    assert list(row["damaged_logs"]) == [str(second)]


def test_a_log_still_being_written_is_not_damaged(tmp_path, capsys):
    live = write_events(tmp_path / "running" / "version_0")
    data = open(live, "rb").read()
    with open(live, "wb") as fh:  # a writer's buffer flushed mid-record, a moment ago
        fh.write(data[:-5])
    main(["compare", str(tmp_path / "running")])
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.splitlines()[2].startswith("| running | ")


# --- 5. dlm sft fit --data.template chat with a tokenizer that has no chat template --------------------------
def test_sft_template_chat_without_a_chat_template_names_the_option(tmp_path, capsys):
    from tests.test_sft import MODEL, RECORDS, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "limit_val_batches": 0,
                    "default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False},
        "model": {"backbone": {"tokenizer": TINY_TOKENIZER, "config": dict(MODEL)}},
        "data": {"train": [{"path": data}], "seq_len": 48, "batch_size": 4},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", "fit", "--config", str(path), "--data.template", "chat"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "data.template chat" in line and "set data.template: plain" in line, line
    assert "give prompt/response records" not in line  # they are prompt/response records already


# --- 6. a folder whose config.json / tokenizer_config.json names custom code (auto_map) ---------------------
CUSTOM_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('custom code ran')\n"


def custom_code_folder(folder, marker):
    """An exported tiny model whose config.json and tokenizer_config.json point transformers at custom.py
    (a model type transformers does not know, so only that code could load it)."""
    from tests.test_chat import tiny_model

    tiny_model().save_pretrained(str(folder))
    (folder / "custom.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="dlm_custom", auto_map={"AutoConfig": "custom.CustomConfig",
                                                     "AutoModelForCausalLM": "custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok.pop("tokenizer_class", None)
    tok["auto_map"] = {"AutoTokenizer": ["custom.CustomTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


def test_custom_code_in_a_model_folder_is_never_offered_nor_run(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    marker = tmp_path / "MARKER"
    folder = custom_code_folder(tmp_path / "model", marker)
    child = pexpect.spawn(sys.executable, ["-m", "lightning_dlm", "sample", "--ckpt", str(folder), "--prompt", "hi",
                                           "--length", "2", "--steps", "1", "--device", "cpu"],
                          cwd=REPO, env=child_env(), timeout=120, encoding="utf-8")
    seen = child.expect([r"\[y/N\]", pexpect.EOF])
    if seen == 0:  # the old behaviour: transformers asks; a person who answers y runs custom.py
        child.sendline("y")
        child.expect(pexpect.EOF)
    output = child.before
    child.close()
    assert seen == 1, "transformers asked whether to run the folder's custom code"
    assert not marker.exists()
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert child.exitstatus == 2 and len(lines) == 1, output
    assert lines[0].startswith(f"error: refusing to load '{folder}': its config.json or tokenizer_config.json names "
                               f"custom Python code (auto_map)"), lines


def test_custom_tokenizer_code_in_a_checkpoint_is_refused(tmp_path):
    from lightning_dlm.core.errors import DLMError
    from lightning_dlm.io.tokenizer_files import tokenizer_from_files, tokenizer_to_files
    from lightning_dlm.model import load_tokenizer

    files = tokenizer_to_files(load_tokenizer(TINY_TOKENIZER))
    marker = tmp_path / "MARKER"
    import base64

    config = json.loads(base64.b64decode(files["tokenizer_config.json"]))
    config.pop("tokenizer_class", None)
    config["auto_map"] = {"AutoTokenizer": ["custom.CustomTokenizer", None]}
    files["tokenizer_config.json"] = base64.b64encode(json.dumps(config).encode()).decode()
    files["custom.py"] = base64.b64encode(CUSTOM_CODE.format(marker=str(marker)).encode()).decode()
    with pytest.raises(DLMError, match=r"names custom Python code \(auto_map in its tokenizer_config.json\)"):
        tokenizer_from_files(files)
    assert not marker.exists()


# --- 7. a bad --trainer.callbacks: the error, not ~120 lines of usage ------------------------------------------
def test_a_bad_option_of_dlm_fit_is_one_line_and_a_pointer_to_the_help(tmp_path, capsys):
    line = one_error_line(["fit", "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path / "run"),
                           "--trainer.callbacks", '[{"class_path": "no.such.Callback"}]'], capsys)
    assert "no.such.Callback" in line and line.endswith(": see dlm fit --help"), line
    line = one_error_line(["fit", "--config", DEBUG, "--trainer.max_stepz", "3"], capsys)
    assert "max_stepz" in line and line.endswith(": see dlm fit --help"), line
    assert not (tmp_path / "run").exists()
