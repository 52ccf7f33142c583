"""Test and benchmark helpers that stand in for the network between the operator and a cloud."""
