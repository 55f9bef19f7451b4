"""peft's own generic tests, run against CLIP-Adapter on a tiny ``CLIPModel``.

The tests are peft's, unchanged: ``PeftCommonTester`` (``tests/testing_common.py``), the custom-model tests
(``tests/test_custom_models.py``) and the config tests (``tests/test_config.py``) from the source
distribution of the installed peft release. This module imports them and parametrises every test that peft
parametrises over its methods' cases with this method's cases instead. Only fixtures are adapted, no
assertion: the model and its inputs, a saved CLIP-Adapter config in place of a LoRA on the Hub, and peft's
helpers that know, per method, how to make an adapter non-identity, which methods merge and which parameter
prefix a method has (the copied tests see these through ``overrides``).

The source distribution is looked up as ``peft-<installed version>.tar.gz`` in ``$PEFT_SDIST_DIR`` (``.ci/run``
downloads it there) or, when that variable is unset, in ``~/.cache/peft-clip-adapter``, where it is
downloaded with ``pip download`` when missing. Without it (no network, no cache) the module is skipped with
the reason; with ``$PEFT_SDIST_DIR`` set, a missing file is an error instead, so CI cannot pass without it.
The tests must exist when pytest collects them, so this happens at import, not in a fixture.

Left out, with the reason:
- every peft test not parametrised over peft's method cases: those test a named method (LoRA, DoRA, IA3, ...)
  or peft's own example models, not the contract every method keeps;
- the tests in ``SKIPPED``, for every case;
- the rest of each test at the point where it would merge (``_skip_if_merging_not_supported``): test_merge_layers,
  test_merge_layers_fp16, test_merge_layers_is_idempotent, test_merge_layers_is_deterministic_in_train_mode,
  test_safe_merge, test_disable_adapters_with_merging, test_delete_merged_adapter_raises_without_mutation,
  test_delete_merged_adapter_only_rejects_the_merged_one, and the fp16 / bf16 forward tests after their forward;
- peft's own skips for methods without a ``bias`` option (test_disable_adapter_with_bias_warns, ...).
``-rs`` shows every skip with its reason.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import peft
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from peft_clip_adapter import CLIPAdapterConfig
from peft_clip_adapter.layer import PREFIX

# Warnings peft gives on its way through its own tests: "tiny-clip" names no Hub model, so peft's check for
# resized embeddings finds no config to compare with; and deleting the active adapter says which one is next.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Could not find a config file in tiny-clip:UserWarning"),
    pytest.mark.filterwarnings("ignore:Adapter delete_me was active which is now deleted:UserWarning"),
]

_SDIST_ENV = "PEFT_SDIST_DIR"
_PACKAGE = "peft_upstream_tests"  # the name peft's tests/ folder is imported under


def _sdist_folder() -> Path:
    explicit = os.environ.get(_SDIST_ENV)
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "peft-clip-adapter"


def _download(version: str, folder: Path) -> str | None:
    """``pip download`` peft's source distribution into ``folder``; the error text when that fails."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
        "--retries", "1", "--timeout", "30", "--disable-pip-version-check", "-q",
        f"peft=={version}", "-d", str(folder),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["no output"])[-1]


def _peft_tests_folder() -> Path:
    """peft's ``tests/`` folder for the installed version, extracted from its source distribution."""
    version = peft.__version__
    folder = _sdist_folder()
    archive = folder / f"peft-{version}.tar.gz"
    if not archive.is_file():
        if os.environ.get(_SDIST_ENV):
            pytest.fail(f"${_SDIST_ENV}={folder} has no {archive.name}; run `.ci/run` or download it there.")
        folder.mkdir(parents=True, exist_ok=True)
        error = _download(version, folder)
        if error is not None or not archive.is_file():
            pytest.skip(
                f"peft's generic tests need peft's source distribution {archive.name}, which could not be "
                f"downloaded ({error}); set ${_SDIST_ENV} to a folder holding it.",
                allow_module_level=True,
            )
    extracted = folder / f"peft-{version}"
    tests = extracted / "tests"
    if not (tests / "testing_common.py").is_file():
        with tarfile.open(archive) as sdist:
            members = [m for m in sdist.getmembers() if m.name.startswith(f"peft-{version}/tests/")]
            sdist.extractall(folder, members=members, filter="data")
    return tests


def _import_peft_tests() -> types.SimpleNamespace:
    """Import peft's test modules as the package ``peft_upstream_tests`` (they import each other relatively)."""
    pytest.register_assert_rewrite(_PACKAGE)  # peft's asserts then report values, as in peft's own runs
    package = types.ModuleType(_PACKAGE)
    package.__path__ = [str(_peft_tests_folder())]
    sys.modules.setdefault(_PACKAGE, package)
    # testing_common.py imports diffusers' StableDiffusionPipeline for its Stable Diffusion tests, which are
    # not run here: a stand-in module serves that import only, and is removed again.
    stand_in = None
    if importlib.util.find_spec("diffusers") is None:
        stand_in = types.ModuleType("diffusers")
        stand_in.StableDiffusionPipeline = None
        sys.modules["diffusers"] = stand_in
    try:
        return types.SimpleNamespace(
            common=importlib.import_module(f"{_PACKAGE}.testing_common"),
            custom=importlib.import_module(f"{_PACKAGE}.test_custom_models"),
            config=importlib.import_module(f"{_PACKAGE}.test_config"),
        )
    finally:
        if stand_in is not None:
            sys.modules.pop("diffusers", None)


upstream = _import_peft_tests()


# --- The model and its inputs -----------------------------------------------------------------------------


def _tiny_clip_config() -> CLIPConfig:
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
    return CLIPConfig(
        text_config={**tower, "vocab_size": 40, "max_position_embeddings": 12, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={**tower, "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )


class LogitsCLIPModel(CLIPModel):
    """A ``CLIPModel`` shaped like peft's custom test models: forward returns a tensor, ``dtype`` is settable."""

    def forward(self, **inputs):
        return super().forward(**inputs).logits_per_image  # [images, texts]: peft's tests compare tensors

    @property
    def dtype(self) -> torch.dtype:
        return CLIPModel.dtype.fget(self)

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:
        # peft's fp16/bf16 tests load in that dtype, then assign it, as a plain nn.Module allows.
        if value != self.dtype:
            raise ValueError(f"The model is in {self.dtype}; load it with dtype={value} instead of assigning it.")


class TinyCLIP:
    """peft's tests build models with ``transformers_class.from_pretrained(model_id, dtype=...)``."""

    @classmethod
    def from_pretrained(cls, model_id: str, dtype: torch.dtype | None = None) -> LogitsCLIPModel:
        if model_id != "tiny-clip":
            raise ValueError(f"Unknown model_id {model_id!r}; the cases use 'tiny-clip'.")
        torch.manual_seed(0)  # the same weights on every call, as peft's own test models
        model = LogitsCLIPModel(_tiny_clip_config()).to(dtype or torch.float32).eval()
        # As transformers' from_pretrained sets them: peft writes them to the config and the card's base_model.
        model.name_or_path = model.config.name_or_path = model_id
        return model


def _inputs(device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, 40, (3, 6), generator=generator).to(device),
        "attention_mask": torch.ones(3, 6, dtype=torch.long, device=device),
        "pixel_values": torch.randn(2, 3, 16, 16, generator=generator).to(device),
    }


# --- This method's cases -----------------------------------------------------------------------------------

#: ``(test_name, model_id, config_cls, config_kwargs)``, as peft's ``TEST_CASES`` of test_custom_models.py.
TEST_CASES = [
    ("vision adapter", "tiny-clip", CLIPAdapterConfig, {}),
    ("text adapter", "tiny-clip", CLIPAdapterConfig, {"adapt": "text", "ratio": 0.5}),
    ("both adapters", "tiny-clip", CLIPAdapterConfig, {"adapt": "both", "reduction": 2}),
    ("explicit target", "tiny-clip", CLIPAdapterConfig, {"target_modules": ["visual_projection"]}),
]
#: ``(config_class, mandatory_kwargs)``, as peft's ``ALL_CONFIG_CLASSES`` of test_config.py.
CONFIG_CASES = [(CLIPAdapterConfig, {}), (CLIPAdapterConfig, {"adapt": "both", "ratio": 0.6})]

#: peft tests that cannot pass for this method, and why. They are skipped for every case.
SKIPPED: dict[str, str] = {
    "test_disable_adapters": (
        "It first asserts that a new adapter leaves the output unchanged. CLIP-Adapter starts as the paper does, "
        "with both linears at PyTorch's default initialisation, so f' = ratio * A(f) + (1 - ratio) * f differs "
        "from f at once (peft zeroes such methods' weights inside the test, by method). Disabling is checked in "
        "tests/test_adapter_layer.py."
    ),
    "test_valid_task_type": (
        "CLIP-Adapter refuses every task_type with a ValueError: a peft task head would replace CLIP's own "
        "forward (tests/test_config.py). The refusal itself is peft's test_invalid_task_type, which runs."
    ),
    "test_save_pretrained_with_runtime_config": (
        "It loads a LoRA config through config_class.from_pretrained and sets LoRA's runtime_config. "
        "CLIPAdapterConfig.from_pretrained refuses another method's config with a ValueError instead of "
        "returning it (tests/test_strict_loading.py), so that a wrong folder is never silently taken."
    ),
}


def _set_init_weights_false(config_cls, kwargs):
    """peft's helper sets ``init_weights=False`` so that a new adapter is not the identity. A CLIP-Adapter
    with ``ratio > 0`` never starts as the identity (both linears get PyTorch's default initialisation), and
    its config has no such switch, so the kwargs stay as they are."""
    if config_cls is CLIPAdapterConfig:
        return dict(kwargs)
    return upstream.custom.set_init_weights_false(config_cls, kwargs)


def _skip_if_merging_not_supported(model_id, config_cls, *config_kwargs):
    """peft's helper, which skips the rest of a test at the point where it would merge, knowing this method too.

    peft 0.18's takes no ``config_kwargs``; later releases do.
    """
    if config_cls is CLIPAdapterConfig:
        pytest.skip(
            "CLIP-Adapter cannot be merged: its ReLU bottleneck is no weight delta, so merging is refused with a "
            "ValueError (tests/test_peft_flows.py). Whatever the test checks before it merges has passed."
        )
    upstream.common._skip_if_merging_not_supported(model_id, config_cls, *config_kwargs)


@contextlib.contextmanager
def _hub_online_once(model_id: str):
    """Stands in for peft's guard that counts Hub accesses per model: these tests never reach the Hub (the tiny
    model is built in memory). peft 0.18's guard patches a transformers 4 function that transformers 5 lacks."""
    yield


def _with_globals(function: types.FunctionType, overrides: dict) -> types.FunctionType:
    """A copy of ``function`` that sees ``overrides`` in place of its module's names of the same name."""
    copy = types.FunctionType(
        function.__code__, {**function.__globals__, **overrides}, function.__name__, function.__defaults__
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    return copy


def _reparametrised(function, upstream_cases: list, cases: list, overrides: dict):
    """A copy of peft's test ``function`` parametrised over ``cases`` where peft uses ``upstream_cases``."""
    copy = _with_globals(function, overrides)
    marks = []
    for mark in getattr(function, "pytestmark", []):
        marks.append(pytest.mark.parametrize(mark.args[0], cases) if _over(mark, upstream_cases) else mark)
    if function.__name__ in SKIPPED:
        marks.append(pytest.mark.skip(reason=SKIPPED[function.__name__]))
    copy.pytestmark = marks
    return copy


def _over(mark, upstream_cases: list) -> bool:
    """Whether ``mark`` parametrises a test over peft's list of method cases ``upstream_cases``."""
    return mark.name == "parametrize" and len(mark.args) > 1 and mark.args[1] is upstream_cases


def _adapted(upstream_class: type, upstream_cases: list, cases: list, overrides: dict, **attributes) -> type:
    """``upstream_class`` holding only its tests over ``upstream_cases``, parametrised with ``cases`` instead.

    Its other attributes (helpers) are kept and ``attributes`` set; ``overrides`` replace module-level names
    (peft's fixtures and helpers) as the copied tests see them.
    """
    namespace: dict = {}
    for klass in reversed(upstream_class.__mro__[:-1]):
        for name, value in vars(klass).items():
            if not name.startswith("test_"):
                plain = isinstance(value, types.FunctionType)  # peft's helpers see the overrides too
                namespace[name] = _with_globals(value, overrides) if plain else value
            elif any(_over(mark, upstream_cases) for mark in getattr(value, "pytestmark", [])):
                namespace[name] = _reparametrised(value, upstream_cases, cases, overrides)
            else:
                namespace.pop(name, None)
    for name in ("__dict__", "__weakref__"):
        namespace.pop(name, None)
    namespace.update(attributes, __module__=__name__, __doc__=f"peft's ``{upstream_class.__name__}`` on CLIP-Adapter.")
    return type(f"{upstream_class.__name__}CLIPAdapter", (), namespace)


def _saved_config() -> str:
    """A folder holding a saved CLIP-Adapter config, removed when the process exits."""
    folder = tempfile.TemporaryDirectory(prefix="clip-adapter-config-")
    _keep.append(folder)
    CLIPAdapterConfig(ratio=0.6).save_pretrained(folder.name)
    return folder.name


_keep: list = []

TestPeftCustomModelCLIPAdapter = _adapted(
    upstream.custom.TestPeftCustomModel,
    upstream.custom.TEST_CASES,
    TEST_CASES,
    {
        "set_init_weights_false": _set_init_weights_false,
        "_skip_if_merging_not_supported": _skip_if_merging_not_supported,
        "hub_online_once": _hub_online_once,
        # peft 0.18 looks up each config class's parameter prefix in a table of its own methods.
        "PREFIXES": {**getattr(upstream.custom, "PREFIXES", {}), CLIPAdapterConfig: PREFIX},
    },
    transformers_class=TinyCLIP,
    torch_device="cpu",
    prepare_inputs_for_testing=lambda self: _inputs(self.torch_device),
)
TestPeftConfigCLIPAdapter = _adapted(
    upstream.config.TestPeftConfig,
    upstream.config.ALL_CONFIG_CLASSES,
    CONFIG_CASES,
    # peft loads a tiny LoRA's config from the Hub, at a revision; offline, a saved CLIP-Adapter config stands
    # in (the revision is ignored for a local folder, as for any local path).
    {"PEFT_MODELS_TO_TEST": [(_saved_config(), "test")]},
)


def test_config_without_peft_type_is_refused_as_peft_refuses_it(tmp_path):
    """Another method's config reads through peft's own reader; a CLIP-Adapter one gets peft's TypeError too."""
    from peft import PeftConfig

    missing = r"The PeftConfig config that is trying to be loaded is missing required keys: \{'peft_type'\}"
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    with pytest.raises(TypeError, match=missing + r"\.$") as refused:
        PeftConfig.from_pretrained(str(tmp_path / "lora"))
    assert type(refused.value) is TypeError  # peft's own, untouched

    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "adapter_config.json").write_text('{"ratio": 0.2, "reduction": 4}')
    with pytest.raises(TypeError, match=missing) as refused:
        PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert isinstance(refused.value, ValueError)  # what the package raises for every bad config
    assert "adapter_config.json" in str(refused.value) and "CLIP_ADAPTER" in str(refused.value)
