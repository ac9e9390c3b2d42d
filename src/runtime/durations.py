"""Durations as the logs and tools print them (H:MM:SS, days first beyond 24 h). Standard library only: the
tools import it without torch."""
from datetime import timedelta


def format_eta(seconds):
    seconds = max(0, int(seconds))
    return str(timedelta(seconds=seconds))
