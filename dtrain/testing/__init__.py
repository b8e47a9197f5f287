"""Helpers for testing dtrain itself: failure injection (`faults`) and peer launching (`peers`)."""
