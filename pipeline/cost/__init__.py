"""Cost: prices as data, estimates before spend, budgets held atomically."""
