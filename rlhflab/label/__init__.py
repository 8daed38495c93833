"""The labeling app (docs/design.md §6): labelers rank K samples or write demonstrations.

  db.py      the SQLite store: labelers (hashed tokens), items, assignments, labels,
             inter-labeler agreement and the JSONL export
  server.py  a standard-library HTTP server for the labeler and owner pages
  cli.py     `rlhflab label serve | add-labeler | load | export | status`

The export is the §3 JSONL that `rlhflab rm` and `rlhflab sft` read.
"""
