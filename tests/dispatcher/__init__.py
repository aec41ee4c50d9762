"""Tests of the hub (``dispatcher``): transport, handshake, bad input, commands."""
