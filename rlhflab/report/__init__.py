"""The run report: one self-contained HTML page of charts, samples and a walkthrough.

sections.py     reads a run directory and renders each section; write_report, `rlhflab report`
generic.py      the page of an eval directory made without the lab world
html.py         HTML helpers (a leaf)
charts.py       matplotlib figures as embedded PNGs
walkthrough.py  one real example per stage: written by `rlhflab run`, drawn in the report
"""
