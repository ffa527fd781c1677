"""How close a stand-in comes to the full cache, one definition of each number: module errors, next-token
agreement and KL, per-layer gaps, greedy answers' similarity. Shared by the compile's own validation
and by `nectar eval`."""
