"""``CLIPAdapterPeftModel``: a ``PeftModel`` that saves atomically and keeps its own model card."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from peft import PeftConfig, PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError

from peft_clip_adapter.adapter_checks import (
    check_adapter_folder,
    check_adapter_name,
    check_weights_file,
    loading_source,
)
from peft_clip_adapter.config import CLIPAdapterConfig
from peft_clip_adapter.families import find_towers
from peft_clip_adapter.layer import PREFIX
from peft_clip_adapter.manifest import MANIFEST_NAME, apply_default_permissions, write_manifest
from peft_clip_adapter.model_card import CLASS_PROMPTS_FILE, load_card, render_model_card

try:  # POSIX: saves into one folder take turns; elsewhere they are still atomic per file, as a set by the manifest.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CARD_NAME = "README.md"


class CLIPAdapterPeftModel(PeftModel):
    """The ``PeftModel`` that ``get_peft_model`` and ``PeftModel.from_pretrained`` return for CLIP-Adapter.

    It is a plain ``PeftModel`` (``isinstance(model, PeftModel)`` holds) with these differences:

    - ``save_pretrained`` writes into a staging folder, records the new files in ``adapter_manifest.json``
      and moves them into place manifest first, so a failed or killed save never leaves a half-written
      file, and a folder that mixes two saves is refused on load instead of loading as a wrong model;
      saved files get the usual permissions (``0644`` under the usual umask);
    - the model card (``README.md``) shows how to load the adapter, including the required
      ``import peft_clip_adapter``, and records ``training_results`` when a training script sets them;
      a card already in the folder (or in the Hub repository) keeps its text and metadata;
    - with ``class_prompts`` set, the class names and templates of the classifier are saved beside the
      adapter (``class_prompts.json``, read by ``FewShotClassifier``);
    - ``push_to_hub`` uploads exactly the saved files, keeping that card (transformers' generic
      ``push_to_hub`` would replace it with a placeholder);
    - ``load_adapter`` (and so ``PeftModel.from_pretrained`` and ``AutoPeftModel``) checks the saved
      folder before loading it, and adapter names must be plain names.

    Example:
        >>> import tempfile, os
        >>> import peft_clip_adapter
        >>> from peft import get_peft_model
        >>> from transformers import CLIPModel
        >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip
        >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
        >>> model = get_peft_model(clip, peft_clip_adapter.CLIPAdapterConfig())
        >>> model.training_results = {"dataset": "shapes", "shots": 4, "accuracy": 0.9}
        >>> out = tempfile.mkdtemp()
        >>> model.save_pretrained(out)
        >>> sorted(os.listdir(out))
        ['README.md', 'adapter_config.json', 'adapter_manifest.json', 'adapter_model.safetensors']
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

        The files are written into a staging folder beside ``save_directory``, their SHA-256 digests
        recorded in ``adapter_manifest.json``, then moved into ``save_directory`` manifest first. Other files there
        (a trainer's results, checkpoints, ...) are left alone. Whenever the process dies, the folder holds
        the old adapter, the new one, or a mix that loading refuses as an interrupted save: never a mix
        that loads.

        Args:
            save_directory: Folder to save into (created if needed).
            is_main_process: ``False`` on the other processes of a distributed run, which write nothing.
            **kwargs: Passed to ``peft.PeftModel.save_pretrained`` (e.g. ``selected_adapters``).

        Returns:
            None.

        Raises:
            ValueError: if ``save_directory`` is an existing file, the model holds no adapter, or an adapter
                name is not a plain name (it names a sub-folder).

        Example:
            >>> import tempfile
            >>> import peft_clip_adapter
            >>> from peft import get_peft_model
            >>> from transformers import CLIPModel
            >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip
            >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
            >>> model = get_peft_model(clip, peft_clip_adapter.CLIPAdapterConfig())
            >>> model.save_pretrained(f"{tempfile.mkdtemp()}/adapter")
            >>> model.save_pretrained(tempfile.mkstemp()[1])
            Traceback (most recent call last):
            ...
            ValueError: save_directory=... is a file; pass a folder to save the adapter in.
        """
        if not self.peft_config:
            raise ValueError(
                "This PeftModel holds no adapter (delete_adapter removed the last one), so there is nothing to "
                "save. Add one with add_adapter(name, config) or load_adapter(path, name) first."
            )
        for name in kwargs.get("selected_adapters") or self.peft_config:
            check_adapter_name(name)
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
        _remove_abandoned_staging(target)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
        location = self._card_location
        try:
            self._card_location = location or str(save_directory)
            if (target / CARD_NAME).is_file():  # the card updater keeps what a user wrote there
                shutil.copy2(target / CARD_NAME, staging / CARD_NAME)
            super().save_pretrained(str(staging), is_main_process=True, **kwargs)
            if self.class_prompts is not None:
                (staging / CLASS_PROMPTS_FILE).write_text(json.dumps(self.class_prompts, indent=2, ensure_ascii=False))
            _commit_save(staging, target)
        finally:
            self._card_location = location
            shutil.rmtree(staging, ignore_errors=True)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, *args: Any, **kwargs: Any) -> None:
        """Add a new, freshly initialised adapter; see ``peft.PeftModel.add_adapter``.

        Args:
            adapter_name: A plain name (letters, digits, ``_``, ``-``): ``save_pretrained`` writes the adapter
                into a sub-folder of that name.
            peft_config: Its ``CLIPAdapterConfig``.
            *args: Passed to ``peft.PeftModel.add_adapter``.
            **kwargs: Passed to ``peft.PeftModel.add_adapter``.

        Returns:
            None.

        Raises:
            ValueError: if ``adapter_name`` is not a plain name or already exists.

        Example:
            >>> import tempfile
            >>> import peft_clip_adapter
            >>> from peft import get_peft_model
            >>> from transformers import CLIPModel
            >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip
            >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
            >>> model = get_peft_model(clip, peft_clip_adapter.CLIPAdapterConfig())
            >>> model.add_adapter("/tmp/elsewhere", peft_clip_adapter.CLIPAdapterConfig())
            Traceback (most recent call last):
            ...
            ValueError: adapter_name='/tmp/elsewhere' is not a plain name: ...
        """
        check_adapter_name(adapter_name)
        return super().add_adapter(adapter_name, peft_config, *args, **kwargs)

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
            ValueError: naming the file and the fix, before anything is loaded, if ``adapter_name`` is not a
                plain name, or the saved adapter is not whole and sound: a folder mixing two saves, a damaged
                or foreign config, weights missing, a pickle, damaged, non-float, NaN / Inf, with keys other
                than the adapter's (which would overwrite base weights), or of another ``reduction``; and, as
                they are loaded, if they do not fit this model (another projection width or branch). Hub
                downloads are checked the same way.

        Example:
            >>> import tempfile
            >>> import peft_clip_adapter
            >>> from peft import get_peft_model
            >>> from transformers import CLIPModel
            >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip
            >>> clip = CLIPModel.from_pretrained(build_tiny_clip(tempfile.mkdtemp()))
            >>> model = get_peft_model(clip, peft_clip_adapter.CLIPAdapterConfig())
            >>> folder = tempfile.mkdtemp()
            >>> model.save_pretrained(folder)
            >>> _ = model.load_adapter(folder, "second")
            >>> sorted(model.peft_config)
            ['default', 'second']
        """
        check_adapter_name(adapter_name)
        hub_kwargs, _ = self._split_kwargs(kwargs)
        source, saved = _check_saved_adapter(model_id, hub_kwargs)
        new = adapter_name not in self.peft_config
        if not new:
            _warn_if_config_differs(self.peft_config[adapter_name], saved, adapter_name, source)
        try:
            with loading_source(source):
                result = super().load_adapter(model_id, adapter_name, *args, **kwargs)
        except Exception as error:
            if new and adapter_name in self.peft_config:
                self.delete_adapter(adapter_name)  # added by this call: a refused load leaves the model as it was
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
            >>> from peft_clip_adapter.testing.tiny_models import build_tiny_clip
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


def _check_saved_adapter(model_id: str | os.PathLike, hub_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check a saved adapter (local folder or Hub repository) as a whole before any of it is loaded.

    Returns the weights file's path (which messages of the checks that need the model then name) and the
    saved config's fields.
    """
    subfolder = hub_kwargs.get("subfolder")
    folder = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    if os.path.isdir(folder):
        # The folder against its manifest, the config, and the weights when present (see from_pretrained).
        config = CLIPAdapterConfig.from_pretrained(os.fspath(model_id), subfolder=subfolder).to_dict()
        path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        if not os.path.isfile(path):  # a config-only folder, or a pickle: no weights to load
            check_adapter_folder(folder, require_weights=True)
        return path, config
    accepted = inspect.signature(hf_hub_download).parameters
    download = {key: value for key, value in hub_kwargs.items() if key in accepted and key != "filename"}
    config = CLIPAdapterConfig.from_json_file(hf_hub_download(str(model_id), CONFIG_NAME, **download))
    try:
        path = hf_hub_download(str(model_id), SAFETENSORS_WEIGHTS_NAME, **download)
    except (EntryNotFoundError, LocalEntryNotFoundError) as error:
        raise ValueError(
            f"{model_id} has no {SAFETENSORS_WEIGHTS_NAME} that can be read here ({type(error).__name__}): check "
            "the repository (and, offline, that it was downloaded). Pickled weights (adapter_model.bin) are never "
            "loaded: unpickling a file can run any code in it."
        ) from error
    check_weights_file(path, config["reduction"])
    return path, config


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


def _staging_prefix(target: Path) -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    return f".{target.name}.saving-{host}-{os.getpid()}-"


def _remove_abandoned_staging(target: Path) -> None:
    """Remove staging folders that saves killed on this host left beside ``target`` (their process is gone)."""
    pattern = re.compile(re.escape(_staging_prefix(target).rsplit("-", 2)[0]) + r"-(\d+)-")
    for path in target.parent.glob(f".{target.name}.saving-*"):
        match = pattern.match(path.name)
        if match and path.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def _commit_save(staging: Path, target: Path) -> None:
    """Move a finished save from ``staging`` into ``target`` so that a mix of two saves never loads.

    Each adapter folder (``target`` and a sub-folder per extra adapter) gets ``adapter_manifest.json``
    listing its new files; the manifest moves first, then the files (``os.replace`` is atomic within one
    file system, and the staging folder is a sibling of ``target``), then the model card. Until the last
    file has moved, the folder does not match its manifest, which the loaders check.
    """
    apply_default_permissions(staging)
    folders = sorted(path.parent for path in staging.rglob(CONFIG_NAME))
    for folder in folders:
        write_manifest(folder, [path.name for path in folder.iterdir() if path.is_file() and path.name != CARD_NAME])
    for path in staging.rglob("*"):
        if path.is_file():
            _fsync(path)  # the data is on disk before any rename makes it visible
    target.mkdir(exist_ok=True)
    with _exclusive(target):
        for folder in folders:
            destination = target / folder.relative_to(staging)
            destination.mkdir(parents=True, exist_ok=True)
            os.replace(folder / MANIFEST_NAME, destination / MANIFEST_NAME)
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.name != CARD_NAME:
                    os.replace(path, destination / path.name)
            _fsync(destination)
        for path in sorted(staging.rglob("*")):  # the model card, last
            if path.is_file():
                destination = target / path.relative_to(staging)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, destination)
        _fsync(target)


def _fsync(path: Path) -> None:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. folders on Windows
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


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
