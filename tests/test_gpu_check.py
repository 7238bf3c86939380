"""tools/gpu-check without a GPU: its arguments and refusals, the choice of steps (a step left
out launches nothing), what it reads from pytest and compute-sanitizer, a rerun from a report,
and a run of a few steps on this machine. Nothing here asserts on a timing."""

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from gpunet import backend

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu-check"


def load_tool():
    """The script, which has no .py, as a module."""
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(TOOL))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


gc = load_tool()


# ---- a GPU machine that answers as a healthy one would, without running anything

def kind_of(cmd) -> str:
    """Which step launched ``cmd``."""
    if cmd[0].endswith("compute-sanitizer"):
        return cmd[cmd.index("--tool") + 1]
    if "train.py" in cmd:
        return "cnn" if "--model" in cmd else "train"
    if "gpunet.bench" in cmd:
        return "bench-compile" if "trainer,torch_compile" in cmd else "bench"
    if "pytest" in cmd:
        return "pytest"
    if "gpunet.gradcheck" in cmd:
        return "gradcheck"
    if gc.COMPILE_LATENCY in cmd:
        return "nvrtc"
    if gc.MACHINE in cmd:
        return "machine"
    raise AssertionError(f"a command no step launches: {cmd}")


TRAIN_LINES = ("device cuda:0 (Fake GPU) | dataset mnist | model mlp 784-512-10 | sgd lr 0.1\n"
               "epoch 1/6 ...\n"
               "test accuracy {acc}% (test loss 0.0600) after 6 epochs, 9.5s\n")
HEALTHY = {
    "machine": (0, 'MACHINE {"problem": null, "gpu": "Fake GPU", "driver": 13000, '
                   '"runtime": 13000, "cupy": "14.0", "nvrtc": [13, 0], "sms": 132, '
                   '"torch": "2.11"}\n', ""),
    "pytest": (0, "....\n346 passed, 1608 deselected in 80.00s\n", ""),
    "memcheck": (0, "sgd test accuracy 0.9\n", "========= ERROR SUMMARY: 0 errors\n"),
    "racecheck": (0, "ok\n", "========= RACECHECK SUMMARY: 0 hazards displayed "
                             "(0 errors, 0 warnings)\n"),
    "train": (0, TRAIN_LINES.format(acc="98.20"), ""),
    "cnn": (0, TRAIN_LINES.format(acc="98.90"), ""),
    "gradcheck": (0, "gradient check on cuda:0 (Fake GPU)\n40 of 40 below 1e-06\n", ""),
    "nvrtc": (0, "LATENCY first_call=0.3000 second_call=0.000100 import_and_upload=1.000\n", ""),
    "bench": (0, "the table\n\nwrote bench-cuda.json\n", "progress\n"),
    "bench-compile": (0, "the torch.compile table\n", ""),
}


class FakeProcess:
    def __init__(self, fake, cmd, answer):
        self.fake, self.cmd, self.pid = fake, cmd, -1
        self.returncode, self.stdout, self.stderr = answer

    def communicate(self, timeout=None):
        self.fake.timeouts.append((kind_of(self.cmd), timeout))
        if self.returncode == "hangs" and timeout is not None:
            raise subprocess.TimeoutExpired(self.cmd, timeout)
        if self.returncode == "interrupted":
            raise KeyboardInterrupt  # the device tool's time limit, say
        return self.stdout, self.stderr


class FakeGPU:
    """Stands in for subprocess.Popen: records what each command was and answers it."""

    def __init__(self):
        self.commands, self.timeouts, self.killed = [], [], []
        self.answers = dict(HEALTHY)

    def __call__(self, cmd, **kwargs):
        self.commands.append(cmd)
        return FakeProcess(self, cmd, self.answers[kind_of(cmd)])

    def kinds(self) -> list:
        return [kind_of(cmd) for cmd in self.commands]


@pytest.fixture
def fake(monkeypatch):
    """The tool's own subprocess, os.killpg and shutil.which, faked (the test's stay real)."""
    gpu = FakeGPU()
    monkeypatch.setattr(gc, "subprocess", types.SimpleNamespace(
        Popen=gpu, PIPE=subprocess.PIPE, TimeoutExpired=subprocess.TimeoutExpired))
    monkeypatch.setattr(gc, "os", types.SimpleNamespace(
        killpg=lambda pid, sig: gpu.killed.append(pid), environ=os.environ, pathsep=os.pathsep))
    monkeypatch.setattr(gc, "shutil", types.SimpleNamespace(which=lambda name: None))
    monkeypatch.setattr(gc, "find_sanitizer", lambda: "/fake/bin/compute-sanitizer")
    return gpu


def check(tmp_path, *argv, out="out"):
    """gpu-check's exit status and report.json, for ``argv`` on the fake GPU."""
    code = gc.main(["--out", str(tmp_path / out), "--data-dir", str(tmp_path), *argv])
    return code, json.loads((tmp_path / out / "report.json").read_text())


ALL_KINDS = ["machine", "pytest", "train", "train", "cnn", "memcheck", "memcheck", "racecheck",
             "gradcheck", "nvrtc", "nvrtc", "bench", "bench-compile"]


# ---- the arguments

@pytest.mark.parametrize("argv, said", [
    (["--only", "pytest,gpu"], "argument --only: expected a comma list of machine, pytest, "
                               "train, cnn, memcheck, racecheck, gradcheck, nvrtc, bench, "
                               "bench-compile, got 'pytest,gpu'"),
    (["--only", ","], "argument --only: expected a comma list of machine"),
    (["--skip", "machine"], "argument --skip: machine always runs (it names the GPU); expected "
                            "a comma list of pytest, train"),
    (["--only", "pytest", "--from-report", "report.json"],
     "argument --from-report: not allowed with argument --only"),
    (["--budget", "0"], "argument --budget: expected a positive number of seconds, got '0'"),
    (["--budget", "soon"], "argument --budget: expected a positive number of seconds, got 'soon'"),
    (["--pytest-args", "-k 'graph"], "argument --pytest-args: expected pytest's arguments as one "
                                     "shell-quoted string, got \"-k 'graph\""),
    (["--skip", "pytest", "--pytest-args", "-k graph"],
     "argument --pytest-args: it selects pytest, which --skip leaves out"),
])
def test_a_wrong_argument_is_refused_in_one_line_before_any_work(argv, said, tmp_path, fake,
                                                                    capsys):
    with pytest.raises(SystemExit) as exit:
        gc.main(["--out", str(tmp_path / "out"), *argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"tools/gpu-check: error: {said}")
    assert fake.commands == [] and not (tmp_path / "out").exists()


def test_a_report_that_is_missing_or_not_gpu_checks_is_refused(tmp_path, fake, capsys):
    (tmp_path / "notes.txt").write_text("not json")
    (tmp_path / "other.json").write_text('{"steps": {"lint": "passed"}}')
    cases = [(tmp_path / "none.json", "cannot read"), (tmp_path / "notes.txt", "which is not JSON"),
             (tmp_path / "other.json", "which has no status for each step")]
    for path, said in cases:
        with pytest.raises(SystemExit) as exit:
            gc.main(["--out", str(tmp_path / "out"), "--from-report", str(path)])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith("tools/gpu-check: error: argument --from-report: ") and said in err
    assert fake.commands == []


def test_help_lists_every_step(capsys):
    with pytest.raises(SystemExit) as exit:
        gc.main(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for name in gc.STEP_NAMES:
        assert f"\n  {name} " in text, name
    assert "--from-report .gpu-check/report.json" in text


# ---- which steps run

def test_the_steps_chosen_keep_their_order_and_machine_always():
    select = gc.select_steps
    assert select(None, None, None, []) == list(gc.STEP_NAMES)
    assert select(["train", "pytest"], None, None, []) == ["machine", "pytest", "train"]
    assert select(None, ["bench", "bench-compile"], None, []) == list(gc.STEP_NAMES[:-2])
    assert select(["cnn"], None, None, ["-k", "graph"]) == ["machine", "pytest", "cnn"]
    assert select(["machine"], None, None, []) == ["machine"]


def test_a_report_reruns_what_it_did_not_show_to_pass():
    report = {"steps": {"machine": "passed", "pytest": "failed", "memcheck": "passed",
                        "racecheck": "skipped", "train": "not finished", "cnn": "not finished",
                        "gradcheck": "not selected", "nvrtc": "done", "bench": "not finished",
                        "bench-compile": "not finished"}}
    assert gc.rerun_steps(report) == ["pytest", "train", "cnn", "racecheck", "bench"]
    assert gc.select_steps(None, ["bench"], report, []) == ["machine", "pytest", "train", "cnn",
                                                            "racecheck"]
    report["steps"]["bench-compile"] = "failed"
    assert gc.rerun_steps(report)[-1] == "bench-compile"


def test_a_report_reruns_the_failed_tests_or_all_where_some_were_skipped():
    report = {"pytest": {"counts": {"failed": 2, "error": 1, "passed": 300},
                         "failed": ["tests/a.py::x[cuda]", "tests/a.py::y"],
                         "errors": ["tests/b.py::z"], "skipped": {}}}
    assert gc.rerun_tests(report) == ["tests/a.py::x[cuda]", "tests/a.py::y", "tests/b.py::z"]
    report["pytest"]["counts"]["skipped"] = 3
    assert gc.rerun_tests(report) == []
    assert gc.rerun_tests({}) == []


# ---- reading pytest's and compute-sanitizer's output

FAILING_TESTS = '''
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture - broke")

@pytest.mark.parametrize("x", ["a b", "c-d - e"])
def test_p(x):
    print("FAILED not_a_node_id - printed by the test")
    assert x == "z", "message - with a dash"

def test_e(broken):
    pass

def test_ok():
    pass

@pytest.mark.skip(reason="no usable CUDA GPU: none here")
def test_s():
    pass
'''


def run_pytest(folder: Path, *paths):
    """pytest with the flags gpu-check gives it: its exit status, stdout and stderr."""
    done = subprocess.run([sys.executable, "-m", "pytest", *gc.PYTEST_FLAGS, "--rootdir",
                           str(folder), *paths], cwd=folder, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=120)
    return done.returncode, done.stdout, done.stderr


def test_pytest_s_own_summary_gives_the_counts_and_node_ids(tmp_path):
    (tmp_path / "test_a.py").write_text(FAILING_TESTS)
    found = gc.parse_pytest(run_pytest(tmp_path, "test_a.py")[1])
    assert found["counts"] == {"failed": 2, "passed": 1, "skipped": 1, "error": 1}
    assert found["failed"] == ["test_a.py::test_p[a b]", "test_a.py::test_p[c-d - e]"]
    assert found["errors"] == ["test_a.py::test_e"]
    assert found["skipped"] == {"no usable CUDA GPU: none here": 1}


def test_an_error_while_collecting_names_the_file(tmp_path):
    (tmp_path / "test_b.py").write_text("import a_module_that_is_not_there\n")
    found = gc.parse_pytest(run_pytest(tmp_path, "test_b.py")[1])
    assert found["counts"] == {"error": 1}
    assert found["errors"] == ["test_b.py"] and found["failed"] == []


def test_pytest_output_cut_off_before_its_summary_gives_nothing():
    found = gc.parse_pytest("....F..\nFAILED tests/a.py::x - printed before the end\n")
    assert found == {"counts": {}, "failed": [], "errors": [], "skipped": {}}


def test_the_sanitizer_summaries():
    assert gc.sanitizer_summary("========= ERROR SUMMARY: 0 errors\n") == {"errors": 0}
    assert gc.sanitizer_summary("========= Invalid __global__ write\n"
                                "========= ERROR SUMMARY: 1 error\n") == {"errors": 1}
    assert gc.sanitizer_summary("========= RACECHECK SUMMARY: 0 hazards displayed "
                                "(0 errors, 0 warnings)\n") == {"hazards": 0, "errors": 0,
                                                               "warnings": 0}
    assert gc.sanitizer_summary("========= RACECHECK SUMMARY: 3 hazards displayed "
                                "(1 error, 2 warnings)\n") == {"hazards": 3, "errors": 1,
                                                              "warnings": 2}
    assert gc.sanitizer_summary("Traceback (most recent call last):\n") is None
    said = gc.sanitizer_complaint("========= COMPUTE-SANITIZER\n=========\n"
                                  "========= Error: Device not supported\n", 1)
    assert said == "no summary (exit 1): Error: Device not supported"
    said = gc.sanitizer_complaint("Traceback (most recent call last):\nImportError: no cupy\n", 1)
    assert said == "no summary (exit 1): ImportError: no cupy"
    assert gc.sanitizer_complaint("", None) == "no summary (timed out)"


# ---- whole runs on the fake GPU

def test_a_healthy_run_passes_every_check(tmp_path, fake, capsys):
    code, report = check(tmp_path)
    assert code == 0 and fake.kinds() == ALL_KINDS
    assert report["failed"] == [] and gc.rerun_steps(report) == []
    assert report["steps"] == {**{name: "passed" for name in gc.STEP_NAMES},
                               "bench-compile": "done"}
    assert report["machine"]["gpu"] == "Fake GPU"
    out = capsys.readouterr().out
    assert "PASS  racecheck, cross-entropy and ReLU backward: 0 hazards" in out
    assert "PASS  train.py --device cuda, graph: 98.2% test accuracy in 9.5 s" in out
    assert "to rerun" not in out


@pytest.mark.parametrize("argv, kinds", [
    (["--only", "racecheck"], ["machine", "racecheck"]),
    (["--only", "machine"], ["machine"]),
    (["--only", "train,gradcheck"], ["machine", "train", "train", "gradcheck"]),
    (["--skip", "pytest,memcheck,racecheck,train,bench,bench-compile"],
     ["machine", "cnn", "gradcheck", "nvrtc", "nvrtc"]),
    (["--only", "cnn", "--pytest-args", "-k graph"], ["machine", "pytest", "cnn"]),
])
def test_a_step_left_out_launches_nothing(argv, kinds, tmp_path, fake):
    code, report = check(tmp_path, *argv)
    assert code == 0 and fake.kinds() == kinds
    ran = set(kinds)
    for name, status in report["steps"].items():
        assert status == ("passed" if name in ran else "not selected"), name


def test_pytest_args_pass_through(tmp_path, fake):
    check(tmp_path, "--only", "pytest", "--pytest-args", "-k 'graph and not cnn' -x")
    pytest_cmd = fake.commands[1]
    assert pytest_cmd[pytest_cmd.index("no:cacheprovider") + 1:] == ["-k", "graph and not cnn",
                                                                     "-x"]


FAILED_PYTEST = (1, ".F.E\n=== short test summary info ===\n"
                    "FAILED tests/test_graph.py::test_replay[cuda] - AssertionError: 1 != 2\n"
                    "ERROR tests/test_kernels_cuda.py::test_big_c - RuntimeError: boom\n"
                    "1 failed, 340 passed, 1 error in 90.00s\n", "")


def test_a_second_call_reruns_what_failed_and_only_the_failed_tests(tmp_path, fake, capsys):
    fake.answers["pytest"] = FAILED_PYTEST
    fake.answers["cnn"] = (0, TRAIN_LINES.format(acc="98.10"), "")
    code, first = check(tmp_path, out="first")
    assert code == 1
    assert first["steps"]["pytest"] == "failed" and first["steps"]["cnn"] == "failed"
    assert first["pytest"]["failed"] == ["tests/test_graph.py::test_replay[cuda]"]
    assert first["pytest"]["errors"] == ["tests/test_kernels_cuda.py::test_big_c"]
    out = capsys.readouterr().out
    assert "FAIL  pytest -m cuda: 1 failed, 340 passed, 1 error: " \
           "tests/test_graph.py::test_replay[cuda], tests/test_kernels_cuda.py::test_big_c" in out
    assert "to rerun pytest, cnn" in out and "--from-report .gpu-check/report.json" in out

    carried = tmp_path / ".gpu-check" / "report.json"
    carried.parent.mkdir()
    carried.write_text((tmp_path / "first" / "report.json").read_text())
    fake.commands.clear()
    fake.answers = dict(HEALTHY)
    code, second = check(tmp_path, "--from-report", str(carried), "--budget", "150", out="second")
    assert code == 0 and fake.kinds() == ["machine", "pytest", "cnn"]
    assert fake.commands[1][-2:] == ["tests/test_graph.py::test_replay[cuda]",
                                     "tests/test_kernels_cuda.py::test_big_c"]
    assert "tests" not in fake.commands[1]
    assert second["from_report"] == str(carried)
    assert [n for n, s in second["steps"].items() if s != "not selected"] == ["machine", "pytest",
                                                                              "cnn"]


def test_a_rerun_of_racecheck_alone_keeps_no_time_for_steps_not_selected(tmp_path, fake):
    # Before the gradient check racecheck leaves it two minutes: in 100 s it is skipped.
    code, report = check(tmp_path, "--only", "racecheck,gradcheck", "--budget", "100")
    assert "racecheck" not in fake.kinds() and report["steps"]["racecheck"] == "skipped"
    assert gc.rerun_steps(report) == ["racecheck"]
    # Alone, it runs in the same budget.
    fake.commands.clear()
    code, report = check(tmp_path, "--only", "racecheck", "--budget", "100")
    assert code == 0 and fake.kinds() == ["machine", "racecheck"]


def test_memcheck_leaves_the_steps_after_it_a_minute_and_a_half(tmp_path, fake):
    code, report = check(tmp_path, "--only", "memcheck,gradcheck", "--budget", "100")
    assert "memcheck" not in fake.kinds() and report["steps"]["memcheck"] == "skipped"
    fake.timeouts.clear()
    check(tmp_path, "--only", "memcheck,gradcheck", "--budget", "400")
    assert [t for kind, t in fake.timeouts if kind == "memcheck"] == [120, 120]
    fake.timeouts.clear()
    check(tmp_path, "--only", "memcheck", "--budget", "100")  # alone: all it has, 2 minutes at most
    assert all(t <= 100 for kind, t in fake.timeouts if kind == "memcheck")


def test_the_bench_keeps_a_minute_for_torch_compile_only_when_that_runs(tmp_path, fake):
    check(tmp_path, "--only", "bench", "--budget", "300")
    check(tmp_path, "--only", "bench,bench-compile", "--budget", "300")
    alone, before_compile = [t for kind, t in fake.timeouts if kind == "bench"]
    assert alone > 250 > before_compile


def test_a_command_out_of_time_is_killed_and_its_step_fails(tmp_path, fake, capsys):
    fake.answers["pytest"] = ("hangs", "", "")
    code, report = check(tmp_path, "--only", "pytest", "--budget", "100")
    assert code == 1 and fake.killed == [-1]
    assert report["steps"]["pytest"] == "failed"
    assert report["commands"]["pytest -m cuda"]["exit"] is None
    assert "FAIL  pytest -m cuda: no summary; timed out\n" in capsys.readouterr().out
    assert gc.rerun_tests(report) == []  # so all of pytest -m cuda again


def test_a_pytest_run_that_crashes_names_the_test_it_was_in(tmp_path, fake, capsys):
    (tmp_path / "test_c.py").write_text("import os\n\ndef test_fine():\n    pass\n\n"
                                        "def test_crash():\n    os.abort()\n")
    fake.answers["pytest"] = run_pytest(tmp_path, "test_c.py")  # what a real crash prints
    code, report = check(tmp_path, "--only", "pytest")
    assert code == 1 and report["steps"]["pytest"] == "failed"
    assert "FAIL  pytest -m cuda: no summary; exit -6; Fatal Python error: Aborted; " \
           "its last line: test_c.py::test_crash" in capsys.readouterr().out


def test_a_run_cut_short_leaves_a_report_that_reruns_the_rest(tmp_path, fake):
    fake.answers["cnn"] = ("interrupted", "", "")
    with pytest.raises(KeyboardInterrupt):
        check(tmp_path)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"]["train"] == "passed"
    assert gc.rerun_steps(report) == ["cnn", "memcheck", "racecheck", "gradcheck", "nvrtc",
                                      "bench"]


def test_the_printed_summary_stays_short_with_many_failures(tmp_path, fake, capsys):
    failed = "".join(f"FAILED tests/test_kernels_cuda.py::test_case_{i}[cuda-float16-"
                     f"{'x' * 60}] - AssertionError: {'y' * 300}\n" for i in range(300))
    fake.answers["pytest"] = (1, f"=== short test summary info ===\n{failed}"
                                 "300 failed, 46 passed in 200.00s\n", "")
    fake.answers["machine"] = (1, "", "Traceback\n" + "z" * 5000 + "\n")
    code, report = check(tmp_path)
    out = capsys.readouterr().out
    assert code == 1 and len(report["pytest"]["failed"]) == 300
    assert len(out) < 6000  # the device tool returns the last 12,000 characters
    assert "and 290 more in report.json" in out


# ---- on this machine, for real

@pytest.mark.skipif(backend.cuda_problem() is None,
                    reason="a GPU is usable here: this run checks the report of a machine "
                           "without one")
def test_a_run_here_without_a_gpu_fails_with_a_readable_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run([sys.executable, str(TOOL), "--only", "machine,memcheck,gradcheck",
                           "--out", str(tmp_path), "--budget", "60"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["commands"]) <= {"machine", "nvidia-smi", "memcheck graph",
                                       "memcheck eager", "gradcheck"}
    assert report["steps"]["machine"] == "failed"
    assert report["machine"]["problem"] == backend.cuda_problem()
    assert {name for name, s in report["steps"].items() if s == "not selected"} == \
        set(gc.STEP_NAMES) - {"machine", "memcheck", "gradcheck"}
    text = (tmp_path / "report.txt").read_text()
    assert f"FAIL  GPU usable (backend.cuda_problem): not usable: {backend.cuda_problem()}" in text
    assert "FAIL  gradcheck --device cuda: exit 2: python -m gpunet.gradcheck: error: device 'cuda' cannot be used" in text
    assert (tmp_path / "gpu-check.log").exists()
    assert done.stdout.splitlines()[0] == "gpu-check: machine, memcheck, gradcheck in 60 s"
    assert "to rerun machine, memcheck, gradcheck" in done.stdout
