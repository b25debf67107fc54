"""The CLI contract of every command: --help works, usage errors are one line naming the problem and the valid
choices (exit 2), failures are one line (exit 1), signals exit 128 + N, never a traceback."""

import errno
import warnings

import pytest
import torch

import edtir
from edtir.cli import COMMANDS, build_parser, main
from edtir.errors import Interrupted

REGISTERED = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_every_registered_command_is_known():
    assert set(REGISTERED) <= set(COMMANDS) and {"info", "eval", "restore", "train"} <= set(REGISTERED)


@pytest.mark.parametrize("command", REGISTERED)
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: edtir {command}")


#: what a command needs before argparse looks at the rest (missing required arguments are reported first)
REQUIRED = {"eval": ["--task", "sr-x2", "--data", "d"], "restore": ["in.png"], "train": ["c.yaml"], "info": []}


@pytest.mark.parametrize("command", REGISTERED)
def test_unknown_flag_is_one_line_exit_2(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, *REQUIRED.get(command, []), "--frobnicate", "--colour"])
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"edtir {command}: error: ") and line.endswith(f"(see edtir {command} --help)")
    if command in REQUIRED:
        assert "unrecognized arguments: --frobnicate --colour" in line and "options: " in line, line


def test_close_matches_are_suggested(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--task", "sr-x2", "--data", "x", "--tiles", "64"])
    line = one_line(capsys.readouterr().err)
    assert "did you mean --tile?" in line and "--tile-overlap" in line


def test_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate"])
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert "invalid choice: 'evaluate'" in line and "eval" in line and "restore" in line


@pytest.fixture(scope="module")
def x2_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "x2.safetensors"
    edtir.save_model(edtir.build_model("T", ["sr-x2"], depths=(2,)), path)
    return path


@pytest.fixture
def one_image(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray((torch.rand(32, 40, 3) * 255).byte().numpy()).save(folder / "a.png")
    return folder


@pytest.mark.parametrize("argv, needles", [
    (["eval", "--task", "sr-x5", "--model", "bicubic", "--data", "{data}"], ["sr-x5", "sr-x2 sr-x3 sr-x4"]),
    (["eval", "--task", "sr-x4", "--weights", "{w}", "--data", "{data}"], ["sr-x4", "sr-x2"]),
    (["restore", "{data}/a.png", "--task", "sr-x4", "--weights", "{w}", "-o", "{tmp}/o"], ["sr-x4", "sr-x2"]),
    (["restore", "{data}/a.png", "--task", "denoise-7", "--model", "bicubic", "-o", "{tmp}/o"], ["denoise-7"]),
    (["info", "--arch", "edt-t", "--tasks", "sr-x2,deblur"], ["deblur", "sr-x2 sr-x3"]),
    (["info", "--arch", "edt-q"], ["edt-q", "T, S, B, L"]),
    (["eval", "--task", "sr-x2", "--model", "bicubic", "--data", "{data}", "--precision", "fp16"],
     ["fp16", "fp32", "bf16"]),
])
def test_wrong_names_exit_2_naming_the_valid_choices(argv, needles, x2_weights, one_image, tmp_path, capsys):
    argv = [a.format(w=x2_weights, data=one_image, tmp=tmp_path) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse choices
        rc = e.code
    assert rc == 2
    out, err = capsys.readouterr()
    line = one_line(err)
    assert all(n in line for n in needles), line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def fail_with(monkeypatch, exc):
    from edtir.commands import info

    def run(args):
        raise exc

    monkeypatch.setattr(info, "run", run)


@pytest.mark.parametrize("exc, code, needle", [
    (OSError(errno.ENOSPC, "No space left on device", "out/x.png"), 1, "out/x.png: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/r.json"), 1, "Permission denied"),
    (MemoryError(), 1, "out of memory"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore text"), 1, "out of memory"),
    (KeyError("boom"), 1, "unexpected KeyError: 'boom' (set EDTIR_DEBUG=1"),
    (Interrupted("SIGTERM: stopped after step 7", 15), 143, "interrupted: SIGTERM"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_failures_are_one_line_with_their_exit_code(exc, code, needle, monkeypatch, capsys):
    fail_with(monkeypatch, exc)
    assert main(["info", "--list"]) == code
    line = one_line(capsys.readouterr().err)
    assert line.startswith("edtir info: ") and needle in line, line


def test_edtir_debug_shows_the_traceback(monkeypatch):
    fail_with(monkeypatch, KeyError("boom"))
    monkeypatch.setenv("EDTIR_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["info", "--list"])


def test_warnings_are_one_line(monkeypatch, capsys):
    from edtir.commands import info

    def run(args):
        warnings.warn("x.png: alpha channel dropped", stacklevel=1)
        return 0

    monkeypatch.setattr(info, "run", run)
    assert main(["info", "--list"]) == 0
    assert one_line(capsys.readouterr().err) == "edtir info: warning: x.png: alpha channel dropped"
