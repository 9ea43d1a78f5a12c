"""The on-device contract: ``run_candidates.py``'s numpy-only checks (device_check, device_guard),
the files an output ships for them, and the emulated aarch64 board."""
