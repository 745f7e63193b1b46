"""Every command the README shows, started the way a user starts it: as a subprocess, with the README's own words.

Each shell command in the README's ```bash blocks is either run here verbatim (in a scratch folder laid out like a
checkout), run by `.ci/run` verbatim (the install and test lines), or listed in NEEDS_REAL_WEIGHTS with the reason it
cannot run on a CPU without the official download. A new README command that is none of these fails
`test_every_readme_command_is_covered`.
"""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from .conftest import ASSETS, FIXTURE_A
from .official_layout import build_official_layout, save_fixture_wav2vec


REPO = Path(__file__).parent.parent
README = REPO / "README.md"

# commands that need the official weights (or a GPU), and what runs in their place here
NEEDS_REAL_WEIGHTS = {
    "python -m hallo3.inference --model pretrained_models": "real weights; the same CLI runs on tiny-random below",
    "accelerate launch -m hallo3.inference --model pretrained_models": "real weights on GPUs",
    "hf download fudan-generative-ai/hallo3": "the Hub; tests/official_layout.py builds the same layout, tiny",
    "python -m train.prepare_dataset --videos data/videos": "a real data set and the official models",
    "accelerate launch --config_file train/configs/accelerate/": "GPUs; tests/test_train.py launches the shipped "
    "configs on 2 CPU processes",
}


def shell_commands(script: str) -> list[str]:
    """Commands of a shell script, continuation lines joined, comments dropped, spacing normalised."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def readme_commands() -> list[str]:
    """The commands of the README's ```bash blocks."""
    return [
        c for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S) for c in shell_commands(block)
    ]


def run_by_ci(command: str) -> bool:
    """`command` is a line of .ci/run, or one of the `&&`-joined steps of one. A CI line may end in `|| exit 1`:
    `set -e` does not stop at a failure inside an `&&` list, so a failing test in the middle would pass unnoticed."""
    lines = [line.removesuffix(" '||' exit 1") for line in shell_commands((REPO / ".ci" / "run").read_text())]
    return command in lines or command in [step for line in lines for step in line.split(" '&&' ")]


def command_like(prefix: str) -> list[str]:
    found = [command for command in readme_commands() if command.startswith(prefix)]
    assert found, f"the README has no command starting with {prefix!r}"
    return found


def run_verbatim(command: str, cwd: Path, timeout: int = 600, env: dict | None = None):
    """`python ...` and `accelerate ...` run from this environment; leading `NAME=value` words set the environment,
    as the shell does; everything else as written."""
    words = shlex.split(command)
    env = {**os.environ, **(env or {})}
    while "=" in words[0] and words[0].split("=")[0].isidentifier():
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if words[0] == "python":
        words[0] = sys.executable
    elif words[0] == "accelerate":
        words[0] = str(Path(sys.executable).parent / "accelerate")
    return subprocess.run(words, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A scratch folder with the checkout's read-only parts linked in: outputs land here, not in the repository."""
    for name in ("assets", "train", "tests", "benchmarks", "app.py"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


# --------------------------------------------------------------------------------------------------------------------


RUN_HERE = (
    "python app.py",
    "python -m hallo3.inference --model tiny-random",
    "python -m hallo3.convert_sat_checkpoint --checkpoint pretrained_models/hallo3",
    "python -m hallo3.convert_sat_vae --checkpoint pretrained_models/",
    "python -m hallo3.save_pipeline --model pretrained_models",
    "python -m train.synthetic_data",
    "python -m train.prepare_dataset --videos runs/tiny-raw/videos",
    "python -m train.train --config train/configs/tiny.yaml",
    "ACCELERATE_USE_CPU=1 accelerate launch --config_file train/configs/accelerate/ddp.yaml",
    "python benchmarks/gpu_check.py --smoke",
    "python -m hallo3.evaluate",
)


def test_every_readme_command_is_covered():
    uncovered = [
        command
        for command in readme_commands()
        if not run_by_ci(command)
        and not command.startswith(RUN_HERE)
        and not command.startswith(tuple(NEEDS_REAL_WEIGHTS))
    ]
    assert not uncovered, f"README commands no test runs: {uncovered}"


def test_ci_runs_the_readme_install_and_test_lines():
    commands = readme_commands()
    install = [c for c in commands if c.startswith(("python3 -m venv", "pip install"))]
    test = [c for c in commands if "python -m pytest" in c]
    assert install and test
    assert all(run_by_ci(command) for command in install + test), "README install/test lines differ from .ci/run"


def test_cli_example_runs_verbatim(checkout):
    from hallo3.video_io import probe_video

    (command,) = command_like("python -m hallo3.inference --model tiny-random")
    result = run_verbatim(command, checkout)
    assert result.returncode == 0, result.stderr[-3000:]
    output = checkout / shlex.split(command)[shlex.split(command).index("--output") + 1]
    info = probe_video(output)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["num_frames"] > 0


@pytest.fixture
def checkout_with_download(checkout) -> Path:
    """The checkout with a tiny `pretrained_models/` laid out as the official download."""
    build_official_layout(checkout)
    return checkout


def test_conversion_commands_run_verbatim_on_the_download(checkout_with_download):
    from diffusers import AutoencoderKLCogVideoX

    from hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel

    commands = [
        *command_like("python -m hallo3.convert_sat_checkpoint --checkpoint pretrained_models/hallo3"),
        *command_like("python -m hallo3.convert_sat_vae --checkpoint pretrained_models/"),
    ]
    for command in commands:
        result = run_verbatim(command, checkout_with_download)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    converted = checkout_with_download / "pretrained_models" / "hallo3-diffusers"
    Hallo3Transformer3DModel.from_pretrained(converted / "transformer")
    Hallo3ReferenceNet.from_pretrained(converted / "reference_net")
    AutoencoderKLCogVideoX.from_pretrained(converted / "vae")


def test_save_pipeline_command_runs_verbatim_on_the_download(checkout_with_download):
    from diffusers import DiffusionPipeline

    (command,) = command_like("python -m hallo3.save_pipeline --model pretrained_models")
    result = run_verbatim(command, checkout_with_download, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    output = checkout_with_download / shlex.split(command)[shlex.split(command).index("--output") + 1]
    pipe = DiffusionPipeline.from_pretrained(output, trust_remote_code=True)
    from safetensors.torch import load_file

    saved = load_file(next((output / "transformer").glob("*.safetensors")))
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}  # the command's default
    assert type(pipe.vae).__name__ == "AutoencoderKLCogVideoX" and pipe.vae.config.scaling_factor == 0.7


def test_training_smoke_commands_run_verbatim(checkout):
    commands = [
        *command_like("python -m train.synthetic_data --output runs/tiny-raw"),
        *command_like("python -m train.prepare_dataset --videos runs/tiny-raw/videos"),
        *command_like("python -m train.train --config train/configs/tiny.yaml"),
        *command_like("ACCELERATE_USE_CPU=1 accelerate launch --config_file train/configs/accelerate/ddp.yaml"),
    ]
    for command in commands:
        result = run_verbatim(command, checkout)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    exported = list((checkout / "runs").rglob("final/transformer/config.json"))
    assert exported, "the smoke run exported no transformer"


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="talking heads speak with espeak-ng")
def test_talking_heads_and_evaluation_commands_run_verbatim(checkout):
    """The synthetic talking heads, then the evaluator on a held-out one: its lips follow its speech."""
    import json

    commands = [
        *command_like("python -m train.synthetic_data talking-heads"),
        *command_like("python -m hallo3.evaluate"),
    ]
    for command in commands:
        result = run_verbatim(command, checkout)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    (evaluate,) = command_like("python -m hallo3.evaluate")
    words = shlex.split(evaluate)
    report = json.loads((checkout / words[words.index("--json") + 1]).read_text())
    assert report["face_found"] > 0.95 and report["frame_count_ok"] and report["lip_sync"] > 0.8
    assert "lip sync" in result.stdout


def test_gpu_check_smoke_runs_verbatim_on_the_cpu(checkout):
    import json

    (command,) = command_like("python benchmarks/gpu_check.py --smoke")
    result = run_verbatim(command, checkout)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((checkout / shlex.split(command)[-1]).read_text())
    assert table  # one row per check, each measured or saying why it could not run


def test_save_pipeline_assembles_the_converted_fixture_with_stock_parts(tmp_path):
    """The converter output + T5/VAE/wav2vec2 folders -> one folder that diffusers' generic entry loads."""
    from hallo3.convert_sat_checkpoint import convert
    from hallo3.loading import build_tiny_random_pipeline

    converted = convert(FIXTURE_A / "checkpoint", tmp_path / "converted")
    tiny = build_tiny_random_pipeline()
    base = tmp_path / "base"  # laid out like the CogVideoX-5B-I2V diffusers repo
    tiny.tokenizer.save_pretrained(base / "tokenizer")
    tiny.text_encoder.save_pretrained(base / "text_encoder")
    tiny.vae.save_pretrained(base / "vae")
    wav2vec = save_fixture_wav2vec(tmp_path / "wav2vec")

    output = tmp_path / "hallo3-pipeline"
    command = [
        sys.executable,
        "-m",
        "hallo3.save_pipeline",
        "--model",
        str(converted),
        "--base-model",
        str(base),
        "--wav2vec-model",
        str(wav2vec),
        "--dtype",
        "float32",
        "--output",
        str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left

    from diffusers import DiffusionPipeline

    from hallo3 import Hallo3Transformer3DModel

    pipe = DiffusionPipeline.from_pretrained(output, trust_remote_code=True)
    expected = Hallo3Transformer3DModel.from_pretrained(converted / "transformer").state_dict()
    for name, tensor in pipe.transformer.state_dict().items():
        assert tensor.equal(expected[name]), name
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


# --------------------------------------------------------------------------------------------------------------------
# The app, as `python app.py` starts it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(process: subprocess.Popen, url: str, log_path: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}: {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise AssertionError(f"the app did not serve {url} within {timeout} s")


class RunningApp:
    """`python app.py ARGS` in `cwd`; stopped with SIGTERM (as `docker stop` or a Space restart does). Its log goes
    to a file (a pipe nobody reads would fill up and stall the app)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], url: str):
        self.url = url
        self.log_path = cwd / f"app-{len(list(cwd.glob('app-*.log')))}.log"
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "app.py", *args],
            cwd=cwd,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **env},
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_until_serving(self.process, url, self.log_path)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text()

    def output_dir(self) -> Path:
        (line,) = [line for line in self.log().splitlines() if line.startswith("Videos go to ")]
        return Path(line.removeprefix("Videos go to ").split(" (")[0])

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    t = np.arange(int(16000 * 1.0)) / 16000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    return path


def generate_once(url: str, speech: Path, memory_mode: str = "none") -> str:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    video, summary = client.predict(
        handle_file(str(ASSETS / "0001.jpg")),
        handle_file(str(speech)),
        "a person talking",
        3.5,
        3.5,
        2,
        1,
        7,
        False,
        memory_mode,
        api_name="/generate",
    )
    path = video["video"] if isinstance(video, dict) else video
    from hallo3.video_io import probe_video

    info = probe_video(path)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["num_frames"] == 25
    return summary


def test_python_app_py_serves_a_generate_request(checkout, speech):
    (command,) = command_like("python app.py")
    assert command == "python app.py"
    port = free_port()
    # GRADIO_SERVER_PORT only picks a free port; the command is the README's
    app = RunningApp([], checkout, {"GRADIO_SERVER_PORT": str(port)}, f"http://127.0.0.1:{port}/")
    try:
        summary = generate_once(app.url, speech)
        assert "RANDOM WEIGHTS" in summary
        output_dir = app.output_dir()
        assert list(output_dir.glob("*.mp4"))
    finally:
        app.stop()
    assert not output_dir.exists()  # SIGTERM cleaned the app's videos up
    assert "Traceback" not in app.log()


def test_python_app_py_as_a_space_starts_it(checkout, speech):
    """A Space runs `python app.py` with GRADIO_SERVER_NAME=0.0.0.0: the app must listen on every address."""
    port = free_port()
    env = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port), "SYSTEM": "spaces"}
    # 127.0.0.2 is this machine too, but a server bound to 127.0.0.1 alone does not answer there
    app = RunningApp([], checkout, env, f"http://127.0.0.2:{port}/")
    try:
        generate_once(app.url, speech)
    finally:
        app.stop()


def test_python_app_py_with_a_model_folder_switches_memory_modes(checkout, speech, tiny_pipeline):
    from hallo3.memory import available_memory_modes

    tiny_pipeline.save_pretrained(checkout / "my-model")
    port = free_port()
    app = RunningApp(["--model", "my-model", "--port", str(port)], checkout, {}, f"http://127.0.0.1:{port}/")
    try:
        modes = available_memory_modes()
        for mode in [*modes[1:], modes[0]]:  # every mode this machine offers, then back to the first
            summary = generate_once(app.url, speech, mode)
            assert f"memory {mode}" in summary and "my-model" in summary
    finally:
        app.stop()
