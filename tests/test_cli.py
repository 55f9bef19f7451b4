"""The trainer's command line: --help at once, one ``error:`` line per user error, a push checked first, quiet logs."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from accelerate import PartialState

# pytest runs with --import-mode=importlib, so tests/ is not on sys.path: load the helpers by path.
_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
fewshot, fresh_accelerate_state, online_hub = helpers.fewshot, helpers.fresh_accelerate_state, helpers.online_hub

HEAVY = ("torch", "transformers", "datasets", "accelerate", "peft", "peft_clip_adapter")
# Runs the script as `python examples/fewshot.py ARGS` would, then reports its exit code and which heavy
# packages it imported.
RUN_SCRIPT = f"""
import runpy, sys
sys.argv = [{str(helpers.EXAMPLE)!r}, *sys.argv[1:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
    code = 0
except SystemExit as exit:
    code = exit.code
print("IMPORTED", sorted(name for name in {HEAVY!r} if name in sys.modules), "CODE", code)
"""


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", RUN_SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120
    )


def _args(tiny_clip_path: str, shapes_dir: str, run: Path, *extra: str) -> list[str]:
    flags = dict(shots=4, views=2, num_train_epochs=3, per_device_train_batch_size=8, learning_rate=0.05)
    return [*helpers.trainer_args(tiny_clip_path, shapes_dir, run, **flags), *extra]


# -----------------------------------------------------------------------------
# --help and flag errors, before any heavy import


def test_help_answers_before_the_heavy_imports_and_shows_every_default():
    finished = run_script("--help")
    assert finished.stdout.rstrip().endswith("IMPORTED [] CODE 0"), finished.stderr[-2000:]
    text = finished.stdout
    for shown in ("(default: 200)", "(default: vision)", "Default: 0.08 (the paper's); 1.0 for the offline default."):
        assert shown in " ".join(text.split())
    assert "how to launch:" in text and "accelerate launch --multi_gpu --num_processes 2" in text
    assert "eurosat" in text and "oxford_pets" in text  # the template sets, read without importing the package


def test_every_flag_states_its_default(fewshot):
    parser = fewshot.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings == ["-h", "--help"] or action.default is False:
            continue  # a switch is off unless given
        text = formatter._get_help_string(action) % {"default": action.default}
        assert "default" in text.lower(), action.option_strings


def test_a_bad_flag_is_one_error_line_before_the_heavy_imports():
    finished = run_script("--ratio", "2")
    assert finished.stdout.strip() == "IMPORTED [] CODE 2"
    assert finished.stderr == ("error: --ratio must be in [0, 1] (the residual blend; the paper uses 0.2), got 2.0.\n")
    finished = run_script("--adapt", "image")
    assert finished.stderr == (
        "error: argument --adapt: invalid choice: 'image' (choose from 'vision', 'text', 'both') (see --help)\n"
    )


def test_the_template_sets_shown_are_the_packages(fewshot):
    from peft_clip_adapter.fewshot.templates import DATASET_TEMPLATES

    assert fewshot._template_set_names() == sorted(DATASET_TEMPLATES)


# -----------------------------------------------------------------------------
# User errors after the heavy imports: one line, exit code 2; --debug and bugs keep their tracebacks


def test_a_user_error_is_one_line_and_exit_code_2(fewshot, tiny_clip_path, tmp_path, capsys):
    argv = ["--model_name_or_path", tiny_clip_path, "--train_dir", str(tmp_path / "missing")]
    with pytest.raises(SystemExit) as exit:
        fewshot.run_cli(fewshot.main, [*argv, "--output_dir", str(tmp_path / "out")])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"error: train_dir={str(tmp_path / 'missing')!r} is not a folder.\n"
    with pytest.raises(ValueError, match="is not a folder"):
        fewshot.run_cli(fewshot.main, [*argv, "--output_dir", str(tmp_path / "out2"), "--debug"])


def test_other_processes_stay_silent_and_bugs_keep_their_traceback(fewshot, monkeypatch, capsys):
    def bad_value(argv):
        raise ValueError("bad value\n  on two lines")

    with pytest.raises(SystemExit):
        fewshot.run_cli(bad_value, [])
    assert capsys.readouterr().err == "error: bad value on two lines\n"
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit:
        fewshot.run_cli(bad_value, [])
    assert exit.value.code == 2 and capsys.readouterr().err == ""
    fewshot.build_parser().print_help()  # `accelerate launch ... --help`: process 0 alone prints it
    assert capsys.readouterr().out == ""
    with pytest.raises(ZeroDivisionError):
        fewshot.run_cli(lambda argv: 1 / 0, [])


@pytest.mark.slow  # accelerate launch: two fresh interpreters
def test_two_launched_processes_print_one_error_line(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(helpers.EXAMPLE), "--cpu", "--shots", "0",
    ]  # fmt: skip
    finished = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        "error: --shots must be at least 1, got 0."
    ]
    assert 'examples/fewshot.py", line' not in output  # no traceback from the script itself


def test_occupied_output_suggests_resuming_only_with_a_checkpoint(fewshot, tiny_clip_path, shapes_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "all_results.json").write_text("{}")
    with pytest.raises(ValueError) as error:
        fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path))
    assert "--resume_from_checkpoint" not in str(error.value)
    assert str(error.value).endswith("Pass --overwrite_output_dir to replace them, or choose another --output_dir.")
    (out / "step_5").mkdir()
    (out / "step_5" / "trainer_state.json").write_text(json.dumps({"completed_steps": 5}))
    with pytest.raises(
        ValueError, match=r"--overwrite_output_dir to replace them, --resume_from_checkpoint latest to"
    ):
        fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path))


def test_cache_lives_under_hf_home(fewshot, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert fewshot.parse_args([]).cache_dir == str(tmp_path / "hf" / "peft-clip-adapter")
    assert fewshot.parse_args([]).feature_cache_dir == str(tmp_path / "hf" / "peft-clip-adapter" / "features")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fewshot.parse_args([]).cache_dir == str(tmp_path / "xdg" / "huggingface" / "peft-clip-adapter")


# -----------------------------------------------------------------------------
# --push_to_hub: checked before any data is loaded


def _refuse_loading(fewshot, monkeypatch) -> None:
    def loading(*args, **kwargs):
        raise AssertionError("data or model loaded before the Hub was checked")

    monkeypatch.setattr(fewshot, "load_model", loading)
    monkeypatch.setattr(fewshot, "load_data", loading)


def test_push_to_hub_offline_fails_before_loading(fewshot, tiny_clip_path, shapes_dir, tmp_path, monkeypatch):
    _refuse_loading(fewshot, monkeypatch)
    with pytest.raises(ValueError, match=r"--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set"):
        fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path, "--push_to_hub"))
    assert not (tmp_path / "out").exists()


def _http_error(status: int):
    from huggingface_hub.errors import HfHubHTTPError

    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__)  # httpx, whichever flavour hub uses
    response = http.Response(status, request=http.Request("GET", "https://huggingface.co/api/whoami-v2"))
    return HfHubHTTPError(f"{status} error", response=response)


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ("no login", r"--push_to_hub needs a Hugging Face login: run `hf auth login` or pass --hub_token"),
        ("401", r"the Hub refused the token \(401 Unauthorized\)"),
        ("403", r"cannot create or reach the repository 'shapes' \(HTTP 403\)\. Check --hub_model_id"),
        ("network", r"cannot reach the Hugging Face Hub \(ConnectionError: no route\); check the network"),
    ],
)
def test_push_to_hub_without_access_fails_before_loading(
    fewshot, tiny_clip_path, shapes_dir, tmp_path, monkeypatch, online_hub, failure, message
):
    import huggingface_hub
    from huggingface_hub.errors import LocalTokenNotFoundError

    def whoami(self, *args, **kwargs):
        raise {"no login": LocalTokenNotFoundError("no token"), "network": ConnectionError("no route")}.get(
            failure, _http_error(401)
        )

    def create_repo(self, repo_id, **kwargs):
        raise _http_error(403)

    if failure == "403":
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    else:
        monkeypatch.setattr(huggingface_hub.HfApi, "whoami", whoami)
    _refuse_loading(fewshot, monkeypatch)
    with pytest.raises(ValueError, match=message):
        fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path, "--push_to_hub", "--hub_model_id", "shapes"))


def test_a_bad_repository_id_is_named(fewshot, tiny_clip_path, shapes_dir, tmp_path, online_hub):
    with pytest.raises(ValueError, match=r"--hub_model_id 'me/bad/id' is not a Hub repository id"):
        fewshot.main(_args(tiny_clip_path, shapes_dir, tmp_path, "--push_to_hub", "--hub_model_id", "me/bad/id"))


# -----------------------------------------------------------------------------
# Quiet by default


def test_a_run_logs_progress_lines_and_no_library_noise(fewshot, tiny_clip_path, shapes_dir, tmp_path, caplog, capfd):
    data = tmp_path / "data"  # a folder datasets has never read, so it is really loaded
    shutil.copytree(shapes_dir, data)
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fewshot.main(_args(tiny_clip_path, str(data), tmp_path))
    err = capfd.readouterr().err
    assert "Downloading data" not in err and "\r" not in err  # no bars: stderr is not a terminal here
    assert "Training: 6/6 steps (100%)" in caplog.text and "Extracting features: 1/1 batches" in caplog.text
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)] == []
    assert "blue triangle" in caplog.text  # four classes: each one is listed


def test_many_classes_are_summarised(fewshot, caplog):
    names = [f"class {index}" for index in range(30)]
    zero_shot = [0.5] * 30
    adapter = [index / 30 for index in range(29)] + [None]
    caplog.set_level(logging.INFO)
    PartialState(cpu=True)  # accelerate's logger, as in a run
    fewshot.log_per_class(names, zero_shot, adapter)
    lines = [record.getMessage().removeprefix("[RANK 0] ") for record in caplog.records]
    assert len(lines) == 3
    assert lines[0] == (
        "Per class (30 classes; every one in all_results.json): 13 better than zero-shot, 15 worse, "
        "1 unchanged, 1 not evaluated"
    )
    assert lines[1].startswith("  weakest:   class 0 0.0% (zero-shot 50.0%), class 1 3.3% (zero-shot 50.0%)")
    assert lines[2].startswith("  strongest: class 28 93.3% (zero-shot 50.0%), class 27 90.0%")


def test_reading_a_local_image_folder_announces_no_download(shapes_dir, tmp_path, capfd):
    import datasets

    from peft_clip_adapter import load_image_classification_data

    shutil.copytree(shapes_dir, tmp_path / "fresh")  # never read before, so datasets really builds it
    shown = datasets.is_progress_bar_enabled()  # an in-process trainer run may have turned them off
    datasets.enable_progress_bars()
    try:
        load_image_classification_data(train_dir=str(tmp_path / "fresh"))
        assert datasets.is_progress_bar_enabled()  # bars are hidden only while the local files are read
    finally:
        if not shown:
            datasets.disable_progress_bars()
    assert "Downloading data" not in capfd.readouterr().err
