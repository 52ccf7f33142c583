"""Launchers for the real stand-ins the tests talk to over the network."""
