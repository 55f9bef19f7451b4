"""The benchmark scripts in tiny mode: they run, write their files, and their arithmetic is right.

Timings are never asserted (they depend on the machine); what is checked is the structure of the
reports, the ratios recomputed from the reported times, the memory probe's accounting and the errors.
"""

from __future__ import annotations

import doctest
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import their sibling modules, as when run directly

import benchlib  # noqa: E402
import pipeline_bench  # noqa: E402
import speed  # noqa: E402
import speed_report  # noqa: E402
import workloads  # noqa: E402


@pytest.mark.parametrize("module", [benchlib, speed_report, workloads, pipeline_bench])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--device", "tpu"], "--device must be 'cpu' or 'cuda"),
        (["--sections", "overhead,speedup"], r"--sections must list names from \['overhead'"),
        (["--views", "0"], "--views must be >= 1, got 0"),
        (["--classes", "1"], "--classes must be >= 2"),
        (["--arch", "vit-h-14"], r"--arch must list architectures from \['vit-b-16', 'vit-b-32'\]"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--image_size", "500x20"], r"--image_size must be a side or WIDTHxHEIGHT, each >= 32 pixels, got '500x20'"),
        (["--pipeline_workers", "0,two"], "--pipeline_workers must be comma-separated whole numbers >= 0"),
        (["--num_workers", "-1"], r"--num_workers must be >= 0 \(0 decodes in the main process\)"),
        (["--dtype", "bfloat16", "--sections", "adapter,memory"], "--dtype bfloat16 applies to the overhead"),
    ],
)
def test_speed_rejects_bad_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        speed.parse_args(argv)


def test_defaults_follow_the_issue():
    args = speed.parse_args([])
    assert args.architectures == ["vit-b-32", "vit-b-16"]
    assert (args.classes, args.shots, args.views, args.epochs, args.batch_size) == (10, 16, 10, 200, 32)


def test_real_size_architectures_are_vit_b():
    from transformers import CLIPConfig

    vision = CLIPConfig(vision_config=benchlib.ARCHITECTURES["vit-b-16"]).vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (768, 12, 16, 224)
    with pytest.raises(ValueError, match="Unknown architecture 'vit-l-14'"):
        benchlib.build_clip("vit-l-14")


def test_reference_prompts_are_padded_like_clip_tokenize(tiny_clip):
    config = tiny_clip.config.text_config
    ids = benchlib.reference_prompt_ids(config, 5)
    assert ids.shape == (5, min(77, config.max_position_embeddings))
    assert (ids[:, 0] == config.bos_token_id).all() and (ids[:, 9] == config.eos_token_id).all()
    words = ids[:, 1:9]
    assert not torch.isin(words, torch.tensor([config.bos_token_id, config.eos_token_id, config.pad_token_id])).any()
    # CLIP pools at the first end token, so the pooled position is 9 for every prompt.
    assert ((ids == config.eos_token_id).int().argmax(dim=-1) == 9).all()


def test_interleaved_medians_take_turns():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    result = benchlib.interleaved_medians(calls, warmup=1, repeats=3)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then alternating turns
    for entry in result.values():
        assert len(entry["times_s"]) == 3 and entry["median_s"] == sorted(entry["times_s"])[1]
    with pytest.raises(ValueError, match="repeats >= 1"):
        benchlib.interleaved_medians(calls, warmup=0, repeats=0)


def test_peak_memory_window_sees_a_64_mib_tensor():
    benchlib.reset_peak_memory("cpu")
    before, _ = benchlib.memory_bytes("cpu")
    block = torch.ones(16 * 2**20)  # 64 MiB, touched
    del block
    _, peak = benchlib.memory_bytes("cpu")
    assert peak - before >= 60 * 2**20


def test_rescaling_to_ten_views_matches_hand_computation():
    result = {"views": 2, "ours": {"extraction_s": 4.0, "training_s": 1.0}, "floor_s": 3.5}
    result["reference"] = {"total_s": 300.0}
    ten = speed._rescale_views(result, 10)
    assert ten["ours_s"] == pytest.approx(4.0 * 5 + 1.0)
    assert ten["floor_s"] == pytest.approx(17.5)
    assert ten["ours_over_floor"] == round(21.0 / 17.5, 4)
    assert ten["reference_over_ours"] == round(300.0 / 21.0, 4)


def test_alternatives_summary_is_steps_times_step_time():
    args = speed.parse_args(["--tiny"])  # 4 shots x 4 classes, batch 8: 2 steps per epoch
    probes = {
        "cached": {"step_seconds": 0.5, "peak_bytes": 1000},
        "lora": {"step_seconds": 2.0, "peak_bytes": 1500},
        "full": {"step_seconds": 3.0, "peak_bytes": 4000},
    }
    summary = speed.summarise_alternatives(probes, args)
    assert summary["steps_per_epoch"] == 2
    assert summary["lora"]["epoch_s"] == 4.0 and summary["lora"]["epoch_over_ours"] == 8.0
    assert summary["full"]["peak_over_ours"] == 4.0


def test_memory_summary_and_adapter_file_size(tiny_clip_path):
    args = speed.parse_args(["--tiny"])
    probes = {
        "inference": {"peak_bytes": 2000, "increment_bytes": 300},
        "cached": {"peak_bytes": 1900, "increment_bytes": 100},
    }
    memory = speed.summarise_memory(probes, tiny_clip_path, args)
    assert memory["cached_training_over_inference"] == 0.95
    assert memory["trainable_parameters"] == 2 * 32 * 8  # d=32, reduction 4: 32 -> 8 -> 32
    assert 2 * 32 * 8 * 4 < memory["adapter_file_bytes"] < 2 * 32 * 8 * 4 + 2048  # fp32 weights + header
    assert "clear_refs" in memory["method"]


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_lora_step_trains_only_lora_on_the_vision_tower(tiny_clip):
    frozen_before = {name: p.detach().clone() for name, p in tiny_clip.named_parameters()}
    pixels, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    weights = torch.nn.functional.normalize(torch.randn(32, 4), dim=0)
    step = workloads.lora_training_step(tiny_clip, pixels, labels, weights)
    trainable = _trainable(tiny_clip)
    assert trainable and all("lora_" in name and "vision_model" in name for name in trainable)
    assert {name.rsplit(".", 3)[-4].rsplit(".", 1)[-1] for name in trainable} == {"q_proj", "v_proj"}
    step()
    step()
    after = dict(tiny_clip.named_parameters())
    assert any(not torch.equal(trainable[name], after[name]) for name in trainable)
    base = {name.replace("base_model.model.", "").replace(".base_layer", ""): p for name, p in after.items()}
    assert all(torch.equal(frozen_before[name], base[name]) for name in frozen_before)


def test_full_finetune_changes_the_vision_tower_only(tiny_clip):
    before = {name: p.detach().clone() for name, p in tiny_clip.named_parameters()}
    step = workloads.full_finetune_step(
        tiny_clip, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), torch.randn(32, 4)
    )
    step()
    changed = {name for name, p in tiny_clip.named_parameters() if not torch.equal(before[name], p)}
    assert changed and all(name.startswith(("vision_model.", "visual_projection.")) for name in changed)


def test_cached_training_trains_the_saved_adapter(tiny_clip, tiny_clip_path, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    import peft_clip_adapter

    model = workloads.clip_adapter(tiny_clip)
    features, labels = torch.randn(2, 8, 32), torch.arange(8) % 4  # [V, N, D], [N]
    epoch = workloads.cached_training_epoch(model, torch.randn(4, 1, 32), features, labels, batch_size=4)
    before = _trainable(model)
    losses = [epoch() for _ in range(3)]
    assert all(loss > 0 for loss in losses)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert len(saved) == len(trained) == 2
    assert all(not torch.equal(before[name], trained[name]) for name in trained)
    reloaded = PeftModel.from_pretrained(benchlib.build_clip(tiny_clip_path), tmp_path)
    layer = peft_clip_adapter.adapter_layers(reloaded)["vision"]
    torch.testing.assert_close(
        layer.adapt(features[0]), peft_clip_adapter.adapter_layers(model)["vision"].adapt(features[0])
    )


@pytest.mark.slow
def test_probe_reports_time_and_memory_in_a_fresh_process(tiny_clip_path):
    spec = {"workload": "cached", "arch": tiny_clip_path, "device": "cpu", "batch_size": 8, "classes": 4}
    report = speed.run_probe({**spec, "views": 2, "images": 16, "steps": 2, "warmup": 1})
    assert len(report["step_times_s"]) == 2 and report["step_seconds"] > 0
    assert report["peak_bytes"] >= report["baseline_bytes"] > 0
    assert report["increment_bytes"] == report["peak_bytes"] - report["baseline_bytes"]
    with pytest.raises(ValueError, match="Unknown workload 'bogus'; choose one of"):
        speed.run_probe({**spec, "workload": "bogus"})


@pytest.mark.slow
def test_speed_tiny_run_writes_consistent_results(tmp_path, capsys):
    report = speed.main(["--tiny", "--sections", "overhead,adapter", "--output_dir", str(tmp_path)])
    written = json.loads((tmp_path / "speed_cpu_tiny.json").read_text())
    assert written["command"].startswith("python benchmarks/speed.py --tiny")
    assert set(written["machine"]) >= {"cpu", "cpu_cores", "torch", "transformers", "peft", "load_average_at_end"}
    result = report["results"]["tiny"]
    overhead = result["overhead"]["get_image_features"]
    assert overhead["ratio"] == round(overhead["adapter_s"] / overhead["bare_s"], 4)
    adapter = result["adapter"]
    assert adapter["images"] == 16 and adapter["views"] == 2 and adapter["epochs"] == 5
    assert adapter["reference"]["total_steps"] == 2 * 5 and adapter["reference"]["extrapolated"] is True
    assert adapter["reference"]["total_s"] == pytest.approx(adapter["reference"]["step_s"] * 10)
    ours = adapter["ours"]
    assert ours["total_s"] == pytest.approx(ours["extraction_s"] + ours["training_s"])
    assert adapter["ours_over_floor"] == round(ours["total_s"] / adapter["floor_s"], 4)
    markdown = (tmp_path / "speed_cpu_tiny.md").read_text()
    assert "| tiny | ours / floor (2 views, measured) |" in markdown
    assert "extrapolated" in markdown and markdown in capsys.readouterr().out


def test_image_sizes_and_worker_lists_parse():
    args = speed.parse_args(["--image_size", "500x375", "--pipeline_workers", "2,0,2", "--sections", "pipeline"])
    assert args.image_size == (500, 375) and args.pipeline_workers == [0, 2] and args.sections == ["pipeline"]
    assert speed.parse_args(["--image_size", "256"]).image_size == (256, 256)
    assert speed.parse_args([]).extraction_batch_size == 32  # --batch_size, unless told otherwise


def test_pipeline_baseline_normalises_as_the_transforms_do():
    from PIL import Image

    train, _ = pipeline_bench._transforms()
    crop = Image.effect_noise((224, 224), 60).convert("RGB")
    pixels = torch.from_numpy(__import__("numpy").array(crop)).permute(2, 0, 1)  # [3, 224, 224] uint8
    # The baseline's float64 arithmetic and the look-up table give the same bits: only the work differs.
    assert torch.equal(pipeline_bench._legacy_normalise(crop, train.steps), train.normalise(pixels))


@pytest.mark.slow
def test_speed_pipeline_section_writes_its_own_table(tmp_path):
    report = speed.main(["--tiny", "--sections", "pipeline", "--output_dir", str(tmp_path)])
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "speed_cpu_pipeline_tiny.json",
        "speed_cpu_pipeline_tiny.md",
    ]
    pipeline, written = report["pipeline"], json.loads((tmp_path / "speed_cpu_pipeline_tiny.json").read_text())
    assert written["pipeline"]["views"] == 2 and report["results"] == {}
    small = pipeline["costs"]["500x375"]
    assert small["train_legacy_ms_per_view"] == pytest.approx(small["train_legacy_ms"] / 2)
    assert small["train_views_speedup_cpu_views"] == round(small["train_legacy_ms"] / small["train_cpu_views_ms"], 4)
    runs = pipeline["throughput"]["runs"]
    assert set(runs) == {f"cpu_views_{n}_workers" for n in (0, 1, 2)}  # views on the device: a GPU only
    speedup = runs["cpu_views_2_workers"]["images_per_s"] / runs["cpu_views_0_workers"]["images_per_s"]
    assert pipeline["throughput"]["workers_speedup"] == round(speedup, 4)
    markdown = (tmp_path / "speed_cpu_pipeline_tiny.md").read_text()
    assert "## Input pipeline" in markdown and "## Ratios" not in markdown


@pytest.mark.slow
def test_gpu_script_runs_its_sections_tiny_on_the_cpu(tmp_path):
    import subprocess

    script = BENCHMARKS / "gpu.sh"
    command = ["bash", str(script), "--device", "cpu", "--tiny", "--classes", "4", "--output_dir", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "speed_cpu_tiny.json").read_text())
    adapter = report["results"]["tiny"]["adapter"]
    assert report["settings"]["sections"] == ["adapter", "pipeline"] and adapter["dtype"] == "bfloat16"
    assert adapter["images"] == 4 * 4 and adapter["gpu_utilisation_percent"] == {"extraction": None, "training": None}
    assert adapter["extraction_over_floor"] == round(adapter["ours"]["extraction_s"] / adapter["floor_s"], 4)
    assert "pipeline" in report and "ours / floor" in completed.stdout


# ---------------------------------------------------------------------------------------------------
# reproduce.py

import paper  # noqa: E402
import reproduce  # noqa: E402


def test_paper_mapping_covers_the_eleven_datasets_and_their_templates():
    from peft_clip_adapter.fewshot.templates import DATASET_TEMPLATES

    assert len(paper.DATASETS) == 11 and set(paper.DATASETS) == set(DATASET_TEMPLATES)
    assert all(entry.template in DATASET_TEMPLATES for entry in paper.DATASETS.values())
    means = [round(sum(column) / 11, 2) for column in zip(*(e.accuracy for e in paper.DATASETS.values()), strict=True)]
    zero_shot = round(sum(entry.zero_shot for entry in paper.DATASETS.values()) / 11, 2)
    # The table's own mean row agrees with its rows (to the paper's rounding).
    assert [zero_shot, *means] == pytest.approx(list(paper.PAPER_MEAN), abs=0.011)
    assert paper.DATASETS["imagenet"].paper_accuracy(16) == 63.59


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--smoke", "--shots", "0,2"], "--shots must be comma-separated whole numbers >= 1"),
        (["--smoke", "--seeds", "a"], "--seeds must be comma-separated whole numbers >= 0"),
        (["--smoke", "--search_ratios", "0.2,1.5"], r"--search_ratios must be comma-separated numbers in \[0, 1\]"),
        (["--smoke", "--ratio", "2"], r"--ratio must be in \[0, 1\]"),
        (["--smoke", "--views", "0"], "--views must be at least 1, got 0"),
        (["--smoke", "--methods", "coop"], r"Unknown method\(s\) \[.coop.\]; choose .all. or names from"),
        (["--smoke", "--protocol", "zero"], r"--protocol must be one of \['few-shot', 'base2novel', 'cross-domain'\]"),
        (["--smoke", "--protocol", "few-shot,cross-domain"], "cross-domain trains on other datasets than it tests"),
        (["--smoke", "--hparams", "search"], r"unrecognized arguments: --hparams search \(see --help\)"),
        (["--datasets", "imagenet2", "--data_root", "d", "--model_name_or_path", "m"], "Unknown dataset"),
        (["--data_root", "d"], "Pass --model_name_or_path"),
        (["--model_name_or_path", "m"], "Pass --data_root"),
        (["--model_name_or_path", "m", "--dataset_dir", "mnist=/x", "--datasets", "dtd"], "KEY=PATH with KEY in"),
        (["--model_name_or_path", "m", "--data_root", "d", "--protocol", "cross-domain", "--targets", "mnist"],
         r"--targets must name datasets from \['imagenet_v2'"),
    ],
)  # fmt: skip
def test_reproduce_rejects_bad_arguments(argv, match):
    with pytest.raises(ValueError, match=match):
        reproduce.parse_args(argv)


def test_reproduce_defaults_follow_the_paper(tmp_path):
    args = reproduce.parse_args(["--model_name_or_path", "m", "--data_root", "d", "--datasets", "dtd"])
    assert (
        args.dataset_dirs == {"dtd": Path("d") / "dtd"} and args.seeds == [1, 2, 3] and args.shots == [1, 2, 4, 8, 16]
    )
    assert args.methods == ["clip-adapter"] and args.protocol == "few-shot" and args.recipe == "paper"
    assert reproduce.RECIPES["paper"] == (10, 200, 2e-3, 0.08)
    cross = ["--model_name_or_path", "m", "--data_root", str(tmp_path), "--protocol", "cross-domain"]
    with pytest.raises(
        ValueError, match=r"No cross-domain target: none of \[.*imagenetv2', .*\] exists; pass --targets"
    ):
        reproduce.parse_args(cross)
    (tmp_path / "imagenet-sketch").mkdir()
    parsed = reproduce.parse_args(cross)
    assert [entry.key for entry in parsed.datasets] == ["imagenet"]
    assert parsed.target_dirs == {"imagenet_sketch": tmp_path / "imagenet-sketch"}


def test_table_puts_our_mean_and_std_beside_the_paper():
    rows = [
        {"protocol": "few-shot", "method": method, "dataset": "eurosat", "shots": 16, "seed": seed,
         "accuracy": accuracy, "seconds": 2.0}
        for method, values in (("clip-adapter", (80.0, 84.0)), ("tip-adapter", (70.0, 70.0)))
        for seed, accuracy in zip((1, 2), values, strict=True)
    ]  # fmt: skip
    rows += [
        {"protocol": "base2novel", "method": "tip-adapter", "dataset": "eurosat", "shots": 16, "seed": 1,
         "base": 90.0, "novel": 60.0, "hm": 72.0, "novel_is_zero_shot": True, "seconds": 1.0}
    ]  # fmt: skip
    summary = reproduce.summarise(rows)
    entry = next(e for e in summary if e["method"] == "clip-adapter")
    assert entry["accuracy"] == {"mean": 82.0, "std": 2.8284, "n": 2} and entry["paper"] == 84.43
    markdown = reproduce.render_markdown(summary, {"command": "c", "model": "m", "seeds": [1, 2]})
    assert "| clip-adapter | eurosat | 82.00 ± 2.83 (84.43) |" in markdown
    assert "| tip-adapter | eurosat | 70.00 ± 0.00 |" in markdown
    assert "| tip-adapter (zero-shot: cannot classify unseen classes) | eurosat | 60.00 ± 0.00 |" in markdown
    assert "## base2novel: hm" in markdown and "| tip-adapter | 1.00 |" not in markdown
    assert "| ViT-B/16 | tip-adapter-f | 81.2 |" in markdown


def test_reproduce_names_a_dataset_folder_that_is_not_laid_out(tmp_path):
    args = reproduce.parse_args(["--model_name_or_path", "m", "--data_root", str(tmp_path), "--datasets", "dtd"])
    with pytest.raises(ValueError, match=r"dtd/train is missing: dtd must be laid out as in paper.py"):
        reproduce.load_dataset_source("dtd", args.dataset_dirs["dtd"], args)


def test_reproduce_smoke_data_has_enough_images_for_the_default_shots(tmp_path):
    # `python benchmarks/reproduce.py --smoke` samples up to 16 shots per class from the generated folder.
    args = reproduce.parse_args(["--smoke", "--output_dir", str(tmp_path)])
    train = args.dataset_dirs["shapes"] / "train"
    counts = {folder.name: len(list(folder.iterdir())) for folder in train.iterdir()}
    assert len(counts) == 4 and min(counts.values()) == max(args.shots) == 16


@pytest.mark.slow
def test_reproduce_smoke_runs_every_feature_method_end_to_end(tmp_path):
    methods = "zero-shot,linear-probe,tip-adapter,tip-adapter-f,clip-adapter,clip-adapter-auto"
    argv = ["--smoke", "--shots", "1,2", "--seeds", "0,1", "--methods", methods, "--search_ratios", "0.2,0.6"]
    report = reproduce.main([*argv, "--output_dir", str(tmp_path)])
    rows = report["rows"]
    assert len(rows) == 2 * 2 * 6 and {row["method"] for row in rows} == set(methods.split(","))
    auto = [row for row in rows if row["method"] == "clip-adapter-auto"]
    assert "1 shot, nothing to hold out" in auto[0]["hyperparameters"]["strategy"]
    assert auto[-1]["hyperparameters"]["strategy"] == "2-fold cross-validation on 2 shots per class"
    assert all(0.0 <= row["accuracy"] <= 100.0 and row["seconds"] >= 0.0 for row in rows)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == json.loads(json.dumps(rows))
    assert set(written[0]) == {
        "method",
        "dataset",
        "protocol",
        "shots",
        "seed",
        "accuracy",
        "seconds",
        "hyperparameters",
    }
    for name in ("results.md", "results.png", "timing.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "Smoke run" in (tmp_path / "results.md").read_text()
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing["cells"] == 4 and timing["command"].startswith("python benchmarks/reproduce.py --smoke")
    # One extraction per sampled set, shared: a second run reads every feature from the cache.
    assert reproduce.main([*argv, "--output_dir", str(tmp_path)])["rows"][0]["accuracy"] == rows[0]["accuracy"]


@pytest.mark.slow
def test_reproduce_base2novel_reports_base_novel_and_hm(tmp_path):
    argv = ["--smoke", "--shots", "2", "--seeds", "0", "--methods", "zero-shot,tip-adapter,clip-adapter"]
    rows = reproduce.main([*argv, "--protocol", "base2novel", "--output_dir", str(tmp_path)])["rows"]
    by_method = {row["method"]: row for row in rows}
    for row in rows:
        assert row["hm"] == pytest.approx(2 * row["base"] * row["novel"] / (row["base"] + row["novel"]))
    assert by_method["tip-adapter"]["novel_is_zero_shot"] and not by_method["clip-adapter"]["novel_is_zero_shot"]
    assert by_method["tip-adapter"]["novel"] == by_method["zero-shot"]["novel"]


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        reproduce.cli(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines)
    return errors[0]


def test_reproduce_reports_an_unknown_method_on_one_error_line(capsys):
    error = _cli_error(["--smoke", "--methods", "zero-shot,coop"], capsys)
    assert error.startswith(
        "error: Unknown method(s) ['coop']; choose 'all' or names from ['zero-shot', 'linear-probe'"
    )


def test_reproduce_refuses_base2novel_with_one_class(tiny_clip_path, tmp_path, capsys):
    # An image folder needs 2 class folders already; a split file can list a single class.
    folder = tmp_path / "eurosat"
    (folder / "2750").mkdir(parents=True)
    from PIL import Image

    for index in range(2):
        Image.new("RGB", (8, 8)).save(folder / "2750" / f"{index}.png")
    entries = [[f"{index}.png", 0, "forest"] for index in range(2)]
    (folder / "split_zhou_EuroSAT.json").write_text(json.dumps({"train": entries, "val": [], "test": entries}))
    argv = ["--model_name_or_path", tiny_clip_path, "--datasets", "eurosat", "--data_root", str(tmp_path)]
    error = _cli_error([*argv, "--protocol", "base2novel", "--output_dir", str(tmp_path / "out")], capsys)
    assert error == "error: base2novel needs at least 2 classes (a base and a novel half), got 1: ['forest']."


def test_reproduce_refuses_a_split_file_naming_missing_images(tiny_clip_path, tmp_path, capsys):
    folder = tmp_path / "eurosat"
    folder.mkdir()
    entries = [[f"2750/Forest/{index}.jpg", 0, "forest"] for index in range(4)]
    (folder / "split_zhou_EuroSAT.json").write_text(json.dumps({"train": entries, "val": [], "test": entries}))
    argv = ["--model_name_or_path", tiny_clip_path, "--datasets", "eurosat", "--data_root", str(tmp_path)]
    error = _cli_error([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert "split_zhou_EuroSAT.json names 8 images that do not exist, e.g. [" in error
    assert "Forest/0.jpg" in error and "Forest/3.jpg" not in error


def test_reproduce_refuses_cross_domain_targets_with_other_class_names(tiny_clip_path, tmp_path, capsys):
    from peft_clip_adapter.testing.tiny_models import write_shapes_dataset

    for split in ("train", "test"):
        write_shapes_dataset(tmp_path / "imagenet" / split, images_per_class=1)
    image = next((tmp_path / "imagenet" / "test").rglob("*.png"))
    for name in ("teapot", "red circle"):
        (tmp_path / "imagenet-sketch" / "test" / name).mkdir(parents=True)
        (tmp_path / "imagenet-sketch" / "test" / name / "0.png").write_bytes(image.read_bytes())
    argv = ["--model_name_or_path", tiny_clip_path, "--data_root", str(tmp_path), "--protocol", "cross-domain"]
    error = _cli_error([*argv, "--shots", "1", "--seeds", "0", "--output_dir", str(tmp_path / "out")], capsys)
    assert error == (
        "error: cross-domain target 'imagenet_sketch' has class names the source lacks: ['teapot'] (1 of 2); "
        "its classes must be the source's (or a subset of them)."
    )


def test_reproduce_refuses_lora_on_a_model_without_its_projections(tmp_path, capsys):
    from peft_clip_adapter.testing.tiny_models import build_tiny_model

    clap = build_tiny_model(tmp_path / "clap", family="clap")  # audio and text towers: no image attention
    argv = ["--model_name_or_path", clap, "--datasets", "dtd", "--data_root", str(tmp_path), "--methods", "lora"]
    error = _cli_error([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert error.startswith(
        "error: ClapModel has no attention projections for LoRA in either tower: CLIP-LoRA adapts the q_proj"
    )


@pytest.mark.slow
def test_reproduce_runs_lora_end_to_end_on_both_protocols(tmp_path):
    argv = ["--smoke", "--shots", "2", "--seeds", "0", "--methods", "lora", "--lora_iterations_per_shot", "2"]
    rows = reproduce.main([*argv, "--protocol", "few-shot,base2novel", "--output_dir", str(tmp_path)])["rows"]
    few_shot, base2novel = rows
    assert few_shot["hyperparameters"] == {"rank": 2, "learning_rate": 2e-4, "batch_size": 32, "iterations": 4}
    assert 0.0 <= few_shot["accuracy"] <= 100.0 and few_shot["seconds"] > 0.0
    # LoRA reads the novel class names through its adapted text tower: it scores them itself.
    assert base2novel["protocol"] == "base2novel" and base2novel["novel_is_zero_shot"] is False


@pytest.mark.slow
def test_reproduce_offline_cross_domain_trains_clean_and_tests_dusk(offline_cache_dir, tmp_path):
    argv = ["--offline", "--cache_dir", str(offline_cache_dir), "--protocol", "cross-domain", "--shots", "1"]
    report = reproduce.main(
        [*argv, "--seeds", "0", "--methods", "zero-shot,tip-adapter", "--output_dir", str(tmp_path)]
    )
    assert [(row["source"], row["dataset"], row["method"]) for row in report["rows"]] == [
        ("clean-pairs", "dusk-pairs", "zero-shot"),
        ("clean-pairs", "dusk-pairs", "tip-adapter"),
    ]
    assert "| zero-shot | clean-pairs → dusk-pairs |" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match=r"target 'held-out-pairs' has class names the source lacks"):
        reproduce.main([*argv, "--seeds", "0", "--targets", "held-out-pairs", "--output_dir", str(tmp_path / "b")])


def test_reproduce_reads_a_hub_dataset_through_an_export(tiny_clip_path, tmp_path):
    from peft_clip_adapter.testing.tiny_models import SHAPE_CLASSES, write_shapes_dataset

    # A local folder with train/ and test/ stands in for a Hub id: load_dataset reads both the same way.
    source = tmp_path / "hub-dataset"
    write_shapes_dataset(source / "train", images_per_class=2, seed=0)
    write_shapes_dataset(source / "test", images_per_class=1, seed=1)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", tiny_clip_path, "--datasets", "eurosat", "--dataset_hub", f"eurosat={source}"]
    argv += ["--shots", "1", "--seeds", "1", "--output_dir", str(out), "--num_train_epochs", "2", "--views", "1"]
    report = reproduce.main(argv)
    exported = out / "hub-data" / "eurosat"
    assert sorted(path.name for path in (exported / "test").iterdir()) == sorted(SHAPE_CLASSES)
    assert sum(1 for _ in (exported / "train").rglob("*.png")) == 4 * 2
    (row,) = report["rows"]
    assert row["dataset"] == "eurosat" and row["shots"] == 1 and 0.0 <= row["accuracy"] <= 100.0


def test_paper_docstring_examples_run():
    result = doctest.testmod(paper, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_hub_export_refuses_a_dataset_without_the_test_split(tmp_path):
    from peft_clip_adapter.testing.tiny_models import write_shapes_dataset

    write_shapes_dataset(tmp_path / "src" / "train", images_per_class=1)
    with pytest.raises(ValueError, match=r"has no \['test'\] split\(s\); its splits are \['train'\]"):
        paper.export_hub_dataset(str(tmp_path / "src"), tmp_path / "out")


def test_reproduce_rejects_a_malformed_dataset_hub():
    with pytest.raises(ValueError, match=r"--dataset_hub must be KEY=ID\[:CONFIG\]"):
        reproduce.parse_args(["--model_name_or_path", "m", "--datasets", "dtd", "--dataset_hub", "dtd"])


@pytest.mark.slow
def test_cache_key_benchmark_reports_the_digest_against_an_extraction(tmp_path):
    import cache_key

    data = cache_key.main(["--images", "8", "--arch", "tiny", "--repeats", "1", "--output_dir", str(tmp_path)])
    [row] = data["rows"]
    assert row["digest_mb_per_s"] == round(data["image_bytes"] / 1e6 / row["digest_s"], 1)
    assert row["digest_share_of_first_run"] == benchlib.ratio(row["digest_s"], row["digest_s"] + row["extraction_s"])
    assert json.loads((tmp_path / "cache_key_cpu.json").read_text())["command"].startswith(
        "python benchmarks/cache_key.py --images 8"
    )


# ---------------------------------------------------------------------------------------------------
# search_cost.py

import search_cost  # noqa: E402


@pytest.mark.slow
def test_search_cost_tiny_run_reports_ratios_of_its_own_timings(tmp_path, capsys):
    report = search_cost.main(["--tiny", "--output_dir", str(tmp_path), "--work_dir", str(tmp_path / "work")])
    summary = report["workloads"]["vit-b-width"]["summary"]
    assert summary["shape"] == {"classes": 9, "train_images": 144, "views": 10, "epochs": 5}
    fixed = summary["fixed_train_s"]
    assert fixed == sorted(turn["train_s"] for turn in report["workloads"]["vit-b-width"]["times"]["fixed"])[0]
    for name, adapters in (("ratio_auto", 16), ("ratio_and_lr_auto", 48)):  # 4 ratios (x 3 lrs) x 4 folds
        assert summary[name]["adapters"] == adapters
        assert summary[name]["search_over_fixed"] == round(summary[name]["search_s"] / fixed, 4)
        assert summary[name]["total_over_fixed"] > summary[name]["search_over_fixed"]
    written = json.loads((tmp_path / "search_cost_cpu_tiny.json").read_text())
    assert written["command"].startswith("python benchmarks/search_cost.py --tiny")
    markdown = (tmp_path / "search_cost_cpu_tiny.md").read_text()
    assert "| vit-b-width | 512 | 9 x 16, 10 |" in markdown and markdown in capsys.readouterr().out


def test_search_cost_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"--workloads must name micro-clip and/or vit-b-width, got \['bogus'\]"):
        search_cost.parse_args(["--workloads", "bogus"])
    with pytest.raises(ValueError, match=r"--repeats and --num_train_epochs must be >= 1, got 0, 200"):
        search_cost.parse_args(["--repeats", "0"])


def test_code_shape_counts_docstrings_and_layers_by_hand(tmp_path):
    import code_shape

    package = tmp_path / "pkg"
    (package / "fewshot").mkdir(parents=True)
    (package / "__init__.py").write_text('"""One line."""\n')
    (package / "fewshot" / "data.py").write_text('"""Two\nlines."""\n\n\ndef f():\n    """One."""\n    return 1\n')
    shape = code_shape.package_shape(package)
    assert shape["layers"] == {"method": {"modules": 0, "lines": 1}, "toolkit": {"modules": 1, "lines": 7}}
    assert (shape["lines"], shape["docstring_lines"], shape["docstring_share"]) == (8, 4, 0.5)


def test_the_package_keeps_its_shape():
    """The limits the restructuring set: concise docstrings and a trainer that stays a script."""
    import code_shape

    shape = code_shape.package_shape(code_shape.ROOT / "peft_clip_adapter")
    assert shape["docstring_share"] <= 0.25, shape
    assert len((code_shape.ROOT / "examples" / "fewshot.py").read_text().splitlines()) <= 620


def test_reproduce_docstring_examples_run():
    result = doctest.testmod(reproduce, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
