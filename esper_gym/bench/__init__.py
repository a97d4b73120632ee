"""The benchmark machinery both entry points use: `jobs` (the one way to play seeded episodes
and collect their metrics) and `report` (the tables printed after a run). No Hydra here: every
function takes plain values."""
