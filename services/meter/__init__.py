"""meter: counts what each neighbor forwards through us and we through it,
prices it, keeps one netted ledger per neighbor, and throttles or cuts off
neighbors whose debt crosses the thresholds."""
