"""Faults injected into saving, caching and building: a process killed at each step of a save, a full disk,
concurrent runs, files changed behind the loader's back. None of them may hand back a wrong model or lose the
previous one."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import datasets
import peft.peft_model
import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoProcessor, CLIPModel

import peft_clip_adapter.peft_model as our_peft_model
from peft_clip_adapter import CLIPAdapterConfig, CLIPAdapterPeftModel
from peft_clip_adapter.fewshot.data import build_eval_transform, load_image_classification_data
from peft_clip_adapter.fewshot.features import FeatureCache, dataset_fingerprint
from peft_clip_adapter.manifest import MANIFEST_NAME
from peft_clip_adapter.testing.offline_default import build_once
from peft_clip_adapter.testing.tiny_models import build_tiny_clip, write_shapes_dataset

# pytest runs with --import-mode=importlib, so tests/ is not on sys.path: load the helpers by path.
_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
fresh_accelerate_state = helpers.fresh_accelerate_state  # fixture

PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def adapter(tiny_clip_path: str, ratio: float, seed: int, **config) -> PeftModel:
    torch.manual_seed(seed)
    return get_peft_model(CLIPModel.from_pretrained(tiny_clip_path).eval(), CLIPAdapterConfig(ratio=ratio, **config))


@torch.no_grad()
def embedding(model) -> torch.Tensor:
    return model.get_image_features(pixel_values=PIXELS).pooler_output


def what_loads(folder: Path, tiny_clip_path: str, old: torch.Tensor, new: torch.Tensor) -> str:
    """``"old"``, ``"new"`` or ``"refused"``; anything else (a mix that loads) fails the test."""
    try:
        loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path).eval(), folder)
    except ValueError as error:
        assert "interrupted" in str(error), error
        return "refused"
    result = embedding(loaded)
    if torch.equal(result, old):
        return "old"
    assert torch.equal(result, new), "the folder loaded as neither the old nor the new adapter"
    return "new"


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing catches it; the save's cleanup is disabled below."""


def save_killed_at(model, target: Path, step: int, monkeypatch) -> bool:
    """Save ``model`` into ``target``, dying just before the ``step``-th file move; True if it died."""
    calls = []
    real_replace = os.replace

    def replace(source, destination):
        if len(calls) == step:
            raise Killed
        calls.append(destination)
        real_replace(source, destination)

    with monkeypatch.context() as patch:
        patch.setattr(our_peft_model.os, "replace", replace)
        patch.setattr(our_peft_model.shutil, "rmtree", lambda *args, **kwargs: None)  # a killed process cleans nothing
        try:
            model.save_pretrained(target)
        except Killed:
            return True
    return False


def test_a_save_killed_at_any_step_never_loads_as_a_mix(tiny_clip_path, tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    old_model, new_model = adapter(tiny_clip_path, 0.3, seed=1), adapter(tiny_clip_path, 0.7, seed=2)
    old_model.save_pretrained(target)
    old, new = embedding(old_model), embedding(new_model)
    outcomes, step = [], 0
    while True:
        shutil.rmtree(target)
        old_model.save_pretrained(target)
        died = save_killed_at(new_model, target, step, monkeypatch)
        outcomes.append(what_loads(target, tiny_clip_path, old, new))
        if not died:
            break
        step += 1
    # Moves: the manifest, adapter_config.json, adapter_model.safetensors, README.md; then complete.
    assert outcomes == ["old", "refused", "refused", "new", "new"]


def test_a_killed_first_save_into_an_empty_folder_is_refused(tiny_clip_path, tmp_path, monkeypatch):
    model = adapter(tiny_clip_path, 0.3, seed=1)
    for step, missing in [(1, "adapter_config.json"), (2, "adapter_model.safetensors")]:
        target = tmp_path / f"killed-{step}"
        assert save_killed_at(model, target, step, monkeypatch)
        with pytest.raises(ValueError, match=rf"is incomplete: {missing} is missing.*save the adapter again"):
            CLIPAdapterConfig.from_pretrained(target)
        # peft looks for adapter_config.json itself, first: its own ValueError when that is missing.
        match = "Can't find 'adapter_config.json'" if step == 1 else f"is incomplete: {missing} is missing"
        with pytest.raises(ValueError, match=match):
            PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), str(target))


@pytest.mark.slow
def test_a_real_sigkill_between_the_moves(tiny_clip_path, tmp_path):
    # The same, with a real SIGKILL (no cleanup at all) just before the new weights replace the old ones.
    target = tmp_path / "adapter"
    adapter(tiny_clip_path, 0.3, seed=1).save_pretrained(target)
    script = f"""
import os, signal, torch
import peft_clip_adapter, peft_clip_adapter.peft_model as saving
from peft import get_peft_model
from transformers import CLIPModel
real = os.replace
def replace(source, destination):
    if str(destination).endswith("adapter_model.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(source, destination)
saving.os.replace = replace
model = get_peft_model(CLIPModel.from_pretrained({tiny_clip_path!r}), peft_clip_adapter.CLIPAdapterConfig(ratio=0.7))
model.save_pretrained({str(target)!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert json.loads((target / "adapter_config.json").read_text())["ratio"] == 0.7  # new config, old weights
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is not the file adapter_manifest\.json records"):
        PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), target)
    # The next save cleans up the staging folder the killed one left, and repairs the adapter.
    assert len(list(tmp_path.glob(".adapter.tmp-*"))) == 1
    adapter(tiny_clip_path, 0.7, seed=2).save_pretrained(target)
    assert list(tmp_path.glob(".adapter.tmp-*")) == []
    PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), target)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["weights", "config", "manifest", "model card"])
def test_a_full_disk_keeps_the_previous_adapter(tiny_clip_path, tmp_path, monkeypatch, where):
    target = tmp_path / "adapter"
    adapter(tiny_clip_path, 0.3, seed=1).save_pretrained(target)
    before = snapshot(target)

    def half_then_full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 10)
        disk_full()

    patches = {
        "weights": (peft.peft_model, "safe_save_file", half_then_full),
        "config": (CLIPAdapterConfig, "save_pretrained", disk_full),
        "manifest": (our_peft_model, "write_manifest", disk_full),
        "model card": (CLIPAdapterPeftModel, "create_or_update_model_card", disk_full),
    }
    monkeypatch.setattr(*patches[where])
    with pytest.raises(OSError) as raised:
        adapter(tiny_clip_path, 0.7, seed=2).save_pretrained(target)
    assert raised.value.errno == errno.ENOSPC
    assert snapshot(target) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]  # no staging folder left


def test_concurrent_saves_into_one_folder_take_turns(tiny_clip_path, tmp_path, monkeypatch):
    # Save A stops between its config and its weights until save B has moved its own config and weights, and B
    # waits for A to stop there: without the lock that leaves B's config beside A's weights. With it, one save
    # waits for the other's lock (and its wait for the other times out after 1 s).
    target = tmp_path / "adapter"
    models = {"A": adapter(tiny_clip_path, 0.3, seed=1), "B": adapter(tiny_clip_path, 0.8, seed=2)}
    expected = {name: embedding(model) for name, model in models.items()}
    a_paused, b_moved = threading.Event(), threading.Event()
    moved_by_b = set()
    real_replace = os.replace

    def replace(source, destination):
        name, file = threading.current_thread().name, Path(destination).name
        if name == "A" and file == "adapter_model.safetensors":
            a_paused.set()
            b_moved.wait(timeout=1.0)
        if name == "B" and not moved_by_b:
            a_paused.wait(timeout=1.0)
        real_replace(source, destination)
        if name == "B":
            moved_by_b.add(file)
            if {"adapter_config.json", "adapter_model.safetensors"} <= moved_by_b:
                b_moved.set()

    monkeypatch.setattr(our_peft_model.os, "replace", replace)
    errors = []

    def save(name):
        try:
            models[name].save_pretrained(target)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=save, args=(name,), name=name) for name in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    loaded = embedding(PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path).eval(), target))
    # Whichever took the lock last, its save is whole (without the lock: B's config beside A's weights).
    assert torch.equal(loaded, expected["A"]) or torch.equal(loaded, expected["B"])


def test_files_changed_after_the_save(tiny_clip_path, tmp_path):
    target = tmp_path / "adapter"
    model = adapter(tiny_clip_path, 0.3, seed=1)
    model.save_pretrained(target)
    config = json.loads((target / "adapter_config.json").read_text())
    # Where the base model is found is not part of the adapter: repointing it by hand is fine.
    config["base_model_name_or_path"] = str(tmp_path / "local-copy")
    (target / "adapter_config.json").write_text(json.dumps(config, indent=4))
    (target / "README.md").write_text("my own notes")  # so is the model card
    assert CLIPAdapterConfig.from_pretrained(target).ratio == 0.3
    # Anything else is refused, with the way out.
    config["ratio"] = 0.9
    (target / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the file was changed afterwards.*on purpose, delete adapter_manifest"):
        PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), target)
    (target / MANIFEST_NAME).unlink()
    assert PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), target).peft_config[
        "default"
    ].ratio == pytest.approx(0.9)
    (target / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_manifest\.json is damaged"):
        CLIPAdapterConfig.from_pretrained(target)


def test_each_extra_adapter_folder_is_checked_on_its_own(tiny_clip_path, tmp_path, monkeypatch):
    model = adapter(tiny_clip_path, 0.3, seed=1)
    model.add_adapter("text", CLIPAdapterConfig(adapt="text", ratio=0.5))
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "text" / MANIFEST_NAME).is_file()
    (tmp_path / "out" / "text" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    )
    loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path), tmp_path / "out")
    with pytest.raises(ValueError, match=r"text/adapter_model\.safetensors is not the file adapter_manifest\.json"):
        loaded.load_adapter(str(tmp_path / "out" / "text"), "text")
    assert list(loaded.peft_config) == ["default"]


# --- the feature cache --------------------------------------------------------------------------------


@pytest.fixture
def image_dataset(tmp_path):
    root = write_shapes_dataset(tmp_path / "images", images_per_class=1)
    return root, datasets.load_dataset("imagefolder", data_dir=root, split="train")


def test_an_image_replaced_in_place_is_a_new_cache_key(tiny_clip_path, image_dataset):
    root, dataset = image_dataset
    before = dataset_fingerprint(dataset)
    path = sorted(Path(root).rglob("*.png"))[0]
    stat = path.stat()
    other = sorted(Path(root).rglob("*.png"))[1].read_bytes()
    path.write_bytes(other)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same path, same modification time
    assert dataset_fingerprint(dataset) != before
    path.write_bytes(path.read_bytes())  # same content again: same key
    assert dataset_fingerprint(dataset) == dataset_fingerprint(dataset)


def test_a_full_disk_while_caching_leaves_no_partial_file(tiny_clip_path, image_dataset, tmp_path, monkeypatch):
    _, dataset = image_dataset
    model = CLIPModel.from_pretrained(tiny_clip_path)
    transform = build_eval_transform(AutoProcessor.from_pretrained(tiny_clip_path).image_processor)
    cache = FeatureCache(tmp_path / "cache")

    def half_then_full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 10)
        disk_full()

    with monkeypatch.context() as patch:
        patch.setattr("peft_clip_adapter.fewshot.features.save_file", half_then_full)
        with pytest.raises(OSError, match="No space left"):
            cache.load_or_extract(model, dataset, transform)
    assert list((tmp_path / "cache").iterdir()) == []
    first = cache.load_or_extract(model, dataset, transform)
    assert cache.last_hit is False
    assert torch.equal(cache.load_or_extract(model, dataset, transform).features, first.features) and cache.last_hit


# --- training inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("argument", ["train_dir", "validation_dir"])
def test_empty_class_folders_are_named(tmp_path, argument):
    classes = ["red circle", "blue square"]
    train = write_shapes_dataset(tmp_path / "train", images_per_class=3, classes=classes)
    validation = write_shapes_dataset(tmp_path / "val", images_per_class=1, classes=classes)
    broken = Path(train if argument == "train_dir" else validation)
    (broken / "green_triangle").mkdir()
    (broken / "yellow_cross" / "notes").mkdir(parents=True)
    (broken / "yellow_cross" / "notes" / "readme.txt").write_text("no image")
    (broken / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    with pytest.raises(ValueError, match=rf"{argument}=.* has class folders without images: \['green_triangle', "):
        load_image_classification_data(train_dir=train, validation_dir=validation)


def test_concurrent_builds_of_one_folder_both_succeed(tmp_path):
    target = tmp_path / "cache" / "offline-default" / "tiny-clip"
    both_building = threading.Barrier(2)
    errors = []

    def build(path):
        build_tiny_clip(path, hidden_size=16, projection_dim=16)
        both_building.wait()  # both runs hold a finished build before either renames it into place

    def run():
        try:
            build_once(target, build)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(path.name for path in target.parent.iterdir()) == ["tiny-clip"]  # no staging left
    assert CLIPModel.from_pretrained(target).config.projection_dim == 16
    assert target.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # not mkdtemp's private 0o700


# --- resuming the trainer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tiny_clip_path, shapes_dir, tmp_path_factory):
    """A finished 2-epoch run with a checkpoint per epoch, and the arguments that made it."""
    run = tmp_path_factory.mktemp("run")
    argv = helpers.trainer_args(
        tiny_clip_path, shapes_dir, run, shots=4, views=1, num_train_epochs=2, checkpointing_steps="epoch"
    )
    return run, argv, helpers.run_fewshot(argv).results


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """The run's output folder copied (to damage), and the arguments to resume it from there."""
    run, argv, results = trained_run
    out = Path(shutil.copytree(run / "out", tmp_path / "out"))
    argv = [*argv, "--resume_from_checkpoint", "latest"]
    argv[argv.index("--output_dir") + 1] = str(out)
    return out, argv, results


def damage_checkpoint(folder: Path, how: str, hostile_pickle) -> Path:
    """Damage one file of the checkpoint ``folder``; returns the marker a hostile pickle would create."""
    model = folder / "model.safetensors"
    marker = folder / "no-pickle-written"
    if how == "model truncated":
        model.write_bytes(model.read_bytes()[:-100])
    elif how == "model NaN":
        from safetensors.torch import load_file, save_file

        tensors = load_file(model)
        key = sorted(tensors)[0]
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, model)
    elif how == "model pickled":
        model.unlink()
        marker = hostile_pickle(folder / "pytorch_model.bin")
    elif how == "optimizer garbage":
        (folder / "optimizer.bin").write_bytes(b"PK\x03\x04 not really a zip file")
    elif how == "random states hostile":
        marker = hostile_pickle(folder / "random_states_0.pkl", "random_state")
    elif how == "random states missing":
        (folder / "random_states_0.pkl").unlink()
    elif how == "state truncated":
        state = folder / "trainer_state.json"
        state.write_bytes(state.read_bytes()[:40])
    elif how == "state wrong types":
        state = json.loads((folder / "trainer_state.json").read_text())
        state["completed_steps"] = "eight"
        (folder / "trainer_state.json").write_text(json.dumps(state))
    else:
        raise AssertionError(how)
    return marker


CHECKPOINT_DAMAGE = {
    "model truncated": r"epoch_2/model\.safetensors is truncated or corrupted",
    "model NaN": r"epoch_2/model\.safetensors holds NaN or infinite values in \['class_embeddings'\]",
    "model pickled": r"epoch_2/pytorch_model\.bin holds the checkpoint's model weights as a pickle",
    "optimizer garbage": r"epoch_2/optimizer\.bin cannot be loaded safely \(",
    "random states hostile": r"epoch_2/random_states_0\.pkl cannot be loaded safely \(UnpicklingError",
    "random states missing": r"epoch_2 lacks \['random_states_0\.pkl'\]: the checkpoint is incomplete",
    "state truncated": r"epoch_2/trainer_state\.json cannot be read \(",
    "state wrong types": r"epoch_2/trainer_state\.json is damaged: \['completed_steps'\]",
}


def _settings(out: Path) -> dict:
    """The run settings recorded in the run's first checkpoint: what resuming that run expects."""
    return json.loads((out / "epoch_1" / "trainer_state.json").read_text())["settings"]


@pytest.mark.parametrize("how", CHECKPOINT_DAMAGE)
def test_a_damaged_checkpoint_is_named_with_the_previous_one(run_copy, hostile_pickle, how):
    """``--resume_from_checkpoint latest`` takes the damaged epoch_2, names the file and suggests epoch_1."""
    from accelerate import Accelerator

    from peft_clip_adapter.fewshot.checkpoints import load_checkpoint, resolve_checkpoint

    out, _, _ = run_copy
    settings = _settings(out)
    marker = damage_checkpoint(out / "epoch_2", how, hostile_pickle)
    match = (
        CHECKPOINT_DAMAGE[how] + r".*Resume from the previous checkpoint instead: --resume_from_checkpoint .*epoch_1"
    )
    with pytest.raises(ValueError, match=match):
        load_checkpoint(Accelerator(cpu=True), resolve_checkpoint(out, "latest"), settings)
    assert not marker.exists()


def test_a_damaged_checkpoint_is_one_error_line(run_copy):
    out, argv, _ = run_copy
    (out / "epoch_2" / "optimizer.bin").write_bytes(b"PK\x03\x04 not really a zip file")
    helpers.fewshot_error(argv, r"epoch_2/optimizer\.bin cannot be loaded safely .*--resume_from_checkpoint .*epoch_1")


@pytest.mark.slow
def test_a_checkpoint_without_settings_resumes_only_when_trusted(run_copy):
    from accelerate import Accelerator

    from peft_clip_adapter.fewshot.checkpoints import load_checkpoint

    out, argv, results = run_copy
    settings = _settings(out)
    state = json.loads((out / "epoch_2" / "trainer_state.json").read_text())
    del state["settings"]["seed"]  # a flag added to the recorded settings after this checkpoint was written
    (out / "epoch_2" / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"epoch_2 records no value for --seed \(saved by an older version"):
        load_checkpoint(Accelerator(cpu=True), out / "epoch_2", settings)
    for folder in ("epoch_1", "epoch_2"):
        state = json.loads((out / folder / "trainer_state.json").read_text())
        del state["settings"]  # as an older version of the trainer wrote it
        (out / folder / "trainer_state.json").write_text(json.dumps(state))
    helpers.fewshot_error(argv, r"epoch_2 records no training settings .*--trust_checkpoint_settings")
    argv = [*argv, "--resume_from_checkpoint", str(out / "epoch_1"), "--trust_checkpoint_settings"]
    resumed = helpers.run_fewshot(argv).results
    assert resumed["train_loss_per_epoch"] == pytest.approx(results["train_loss_per_epoch"], rel=1e-5)
    assert "settings" in json.loads((out / "epoch_2" / "trainer_state.json").read_text())  # recorded from now on


def test_a_checkpoint_save_killed_midway_is_never_resumed(run_copy):
    from peft_clip_adapter.atomic import temporary_prefix
    from peft_clip_adapter.fewshot.checkpoints import find_checkpoints, resolve_checkpoint

    out, _, _ = run_copy
    # What a run killed while saving epoch_3 leaves: a hidden temporary folder, even with a trainer state.
    staging = out / f"{temporary_prefix(out / 'epoch_3')}0123abcd"
    shutil.copytree(out / "epoch_2", staging)
    state = json.loads((staging / "trainer_state.json").read_text())
    (staging / "trainer_state.json").write_text(json.dumps({**state, "completed_steps": 10**6}))
    (staging / "model.safetensors").write_bytes(b"half")
    assert [path.name for path in find_checkpoints(out)] == ["epoch_1", "epoch_2"]
    assert resolve_checkpoint(out, "latest") == out / "epoch_2"


@pytest.mark.parametrize("failure", ["killed", "full disk"])
def test_a_checkpoint_save_that_fails_leaves_the_previous_ones_and_no_part(tmp_path, monkeypatch, failure):
    """save_state dies after writing some files: no epoch_2 appears, no temporary stays, epoch_1 is intact."""
    from accelerate import Accelerator

    from peft_clip_adapter.fewshot.checkpoints import find_checkpoints, new_training_state, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    save_checkpoint(accelerator, tmp_path / "epoch_1", new_training_state({"seed": 0}))
    real_save_state = accelerator.save_state

    def dies_midway(folder, **kwargs):
        real_save_state(folder, **kwargs)  # every file written ...
        if failure == "full disk":
            raise OSError(errno.EFBIG, "File too large")
        raise Killed  # ... then the process dies before the trainer state

    monkeypatch.setattr(accelerator, "save_state", dies_midway)
    with pytest.raises(Killed if failure == "killed" else OSError) as caught:
        save_checkpoint(accelerator, tmp_path / "epoch_2", new_training_state({"seed": 0}))
    if failure == "full disk":
        assert f"Could not write {tmp_path / 'epoch_2'}: File too large" in str(caught.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["epoch_1"]
    assert find_checkpoints(tmp_path) == [tmp_path / "epoch_1"]


@pytest.mark.slow
def test_a_pickled_base_model_is_refused_unread(tiny_clip_path, shapes_dir, tmp_path, hostile_pickle):
    model = Path(shutil.copytree(tiny_clip_path, tmp_path / "pickled-clip"))
    (model / "model.safetensors").unlink()
    marker = hostile_pickle(model / "pytorch_model.bin")
    argv = helpers.trainer_args(str(model), shapes_dir, tmp_path, shots=4, views=1, num_train_epochs=1)
    helpers.fewshot_error(argv, r"pytorch_model\.bin holds the base model weights as a pickle.*not loaded")
    assert not marker.exists()
