"""The Gradio app, launched for real on localhost with the tiny-random model: API client and a real browser."""

import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile

import app as app_module
from hallo3.settings import DEFAULTS
from hallo3.video_io import probe_video

from .conftest import ASSETS


REPO = Path(__file__).parent.parent
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    t = np.arange(int(16000 * 1.2)) / 16000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    return path


@pytest.fixture(scope="module")
def server(tiny_animator, tmp_path_factory):
    app = app_module.Hallo3App(
        tiny_animator, "tiny-random", "cpu", tmp_path_factory.mktemp("outputs"), max_audio_seconds=5.0
    )
    demo = app_module.build_demo(app, is_random=True, memory_modes=["none"])
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(
        server_name="127.0.0.1",
        server_port=None,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
        allowed_paths=[str(app_module.ASSETS)],
        max_file_size="50mb",
    )
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


@pytest.fixture(scope="module")
def running_app(tmp_path_factory):
    """`python app.py` as a user starts it, for the tests that call it as gradio users do and read its console."""
    from .test_readme_commands import RunningApp, free_port

    folder = tmp_path_factory.mktemp("checkout")
    for name in ("assets", "app.py"):
        (folder / name).symlink_to(REPO / name)
    port = free_port()
    app = RunningApp(["--port", str(port)], folder, {}, f"http://127.0.0.1:{port}/")
    yield app
    app.stop()


def ablation_args(audio, axis: str, values: str):
    """The ablation tab's inputs: the example portrait, `audio`, no prompt, `axis` over `values`, 1 step, seed 3."""
    from gradio_client import handle_file

    return (handle_file(str(ASSETS / "0001.jpg")), handle_file(str(audio)), "", axis, values, 3.5, 3.5, 2, 1, 3)


def generate_args(image, audio, steps=1):
    from gradio_client import handle_file

    return (handle_file(str(image)), handle_file(str(audio)), "a person talking", 3.5, 3.5, 2, steps, 7, False, "none")


def test_named_endpoints(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/generate", "/ablation"} <= set(endpoints)


def test_the_api_is_called_with_the_two_files_alone(running_app, speech_file):
    """As gradio users call an app: the inputs left out take the page's values, which are the settings' defaults."""
    from gradio_client import Client, handle_file

    client = Client(running_app.url, verbose=False)
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/generate", "/ablation"):
        parameters = endpoints[name]["parameters"]
        assert [p["parameter_name"] for p in parameters if not p["parameter_has_default"]] == ["image", "audio"]
        defaults = {p["parameter_name"]: p["parameter_default"] for p in parameters}
        assert defaults["prompt"] == DEFAULTS.prompt
        assert defaults["steps"] == DEFAULTS.num_inference_steps
        assert defaults["guidance_scale"] == DEFAULTS.guidance_scale
        assert defaults["audio_guidance_scale"] == DEFAULTS.guidance_scale  # equal: the official joint guidance
        assert defaults["motion_frames"] == DEFAULTS.motion_frames

    image = handle_file(str(ASSETS / "0001.jpg"))
    video, summary = client.predict(image, handle_file(str(speech_file)), api_name="/generate")
    info = probe_video(video["video"] if isinstance(video, dict) else video)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["num_frames"] == 30
    assert f"steps {DEFAULTS.num_inference_steps}, CFG {DEFAULTS.guidance_scale}" in summary

    *videos, summary = client.predict(image, handle_file(str(speech_file)), api_name="/ablation")
    axis = endpoints["/ablation"]["parameters"][3]["parameter_default"]
    made = [v for v in videos if v and (v.get("video") if "video" in v else v.get("value"))]
    assert len(made) == len(app_module.ABLATION_AXES[axis][2].split(","))
    assert f"**{axis}**" in summary and f"{DEFAULTS.num_inference_steps} steps" in summary


def test_a_refused_upload_is_one_line_in_the_server_console(running_app, speech_file, tmp_path):
    """The user gets the message; the server's console gets one line about it, not gradio's traceback of it."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    client = Client(running_app.url, verbose=False)
    with pytest.raises(AppError, match="notes.png: not an image file") as refused:
        client.predict(handle_file(str(notes)), handle_file(str(speech_file)), api_name="/generate")
    log = running_app.log()
    assert [line for line in log.splitlines() if "notes.png" in line] == [f"refused a request: {refused.value}"]
    assert "Traceback" not in log


def test_generate_returns_an_mp4_with_audio(client, speech_file):
    video, summary = client.predict(*generate_args(ASSETS / "0001.jpg", speech_file), api_name="/generate")
    path = video["video"] if isinstance(video, dict) else video
    info = probe_video(path)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["num_frames"] == 30
    assert "seed 7" in summary and "RANDOM WEIGHTS" in summary


@pytest.mark.parametrize("bad", ["no-face", "not-audio", "too-long", "not-image"])
def test_a_bad_upload_is_an_error_and_the_next_request_works(client, speech_file, tmp_path, bad):
    from gradio_client.exceptions import AppError

    image, audio = ASSETS / "0001.jpg", speech_file
    if bad == "no-face":
        from PIL import Image

        image = tmp_path / "wall.png"
        Image.fromarray(np.full((240, 320, 3), 90, dtype=np.uint8)).save(image)
        expected = "no face found"
    elif bad == "not-audio":
        audio = tmp_path / "voice.mp3"
        audio.write_bytes(b"definitely not audio" * 50)
        expected = "not a readable audio file"
    elif bad == "too-long":
        audio = tmp_path / "long.wav"
        soundfile.write(audio, np.zeros(16000 * 8, dtype=np.float32), 16000)
        expected = "longer than the maximum of 5 s"
    else:
        image = tmp_path / "photo.png"
        image.write_text("not an image")
        expected = "not an image file"
    with pytest.raises(AppError, match=expected) as refused:
        client.predict(*generate_args(image, audio), api_name="/generate")
    message = str(refused.value)
    uploaded = Path(image if bad in ("no-face", "not-image") else audio).name
    assert uploaded in message  # the file as the user named it
    assert "/tmp" not in message and "gradio" not in message.lower()  # no server paths, no gradio internals
    video, _ = client.predict(*generate_args(ASSETS / "0008.jpg", speech_file), api_name="/generate")
    assert video


def test_a_16_bit_grayscale_upload_is_read_whole(client, speech_file, tmp_path):
    from PIL import Image

    gray = np.asarray(Image.open(ASSETS / "0001.jpg").convert("L"), dtype=np.uint16)
    Image.fromarray(gray * 257).save(tmp_path / "scan16.png")  # gradio's own RGB conversion would clip it to white
    video, summary = client.predict(*generate_args(tmp_path / "scan16.png", speech_file), api_name="/generate")
    assert video and "Video:" in summary


def test_ablation_returns_one_video_per_variant(client, speech_file):

    result = client.predict(*ablation_args(speech_file, "CFG scale", "2.0, 5.0, 7.5"), api_name="/ablation")
    *videos, summary = result
    assert len(videos) == app_module.MAX_VARIANTS
    made = [v for v in videos if v and (v.get("video") if isinstance(v, dict) and "video" in v else v.get("value"))]
    assert len(made) == 3
    assert "| 7.5 |" in summary


def test_a_setting_out_of_its_range_is_named_as_the_page_names_it(client, speech_file):
    """The settings' one validator refuses the value; the page names the axis, and the app keeps serving."""

    with pytest.raises(Exception, match=r"CFG scale: must be a finite number >= 1, got 0\.5"):
        client.predict(*ablation_args(speech_file, "CFG scale", "0.5, 3.5"), api_name="/ablation")
    assert client.predict(*generate_args(ASSETS / "0001.jpg", speech_file), api_name="/generate")


def test_only_its_own_files_are_served(server):
    base = server.rstrip("/")
    for path in ("/etc/passwd", str(Path(app_module.__file__).resolve())):
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{base}/gradio_api/file={path}")
        assert denied.value.code == 403
    assert urllib.request.urlopen(f"{base}/gradio_api/file={ASSETS / '0001.jpg'}").status == 200


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium_path() is None, reason="Debian chromium is not installed")
def test_real_browser_generate_then_ablation(server, speech_file):
    playwright = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium_path(),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(server)
        page.get_by_text("Demo mode: tiny random model").wait_for()
        page.locator("#image input[type=file]").set_input_files(str(ASSETS / "0001.jpg"))
        page.locator("#audio input[type=file]").set_input_files(str(speech_file))
        page.locator("#audio audio").first.wait_for(
            state="attached", timeout=30_000
        )  # a waveform shows; <audio> is hidden
        steps = page.locator("#steps input[type=number]")
        steps.fill("1")
        steps.press("Enter")
        page.locator("#generate-btn").click()
        video = page.locator("#result-video video")
        video.wait_for(timeout=120_000)
        page.wait_for_function("document.querySelector('#result-video video').readyState >= 2", timeout=60_000)
        assert "seed 42" in page.locator("#result-summary").inner_text()
        page.screenshot(path=str(ARTIFACTS / "app-generate.png"), full_page=True)

        page.get_by_role("tab", name="Ablation").click()
        page.locator("#values textarea, #values input").first.fill("2.0, 6.0")
        page.locator("#ablation-btn").click()
        page.locator("#variant-1 video").wait_for(timeout=180_000)
        page.wait_for_function("document.querySelector('#variant-1 video').readyState >= 2", timeout=60_000)
        summary = page.locator("#ablation-summary").inner_text()
        assert "6.0" in summary and "2.0" in summary
        assert not page.locator("#variant-2 video").is_visible()
        page.screenshot(path=str(ARTIFACTS / "app-ablation.png"), full_page=True)
        browser.close()


def test_a_job_that_failed_part_way_continues_from_its_finished_clips(tiny_animator, tmp_path, monkeypatch):
    """The app, for a job it was running: asked again with the same inputs and seed, it computes only the clips the
    failure lost, and the video is the one an unbroken job makes."""
    from hallo3.preprocessing.audio import ffmpeg_exe

    speech = tmp_path / "speech.wav"
    t = np.arange(int(16000 * 3.0)) / 16000  # 75 frames: 2 clips
    soundfile.write(speech, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    settings = lambda: app_module.slider_settings("", 3.5, 3.5, 2, 1, 11)  # noqa: E731
    pipeline = tiny_animator.pipeline
    decode = pipeline.decode_latents
    calls = []

    def failing_second_clip(latents):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return decode(latents)

    app = app_module.Hallo3App(tiny_animator, "tiny-random", "cpu", tmp_path / "outputs")
    monkeypatch.setattr(pipeline, "decode_latents", failing_second_clip)
    with pytest.raises(Exception, match="Internal error"):
        app.run(str(ASSETS / "0001.jpg"), str(speech), settings())
    calls.clear()
    resumed = app.run(str(ASSETS / "0001.jpg"), str(speech), settings())
    assert len(calls) == 1  # only the lost clip

    monkeypatch.setattr(pipeline, "decode_latents", decode)
    fresh = app_module.Hallo3App(tiny_animator, "tiny-random", "cpu", tmp_path / "fresh").run(
        str(ASSETS / "0001.jpg"), str(speech), settings()
    )

    def frames(video):
        command = [ffmpeg_exe(), "-v", "error", "-i", str(video), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
        return subprocess.run(command, capture_output=True, check=True).stdout

    assert frames(resumed.path) == frames(fresh.path)
