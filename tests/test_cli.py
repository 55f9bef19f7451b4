"""The trainer's command line: --help at once, one ``error:`` line per user error, a push checked first, quiet logs."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

# pytest runs with --import-mode=importlib, so tests/ is not on sys.path: load the helpers by path.
_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
fresh_accelerate_state, online_hub = helpers.fresh_accelerate_state, helpers.online_hub  # fixtures

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


def run_script(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    env = {name: value for name, value in env.items() if value is not None}  # None: unset
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


def test_every_flag_states_its_default():
    options = run_script("--help").stdout.split("how to launch:")[0]
    entries = re.split(r"\n(?=  -)", options)[1:]  # one per option: "  --flag METAVAR  help ..."
    assert len(entries) > 40
    for entry in entries:
        flag, *rest = entry.split(maxsplit=1)
        switch = re.match(r"\s*  ", entry[len(flag) + 2 :]) is not None  # no metavar: --cpu, --debug, ...
        if flag not in ("-h,", "--help") and not switch:
            assert "default" in " ".join(rest).lower(), flag


def test_a_bad_flag_is_one_error_line_before_the_heavy_imports():
    finished = run_script("--ratio", "2")
    assert finished.stdout.strip() == "IMPORTED [] CODE 2"
    assert finished.stderr == ("error: --ratio must be in [0, 1] (the residual blend; the paper uses 0.2), got 2.0.\n")
    finished = run_script("--adapt", "image")
    assert finished.stderr == (
        "error: argument --adapt: invalid choice: 'image' (choose from 'vision', 'text', 'both') (see --help)\n"
    )


def test_the_template_sets_shown_are_the_packages():
    from peft_clip_adapter.fewshot.templates import DATASET_TEMPLATES

    text = " ".join(run_script("--help").stdout.split())
    assert "(default, ensemble, " + ", ".join(sorted(DATASET_TEMPLATES)) + ")" in text


# -----------------------------------------------------------------------------
# User errors after the heavy imports: one line, exit code 2; --debug and bugs keep their tracebacks


def test_a_user_error_is_one_line_and_exit_code_2(tiny_clip_path, tmp_path):
    argv = ["--model_name_or_path", tiny_clip_path, "--train_dir", str(tmp_path / "missing")]
    line = helpers.fewshot_error([*argv, "--output_dir", str(tmp_path / "out")], "is not a folder")
    assert line == f"error: train_dir={str(tmp_path / 'missing')!r} is not a folder."
    debug = helpers.run_fewshot(["--ratio", "2", "--debug"], expect_code=1)  # --debug: the traceback
    assert "Traceback" in debug.log and "ValueError: --ratio must be in [0, 1]" in debug.log


def test_other_processes_stay_silent_and_bugs_keep_their_traceback():
    other = subprocess.run(
        [sys.executable, str(helpers.EXAMPLE), "--ratio", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, "RANK": "1"},
    )
    assert (other.returncode, other.stdout, other.stderr) == (2, "", "")  # process 0 alone reports the error
    other = subprocess.run(
        [sys.executable, str(helpers.EXAMPLE), "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "RANK": "1"},
    )
    assert (other.returncode, other.stdout) == (0, "")  # `accelerate launch ... --help`: process 0 alone prints it
    bug = "import argparse\nargparse.ArgumentParser.parse_args = lambda self, argv=None: 1 / 0\n"
    finished = helpers.run_fewshot(["--shots", "2"], prelude=bug, expect_code=1)
    assert "Traceback" in finished.log and "ZeroDivisionError" in finished.log and "error: " not in finished.log


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


def test_occupied_output_suggests_resuming_only_with_a_checkpoint(tiny_clip_path, shapes_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "all_results.json").write_text("{}")
    line = helpers.fewshot_error(_args(tiny_clip_path, shapes_dir, tmp_path), r"already holds another run's files")
    assert "--resume_from_checkpoint" not in line
    assert line.endswith(
        "(all_results.json). Pass --overwrite_output_dir to replace them, or choose another --output_dir."
    )
    (out / "step_5").mkdir()
    (out / "step_5" / "trainer_state.json").write_text(json.dumps({"completed_steps": 5}))
    match = r"--overwrite_output_dir to replace them, --resume_from_checkpoint latest to"
    helpers.fewshot_error(_args(tiny_clip_path, shapes_dir, tmp_path), match)
    (tmp_path / "file").write_text("")
    argv = _args(tiny_clip_path, shapes_dir, tmp_path, "--output_dir", str(tmp_path / "file"))
    helpers.fewshot_error(argv, r"--output_dir .*file is a file")


def test_cache_lives_under_hf_home(tmp_path):
    shown = run_script("--help", env={"HF_HOME": str(tmp_path / "hf")}).stdout
    assert f"(default:{tmp_path / 'hf' / 'peft-clip-adapter'})" in "".join(shown.split())
    shown = run_script("--help", env={"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HOME": None}).stdout
    assert f"(default:{tmp_path / 'xdg' / 'huggingface' / 'peft-clip-adapter'})" in "".join(shown.split())


# -----------------------------------------------------------------------------
# --push_to_hub: checked before any data is loaded


def test_push_to_hub_offline_fails_before_loading(tiny_clip_path, shapes_dir, tmp_path):
    argv = _args(tiny_clip_path, shapes_dir, tmp_path, "--push_to_hub")
    helpers.fewshot_error(argv, r"--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set")
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
def test_push_to_hub_without_access_fails_before_loading(monkeypatch, online_hub, failure, message):
    """The trainer calls check_hub_access right after parsing its flags, before any model or data loads."""
    import huggingface_hub
    from huggingface_hub.errors import LocalTokenNotFoundError

    from peft_clip_adapter.fewshot.training import check_hub_access

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
    with pytest.raises(ValueError, match=message):
        check_hub_access("shapes")


def test_a_bad_repository_id_is_named(online_hub):
    from peft_clip_adapter.fewshot.training import check_hub_access

    with pytest.raises(ValueError, match=r"--hub_model_id 'me/bad/id' is not a Hub repository id"):
        check_hub_access("me/bad/id")
    assert check_hub_access("shapes") == "me/shapes" and online_hub.created == ["shapes"]


# -----------------------------------------------------------------------------
# Quiet by default


def test_a_run_logs_progress_lines_and_no_library_noise(tiny_clip_path, shapes_dir, tmp_path):
    data = tmp_path / "data"  # a folder datasets has never read, so it is really loaded
    shutil.copytree(shapes_dir, data)
    log = helpers.run_fewshot(_args(tiny_clip_path, str(data), tmp_path), env={"PYTHONWARNINGS": "always"}).log
    assert "Downloading data" not in log and "\r" not in log  # no bars: stderr is not a terminal here
    assert "Training: 6/6 steps (100%)" in log and "Extracting features: 1/1 batches" in log
    assert "is_gradient_checkpointing" not in log
    assert "blue triangle" in log  # four classes: each one is listed


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
