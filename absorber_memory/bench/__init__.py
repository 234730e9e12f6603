"""The benchmark suite: does absorbing into weights beat the alternatives, and at what cost?

`absorber-memory bench {fidelity,latency,ablations,all} [--quick]` (or
`python -m absorber_memory.bench ...`). Modules: `data` (offline
conversations and long text), `methods` (the memory methods and their
scoring), `experiments` (fidelity vs. baselines with dev-split tuning, and
ablations), `latency` (decode latency and memory vs. transcript length),
`report` (JSON, markdown, plots), `cli`.
"""
