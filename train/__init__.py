"""Training for both Hallo3 stages; imports hallo3's model, preprocessing and scheduler code, copies none of it."""
