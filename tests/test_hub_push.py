"""push_to_hub, offline: the huggingface_hub upload calls are intercepted and the uploaded files inspected."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import ModelCard
from peft import get_peft_model
from safetensors.torch import load, load_file

from peft_clip_adapter import CardFacts, CLIPAdapterConfig

BASE_ID = "openai/clip-vit-base-patch16"
REPO_ID = "me/clip-adapter-x"

# peft looks up the (offline, unreachable) base config to see whether embeddings were resized; they never are.
pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")


@pytest.fixture
def hub(monkeypatch) -> SimpleNamespace:
    """Replaces ``HfApi.create_repo`` / ``HfApi.upload_folder``; records calls and uploaded file contents."""
    record = SimpleNamespace(created=[], uploads=[])

    def create_repo(self, repo_id, **kwargs):
        record.created.append((repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {}
        for root, _, names in os.walk(folder_path):
            for name in names:
                path = os.path.join(root, name)
                files[os.path.relpath(path, folder_path)] = Path(path).read_bytes()
        record.uploads.append(SimpleNamespace(repo_id=repo_id, files=files, kwargs=kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return record


@pytest.fixture
def model(tiny_clip):
    tiny_clip.name_or_path = BASE_ID  # as if loaded from the Hub
    return get_peft_model(tiny_clip, CLIPAdapterConfig(adapt="both", ratio=0.6))


def test_push_uploads_exactly_the_adapter_files_in_one_commit(hub, model, tmp_path):
    result = model.push_to_hub(REPO_ID, private=True, commit_message="first adapter")
    assert result.commit_url.endswith("/commit/0")
    assert hub.created == [(REPO_ID, {"private": True, "exist_ok": True})]
    [upload] = hub.uploads
    assert upload.repo_id == REPO_ID and upload.kwargs["commit_message"] == "first adapter"
    assert sorted(upload.files) == [
        "README.md",
        "adapter_config.json",
        "adapter_manifest.json",
        "adapter_model.safetensors",
    ]

    model.save_pretrained(tmp_path)  # the uploaded weights are the model's adapter weights
    uploaded = load(upload.files["adapter_model.safetensors"])
    local = load_file(tmp_path / "adapter_model.safetensors")
    assert uploaded.keys() == local.keys() and all(uploaded[key].equal(local[key]) for key in local)
    assert b'"peft_type": "CLIP_ADAPTER"' in upload.files["adapter_config.json"]


def test_pushed_model_card_shows_the_import_tags_and_base_model(hub, model):
    model.push_to_hub(REPO_ID)
    text = hub.uploads[0].files["README.md"].decode()
    card = ModelCard(text)
    assert {"peft", "clip-adapter", f"base_model:adapter:{BASE_ID}"} <= set(card.data.tags)
    assert card.data.base_model == BASE_ID and card.data.library_name == "peft"
    assert "import peft_clip_adapter" in text
    assert f'PeftModel.from_pretrained(base, "{REPO_ID}")' in text  # the snippet loads from the Hub repo
    assert f'CLIPModel.from_pretrained("{BASE_ID}")' in text
    assert "| ratio (residual blend) | 0.6 |" in text


def test_a_local_base_model_and_dataset_stay_out_of_the_card_metadata(hub, tiny_clip, tiny_clip_path, shapes_dir):
    # The Hub rejects a README whose base_model is a local path, so such a push would fail after training.
    assert tiny_clip.name_or_path == str(tiny_clip_path)  # loaded from a local folder
    model = get_peft_model(tiny_clip, CLIPAdapterConfig())
    model.push_to_hub(REPO_ID, card_facts=CardFacts(results={"dataset": str(shapes_dir), "shots": 4}))
    card = ModelCard(hub.uploads[0].files["README.md"].decode())
    assert card.data.base_model is None and card.data.datasets is None
    assert sorted(card.data.tags) == ["clip-adapter", "peft", "transformers"]
    # Nor in the snippet: a path means nothing elsewhere. The card says what to pass instead.
    assert str(tiny_clip_path) not in card.text and 'CLIPModel.from_pretrained("<base model id>")' in card.text
    assert f"| dataset | {shapes_dir} |" in card.text


def test_training_results_appear_in_the_card(hub, model, tmp_path):
    facts = CardFacts(results={"dataset": "shapes", "shots": 4, "accuracy": 0.875})
    model.push_to_hub(REPO_ID, card_facts=facts)
    card = ModelCard(hub.uploads[0].files["README.md"].decode())
    assert card.data.datasets == ["shapes"]
    for row in ("| dataset | shapes |", "| shots | 4 |", "| accuracy | 0.875 |"):
        assert row in card.text
    model.save_pretrained(tmp_path, card_facts=facts)  # a local save writes the same results; its folder is no Hub id
    local = (tmp_path / "README.md").read_text()
    assert "| accuracy | 0.875 |" in local and str(tmp_path) not in local
    assert 'PeftModel.from_pretrained(base, "<this adapter\'s Hub id, or its folder>")' in local
