"""Audio windows and the clip loop's audio alignment, on synthetic data."""

import torch

from hallo3.clip_loop import audio_windows, clip_audio_indices, gather_clip_audio, num_clips


def test_windows_are_neighbours_clamped_at_the_ends():
    features = torch.arange(6.0).view(6, 1, 1)
    windows = audio_windows(features, window=5)[..., 0, 0]
    assert windows[0].tolist() == [0, 0, 0, 1, 2]
    assert windows[3].tolist() == [1, 2, 3, 4, 5]
    assert windows[5].tolist() == [3, 4, 5, 5, 5]


def test_every_output_frame_is_conditioned_on_its_own_audio_frame():
    """Clip k keeps frames K..48; kept frame j of the video must have seen audio frame j."""
    for num_frames, motion in ((262, 2), (49, 2), (48, 2), (100, 1), (95, 3), (60, 0)):
        padded = -(-num_frames // 49) * 49  # the encoder pads the waveform to whole clips
        seen = []
        for clip in range(num_clips(num_frames, 49, motion)):
            indices = clip_audio_indices(clip, padded, 49, motion)
            assert len(indices) == 49
            if clip == 0:
                assert (indices[:motion] == -1).all()  # the first clip's motion frames hear silence
            else:
                previous = clip_audio_indices(clip - 1, padded, 49, motion)
                assert torch.equal(indices[:motion], previous[49 - motion :][:motion]) or motion == 0
            seen += indices[motion:].tolist()
        assert seen[:num_frames] == list(range(num_frames)), (num_frames, motion)


def test_official_clip_count_minus_the_all_cut_clip():
    # 10.45 s -> 262 frames; the official loop pads to 294 and runs ceil(294 / 47) = 7 clips, the 7th fully cut
    assert num_clips(262) == 6
    assert num_clips(47) == 1 and num_clips(48) == 2


def test_gather_gives_silence_for_the_prefix():
    windows = torch.arange(1.0, 11.0).view(10, 1, 1, 1)
    clip = gather_clip_audio(windows, torch.tensor([-1, -1, 0, 9]))
    assert clip.flatten().tolist() == [0, 0, 1, 10]
