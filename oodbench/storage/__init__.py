"""Storage, the lowest floor: verified files (`files`, `entries`), the output, layer and
fit-state caches (`caches`) and the SQLite results database (`store`). It imports nothing
of oodbench above `errors`, `identity` and `outputs`; everything else builds on it."""
