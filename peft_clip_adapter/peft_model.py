"""``CLIPAdapterPeftModel``: a ``PeftModel`` that saves atomically and keeps its own model card."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from peft import PeftModel
from safetensors import SafetensorError

from peft_clip_adapter.card import CLASS_PROMPTS_FILE, load_card, render_model_card
from peft_clip_adapter.layer import PREFIX


class CLIPAdapterPeftModel(PeftModel):
    """The ``PeftModel`` that ``get_peft_model`` and ``PeftModel.from_pretrained`` return for CLIP-Adapter.

    It is a plain ``PeftModel`` (``isinstance(model, PeftModel)`` holds) with three differences:

    - ``save_pretrained`` writes into a staging folder and moves each finished file into place, so a
      failed save never leaves a half-written file in the target folder;
    - the model card (``README.md``) shows how to load the adapter, including the required
      ``import peft_clip_adapter``, and records ``training_results`` when a training script sets them;
      a card already in the folder (or in the Hub repository) keeps its text and metadata;
    - with ``class_prompts`` set, the class names and templates of the classifier are saved beside the
      adapter (``class_prompts.json``, read by ``FewShotClassifier``);
    - ``push_to_hub`` uploads exactly the saved files, keeping that card (transformers' generic
      ``push_to_hub`` would replace it with a placeholder).

    Example:
        >>> import tempfile, os
        >>> import peft_clip_adapter
        >>> from peft import get_peft_model
        >>> from transformers import CLIPModel
        >>> from peft_clip_adapter.offline import build_tiny_clip
        >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
        >>> model = get_peft_model(clip, peft_clip_adapter.CLIPAdapterConfig())
        >>> model.training_results = {"dataset": "shapes", "shots": 4, "accuracy": 0.9}
        >>> out = tempfile.mkdtemp()
        >>> model.save_pretrained(out)
        >>> sorted(os.listdir(out))
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    """

    #: Facts about training (dataset, shots, accuracy, ...) written into the model card.
    training_results: Optional[dict[str, Any]] = None
    #: ``{"class_names": [...], "templates": [...]}`` of the classifier the adapter was trained for, saved
    #: as ``class_prompts.json`` and shown in the card (``FewShotClassifier`` sets it).
    class_prompts: Optional[dict[str, list[str]]] = None
    #: The card's ``license``; ``None`` keeps the card's own or takes the base model's when it is known.
    license: Optional[str] = None
    # Where the card's usage snippet says the adapter lives; set per save.
    _card_location: Optional[str] = None

    def save_pretrained(self, save_directory: str, is_main_process: bool = True, **kwargs: Any) -> None:
        """Save the adapter(s), config and model card; see ``peft.PeftModel.save_pretrained``.

        Args:
            save_directory: Folder to save into (created if needed); files already there are replaced
                one by one, only once every new file is written.
            is_main_process: ``False`` on the other processes of a distributed run, which write nothing.
            **kwargs: Passed to ``peft.PeftModel.save_pretrained`` (e.g. ``selected_adapters``).

        Returns:
            None.

        Raises:
            ValueError: if ``save_directory`` is an existing file.

        Example:
            >>> import tempfile
            >>> import peft_clip_adapter
            >>> from peft import get_peft_model
            >>> from transformers import CLIPModel
            >>> from peft_clip_adapter.offline import build_tiny_clip
            >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
            >>> model = get_peft_model(clip, peft_clip_adapter.CLIPAdapterConfig())
            >>> model.save_pretrained(f"{tempfile.mkdtemp()}/adapter")
            >>> model.save_pretrained(tempfile.mkstemp()[1])
            Traceback (most recent call last):
            ...
            ValueError: save_directory=... is a file; pass a folder to save the adapter in.
        """
        if not is_main_process:
            return super().save_pretrained(save_directory, is_main_process=False, **kwargs)
        target = Path(save_directory)
        if target.is_file():
            raise ValueError(f"save_directory={str(target)!r} is a file; pass a folder to save the adapter in.")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
        location = self._card_location
        try:
            self._card_location = location or str(save_directory)
            if (target / "README.md").is_file():  # the card updater keeps what a user wrote there
                shutil.copy2(target / "README.md", staging / "README.md")
            super().save_pretrained(str(staging), is_main_process=True, **kwargs)
            if self.class_prompts is not None:
                (staging / CLASS_PROMPTS_FILE).write_text(json.dumps(self.class_prompts, indent=2, ensure_ascii=False))
            _move_files(staging, target)
        finally:
            self._card_location = location
            shutil.rmtree(staging, ignore_errors=True)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        """Load a saved adapter as ``adapter_name``; see ``peft.PeftModel.load_adapter``.

        ``PeftModel.from_pretrained`` and ``AutoPeftModel.from_pretrained`` load through this method too.

        Args:
            model_id: A local folder written by ``save_pretrained``, or a Hub repository id.
            adapter_name: Name the loaded adapter gets in this model.
            *args: Passed to ``peft.PeftModel.load_adapter``.
            **kwargs: Passed to ``peft.PeftModel.load_adapter`` (e.g. ``is_trainable``).

        Returns:
            What ``peft.PeftModel.load_adapter`` returns (the load result of the weights).

        Raises:
            ValueError: if the adapter's weights file cannot be read. Local folders are checked before
                loading (see ``CLIPAdapterConfig.from_pretrained``); this also covers a damaged file
                downloaded from the Hub, which safetensors would report only as a bare parse error.

        Example:
            >>> import tempfile
            >>> import peft_clip_adapter
            >>> from peft import get_peft_model
            >>> from transformers import CLIPModel
            >>> from peft_clip_adapter.offline import build_tiny_clip
            >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
            >>> model = get_peft_model(clip, peft_clip_adapter.CLIPAdapterConfig())
            >>> folder = tempfile.mkdtemp()
            >>> model.save_pretrained(folder)
            >>> _ = model.load_adapter(folder, "second")
            >>> sorted(model.peft_config)
            ['default', 'second']
        """
        try:
            result = super().load_adapter(model_id, adapter_name, *args, **kwargs)
        except SafetensorError as error:
            raise ValueError(
                f"The adapter weights of {str(model_id)!r} are truncated or corrupted ({error}). Save the "
                "adapter again, or download it again (force_download=True) if it came from the Hub."
            ) from error
        # peft keeps the missing keys that contain the adapter name and the prefix as substrings, so a name
        # such as "adapter", "clip" or "down" (inside "clip_adapter_down") also reports every other
        # adapter's weights as missing. Keep only the keys of this adapter's own parameters.
        own_key = re.compile(rf"\.{re.escape(PREFIX)}[^.]*\.{re.escape(adapter_name)}\.[^.]+$")
        missing = [key for key in result.missing_keys if own_key.search(key)]
        result.missing_keys[:] = missing
        return result

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write the model card, or update ours inside the card already there (keeping the user's parts).

        ``save_pretrained`` calls this; the card shows the ``import peft_clip_adapter`` needed to load the
        adapter, the classifier's classes (``class_prompts``) and the ``training_results`` when set. Text
        outside our marked section and metadata fields we do not set are left as they were.

        Args:
            output_dir: Folder that receives (or already holds) ``README.md``.

        Returns:
            None.

        Raises:
            OSError: if ``output_dir`` does not exist or cannot be written.

        Example:
            >>> import tempfile
            >>> import peft_clip_adapter
            >>> from peft import get_peft_model
            >>> from transformers import CLIPModel
            >>> from peft_clip_adapter.offline import build_tiny_clip
            >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
            >>> model = get_peft_model(clip, peft_clip_adapter.CLIPAdapterConfig())
            >>> folder = tempfile.mkdtemp()
            >>> model.create_or_update_model_card(folder)
            >>> "import peft_clip_adapter" in open(f"{folder}/README.md").read()
            True
        """
        # Not peft's own card: it fills a new card with an empty template, and it would write a local
        # path as base_model, which the Hub refuses.
        path = os.path.join(output_dir, "README.md")
        config = self.active_peft_config
        base = self.get_base_model()
        prompts = self.class_prompts or {}
        card = render_model_card(
            config,
            base_model=config.base_model_name_or_path or getattr(base, "name_or_path", None) or None,
            repo_id=self._card_location,
            base_model_class=type(base).__name__,
            results=self.training_results,
            existing=load_card(path),
            class_names=prompts.get("class_names"),
            templates=prompts.get("templates"),
            license=self.license,
            # As peft's own card: the base model's tags (ours among them) and "transformers".
            tags=[*(getattr(base, "model_tags", None) or []), *self._get_peft_specific_model_tags()],
        )
        card.save(path)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: Optional[str] = None,
        commit_description: Optional[str] = None,
        private: Optional[bool] = None,
        token: Optional[bool | str] = None,
        revision: Optional[str] = None,
        create_pr: bool = False,
        **save_kwargs: Any,
    ) -> Any:
        """Upload the adapter, its config and its model card to the Hub repository ``repo_id``.

        Exactly the files ``save_pretrained`` writes are uploaded, in one commit. A card already in the
        repository keeps its text outside our section, and its metadata.

        Args:
            repo_id: ``"user/name"``; the repository is created if it does not exist.
            commit_message: Defaults to ``"Upload CLIP-Adapter"``.
            commit_description: Optional longer description of the commit.
            private: Visibility of a newly created repository.
            token: Hub token; ``None`` uses the logged-in one.
            revision: Branch to push to.
            create_pr: Open a pull request instead of committing to the branch.
            **save_kwargs: Passed to ``save_pretrained``.

        Returns:
            The ``huggingface_hub.CommitInfo`` of the upload.

        Raises:
            huggingface_hub.errors.HfHubHTTPError: if the Hub refuses to create or write the repository.

        Example:
            The upload needs the network, so the example is not run here (the tests intercept it):

            >>> model.training_results = {"dataset": "eurosat", "shots": 16, "accuracy": 0.84}  # doctest: +SKIP
            >>> model.push_to_hub("me/clip-adapter-eurosat")  # doctest: +SKIP
        """
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            existing = _hub_card(repo_id, revision=revision, token=token)
            if existing is not None:
                shutil.copy2(existing, os.path.join(folder, "README.md"))
            self._card_location = repo_id
            try:
                self.save_pretrained(folder, **save_kwargs)
            finally:
                self._card_location = None
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload CLIP-Adapter",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )


def _hub_card(repo_id: str, *, revision: Optional[str], token: Optional[bool | str]) -> Optional[str]:
    """The local path of the repository's current ``README.md``, or ``None`` when it has none."""
    try:
        return hf_hub_download(repo_id, "README.md", revision=revision, token=token)
    except EntryNotFoundError:  # also raised offline when the card is not cached: nothing to keep then
        return None


def _allow_in_zero_shot_pipeline() -> None:
    """List our ``PeftModel`` class among the models transformers' zero-shot image pipeline accepts.

    The pipeline checks the model's class name against a table and logs an ERROR for any other class,
    though an adapted model works there unchanged. transformers keeps the PEFT wrapper classes each
    pipeline accepts in ``SUPPORTED_PEFT_TASKS``; it is mutated in place, idempotently.
    """
    from transformers.pipelines import base as pipelines_base

    accepted = pipelines_base.SUPPORTED_PEFT_TASKS.setdefault("zero-shot-image-classification", [])
    if CLIPAdapterPeftModel.__name__ not in accepted:
        accepted.append(CLIPAdapterPeftModel.__name__)


def _move_files(source: Path, target: Path) -> None:
    """Move every file under ``source`` to the same relative place under ``target``.

    ``os.replace`` is atomic within a file system (the staging folder is a sibling of ``target``), so
    each file in ``target`` is either the old one or the complete new one.
    """
    for path in sorted(source.rglob("*")):
        if path.is_file():
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)
