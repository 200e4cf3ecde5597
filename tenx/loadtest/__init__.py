"""`tenx loadtest`: the 10x litmus test of a running stack.

- `steps`: open-loop load at 1x/3x/5x/10x of a base rate (or of the capacity it finds)
  against the model server or the feature API, per priority class, with cost per step.
- `faults`: one component stopped mid-step and restarted; a timeline around it.
- `pipelines`: the batch backfill and the stream job at 1x and 10x events.
- `report`: the terminal table, JSON and a self-contained HTML report with plots.
"""
