"""The benchmark machinery both entry points use: `jobs` (the one env constructor and the one way
to play seeded episodes), `learners` (train's), `suite` (evaluate's run), `oracle`, `stats`,
`report` (tables), `plots`, `records` and `replay` (replays.json, `python -m esper_gym.validate`).
No Hydra here: every function takes plain values."""
