"""The documentation site: it builds with ``mkdocs build --strict``, and every snippet in it runs.

Snippets run offline against a tiny CLIP served under real Hub ids, with Hub uploads intercepted; the
mechanism is in ``tests/docs_snippets.py`` and in docs/contributing.md.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import peft_clip_adapter

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load_sibling(name: str):
    # pytest runs with --import-mode=importlib, so tests/ is not on sys.path.
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


snippets = _load_sibling("docs_snippets")

PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
PAGES_WITH_CODE = [
    page for page in PAGES if any(s.skip_reason is None for s in snippets.python_snippets(page.read_text()))
]

#: Every public module of the package and its subpackages: their public classes and functions must be in the
#: API reference.
API_MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(peft_clip_adapter.__path__, prefix="peft_clip_adapter.")
    if not any(part.startswith("_") for part in info.name.split("."))
)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_clip_path):
    with snippets.offline_hub(tmp_path_factory.mktemp("hub-cache"), Path(tiny_clip_path)) as offline:
        yield offline


@pytest.fixture
def one_thread():
    """Snippets on the tiny model work on tensors of a few kilobytes, where handing each op to a pool of
    threads costs far more than it saves (10x slower on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
# peft's save_pretrained asks the Hub whether the base model's config exists, which offline it cannot.
@pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda page: str(page.relative_to(ROOT)))
def test_page_snippets_run(page, hub, one_thread, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert snippets.run_page(page) >= 1


def test_few_blocks_are_skipped():
    skipped = [
        (page.name, s.line) for page in PAGES for s in snippets.python_snippets(page.read_text()) if s.skip_reason
    ]
    total = sum(len(snippets.python_snippets(page.read_text())) for page in PAGES)
    assert total >= 20
    assert len(skipped) <= 3, skipped


def test_offline_hub_serves_tiny_models_and_round_trips_uploads(hub, tmp_path):
    from huggingface_hub import HfApi
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained("openai/clip-vit-base-patch32")
    assert model.config.projection_dim == 32
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    api = HfApi()
    repo_id = api.create_repo("someone/round-trip", exist_ok=True).repo_id
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="test")
    assert hub.uploads[-1] == ("someone/round-trip", ["notes.txt"])
    from huggingface_hub import hf_hub_download

    assert Path(hf_hub_download("someone/round-trip", "notes.txt")).read_text() == "hello"
    assert commit.oid == (hub.cache_dir / "models--someone--round-trip" / "refs" / "main").read_text()


def test_snippet_parser_handles_indentation_attributes_and_markers():
    page = (
        "<!-- skip-test: needs the real checkpoint -->\n"
        '```python title="real.py"\n'
        "load()\n"
        "```\n"
        "```bash\n"
        "echo no\n"
        "```\n"
        "!!! note\n    ```py\n    if True:\n        x = 1\n    ```\n"
    )
    found = snippets.python_snippets(page)
    assert [(s.line, s.skip_reason) for s in found] == [(3, "needs the real checkpoint"), (10, None)]
    assert found[1].code == "if True:\n    x = 1\n"


@pytest.mark.parametrize(
    ("page", "message"),
    [
        ("```python\nx = 1\n", "never closed"),
        ("<!-- skip-test: -->\n```python\nx = 1\n```\n", "must say why"),
    ],
)
def test_snippet_parser_rejects_bad_markup(page, message):
    with pytest.raises(ValueError, match=message):
        snippets.python_snippets(page)


def test_failing_snippet_names_page_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nvalue = 1\n```\n\n```python\nassert value == 2\n```\n")
    with pytest.raises(AssertionError, match=r"page\.md:8 failed"):
        snippets.run_page(page)


def _public_names(module_name: str) -> list[str]:
    """Classes and functions defined in the module itself (not imported), without a leading underscore."""
    module = importlib.import_module(module_name)
    public = getattr(module, "__all__", None) or [name for name in vars(module) if not name.startswith("_")]
    return sorted(
        f"{module_name}.{name}"
        for name in public
        if (inspect.isclass(getattr(module, name)) or inspect.isfunction(getattr(module, name)))
        and getattr(module, name).__module__ == module_name
    )


def _exported_names() -> list[str]:
    names = []
    for name in peft_clip_adapter.__all__:
        value = getattr(peft_clip_adapter, name)
        module = getattr(value, "__module__", None)
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            # A constant: find the module that assigns it at top level (others merely import it).
            assigned = re.compile(rf"^{name}\s*[:=]", re.MULTILINE)
            module = next(m for m in API_MODULES if assigned.search(inspect.getsource(importlib.import_module(m))))
        names.append(f"{module}.{name}")
    return names


@pytest.mark.slow
def test_mkdocs_build_strict_documents_every_public_name(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    html = "".join(path.read_text(encoding="utf-8") for path in (site / "api").rglob("*.html"))
    anchors = set(re.findall(r'id="(peft_clip_adapter\.[\w.]+)"', html))
    wanted = {name for module in API_MODULES for name in _public_names(module)} | set(_exported_names())
    assert sorted(wanted - anchors) == []


#: ``name:`` entries of a docstring's ``Args:`` (or ``Attributes:``) section, at its first indentation level.
_SECTION = re.compile(r"^(?P<indent>[ \t]*)(?P<title>Args|Arguments|Attributes|Returns|Raises|Examples?):[ \t]*$")


def _documented_arguments(doc: str) -> list[str]:
    """The names an ``Args:`` section of ``doc`` documents (``*args`` / ``**kwargs`` without their stars)."""
    names, inside, indent = [], False, None
    for line in doc.splitlines():
        section = _SECTION.match(line)
        if section:
            inside, indent = section["title"] in ("Args", "Arguments"), None
            continue
        if not inside or not line.strip():
            continue
        own = len(line) - len(line.lstrip())
        if indent is None:
            indent = own
        if own < indent:
            inside = False  # the section ended: back at the docstring's own indentation
        elif own == indent:
            entry = re.match(r"\s*\**(\w+)\s*(\([^)]*\))?:", line)
            if entry:
                names.append(entry.group(1))
    return names


def _docstring_problems(qualname: str, obj) -> list[str]:
    """What is wrong with ``obj``'s docstring: none at all, or ``Args:`` naming an argument it does not take."""
    function = getattr(obj, "__func__", obj)
    if isinstance(function, property):
        function = function.fget
    doc = inspect.getdoc(function) if not inspect.isclass(function) else function.__dict__.get("__doc__")
    if not (doc or "").strip():
        return [f"{qualname}: no docstring"]
    if inspect.isclass(function):
        # The constructor's parameters (inherited ones too), a dataclass's fields, a named tuple's.
        known = set(inspect.signature(function).parameters)
        known |= set(getattr(function, "__dataclass_fields__", {})) | set(getattr(function, "_fields", ()))
    elif callable(function):
        known = set(inspect.signature(function).parameters)
    else:
        return []
    return [
        f"{qualname}: documents {name!r}, which it does not take"
        for name in _documented_arguments(doc)
        if name not in known
    ]


def _public_members(cls) -> list[tuple[str, object]]:
    """The public methods and properties a class defines itself."""
    return [
        (name, member)
        for name, member in vars(cls).items()
        if not name.startswith("_")
        and (inspect.isfunction(member) or isinstance(member, (classmethod, staticmethod, property)))
    ]


def test_every_public_module_class_and_function_has_a_docstring_that_matches_its_signature():
    # Concise docstrings: no section is required (a trivial function gets one line), but every public name says
    # what it is, and an Args: section never documents an argument the signature lacks (a stale docstring).
    problems = []
    for module_name in API_MODULES:
        module = importlib.import_module(module_name)
        if not (module.__doc__ or "").strip():
            problems.append(f"{module_name}: no module docstring")
        for qualname in _public_names(module_name):
            obj = getattr(module, qualname.rpartition(".")[2])
            problems += _docstring_problems(qualname, obj)
            if inspect.isclass(obj):
                problems += [
                    problem
                    for name, member in _public_members(obj)
                    for problem in _docstring_problems(f"{qualname}.{name}", member)
                ]
    assert sorted(problems) == []


def test_the_docstring_check_catches_a_missing_docstring_and_a_stale_argument():
    def documented(ratio: float, *, adapt: str = "vision", **kwargs) -> None:
        """Set things.

        Args:
            ratio: The blend.
            adapt: Which tower; a long description
                that continues: with a colon.
            **kwargs: Passed on.

        Returns:
            Nothing: a colon here is no argument.
        """

    def stale(ratio: float) -> None:
        """Set things.

        Args:
            ration: The blend.
        """

    def bare() -> None:
        pass

    class Settings:
        """Settings.

        Args:
            width: The width.
            height: Not a parameter any more.
        """

        def __init__(self, width: int) -> None:
            self.width = width

    assert _documented_arguments(inspect.getdoc(documented)) == ["ratio", "adapt", "kwargs"]
    assert _docstring_problems("documented", documented) == []
    assert _docstring_problems("stale", stale) == ["stale: documents 'ration', which it does not take"]
    assert _docstring_problems("bare", bare) == ["bare: no docstring"]
    assert _docstring_problems("Settings", Settings) == ["Settings: documents 'height', which it does not take"]


def _message_fragments(path: Path) -> list[tuple[int, str]]:
    """``(line, longest literal part)`` of each ``raise ValueError/RuntimeError(<message>)`` in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
            continue
        if getattr(node.exc.func, "id", None) not in ("ValueError", "RuntimeError"):
            continue
        message = node.exc.args[0]
        parts = message.values if isinstance(message, ast.JoinedStr) else [message]
        literals = [part.value for part in parts if isinstance(part, ast.Constant) and isinstance(part.value, str)]
        if literals:
            found.append((node.lineno, " ".join(max(literals, key=len).split())))
    return found


def test_troubleshooting_quotes_every_error_message():
    page = " ".join((DOCS / "troubleshooting.md").read_text(encoding="utf-8").split())
    missing = [
        f"{path.name}:{line}: {fragment!r}"
        for path in [*sorted((ROOT / "peft_clip_adapter").rglob("*.py")), ROOT / "examples" / "fewshot.py"]
        for line, fragment in _message_fragments(path)
        if fragment.strip(" .,:;") and fragment.strip() not in page
    ]
    assert not missing, "Quote these messages in docs/troubleshooting.md:\n" + "\n".join(missing)


def _script_flags(script: str) -> set[str]:
    """The ``--flags`` a script's argparse parser defines, read from its source."""
    return set(re.findall(r"""["'](--[a-z][a-z0-9_]*)["']""", (ROOT / script).read_text(encoding="utf-8")))


def _launch_flags() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {option for action in launch_command_parser()._actions for option in action.option_strings}


def test_documented_commands_use_real_flags():
    trainer = _script_flags("examples/fewshot.py")
    known = {
        "examples/fewshot.py": trainer,
        "benchmarks/reproduce.py": _script_flags("benchmarks/reproduce.py"),
        "benchmarks/speed.py": _script_flags("benchmarks/speed.py"),
        "benchmarks/search_cost.py": _script_flags("benchmarks/search_cost.py"),
    }
    launch = _launch_flags()
    wrong, checked = [], 0
    for page in PAGES:
        for command in snippets.shell_commands(page.read_text(encoding="utf-8")):
            for script, flags in known.items():
                if script not in command:
                    continue
                checked += 1
                before, after = command.split(script, 1)
                used = re.findall(r"(?<!\S)(--[a-z][a-z0-9_]*)", after)
                wrong += [f"{page.name}: {flag} (not a flag of {script})" for flag in used if flag not in flags]
                if "accelerate launch" in before:
                    used = re.findall(r"(?<!\S)(--[a-z][a-z0-9_]*)", before)
                    wrong += [
                        f"{page.name}: {flag} (not an accelerate launch flag)" for flag in used if flag not in launch
                    ]
    assert checked >= 10  # the docs show the trainer and the harness in many commands
    assert not wrong, "\n".join(wrong)
