"""File inputs -> what the pipeline takes: framed images, face mask and embedding, 16 kHz waveform."""
