"""Deterministic simulation of whole sessions from one seed (issue 14):
testbench/sim/engine.py runs one seed, model.py is the reference model,
world.py the controllers, links and devices, campaign.py runs seeds (and the
fault campaign, and a trace-replay matrix) on Dask."""
