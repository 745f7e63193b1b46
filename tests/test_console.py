"""A quiet console: a run of the CLI or the app prints hallo3's own lines and nothing else, unless `--verbose`.

"hallo3's own lines" are read from the sources, not copied from an output: a line is the project's when one of the
logging calls of `hallo3/` or `app.py` (`logger.info("Wrote %s with %s", ...)`) can print it, when it is a frame of
the pipeline's progress bars (their `desc=` labels come from the sources too), or when it is a one-line `error: ...`.
A message that is mostly placeholders (`"%s: %s"`) fits lines of other origins too, so the library lines seen before
the console was quieted are also looked for by name (LIBRARY_MARKS).
"""

import ast
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from hallo3.settings import DEFAULTS

from .conftest import ASSETS
from .test_readme_commands import RunningApp, checkout, command_like, free_port  # noqa: F401


REPO = Path(__file__).parent.parent
SOURCES = [*sorted(REPO.glob("hallo3/**/*.py")), REPO / "app.py"]
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}
# what the libraries print when they are not kept quiet; none of it may show in a normal run
LIBRARY_MARKS = ("W0000", "absl", "INFO: Created TensorFlow", "DeprecationWarning", "FutureWarning", "torchao")
PLACEHOLDER = re.compile(r"%%|%[-#0 +]*\d*(?:\.\d+)?[a-zA-Z]")


def is_project_logger(receiver: ast.expr) -> bool:
    """`logger` (every module's hallo3 logger) or `logging.getLogger(__name__)`; not another library's logger."""
    if isinstance(receiver, ast.Name):
        return receiver.id == "logger"
    return (
        isinstance(receiver, ast.Call)
        and isinstance(receiver.func, ast.Attribute)
        and receiver.func.attr == "getLogger"
        and len(receiver.args) == 1
        and isinstance(receiver.args[0], ast.Name)
        and receiver.args[0].id == "__name__"
    )


def template_pattern(template: str) -> str:
    """A %-format message as a regex: the placeholders match anything, the rest itself."""
    parts = PLACEHOLDER.split(template)
    placeholders = PLACEHOLDER.findall(template)
    pattern = re.escape(parts[0])
    for placeholder, part in zip(placeholders, parts[1:]):
        pattern += ("%" if placeholder == "%%" else ".*") + re.escape(part)
    return pattern


def message_patterns(message: ast.expr) -> list[str]:
    """A regex for each line of a logging call's message: a %-format string or an f-string (whose fields match
    anything); nothing for a message built elsewhere."""
    if isinstance(message, ast.Constant) and isinstance(message.value, str):
        return [template_pattern(line) for line in message.value.split("\n")]
    if not isinstance(message, ast.JoinedStr):
        return []
    lines = [""]
    for value in message.values:
        if isinstance(value, ast.Constant):
            first, *rest = str(value.value).split("\n")
            lines[-1] += re.escape(first)
            lines += [re.escape(line) for line in rest]
        else:
            lines[-1] += ".*"
    return lines


def project_line_patterns() -> tuple[list[re.Pattern], list[str]]:
    """(a pattern for every line hallo3's logging calls can print, the labels of the pipeline's progress bars)."""
    lines: list[str] = []
    labels: list[str] = []
    for source in SOURCES:
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.Call):
                continue
            labels += [
                k.value.value
                for k in node.keywords
                if k.arg == "desc" and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)
            ]
            if not (
                isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS
                and is_project_logger(node.func.value)
                and node.args
            ):
                continue
            lines += message_patterns(node.args[0])
    assert len(lines) > 20 and {"clips", "steps"} <= set(labels)  # the sources were read
    # a message of placeholders alone ("%s") would pass every line of every library as hallo3's
    assert ".*" not in lines, "a hallo3 log message needs words of its own, not only placeholders"
    return [re.compile(line) for line in lines], labels


def foreign_lines(output: str) -> list[str]:
    """The lines of a console that are not hallo3's own."""
    patterns, labels = project_line_patterns()
    bar = re.compile(rf"(?:(?:{'|'.join(map(re.escape, labels))}): *)?\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]")
    foreign = []
    for line in output.removesuffix("\n").split("\n") if output else []:
        if "\r" in line:  # a progress bar redrawn in place; its blank frames clear the line
            frames = [frame for frame in line.replace("\x1b[A", "").split("\r") if frame.strip()]
            foreign += [frame for frame in frames if not bar.fullmatch(frame.strip())]
        elif not (line.startswith("error: ") or any(pattern.fullmatch(line) for pattern in patterns)):
            foreign.append(line)
    return foreign


def run_readme_cli_example(cwd: Path, extra: list[str] | None = None, **values: str) -> tuple[int, str, str]:
    """The README's tiny-random CLI example, with some flags' values replaced and `extra` flags added, run in `cwd`:
    (exit code, stdout, stderr). Read as bytes: text mode would turn a progress bar's carriage returns into lines."""
    (command,) = command_like("python -m hallo3.inference --model tiny-random")
    words = shlex.split(command)
    for flag, value in values.items():
        words[words.index(f"--{flag}") + 1] = value
    assert words[0] == "python"
    result = subprocess.run([sys.executable, *words[1:], *(extra or [])], cwd=cwd, capture_output=True, timeout=900)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def test_the_definition_of_a_project_line():
    """The test's own yardstick: hallo3's lines pass, a library's do not."""
    output = (
        "Using tiny-random: RANDOM WEIGHTS, not a trained model; the video is noise.\n"
        "vocals: not separated (no audio_separator model folder)\n"
        "\r  0%|          | 0/6 [00:00<?, ?it/s]\rclips:   0%|          | 0/6 [00:00<?, ?it/s]\n"
        "\r                                            \x1b[A\rsteps: 100%|##########| 1/1 [00:00<00:00,  6.05it/s]\n"
        "Wrote out.mp4 (9.80 s of video, 245 frames) in 48.3 s, seed 42 with tiny-random\n"
        "error: output out.mp4: already exists; choose another name or pass --overwrite.\n"
    )
    assert foreign_lines(output) == []
    library = [
        "W0000 00:00:1796437610.251571    7102 inference_feedback_manager.cc:114] Feedback manager requires ...",
        "generated new fontManager",
        "",
        "\rLoading pipeline components...:  40%|####      | 2/5 [00:01<00:01,  2.00it/s]",
    ]
    assert foreign_lines("\n".join(library) + "\n") == library[:3] + [library[3].removeprefix("\r")]
    # a message made of placeholders ("%s: %s") fits many a line; the library lines known to fit one are named
    assert foreign_lines("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n") == []
    assert "INFO: Created TensorFlow" in LIBRARY_MARKS


def test_the_readme_cli_example_prints_only_hallo3_lines(checkout):  # noqa: F811
    code, out, err = run_readme_cli_example(checkout, steps="1")  # one step per clip
    assert code == 0, err[-3000:]
    assert foreign_lines(out + err) == []
    assert not [mark for mark in LIBRARY_MARKS if mark in out + err]
    assert "Wrote out.mp4" in err and "face: mediapipe-face-mesh, 1 face(s)" in err and "clips: 100%" in err
    assert (checkout / "out.mp4").stat().st_size > 0


def test_verbose_shows_the_libraries_lines_again(checkout):  # noqa: F811
    """Stopped at its output folder after the face model is built (the first thing to print library lines)."""
    quiet = run_readme_cli_example(checkout, output="missing/out.mp4")
    verbose = run_readme_cli_example(checkout, ["--verbose"], output="missing/out.mp4")
    for code, _, err in (quiet, verbose):
        assert code == 2 and "error: output missing/out.mp4: the folder missing does not exist" in err
    assert foreign_lines(quiet[1] + quiet[2]) == []
    shown = foreign_lines(verbose[1] + verbose[2])
    # mediapipe's C++ log, as it prints it; its feedback-manager lines come from a graph thread, so under load the
    # process may end before they do: any of its lines shows that --verbose lets them through
    assert any(mark in line for line in shown for mark in ("inference_feedback_manager", "TensorFlow Lite", "absl"))
    assert "INFO: Created TensorFlow Lite" in verbose[2]


def test_help_names_the_command_and_says_the_defaults():
    result = subprocess.run(
        [sys.executable, "-m", "hallo3.inference", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0 and result.stderr == ""
    help_text = " ".join(result.stdout.split())  # argparse wraps lines
    assert help_text.startswith("usage: python -m hallo3.inference ")
    assert f"--steps NUM_INFERENCE_STEPS steps per clip (default: {DEFAULTS.num_inference_steps})" in help_text
    assert f"joint text+audio guidance (default: {DEFAULTS.guidance_scale})" in help_text
    assert f"(default: {DEFAULTS.motion_frames})" in help_text and "(default: tiny-random)" in help_text
    assert "--verbose" in help_text


TORCHAO_CHECK = """
import importlib.util, sys
import hallo3.inference, app
from hallo3.inference import PortraitAnimator
from hallo3.loading import load_pipeline
PortraitAnimator(load_pipeline("tiny-random"), "cpu")
print("after none:", "torchao" in sys.modules)
if importlib.util.find_spec("torchao") is not None:
    import torch
    loaded = load_pipeline("tiny-random", torch_dtype=torch.float32, memory_mode="int8-torchao")
    weight = loaded.pipeline.transformer.transformer_blocks[0].attn1.to_q.weight
    print("int8-torchao weight:", type(weight).__name__)
"""


def test_torchao_is_imported_only_for_its_memory_mode():
    """diffusers and transformers import torchao whenever it is installed; hallo3 keeps it out until asked."""
    result = subprocess.run([sys.executable, "-c", TORCHAO_CHECK], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "after none: False" in result.stdout
    if "int8-torchao weight" in result.stdout:  # torchao is installed: the mode still quantizes
        assert "Int8" in result.stdout or "Affine" in result.stdout, result.stdout


def test_the_app_console_holds_only_hallo3_lines_and_says_how_it_stopped(checkout, tmp_path):  # noqa: F811
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    port = free_port()
    app = RunningApp(["--port", str(port)], checkout, {}, f"http://127.0.0.1:{port}/")
    try:
        client = Client(app.url, verbose=False)
        not_an_image, speech = tmp_path / "photo.png", tmp_path / "speech.wav"
        not_an_image.write_text("not an image")
        t = np.arange(16000) / 16000  # one clip
        soundfile.write(speech, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
        with pytest.raises(AppError, match="photo.png: not an image file"):
            client.predict(handle_file(str(not_an_image)), handle_file(str(speech)), api_name="/generate")
        video, _ = client.predict(
            handle_file(str(ASSETS / "0001.jpg")), handle_file(str(speech)), steps=1, api_name="/generate"
        )
        assert video
    finally:
        returncode = app.stop()
    log = app.log()
    assert returncode == 0 and log.splitlines()[-1] == "Stopped by SIGTERM."
    assert foreign_lines(log) == []
    assert not [mark for mark in LIBRARY_MARKS if mark in log]
    assert signal.SIGTERM.name in log  # the line names the signal that stopped it
