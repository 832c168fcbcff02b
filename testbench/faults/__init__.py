"""The fault campaign behind ``mirrorfw faults``: crash points, link faults,
device faults, fuzzers and a load test, each a module with one ``run_*``
function returning the counters of faults/results.json (RESULTS.md).

Every part is seeded and bounded in time; a loss or inconsistency counter
above zero makes the campaign fail.
"""
