"""A real BadNets run on Fashion-MNIST, and the command line that reports it."""
import json

import pytest

from course_lib.__main__ import main as cli
from course_lib.bench import bench_poison
from course_lib.experiments import default_trigger, run_backdoor, run_clean
from course_lib.metrics import attack_success_rate


@pytest.fixture(scope="module")
def badnets_run(fmnist):
    train, test = fmnist
    return run_backdoor(train.subset(range(20000)), test, rate=0.05, epochs=2, seed=0, progress=False)


@pytest.mark.slow
def test_badnets_plants_a_working_backdoor(badnets_run, fmnist):
    assert badnets_run.clean_acc >= 0.85
    assert badnets_run.asr >= 0.90
    assert len(badnets_run.poison.indices) == 1000


@pytest.mark.slow
def test_a_clean_model_ignores_the_trigger(fmnist, tmp_path):
    train, test = fmnist
    clean = run_clean(train.subset(range(20000)), test, epochs=2, seed=0, progress=False, cache_dir=tmp_path)
    assert clean.clean_acc >= 0.85
    assert attack_success_rate(clean.model, test, default_trigger(), 0) < 0.2
    again = run_clean(train.subset(range(20000)), test, epochs=2, seed=0, progress=False, cache_dir=tmp_path)
    assert again.history is None and again.clean_acc == pytest.approx(clean.clean_acc)  # from the cache


def test_the_demo_command_prints_a_table_and_writes_figures(tmp_path, capsys):
    cli(["demo", "--out", str(tmp_path), "--epochs", "1", "--rate", "0.05"])
    out = capsys.readouterr().out
    assert "| clean_acc |" in out and "| asr |" in out and "| stealth_ssim |" in out
    for name in ("trigger_gallery.png", "poisoned_samples.png", "training_curves.png"):
        assert (tmp_path / name).stat().st_size > 5000


def test_bench_poison_measures_both_ways():
    result = bench_poison(n=2000, repeats=1)
    assert result["images"] == 2000 and result["kit_seconds"] > 0 and result["loop_seconds"] > 0
    assert result["speedup"] == pytest.approx(result["loop_seconds"] / result["kit_seconds"], rel=0.01)
    assert result["speedup"] > 1, "one batched call must beat a Python loop over every image"


def test_bench_command_prints_json(capsys):
    cli(["bench", "poison", "--json", "--rate", "0.1", "--n", "1000"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["poison_rate"] == 0.1 and result["images"] == 1000


def test_cli_rejects_unknown_commands(capsys):
    assert cli(["train-everything"]) == 2
    with pytest.raises(SystemExit):
        cli(["demo", "--dataset", "imagenet"])


def test_bench_throughput_reports_images_per_second():
    from course_lib.bench import bench_throughput
    result = bench_throughput("resnet18", batch_size=4, steps=2)
    assert result["images_per_second"] > 0 and result["device"] == "cpu"


def test_bench_predict_times_both_layouts_and_batch_sizes(capsys):
    assert cli(["bench", "predict", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    timed = {k: v for k, v in result.items() if k.endswith("_seconds")}
    assert sorted(timed) == sorted(f"{layout}_batch_{size}_seconds" for layout in ("default_layout", "channels_last")
                                   for size in (128, 1024))
    assert all(v > 0 for v in timed.values()) and result["images"] == 10_000
