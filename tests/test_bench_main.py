"""gpunet.bench, the command line: the harness runs end to end at tiny sizes and writes its
JSON and its report. Nothing here asserts on a timing."""

import io
import json

import numpy as np
import pytest

import gpunet.bench.__main__ as cli
from gpunet.bench import common, report
from gpunet.backend import cuda_problem

TINY = ["--tiny", "--hidden", "16", "--repeats", "1"]


def run_quietly(argv):
    out, err = io.StringIO(), io.StringIO()
    result = cli.run(argv, out=out, err=err)
    return result, out.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    result, table = run_quietly([*TINY, "--json", str(path)])
    return result, table, path


def test_tiny_run_writes_the_json_it_returns(tiny):
    result, _, path = tiny
    written = json.loads(path.read_text())
    assert written == json.loads(json.dumps(result, default=common._jsonable))
    for key in ("machine", "versions", "threads", "settings", "results", "time_to_98", "date",
                "command"):
        assert key in written, key
    assert written["machine"]["cpu_count"] >= 1
    assert written["versions"]["numpy"] == np.__version__
    assert "env" in written["threads"] and "numpy_blas" in written["threads"]
    assert written["time_to_98"] == {"skipped": "--tiny"}
    assert written["gpu"] is None


def test_every_contender_has_its_samples_and_the_ratios_are_there(tiny):
    result, _, _ = tiny
    model = result["results"]["784-16-10"]
    assert model["steps_per_epoch"] == common.TINY_SAMPLES // 128
    assert set(model["contenders"]) == set(common.DEFAULT_CONTENDERS["cpu"])
    for key, entry in model["contenders"].items():
        if entry["status"].startswith("unavailable"):  # torch, where it is not installed
            assert key == "torch" and entry["samples"] == []
            continue
        assert entry["status"] == "ok", (key, entry["status"])
        assert len(entry["samples"]) == 1 and entry["median"] == entry["samples"][0] > 0
        assert len(entry["cpu_seconds"]) == 1
        assert entry["warmup_seconds"] > 0
    for key in ("trainer/floor", "trainer/floor_input_grad", "trainer/textbook",
                "layer_api/trainer"):
        assert model["ratios"][key] > 0
        within = model["ratios_within_rounds"][key]  # one round: the same ratio
        assert within["per_round"] == [pytest.approx(model["ratios"][key])]
        assert within["min"] == within["median"] == within["max"]
    available = [k for k in common.DEFAULT_CONTENDERS["cpu"]
                 if model["contenders"][k]["status"] == "ok"]
    assert model["order_per_round"] == [available]  # torch drops out where it is not installed


def test_the_table_names_every_contender(tiny):
    _, table, path = tiny
    for key in common.DEFAULT_CONTENDERS["cpu"]:
        assert f"| {common.CONTENDERS[key]} |" in table
    assert "| gpunet trainer / GEMM floor |" in table
    assert "### Ratios within each round" in table
    assert str(path) in table


def test_without_torch_its_contender_is_reported_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "_torch_cache", [common.Unavailable("PyTorch cannot be imported")])
    result, table = run_quietly([*TINY, "--contenders", "trainer,torch", "--cnn-steps", "1",
                                 "--json", str(tmp_path / "b.json")])
    entries = result["results"]["784-16-10"]["contenders"]
    assert entries["torch"]["status"].startswith("unavailable: PyTorch cannot be imported")
    assert entries["trainer"]["status"] == "ok"
    assert result["versions"]["torch"].startswith("unavailable")
    assert "| torch eager | unavailable" in table
    cnn = result["cnn"]
    assert cnn["contenders"]["torch"]["status"].startswith("unavailable: PyTorch cannot")
    assert cnn["contenders"]["gpunet"]["status"] == "ok" and "gpunet/torch" not in cnn
    assert cnn["conv_gemm_share"] > 0


def test_the_cnn_section_times_every_contender_on_the_same_steps(tiny):
    result, table, path = tiny
    cnn = json.loads(path.read_text())["cnn"]
    assert cnn["steps_per_sample"] == 2 and cnn["batch_size"] == 128
    assert cnn["steps_per_epoch"] == 430  # train.py's 55,000 training images
    for key, entry in cnn["contenders"].items():
        if key == "torch" and entry["status"].startswith("unavailable"):
            continue
        assert entry["status"] == "ok", (key, entry["status"])
        assert len(entry["samples"]) == 1 and entry["median_ms_per_step"] > 0
        assert entry["epoch_seconds"] == pytest.approx(
            entry["median_ms_per_step"] / 1e3 * 430)
    ms = {k: e.get("median_ms_per_step") for k, e in cnn["contenders"].items()}
    assert cnn["conv_gemm_share"] == pytest.approx(ms["conv_floor"] / ms["gpunet"])
    assert cnn["flops_per_step"]["conv"] == 2_890_137_600
    if ms["torch"]:
        assert cnn["gpunet/torch"] == pytest.approx(ms["gpunet"] / ms["torch"])
    assert "### Small CNN" in table and "| conv GEMM floor |" in table


def test_the_cnn_can_be_skipped(tmp_path):
    result, table = run_quietly([*TINY, "--contenders", "floor", "--cnn-steps", "0",
                                 "--json", str(tmp_path / "b.json")])
    assert result["cnn"] == {"skipped": "--cnn-steps 0"}
    assert "Small CNN: --cnn-steps 0" in table


def test_rounds_rotate_the_order(tmp_path):
    result, _ = run_quietly(["--tiny", "--hidden", "8", "--repeats", "3", "--contenders",
                             "floor,floor-input-grad,textbook", "--cnn-steps", "0",
                             "--json", str(tmp_path / "b.json")])
    assert result["results"]["784-8-10"]["order_per_round"] == [
        ["floor", "floor_input_grad", "textbook"],
        ["floor_input_grad", "textbook", "floor"],
        ["textbook", "floor", "floor_input_grad"]]


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "expected cpu, cuda or cuda:N"),
    (["--contenders", "trainer,jax"], "expected a comma list"),
    (["--hidden", "0"], "expected positive hidden widths"),
    (["--cnn-steps", "-1"], "expected an integer >= 0"),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, message):
    assert cli.main([*TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(cuda_problem() is None, reason="a GPU is usable here")
def test_cuda_without_a_gpu_is_a_one_line_error(capsys, tmp_path):
    assert cli.main([*TINY, "--device", "cuda", "--json", str(tmp_path / "b.json")]) == 1
    err = capsys.readouterr().err
    assert "cannot be used" in err and err.count("\n") == 1


@pytest.mark.cuda
def test_tiny_run_on_the_gpu(tmp_path):
    # torch.compile's first compile takes minutes: it runs last and on its own in tools/gpu-check
    result, table = run_quietly([*TINY, "--device", "cuda", "--json", str(tmp_path / "g.json"),
                                 "--contenders", "trainer,layer_api,torch,floor"])
    model = result["results"]["784-16-10"]
    assert model["contenders"]["trainer"]["status"] == "ok"
    assert result["gpu"]["empty_launch"]["seconds"] > 0
    assert "Launch overhead" in table


def test_gpu_section_reports_numbers_and_errors_alike(tiny):
    """The GPU part of the table, from a result shaped like a GPU run's (none runs here)."""
    result, _, _ = tiny
    kernel = {"seconds": 5e-6, "gb_per_s": 1.2, "samples": [5e-6]}
    gpu = {
        "empty_launch": {"seconds": 2.5e-6, "samples": [2.5e-6], "launches": 20000},
        "launch_floor": {"784-16-10": {"trainer": {
            "device_ops_per_step": 14.0, "kernels_per_step": 12.0,
            "launch_floor_seconds": 0.01, "median_seconds": 0.03,
            "median_over_launch_floor": 3.0}}},
        "cross_entropy": {
            "copy_bandwidth": {"seconds": 1e-3, "gb_per_s": 4000.0, "bytes": 1 << 31},
            "rows": [{"shape": [128, 10], "dtype": "float32", "gpunet": kernel, "torch": kernel},
                     {"shape": [128, 10], "dtype": "bfloat16",
                      "gpunet": {"error": "unavailable: CuPy 13.6.0 has no bfloat16"},
                      "torch": kernel}],
            "launches_128x10": {"calls": 100, "per_call": {"kernels": 1.0, "memcpy": 0.0,
                                                           "memset": 0.0,
                                                           "launch_api_calls": 1.0}}},
        "relu_backward": {"rows": [{"shape": [100352, 32], "bytes": 38535296, "groups": 528,
                                    "planned": kernel, "one group": {"error": "RuntimeError: x"}}]},
    }
    table = report.format_report({**result, "gpu": gpu})
    assert "empty kernel launch (CuPy RawKernel, host side): 2.50 µs" in table
    assert "| 784-16-10 | gpunet trainer | 12.0 | 14.0 | 0.0100 | 0.0300 | 3.00 |" in table
    assert "4000 GB/s" in table and "unavailable: CuPy 13.6.0" in table
    assert "fused CE at (128, 10): 1.0 kernels" in table
    assert "| 100352×32 | 528 | 5.0 | 1.2 | RuntimeError: x | RuntimeError: x |" in table
