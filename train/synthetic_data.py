"""Synthetic talking-head videos made from a real face photo: the smoke-training data, the demo data set, test data.

    python -m train.synthetic_data --output runs/tiny-raw [--photos assets/examples/0001.jpg ...] [--seconds 3.2]
        [--face-box X0 Y0 X1 Y1]
    python -m train.synthetic_data talking-heads --output DIR --count N [--seed S] [--split train|held-out]
        [--photos ...] [--height 192 --width 288] [--seconds 4]

Smoke clips (the first form, `talking_video`): the face moves by a small random affine jitter and its mouth region
darkens with the audio envelope, so the clips have head and lip motion tied to the sound. Speech comes from espeak-ng
when installed, else a modulated tone. Writes `videos/*.mp4` (with audio) and `captions/*.txt`.

The face box of each photo is known, not detected (`KNOWN_FACE_BOXES`, or `--face-box` for other photos), so the
videos are the same on every machine, and `RecordedFaces` answers face detection on them from that record: tests of
data preparation never depend on a detector's borderline answer on synthetic frames.

Talking heads (`talking-heads`, `make_talking_heads`): clips whose lips really move with the speech, for training a
demo model and for checking `hallo3.evaluate`. Per clip, from (seed, index): an example portrait, flipped, recoloured,
scaled and placed in a 3:2 frame; espeak-ng speech (sentences, voice, speed, pitch); the face mesh of the portrait
(found once per photo) drives a warp that opens the mouth by the speech envelope, with a dark interior and a hint of
teeth; random blinks and a slow head sway add motion that is not speech. The same seed gives the same frames. Held-out
sentences and voices (`HELD_OUT_SENTENCES`, `HELD_OUT_LANGUAGES`, `HELD_OUT_VARIANTS`) are used only by
`--split held-out`. Writes `videos/NAME.mp4`, `captions/NAME.txt` (the layout `train.prepare_dataset` reads),
`portraits/NAME.png` (the still frame, the portrait to evaluate against) and `manifest.jsonl` (each clip's recipe).
"""

import argparse
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import soundfile
from PIL import Image, ImageEnhance

from hallo3.evaluate import INNER_LIP_TOP, speech_envelope
from hallo3.preprocessing.audio import SAMPLE_RATE, load_audio, num_video_frames
from hallo3.preprocessing.face import EMBEDDING_DIM
from hallo3.video_io import VideoWriter
from train.prepare_dataset import FPS


FaceBox = tuple[float, float, float, float]

# The face of each example photo as fractions (x0, y0, x1, y1) of its width and height, measured once (OpenCV's
# frontal cascade on the 240 px version) and written down.
KNOWN_FACE_BOXES: dict[str, FaceBox] = {
    "0001.jpg": (0.3125, 0.129, 0.6375, 0.454),
    "0008.jpg": (0.217, 0.221, 0.779, 0.783),
}


@dataclass
class SyntheticVideo:
    """What `talking_video` drew: the unjittered frame and its face box in pixels (None: no face)."""

    path: Path
    base: Image.Image
    face_box: FaceBox | None


def portrait(photo: Path | None, size: int, face_box: FaceBox | None = None) -> tuple[Image.Image, FaceBox | None]:
    """The `size` x `size` frame drawn for `photo` and its face box in pixels; a plain wall when `photo` is None.

    `face_box` (fractions of the photo) is needed for photos that are not in `KNOWN_FACE_BOXES`.
    """
    if photo is None:
        return Image.fromarray(np.full((size, size, 3), 120, dtype=np.uint8)), None
    fractions = face_box or KNOWN_FACE_BOXES.get(Path(photo).name)
    if fractions is None:
        raise ValueError(f"{photo}: no known face box; pass `face_box` (--face-box X0 Y0 X1 Y1, fractions).")
    x0, y0, x1, y1 = fractions
    return Image.open(photo).convert("RGB").resize((size, size)), (x0 * size, y0 * size, x1 * size, y1 * size)


def speech(path: Path, seconds: float, text: str = "Hello there, this is a short test of the talking head.") -> Path:
    if shutil.which("espeak-ng"):
        raw = path.with_suffix(".espeak.wav")
        subprocess.run(["espeak-ng", "-w", str(raw), "-s", "150", text], check=True, capture_output=True)
        waveform = load_audio(raw)
        raw.unlink()
    else:
        t = np.arange(int(16000 * seconds)) / 16000
        waveform = (0.3 * np.sin(2 * np.pi * 160 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)
    waveform = np.resize(waveform, int(16000 * seconds))  # loop or cut to the length asked for
    soundfile.write(path, waveform, 16000)
    return path


def talking_video(
    path: Path,
    photo: Path | None,
    seconds: float,
    size: int = 240,
    moving: bool = True,
    seed: int = 0,
    face_box: FaceBox | None = None,
) -> SyntheticVideo:
    """An mp4 with audio: `photo` jittered with a mouth that follows the audio envelope (no face if photo is None)."""
    rng = np.random.default_rng(seed)
    audio = speech(path.with_suffix(".wav"), seconds)
    waveform = load_audio(audio)
    num_frames = int(round(seconds * 25))
    envelope = np.array([np.abs(waveform[i * 640 : (i + 1) * 640]).mean() for i in range(num_frames)])
    envelope = envelope / max(envelope.max(), 1e-6)
    base, box = portrait(photo, size, face_box)
    mouth = None
    if box is not None:
        x0, y0, x1, y1 = box
        mouth = (
            int(x0 + 0.3 * (x1 - x0)),
            int(y0 + 0.68 * (y1 - y0)),
            int(x0 + 0.7 * (x1 - x0)),
            int(y0 + 0.9 * (y1 - y0)),
        )
    with VideoWriter(path, audio_path=audio) as writer:
        for i in range(num_frames):
            frame = base.copy()
            if moving and mouth is not None:
                region = frame.crop(mouth)
                frame.paste(ImageEnhance.Brightness(region).enhance(1 - 0.6 * envelope[i]), mouth[:2])
                dx, dy, angle = rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-2, 2)
                frame = frame.rotate(angle, translate=(dx, dy), resample=Image.BILINEAR, fillcolor=(0, 0, 0))
            writer.write(np.asarray(frame)[None])
    audio.unlink()
    return SyntheticVideo(path, base, box)


class RecordedFaces:
    """Face detection on synthetic frames answered from what `talking_video` drew, not by a detector.

    A frame is matched to the nearest drawn base image (mean absolute difference: the jitter and the mouth change a
    frame far less than a different photo or the wall does) and gets that base's face box, or no face for the wall.
    Each base has its own fixed embedding, so identities differ. Same interface as `FaceAnalyzer.detect`.
    """

    def __init__(self, videos: list[SyntheticVideo]):
        self.records: list[tuple[np.ndarray, FaceBox | None, np.ndarray]] = []
        for index, video in enumerate(videos):
            embedding = np.random.default_rng(index).standard_normal(EMBEDDING_DIM).astype(np.float32)
            self.records.append((np.asarray(video.base, dtype=np.float32), video.face_box, embedding))

    @classmethod
    def for_photos(cls, photos: list[Path | None], size: int = 240) -> "RecordedFaces":
        """The record of videos made by `talking_video(..., photo, size=size)` for each of `photos`."""
        return cls([SyntheticVideo(Path(), *portrait(photo, size)) for photo in photos])

    def detect(self, image: Image.Image) -> list[tuple[FaceBox, np.ndarray]]:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        matching = [record for record in self.records if record[0].shape == pixels.shape]
        if not matching:
            raise ValueError(f"a {image.size} frame matches no recorded synthetic video")
        _, box, embedding = min(matching, key=lambda record: float(np.abs(record[0] - pixels).mean()))
        return [] if box is None else [(box, embedding)]


# ---------------------------------------------------------------------------------------------------------------------
# Talking heads whose lips move with the speech: the demo training set and the evaluator's known-good videos


DEFAULT_SIZE = (192, 288)  # height x width: the released model's 3:2 (480 x 720), sides multiples of 16
DEFAULT_CLIP_SECONDS = 4.0
DEFAULT_PHOTOS = (Path("assets/examples/0001.jpg"), Path("assets/examples/0008.jpg"))
CAPTION = "a person talking to the camera"

# Speech. Training clips say TRAIN_SENTENCES in TRAIN_LANGUAGES x TRAIN_VARIANTS; held-out clips (`split="held-out"`)
# say HELD_OUT_SENTENCES in HELD_OUT_LANGUAGES x HELD_OUT_VARIANTS, none of which a training clip ever uses, so a model
# can be measured on speech and voices it never heard.
TRAIN_SENTENCES = (
    "Hello there, this is a short test of the talking head.",
    "The quick brown fox jumps over the lazy dog.",
    "Please bring me the blue book from the kitchen table.",
    "We walked along the beach until the sun went down.",
    "My favourite season is autumn, when the leaves turn red.",
    "Can you tell me how to get to the railway station?",
    "The weather today is warm with a light breeze from the sea.",
    "I would like a cup of tea with milk and no sugar.",
    "She plays the piano every morning before breakfast.",
    "They built a small wooden boat in their garden.",
    "Turn left at the second corner and walk for five minutes.",
    "The museum opens at nine and closes at six.",
    "Every good story needs a beginning, a middle and an end.",
    "Water boils at one hundred degrees at sea level.",
    "The children laughed as the puppy chased its tail.",
    "Remember to switch off the lights when you leave.",
    "Our train was delayed by almost an hour this morning.",
    "He painted the fence bright yellow last summer.",
    "Mountains look smaller from the window of a plane.",
    "A balanced diet includes fruit, vegetables and grains.",
    "I think it might rain later, so take an umbrella.",
    "The library has thousands of books about history.",
    "Music can change the way we feel in a few seconds.",
    "Let us meet at the cafe near the old bridge.",
    "The cat slept on the windowsill all afternoon.",
    "Good morning everyone, thank you for coming today.",
    "This recipe needs two eggs, flour and a little butter.",
    "The river flows quietly through the green valley.",
    "We should plant more trees along the main road.",
    "My brother is learning to speak Japanese.",
    "Open the window, it is getting hot in here.",
    "The stars were shining brightly over the desert.",
    "Practice makes perfect, so keep trying every day.",
    "Their house has a red door and a big garden.",
    "Fresh bread smells wonderful in the early morning.",
    "Could you please repeat that a little more slowly?",
    "The football match ended in a draw last night.",
    "Bees carry pollen from one flower to the next.",
    "I left my keys on the shelf by the front door.",
    "Winter evenings are perfect for reading by the fire.",
)
HELD_OUT_SENTENCES = (
    "A gentle wind moved the tall grass across the field.",
    "Seven purple kites floated above the harbour.",
    "Nobody expected the concert to finish so early.",
    "Lemons and limes are sour, but oranges are sweet.",
    "The old clock in the hall strikes twelve at midnight.",
    "Maps help travellers find their way in strange cities.",
)
TRAIN_LANGUAGES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan")
HELD_OUT_LANGUAGES = ("en-us-nyc", "en-gb-x-gbcwmd")
TRAIN_VARIANTS = ("", "+m1", "+m2", "+m3", "+m5", "+m6", "+f1", "+f2", "+f3", "+f5")
HELD_OUT_VARIANTS = ("+m4", "+f4")
SPLITS = {
    "train": (TRAIN_SENTENCES, TRAIN_LANGUAGES, TRAIN_VARIANTS),
    "held-out": (HELD_OUT_SENTENCES, HELD_OUT_LANGUAGES, HELD_OUT_VARIANTS),
}
SPEEDS = (120, 185)  # espeak-ng words per minute
PITCHES = (25, 75)  # espeak-ng pitch, 0..99

# Face-mesh landmark chains (mediapipe's 478-point mesh), from one corner to the other.
UPPER_INNER_LIP = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
EYE_LIDS = (  # (upper lid, lower lid) of each eye
    ([33, 246, 161, 160, 159, 158, 157, 173, 133], [33, 7, 163, 144, 145, 153, 154, 155, 133]),
    ([263, 466, 388, 387, 386, 385, 384, 398, 362], [263, 249, 390, 373, 374, 380, 381, 382, 362]),
)
MOUTH_CORNERS, CHIN, FACE_SIDES = (61, 291), 152, (234, 454)
MOUTH_INTERIOR = np.array([62.0, 26.0, 30.0])  # a shadowed mouth, RGB
TEETH = np.array([200.0, 192.0, 178.0])


@dataclass(frozen=True)
class Utterance:
    """What a clip says and how: espeak-ng `-v language+variant -s speed -p pitch`. The sentences are said in order,
    with pauses, until the clip is full; the last one may be cut off, and at a fast speed one may be left unsaid."""

    sentences: tuple[str, ...]
    voice: str
    speed: int
    pitch: int


@dataclass(frozen=True)
class TalkingHeadSpec:
    """Everything a clip is made from; drawn from (seed, index) by `draw_spec`, written to `manifest.jsonl`."""

    name: str
    split: str
    seed: int
    index: int
    photo: str
    height: int
    width: int
    seconds: float
    flip: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float  # degrees
    face_height: float  # silhouette height over the frame height
    face_x: float  # face centre, fraction of the width
    face_y: float  # face centre, fraction of the height
    gain: float
    utterance: Utterance


RANDOM_STREAMS = ("spec", "speech", "blinks", "sway")


def clip_rng(seed: int, index: int, purpose: str) -> np.random.Generator:
    """One generator per (seed, clip, purpose): clip `index` is the same whatever the count, and drawing more of one
    thing (a longer clip's pauses) does not change another (its blinks)."""
    return np.random.default_rng([seed, index, RANDOM_STREAMS.index(purpose)])


def draw_spec(
    seed: int, index: int, photos: tuple[Path, ...], split: str, size: tuple[int, int], seconds: float
) -> TalkingHeadSpec:
    """The `index`-th clip of the run `seed`: its portrait, augmentation and utterance."""
    rng = clip_rng(seed, index, "spec")
    sentences, languages, variants = SPLITS[split]
    order = rng.permutation(len(sentences))
    voice = f"{languages[rng.integers(len(languages))]}{variants[rng.integers(len(variants))]}"
    speed, pitch = int(rng.integers(*SPEEDS)), int(rng.integers(*PITCHES))
    # enough sentences to fill the clip at a slow reading (two words a second), pauses aside
    chosen: list[str] = []
    words = 0
    for i in order:
        if words >= 2 * seconds and chosen:
            break
        chosen.append(sentences[i])
        words += len(sentences[i].split())
    utterance = Utterance(tuple(chosen), voice, speed, pitch)
    return TalkingHeadSpec(
        name=f"{split}-{index:05d}",
        split=split,
        seed=seed,
        index=index,
        photo=str(photos[int(rng.integers(len(photos)))]),
        height=size[0],
        width=size[1],
        seconds=seconds,
        flip=bool(rng.random() < 0.5),
        brightness=round(float(rng.uniform(0.85, 1.15)), 4),
        contrast=round(float(rng.uniform(0.85, 1.15)), 4),
        saturation=round(float(rng.uniform(0.75, 1.25)), 4),
        hue=round(float(rng.uniform(-8, 8)), 3),
        face_height=round(float(rng.uniform(0.45, 0.6)), 4),
        face_x=round(float(rng.uniform(0.42, 0.58)), 4),
        face_y=round(float(rng.uniform(0.45, 0.55)), 4),
        gain=round(float(rng.uniform(0.5, 0.9)), 4),
        utterance=utterance,
    )


def espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's rendering of `text`, mono float32 at 16 kHz (espeak-ng's output is the same on every run)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng); talking heads need its speech.")
    with tempfile.TemporaryDirectory(prefix="hallo3-speech-") as folder:
        path = Path(folder) / "speech.wav"
        command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text]
        subprocess.run(command, check=True, capture_output=True)
        return load_audio(path)


def utterance_waveform(utterance: Utterance, seconds: float, gain: float, rng: np.random.Generator) -> np.ndarray:
    """The utterance's sentences with pauses between them, from a short silence on, cut to exactly `seconds`; peak
    `gain`, over a faint noise floor (real recordings are never digitally silent)."""
    total = int(round(seconds * SAMPLE_RATE))
    pieces = [np.zeros(int(rng.uniform(0.1, 0.5) * SAMPLE_RATE), dtype=np.float32)]
    for sentence in utterance.sentences:
        if sum(len(piece) for piece in pieces) >= total:
            break
        pieces.append(espeak(sentence, utterance.voice, utterance.speed, utterance.pitch))
        pieces.append(np.zeros(int(rng.uniform(0.15, 0.6) * SAMPLE_RATE), dtype=np.float32))
    waveform = np.concatenate(pieces)[:total]
    waveform = np.pad(waveform, (0, total - len(waveform)))
    waveform = waveform * (gain / max(float(np.abs(waveform).max()), 1e-6))
    return (waveform + rng.normal(0, 0.002, total)).astype(np.float32)


def mouth_opening(envelope: np.ndarray) -> np.ndarray:
    """Speech envelope -> mouth opening in [0, 1]: linear in the loudness (what the evaluator correlates), closed
    below a gate of 5% of the loud level (pauses, the noise floor), fully open at the 98th percentile."""
    loud = max(float(np.percentile(envelope, 98)), 1e-6)
    return np.clip((envelope / loud - 0.05) / 0.95, 0.0, 1.0)


def blink_track(num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Eyelid closure in [0, 1] per frame: blinks of 5 frames (200 ms) at random times, 2-5 s apart."""
    closure = np.zeros(num_frames)
    shape = np.array([0.35, 0.8, 1.0, 0.7, 0.3])
    start = int(rng.uniform(0.3, 2.5) * FPS)
    while start < num_frames:
        end = min(start + len(shape), num_frames)
        closure[start:end] = shape[: end - start]
        start += int(rng.uniform(2.0, 5.0) * FPS)
    return closure


def sway_track(num_frames: int, centre: tuple[float, float], height: int, rng: np.random.Generator) -> np.ndarray:
    """[num_frames, 2, 3] affine maps (still frame -> shown frame): a slow head sway of a few pixels and degrees, the
    sum of two sinusoids of 0.1-0.6 Hz per axis (rotation about the face centre, scale, shift)."""
    t = np.arange(num_frames) / FPS

    def wave(amplitude: float) -> np.ndarray:
        frequencies, phases = rng.uniform(0.1, 0.6, 2), rng.uniform(0, 2 * np.pi, 2)
        return amplitude * 0.5 * np.sin(2 * np.pi * frequencies[:, None] * t + phases[:, None]).sum(axis=0)

    angle, scale, shift_x, shift_y = wave(2.5), 1 + wave(0.02), wave(0.02 * height), wave(0.015 * height)
    maps = np.stack([cv2.getRotationMatrix2D(centre, float(a), float(s)) for a, s in zip(angle, scale)])
    maps[:, 0, 2] += shift_x
    maps[:, 1, 2] += shift_y
    return maps


def _curve(landmarks: np.ndarray, chain: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The chain's points sorted by x, for np.interp (a flipped face runs right to left)."""
    points = landmarks[chain]
    order = np.argsort(points[:, 0], kind="stable")
    return points[order, 0], points[order, 1]


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


@dataclass
class FaceRig:
    """A still portrait frame and the warps that open its mouth and close its eyes.

    Mouth: every column below the upper inner lip moves down, by the lens-shaped opening of the lips at the lip line
    (zero at the corners), widening linearly to the jaw's broad profile at the chin, then fading out over the neck;
    the gap that opens between the lips is painted as the mouth's interior with a hint of the upper teeth. The face
    above the lips never moves. Eyes: the skin above each upper lid slides down over the eye by the closure times the
    eye's height. The shift never grows by more than 0.6 pixel per pixel down a column, so the warp never folds.
    """

    still: np.ndarray  # [H, W, 3] uint8
    landmarks: np.ndarray  # [478, 2] pixels of `still`

    def __post_init__(self):
        lm = self.landmarks
        self.lip_x, self.lip_y = _curve(lm, UPPER_INNER_LIP)
        self.mouth_centre = float(self.lip_x.mean())
        self.mouth_half = float(self.lip_x[-1] - self.lip_x[0]) / 2
        self.lip_line = float(lm[INNER_LIP_TOP, 1])
        self.chin = max(float(lm[CHIN, 1]), self.lip_line + 4)
        mouth_width = float(np.linalg.norm(lm[MOUTH_CORNERS[0]] - lm[MOUTH_CORNERS[1]]))
        self.max_opening = min(0.4 * mouth_width, 0.6 * (self.chin - self.lip_line))
        self.jaw_half = float(abs(lm[FACE_SIDES[1], 0] - lm[FACE_SIDES[0], 0])) / 2
        self.neck = 0.6 * (self.chin - self.lip_line)
        self.eyes = []
        for upper, lower in EYE_LIDS:
            upper_x, upper_y = _curve(lm, upper)
            lower_x, lower_y = _curve(lm, lower)
            eye_height = float(np.max(np.interp(upper_x, lower_x, lower_y) - upper_y))
            self.eyes.append((upper_x, upper_y, lower_x, lower_y, max(eye_height, 1.0)))

    def lens(self, x: np.ndarray) -> np.ndarray:
        """The lips' opening profile: 1 mid-mouth, 0 at and beyond the corners."""
        return np.sqrt(np.clip(1 - ((x - self.mouth_centre) / self.mouth_half) ** 2, 0.0, 1.0))

    def jaw(self, x: np.ndarray) -> np.ndarray:
        """The chin's profile: 1 across the middle half of the face, falling smoothly to 0 at its sides."""
        return 1 - _smoothstep((np.abs(x - self.mouth_centre) - 0.5 * self.jaw_half) / (0.5 * self.jaw_half))

    def jaw_shift(self, x: np.ndarray, y: np.ndarray, top: np.ndarray, opening: float) -> np.ndarray:
        """How far down the points (x, y) below the lip line `top` have moved: the lips' lens at the lip line,
        widening to the jaw's profile at the chin, fading out down the neck."""
        depth = np.clip((y - top) / (self.chin - self.lip_line), 0.0, 1.0)
        profile = (1 - depth) * self.lens(x) + depth * self.jaw(x)
        fade = 1 - _smoothstep((y - self.chin) / self.neck)
        return opening * self.max_opening * profile * fade

    def source_rows(
        self, x: np.ndarray, y: np.ndarray, opening: float, closure: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For points (x, y) of the warped face: the row of the still frame each shows, and how much of each pixel
        the open mouth's interior and teeth cover."""
        top = np.interp(x, self.lip_x, self.lip_y)
        shift = np.where(y >= top, self.jaw_shift(x, y, top, opening), 0.0)
        # the lower lip's edge lands at the `bottom` that shows row `top`: bottom = top + shift(bottom), a contraction
        # (the shift grows by at most 0.6 px per px), so a few steps find it to a hundredth of a pixel
        bottom = top + opening * self.max_opening * self.lens(x)
        for _ in range(10):
            bottom = top + self.jaw_shift(x, bottom, top, opening)

        def covered(low: np.ndarray, high: np.ndarray) -> np.ndarray:
            return np.clip(np.minimum(y + 0.5, high) - np.maximum(y - 0.5, low), 0.0, 1.0)

        interior = covered(top, bottom)
        teeth = covered(top, top + np.minimum(0.3 * (bottom - top), 0.24 * self.mouth_half))
        for upper_x, upper_y, lower_x, lower_y, eye_height in self.eyes:
            inside = (x >= upper_x[0]) & (x <= upper_x[-1])
            lid, lower = np.interp(x, upper_x, upper_y), np.interp(x, lower_x, lower_y)
            height = np.where(inside, np.maximum(lower - lid, 0.0), 0.0)
            band = 2.5 * eye_height  # the skin above the lid stretches over this height
            weight = np.where(y < lid, _smoothstep((y - lid + band) / band), (y < lower).astype(np.float64))
            shift = shift + closure * height * weight
        return y - shift, interior, teeth

    def frame(self, opening: float, closure: float, sway: np.ndarray) -> np.ndarray:
        """The still frame with the mouth `opening` and eyes `closure` (both 0..1), seen through the affine `sway`."""
        height, width = self.still.shape[:2]
        grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
        inverse = cv2.invertAffineTransform(sway)  # shown frame -> still frame
        x = inverse[0, 0] * grid_x + inverse[0, 1] * grid_y + inverse[0, 2]
        y = inverse[1, 0] * grid_x + inverse[1, 1] * grid_y + inverse[1, 2]
        rows, interior, teeth = self.source_rows(x, y, opening, closure)
        warped = cv2.remap(
            self.still,
            x.astype(np.float32),
            rows.astype(np.float32),
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        ).astype(np.float64)
        mouth = teeth[..., None] * TEETH + (interior - teeth)[..., None] * MOUTH_INTERIOR
        return np.clip(warped * (1 - interior[..., None]) + mouth + 0.5, 0, 255).astype(np.uint8)


def still_portrait(photo: np.ndarray, landmarks: np.ndarray, spec: TalkingHeadSpec) -> tuple[np.ndarray, np.ndarray]:
    """The augmented still frame of `spec` ([H, W, 3] uint8) and its landmarks: the photo flipped, scaled so the face
    is `face_height` of the frame, placed at (`face_x`, `face_y`), edges extended where the photo ends, recoloured."""
    if spec.flip:
        photo = photo[:, ::-1]
        landmarks = np.stack([photo.shape[1] - landmarks[:, 0], landmarks[:, 1]], axis=1)
    box_y0, box_y1 = landmarks[:, 1].min(), landmarks[:, 1].max()
    scale = spec.face_height * spec.height / (box_y1 - box_y0)
    scaled = cv2.resize(
        np.ascontiguousarray(photo),
        (max(1, round(photo.shape[1] * scale)), max(1, round(photo.shape[0] * scale))),
        interpolation=cv2.INTER_AREA,
    )
    scale_x, scale_y = scaled.shape[1] / photo.shape[1], scaled.shape[0] / photo.shape[0]
    centre = (landmarks.min(axis=0) + landmarks.max(axis=0)) / 2 * (scale_x, scale_y)
    shift = (spec.face_x * spec.width - centre[0], spec.face_y * spec.height - centre[1])
    placement = np.array([[1, 0, shift[0]], [0, 1, shift[1]]], dtype=np.float64)
    placed = cv2.warpAffine(
        scaled, placement, (spec.width, spec.height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    ).astype(np.float64)
    # past the photo's edges: its edge pixels smeared outwards, then blurred (a mirrored border could show a second
    # face, and a data set of talking heads must have exactly one)
    inside = cv2.warpAffine(np.ones(scaled.shape[:2]), placement, (spec.width, spec.height), flags=cv2.INTER_LINEAR)
    inside = cv2.GaussianBlur(inside, (0, 0), 2.0)[..., None]
    placed = placed * inside + cv2.GaussianBlur(placed, (0, 0), 0.04 * spec.height) * (1 - inside)
    placed = np.clip(placed + 0.5, 0, 255).astype(np.uint8)
    points = landmarks * (scale_x, scale_y) + shift
    hsv = cv2.cvtColor(placed, cv2.COLOR_RGB2HSV_FULL).astype(np.float64)
    hsv[..., 0] = (hsv[..., 0] + spec.hue * 256 / 360) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] * spec.saturation, 0, 255)
    recoloured = cv2.cvtColor(hsv.round().astype(np.uint8), cv2.COLOR_HSV2RGB_FULL).astype(np.float64)
    mean = recoloured.mean()
    recoloured = (recoloured - mean) * spec.contrast + mean * spec.brightness
    return np.clip(recoloured + 0.5, 0, 255).astype(np.uint8), points


@dataclass
class TalkingHead:
    """One synthetic clip: the speech, the motion tracks that follow from it and from the seed, and its frames."""

    spec: TalkingHeadSpec
    waveform: np.ndarray  # [samples] float32 at 16 kHz
    rig: FaceRig
    opening: np.ndarray  # [N] mouth opening 0..1, from the speech envelope
    closure: np.ndarray  # [N] eyelid closure 0..1, random blinks
    sway: np.ndarray  # [N, 2, 3] head motion

    def frames(self) -> Iterator[np.ndarray]:
        for opening, closure, sway in zip(self.opening, self.closure, self.sway):
            yield self.rig.frame(float(opening), float(closure), sway)


def talking_head(spec: TalkingHeadSpec, photo: np.ndarray, landmarks: np.ndarray) -> TalkingHead:
    """The clip `spec` describes, from the photo ([H, W, 3] uint8) and its face-mesh landmarks ([478, 2] pixels)."""
    waveform = utterance_waveform(spec.utterance, spec.seconds, spec.gain, clip_rng(spec.seed, spec.index, "speech"))
    num_frames = num_video_frames(len(waveform), FPS)
    still, points = still_portrait(photo, landmarks, spec)
    rig = FaceRig(still, points)
    centre = (float(points[:, 0].mean()), float(points[:, 1].mean()))
    return TalkingHead(
        spec,
        waveform,
        rig,
        mouth_opening(speech_envelope(waveform, num_frames, FPS)),
        blink_track(num_frames, clip_rng(spec.seed, spec.index, "blinks")),
        sway_track(num_frames, centre, spec.height, clip_rng(spec.seed, spec.index, "sway")),
    )


def photo_landmarks(photos: tuple[Path, ...], analyzer=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each photo as RGB uint8 and its face-mesh landmarks, found once per photo (the project's face module)."""
    from hallo3.preprocessing.face import FaceAnalyzer
    from hallo3.preprocessing.image import load_image

    analyzer = analyzer or FaceAnalyzer(min_face_size=32)
    found = {}
    for photo in photos:
        image = load_image(photo)
        found[str(photo)] = (np.asarray(image), analyzer.analyze(image, name=f"photo {photo}").landmarks)
    return found


def write_talking_head(clip: TalkingHead, output: Path) -> None:
    """`videos/NAME.mp4` (frames + speech), `captions/NAME.txt`, `portraits/NAME.png` (the still frame: the portrait
    to evaluate against), then the clip's line in `manifest.jsonl` (so a listed clip is a complete one)."""
    name = clip.spec.name
    (output / "captions" / f"{name}.txt").write_text(CAPTION + "\n")
    Image.fromarray(clip.rig.still).save(output / "portraits" / f"{name}.png")
    with tempfile.TemporaryDirectory(prefix="hallo3-speech-") as folder:
        audio = Path(folder) / f"{name}.wav"
        soundfile.write(audio, clip.waveform, SAMPLE_RATE, subtype="FLOAT")
        with VideoWriter(output / "videos" / f"{name}.mp4", fps=FPS, audio_path=audio) as writer:
            for frame in clip.frames():
                writer.write(frame[None])
    with open(output / "manifest.jsonl", "a") as manifest:
        manifest.write(json.dumps(asdict(clip.spec)) + "\n")


def make_talking_heads(
    output: Path,
    count: int,
    seed: int,
    photos: tuple[Path, ...] = DEFAULT_PHOTOS,
    split: str = "train",
    size: tuple[int, int] = DEFAULT_SIZE,
    seconds: float = DEFAULT_CLIP_SECONDS,
) -> list[str]:
    """Write clips 0..count-1 of the run `seed` into `output` (the layout `train.prepare_dataset` reads); returns the
    names written. A clip already listed in `output/manifest.jsonl` with the same spec is kept (a rerun resumes); one
    listed with another spec, or a video that the manifest does not list, stops the run before anything is written."""
    output.mkdir(parents=True, exist_ok=True)
    for folder in ("videos", "captions", "portraits"):
        (output / folder).mkdir(exist_ok=True)
    listed: dict[str, dict] = {}
    manifest = output / "manifest.jsonl"
    if manifest.is_file():
        for line in manifest.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                listed[entry["name"]] = entry
    specs = [draw_spec(seed, index, photos, split, size, seconds) for index in range(count)]
    for spec in specs:
        entry = json.loads(json.dumps(asdict(spec)))  # as the manifest holds it (lists, not tuples)
        video = output / "videos" / f"{spec.name}.mp4"
        if spec.name in listed and listed[spec.name] != entry:
            raise ValueError(f"{video}: made with other settings (see {manifest}); use another --output.")
        if video.exists() and spec.name not in listed:
            raise ValueError(f"{video}: exists but is not in {manifest}; use another --output.")
    todo = [spec for spec in specs if spec.name not in listed]
    sources = photo_landmarks(tuple(sorted({Path(spec.photo) for spec in todo}))) if todo else {}
    for spec in todo:
        write_talking_head(talking_head(spec, *sources[spec.photo]), output)
    return [spec.name for spec in todo]


def talking_heads_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.synthetic_data talking-heads",
        description="Synthetic talking heads whose lips follow espeak-ng speech (mouth, blinks, head sway).",
    )
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True, help="how many clips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=sorted(SPLITS), default="train", help="sentences and voices to use")
    parser.add_argument("--photos", type=Path, nargs="+", default=list(DEFAULT_PHOTOS))
    parser.add_argument("--height", type=int, default=DEFAULT_SIZE[0])
    parser.add_argument("--width", type=int, default=DEFAULT_SIZE[1])
    parser.add_argument("--seconds", type=float, default=DEFAULT_CLIP_SECONDS, help="length of every clip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    problems = []
    if not 1 <= args.count <= 100_000:
        problems.append(f"--count must be 1..100000, got {args.count}")
    if not 0 <= args.seed < 2**32:
        problems.append(f"--seed must be 0..2^32-1, got {args.seed}")
    for flag, side in (("--height", args.height), ("--width", args.width)):
        if not (64 <= side <= 1024 and side % 16 == 0):
            problems.append(f"{flag} must be a multiple of 16 in 64..1024, got {side}")
    if not (math.isfinite(args.seconds) and 1.0 <= args.seconds <= 30.0):
        problems.append(f"--seconds must be 1..30, got {args.seconds}")
    if problems:
        print(f"error: {problems[0]}.", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        written = make_talking_heads(
            args.output, args.count, args.seed, tuple(args.photos), args.split, (args.height, args.width), args.seconds
        )
    except (ValueError, RuntimeError) as error:  # ImageError and FaceError are ValueErrors naming the photo
        print(f"error: {error}", file=sys.stderr)
        return 2
    minutes = (time.monotonic() - started) / 60
    rate = f" ({len(written) / minutes:.1f} clips/minute)" if written and minutes > 0 else ""
    print(f"wrote {len(written)} of {args.count} clips to {args.output}{rate}")
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["talking-heads"]:
        return talking_heads_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--photos", type=Path, nargs="+", default=[Path("assets/examples/0001.jpg"), Path("assets/examples/0008.jpg")]
    )
    parser.add_argument("--seconds", type=float, default=3.2)
    parser.add_argument(
        "--face-box", type=float, nargs=4, default=None, help="face box as fractions, for photos not in the table"
    )
    args = parser.parse_args(argv)
    (args.output / "videos").mkdir(parents=True, exist_ok=True)
    (args.output / "captions").mkdir(parents=True, exist_ok=True)
    for seed, photo in enumerate(args.photos):
        face_box = tuple(args.face_box) if args.face_box else None
        try:
            talking_video(
                args.output / "videos" / f"{photo.stem}.mp4", photo, args.seconds, seed=seed, face_box=face_box
            )
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        (args.output / "captions" / f"{photo.stem}.txt").write_text("a person talking to the camera")
    print(f"wrote {len(args.photos)} videos to {args.output / 'videos'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
