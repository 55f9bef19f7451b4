"""``CLIPAdapterPeftModel``: a ``PeftModel`` that saves atomically as a set and writes its own model card."""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Optional

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled
from peft import PeftConfig, PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError

from peft_clip_adapter.adapter_checks import (
    check_adapter_folder,
    check_adapter_name,
    check_weights_file,
    loading_source,
    weights_path,
)
from peft_clip_adapter.atomic import fsync_tree, staging_folder
from peft_clip_adapter.config import CLIPAdapterConfig
from peft_clip_adapter.families import find_towers
from peft_clip_adapter.layer import PREFIX
from peft_clip_adapter.manifest import MANIFEST_NAME, apply_default_permissions, write_manifest
from peft_clip_adapter.model_card import CardFacts, load_card, render_model_card

try:  # POSIX: saves into one folder take turns; elsewhere they are still atomic per file, as a set by the manifest.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CARD_NAME = "README.md"
_PLAIN_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class CLIPAdapterPeftModel(PeftModel):
    """The ``PeftModel`` that ``get_peft_model`` and ``PeftModel.from_pretrained`` return for CLIP-Adapter.

    A plain ``PeftModel`` (``isinstance(model, PeftModel)`` holds) whose ``save_pretrained`` writes a set
    that loads whole or not at all (staged, recorded in ``adapter_manifest.json``, moved in manifest first,
    usual file permissions), with a model card showing the ``import peft_clip_adapter`` loading needs (a card
    already there keeps its text and metadata); whose ``push_to_hub`` uploads exactly those files; and whose
    ``load_adapter`` checks a saved adapter whole before loading it.
    """

    # Set by peft_integration.register(): whether peft's from_pretrained built this model for the load failing.
    _built_by_this_load: ClassVar[Callable[[PeftModel], bool]] = staticmethod(lambda model: False)
    # Where the card's usage snippet says the adapter lives, and its facts; set for one save.
    _card_location: Optional[str] = None
    _card_facts: CardFacts = CardFacts()

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        *,
        extra_files: Optional[Mapping[str, str | bytes]] = None,
        card_facts: Optional[CardFacts] = None,
        **kwargs: Any,
    ) -> None:
        """Save the adapter(s), config and model card, as one set; see ``peft.PeftModel.save_pretrained``.

        Other files in ``save_directory`` (a trainer's results, ...) are left alone. Whenever the process dies,
        the folder holds the old save, the new one, or a mix that loading refuses: never a mix that loads.

        Args:
            extra_files: ``{file name: text or bytes}`` saved beside the adapter, in the same checked set (e.g. a
                classifier's ``class_prompts.json``).
            card_facts: What the model card shows beyond the adapter: training results, classes, licence.
            **kwargs: Passed to peft (e.g. ``selected_adapters``, ``safe_serialization``).
        """
        if not self.peft_config:
            raise ValueError(
                "This PeftModel holds no adapter (delete_adapter removed the last one), so there is nothing to "
                "save. Add one with add_adapter(name, config) or load_adapter(path, name) first."
            )
        for name in kwargs.get("selected_adapters") or self.peft_config:
            check_adapter_name(name)
        _check_extra_files(extra_files or {}, self.peft_config)
        if card_facts is not None and not isinstance(card_facts, CardFacts):
            raise ValueError(f"card_facts must be a peft_clip_adapter.model_card.CardFacts, got {card_facts!r}.")
        if not is_main_process:
            return super().save_pretrained(save_directory, is_main_process=False, **kwargs)
        target = Path(save_directory)
        if target.is_file():
            raise ValueError(f"save_directory={str(target)!r} is a file; pass a folder to save the adapter in.")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as error:
            raise ValueError(
                f"save_directory={str(target)!r} cannot be created: {error.filename} is a file, not a folder."
            ) from error
        try:
            with staging_folder(target) as staging, self._card(self._card_location or str(target), card_facts):
                if (target / CARD_NAME).is_file():  # the card updater keeps what a user wrote there
                    shutil.copy2(target / CARD_NAME, staging / CARD_NAME)
                super().save_pretrained(str(staging), is_main_process=True, **kwargs)
                for name, content in (extra_files or {}).items():
                    (staging / name).write_bytes(content.encode() if isinstance(content, str) else content)
                _commit_save(staging, target)
        except OSError as error:
            if str(target) in str(error):
                raise
            raise OSError(
                error.errno,
                f"Could not save the adapter in {target}: {error.strerror or error}. The folder keeps the previous "
                "save, or a mix of two that loading refuses: free the space (or fix the cause) and save again.",
            ) from error

    @contextlib.contextmanager
    def _card(self, location: str, facts: Optional[CardFacts]) -> Iterator[None]:
        saved = self._card_location, self._card_facts
        self._card_location, self._card_facts = location, facts or CardFacts()
        try:
            yield
        finally:
            self._card_location, self._card_facts = saved

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, *args: Any, **kwargs: Any) -> None:
        """``peft.PeftModel.add_adapter``, refusing a name that is not a plain folder name."""
        check_adapter_name(adapter_name)
        return super().add_adapter(adapter_name, peft_config, *args, **kwargs)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        """``peft.PeftModel.load_adapter`` (behind ``PeftModel.from_pretrained`` and ``AutoPeftModel`` too), with the
        saved adapter checked whole first.

        Raises ``ValueError`` naming the file and the fix, before anything is loaded: a folder mixing two saves, a
        damaged or foreign config, missing or damaged weights, a pickle the weights-only unpickler refuses,
        non-float or NaN weights, keys beyond the adapter's, another ``reduction``, branch or embedding width.
        A refused load leaves the model (and the base model under a refused ``from_pretrained``) as it was.
        """
        check_adapter_name(adapter_name)
        new = adapter_name not in self.peft_config
        try:
            hub_kwargs, _ = self._split_kwargs(kwargs)
            source, saved = _check_saved_adapter(model_id, hub_kwargs)
            if not new:
                _warn_if_config_differs(self.peft_config[adapter_name], saved, adapter_name, source)
            with loading_source(source):
                result = super().load_adapter(model_id, adapter_name, *args, **kwargs)
        except Exception as error:
            if new and adapter_name in self.peft_config:
                self.delete_adapter(adapter_name)  # added by this call: a refused load leaves the model as it was
            elif not new and self._built_by_this_load(self):
                self.base_model.unload()  # the caller never gets this model: give its base model back as it was
            if isinstance(error, SafetensorError):
                raise ValueError(
                    f"The adapter weights of {str(model_id)!r} are truncated or corrupted ({error}). Save the "
                    "adapter again, or download it again (force_download=True) if it came from the Hub."
                ) from error
            raise
        # peft keeps the missing keys that contain the adapter name and the prefix as substrings, so a name
        # such as "adapter", "clip" or "down" (inside "clip_adapter_down") also reports every other
        # adapter's weights as missing. Keep only the keys of this adapter's own parameters.
        own_key = re.compile(rf"\.{re.escape(PREFIX)}[^.]*\.{re.escape(adapter_name)}\.[^.]+$")
        missing = [key for key in result.missing_keys if own_key.search(key)]
        result.missing_keys[:] = missing
        return result

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write our model card into ``output_dir``, or update our section of the card there (keeping the rest)."""
        # Not peft's own card: it fills a new card with an empty template, and it would write a local
        # path as base_model, which the Hub refuses.
        path = os.path.join(output_dir, CARD_NAME)
        config = self.active_peft_config
        base = self.get_base_model()
        card = render_model_card(
            config,
            base_model=config.base_model_name_or_path or getattr(base, "name_or_path", None) or None,
            repo_id=self._card_location,
            base_model_class=type(base).__name__,
            existing=load_card(path),
            facts=self._card_facts,
            # As peft's own card: the base model's tags (ours among them) and "transformers".
            tags=[*(getattr(base, "model_tags", None) or []), *self._get_peft_specific_model_tags()],
            branches=sorted({tower.branch for tower in find_towers(base).values()}),
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
        """Upload exactly what ``save_pretrained(**save_kwargs)`` writes to ``repo_id``, in one commit.

        The repository is created if needed; a card already there keeps its text outside our section and its
        metadata. Returns the ``huggingface_hub.CommitInfo``.
        """

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            existing = _hub_card(repo_id, revision=revision, token=token)
            if existing is not None:
                shutil.copy2(existing, os.path.join(folder, "README.md"))
            location, self._card_location = self._card_location, repo_id
            try:
                self.save_pretrained(folder, **save_kwargs)
            finally:
                self._card_location = location
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


def _with_extra_files(staging: Path) -> set[Path]:
    """The staging folder itself when it holds files besides adapters (``extra_files`` of a selected adapter)."""
    return {staging} if any(path.is_file() and path.name != CARD_NAME for path in staging.iterdir()) else set()


def _check_extra_files(extra_files: Mapping[str, Any], adapter_names: Any) -> None:
    reserved = {CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, MANIFEST_NAME, CARD_NAME, *adapter_names}
    for name, content in extra_files.items():
        if not isinstance(name, str) or not _PLAIN_FILE.fullmatch(name) or name in reserved:
            raise ValueError(
                f"extra_files name {name!r} must be a plain file name (no folder, not hidden) other than the "
                f"adapter's own files and sub-folders {sorted(reserved)}."
            )
        if not isinstance(content, (str, bytes)):
            raise ValueError(f"extra_files[{name!r}] must be str or bytes, got {type(content).__name__}.")


def _check_saved_adapter(model_id: str | os.PathLike, hub_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check a saved adapter (folder or Hub repository) whole before any of it is loaded; returns the weights
    file's path (for messages) and the saved config's fields."""
    subfolder = hub_kwargs.get("subfolder")
    folder = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    if os.path.isdir(folder):
        # The folder against its manifest, the config, and the weights when present (see from_pretrained).
        config = CLIPAdapterConfig.from_pretrained(os.fspath(model_id), subfolder=subfolder).to_dict()
        path = weights_path(folder)
        if path is None:  # a config-only folder, or a foreign pickle: no weights to load
            check_adapter_folder(folder, require_weights=True)
        return os.fspath(path), config
    accepted = inspect.signature(hf_hub_download).parameters
    download = {key: value for key, value in hub_kwargs.items() if key in accepted and key != "filename"}
    config = CLIPAdapterConfig.from_json_file(hf_hub_download(str(model_id), CONFIG_NAME, **download))
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):  # peft's order
        try:
            path = hf_hub_download(str(model_id), name, **download)
        except (EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
            missing = error
            continue
        check_weights_file(path, config["reduction"])
        return path, config
    raise ValueError(
        f"{model_id} has neither {SAFETENSORS_WEIGHTS_NAME} nor {WEIGHTS_NAME} that can be read here "
        f"({type(missing).__name__}): check the repository (and, offline, that it was downloaded)."
    ) from missing


def _warn_if_config_differs(current: PeftConfig, saved: dict[str, Any], adapter_name: str, source: str) -> None:
    """Loading into an existing adapter keeps its config (peft's rule); say so when the saved one differs."""
    fields = ("ratio", "reduction", "target_modules")
    differ = [
        f"{name} {getattr(current, name)!r} (saved: {saved.get(name)!r})"
        for name in fields
        if getattr(current, name) != saved.get(name)
    ]
    if differ:
        warnings.warn(
            f"Loading {source} into the existing adapter {adapter_name!r}, which keeps its own config: "
            f"{', '.join(differ)}. To use the saved config, load it under a new adapter_name.",
            UserWarning,
            stacklevel=3,
        )


def _commit_save(staging: Path, target: Path) -> None:
    """Move a finished save from ``staging`` into ``target`` so that a mix of two saves never loads.

    Each adapter folder (``target``, and a sub-folder per extra adapter) gets ``adapter_manifest.json`` listing
    its new files; the manifest moves first, then the files (``os.replace`` is atomic within one file system,
    and the staging folder is a sibling of ``target``), then the model card. Until the last file has moved, the
    folder does not match its manifest, which the loaders check.
    """
    apply_default_permissions(staging)
    folders = sorted({path.parent for path in staging.rglob(CONFIG_NAME)} | _with_extra_files(staging))
    for folder in folders:
        write_manifest(folder, [path.name for path in folder.iterdir() if path.is_file() and path.name != CARD_NAME])
    fsync_tree(staging)  # the data is on disk before any rename makes it visible
    target.mkdir(exist_ok=True)
    with _exclusive(target):
        for folder in folders:
            destination = target / folder.relative_to(staging)
            destination.mkdir(parents=True, exist_ok=True)
            os.replace(folder / MANIFEST_NAME, destination / MANIFEST_NAME)
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.name != CARD_NAME:
                    os.replace(path, destination / path.name)
            fsync_tree(destination, recursive=False)
        for path in sorted(staging.rglob("*")):  # the model card, last
            if path.is_file():
                destination = target / path.relative_to(staging)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, destination)
        fsync_tree(target, recursive=False)


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (POSIX ``flock``), so two saves into it move their files in turns."""
    if fcntl is None:
        yield
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock
