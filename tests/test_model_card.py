"""The model card never destroys what a user wrote and never lets a user string break it or its snippets."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from peft import get_peft_model

from peft_clip_adapter import CLIPAdapterConfig, FewShotClassifier
from peft_clip_adapter.model_card import BEGIN_MARKER, END_MARKER, CardFacts, render_model_card

# pytest runs with --import-mode=importlib, so tests/ is not on sys.path: load the helpers by path.
_spec = importlib.util.spec_from_file_location("fewshot_helpers", Path(__file__).with_name("fewshot_helpers.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
snippets = helpers.load_module(Path(__file__).with_name("docs_snippets.py"), "docs_snippets")

# peft looks up the (offline, unreachable) base config to see whether embeddings were resized; they never are.
pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")
HOSTILE = 'x\n---\nlicense: evil\n```\nimport os; os.system("rm -rf /")\n"""`|<script>'


def python_blocks(text: str) -> list[str]:
    return [block.code for block in snippets.python_snippets(text)]


@pytest.fixture
def model(tiny_clip):
    return get_peft_model(tiny_clip, CLIPAdapterConfig())


def test_an_existing_card_keeps_the_users_text_and_metadata(model, tmp_path):
    # peft's own test_existing_model_card, which LoRA and IA3 pass.
    (tmp_path / "README.md").write_text("---\nmeta: hello\n---\nThis is a model card\n")
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "meta: hello" in card and "This is a model card" in card

    # The user edits the card around our section; a second save replaces only our section.
    edited = card.replace("This is a model card", "This is my model card").replace("meta: hello", "meta: bye")
    edited += "\n## My notes\n\nKeep me.\n"
    (tmp_path / "README.md").write_text(edited)
    model.peft_config["default"].ratio = 0.7
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.meta == "bye" and card.data.library_name == "peft"
    assert card.text.index("This is my model card") < card.text.index(BEGIN_MARKER)
    assert card.text.rstrip().endswith("## My notes\n\nKeep me.")
    assert card.text.count(BEGIN_MARKER) == card.text.count(END_MARKER) == 1
    assert "| ratio (residual blend) | 0.7 |" in card.text and "| 0.2 |" not in card.text


def test_a_user_license_is_kept_and_a_given_one_is_written(model, tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: cc-by-4.0\n---\nMine.\n")
    model.save_pretrained(tmp_path)
    assert ModelCard.load(tmp_path / "README.md").data.license == "cc-by-4.0"
    model.save_pretrained(tmp_path / "fresh", card_facts=CardFacts(license="mit"))
    assert ModelCard.load(tmp_path / "fresh" / "README.md").data.license == "mit"


def test_the_license_is_inherited_from_the_base_models_card(tiny_clip_path, tmp_path):
    from transformers import CLIPModel

    base = tmp_path / "base"
    CLIPModel.from_pretrained(tiny_clip_path).save_pretrained(base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\nThe base model.\n")
    get_peft_model(CLIPModel.from_pretrained(base), CLIPAdapterConfig()).save_pretrained(tmp_path / "adapter")
    assert ModelCard.load(tmp_path / "adapter" / "README.md").data.license == "apache-2.0"
    (base / "README.md").unlink()  # unknown: no licence rather than a guess
    get_peft_model(CLIPModel.from_pretrained(base), CLIPAdapterConfig()).save_pretrained(tmp_path / "unknown")
    assert ModelCard.load(tmp_path / "unknown" / "README.md").data.license is None


def test_no_local_path_in_the_metadata_or_the_snippets(model, tiny_clip_path, tiny_processor, tmp_path):
    classifier = FewShotClassifier(model, tiny_processor, ["cat", "dog"])
    classifier.save_pretrained(tmp_path / "adapter")
    text = (tmp_path / "adapter" / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.base_model is None and not any(tag.startswith("base_model:") for tag in card.data.tags)
    assert str(tmp_path) not in text and tiny_clip_path not in text
    assert "pass its Hub id (or a local copy of it) where the snippets say `<base model id>`" in text
    usage, peft_usage = python_blocks(text)
    assert (
        'FewShotClassifier.from_pretrained("<this adapter\'s Hub id, or its folder>", base_model="<base model id>")'
        in usage
    )
    assert 'CLIPModel.from_pretrained("<base model id>")' in peft_usage


def test_hostile_strings_are_escaped_or_quoted(tiny_clip, tiny_processor, tmp_path):
    model = get_peft_model(tiny_clip, CLIPAdapterConfig())
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / HOSTILE)  # a folder name
    names = [HOSTILE, "plain", 'quote\'s "both"']
    classifier = FewShotClassifier(model, tiny_processor, names, [HOSTILE.replace("x", "{}", 1)])
    results = {"dataset": HOSTILE, HOSTILE: 0.5, "shots": 4}
    classifier.save_pretrained(tmp_path / "adapter", training_results=results)
    text = (tmp_path / "adapter" / "README.md").read_text()

    card = ModelCard(text)
    assert set(card.data.to_dict()) == {"library_name", "pipeline_tag", "tags"}  # nothing injected; no widget
    assert card.data.license is None
    prose = re.sub(r"^(`{3,})python\n.*?^\1$", "", card.text, flags=re.MULTILINE | re.DOTALL)
    lines = prose.splitlines()
    assert "---" not in lines and not any(line.startswith("import os") for line in lines)
    assert "<script>" not in prose and "```" not in prose  # escaped: \<script\>, \`\`\`
    table = [line for line in lines if line.startswith("| ")]
    assert all(line.count("|") - line.count("\\|") == 3 for line in table)  # two cells in every row
    blocks = python_blocks(text)
    assert len(blocks) == 2
    for code in blocks:
        tree = ast.parse(code)  # still Python, and no statement but ours
        assert all(isinstance(node, (ast.Import, ast.ImportFrom, ast.Assign)) for node in tree.body)
    usage = ast.parse(blocks[0])
    comment = blocks[0].splitlines()[-1]
    listed = comment.removeprefix("# 3 classes: ").removesuffix(" (classifier.class_names)")
    assert ast.literal_eval(listed) == names
    assert [type(node).__name__ for node in usage.body] == ["ImportFrom", "Assign", "Assign"]


def test_class_names_with_commas_leave_the_widget_out():
    facts = CardFacts(class_names=["cats, large", "dogs"], templates=["{}"])
    card = render_model_card(CLIPAdapterConfig(), facts=facts)
    assert card.data.get("widget") is None and "2 classes" in card.text


def test_push_keeps_the_card_already_in_the_repository(model, tiny_clip_path, tmp_path):
    with snippets.offline_hub(tmp_path / "hub", Path(tiny_clip_path)) as hub:
        notes = tmp_path / "notes"
        notes.mkdir()
        (notes / "README.md").write_text("---\nlicense: mit\nmeta: mine\n---\n# My adapter\n\nWritten by hand.\n")
        from huggingface_hub import HfApi

        HfApi().upload_folder(repo_id="me/adapter", folder_path=str(notes))
        model.push_to_hub("me/adapter")
        card = ModelCard.load("me/adapter")
        assert hub.uploads[-1][0] == "me/adapter"
    assert card.data.license == "mit" and card.data.meta == "mine" and card.data.library_name == "peft"
    assert card.text.startswith("# My adapter\n\nWritten by hand.") and BEGIN_MARKER in card.text
    assert re.search(r'PeftModel\.from_pretrained\(base, "me/adapter"\)', card.text)


def test_a_card_written_before_the_markers_is_replaced_not_duplicated(model, tmp_path):
    old = render_model_card(CLIPAdapterConfig())
    old.text = old.text.replace(BEGIN_MARKER + "\n", "").replace("\n" + END_MARKER, "")
    old.save(tmp_path / "README.md")
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.count("# CLIP-Adapter\n") == 1 and text.count(BEGIN_MARKER) == 1


def test_the_card_names_the_task_of_the_base_model_and_no_single_family(tiny_clip, tmp_path):
    from transformers import ClapModel

    from peft_clip_adapter.testing.tiny_models import build_tiny_model

    clap = ClapModel.from_pretrained(build_tiny_model(tmp_path / "clap", family="clap"))
    adapted = get_peft_model(clap, CLIPAdapterConfig(adapt="both"))
    adapted.save_pretrained(tmp_path / "audio")
    card = ModelCard.load(tmp_path / "audio" / "README.md")
    assert card.data.pipeline_tag == "zero-shot-audio-classification"
    assert "CLIP's" not in card.text and "final pooled embedding of each adapted tower" in card.text
    assert "| adapted branch | both |" in card.text and "ClapModel.from_pretrained(" in card.text

    # The image task an earlier version wrote for every adapter is corrected; a task the user chose is kept.
    for written, expected in [
        ("zero-shot-image-classification", "zero-shot-audio-classification"),
        ("audio-classification", "audio-classification"),
    ]:
        card.data.pipeline_tag = written
        card.save(tmp_path / "audio" / "README.md")
        adapted.save_pretrained(tmp_path / "audio")
        assert ModelCard.load(tmp_path / "audio" / "README.md").data.pipeline_tag == expected

    get_peft_model(tiny_clip, CLIPAdapterConfig(adapt="text")).save_pretrained(tmp_path / "image")
    assert ModelCard.load(tmp_path / "image" / "README.md").data.pipeline_tag == "zero-shot-image-classification"
