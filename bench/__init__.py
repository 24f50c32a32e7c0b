"""The benchmark of issue 6: `make bench` (or `python -m bench`), against the real stack on loopback.

Sections, each a module: `connectable` (time to connectable and its breakdown, with the naive
baseline), `density` (memory of idle instances), `api_load` (the API under load over 10,000
rows), `reconcile` (one reconcile pass), `snapshots` (snapshot, restore and clone of 100 MB, with
the naive dump-and-load baselines, over the data of `datasets`), `pitr` (point-in-time restore and
clone of the same 100 MB after 10,000 writes, with the base snapshot's restore as baseline),
`changes` (a live PATCH of an instance's memory size, with a setting applied by restart as
baseline).
`stack` starts and stops the processes, `client` talks to the API, `report` writes
`bench/results.json` and prints the Markdown table.
"""
