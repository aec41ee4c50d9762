"""Tests of the agent library (``agent_client``)."""
